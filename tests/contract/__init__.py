"""Contract suites: one set of checks that a test double and the real thing must both pass.

backend.py holds the systemd backend's; test_backend_fake.py runs it against FakeBackend, and
tests/e2e/test_backend.py against DBusSystemdBackend and systemd in the testbed.
"""
