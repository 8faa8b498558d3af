"""Programs that e2e tests run *inside* the testbed, as real modules that ruff and mypy check.

Each is run from the bind-mounted checkout with `Testbed.run_module()` (`python3 -m
e2e.inbed.NAME` with PYTHONPATH=/src/tests), by the bed's system python3: the installed capsuled
wheel, Debian's python3-jeepney and python3-systemd, the standard library, and no pytest. They
print one JSON document (or one per line) for the test on the host to judge, and assert nothing
a test should check: the test reads what they saw and asserts there.

Keep them importable without side effects (the work is under `if __name__ == "__main__"`), and
free of host-only imports (testbed, pytest).
"""
