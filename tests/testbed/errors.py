"""Exceptions of the testbed.

TestbedError                 something went wrong driving the testbed
├── TestbedUnavailable       a prerequisite is missing (not root, no nspawn, debootstrap
│                            failed): e2e tests fail under CI=true and skip otherwise
└── CommandTimeout           a command inside the container ran past its timeout
"""

from __future__ import annotations


class TestbedError(Exception):
    """Something went wrong driving the testbed."""

    __test__ = False  # not a pytest test class, despite the name


class TestbedUnavailable(TestbedError):
    """A prerequisite of the testbed is missing on this host."""


class CommandTimeout(TestbedError):
    """A command inside the container did not finish in time (it has been killed)."""

    def __init__(self, argv: tuple[str, ...], timeout: float, stdout: str, stderr: str) -> None:
        super().__init__(
            f"{' '.join(argv)!r} timed out after {timeout} s\n"
            f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        )
        self.argv = argv
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
