"""The systemd testbed: Debian trixie with systemd 257 booted in systemd-nspawn, as root.

    from testbed import Testbed
    with Testbed.boot() as bed:
        bed.as_user("alice", "capsulectl", "list").check()

rootfs.py builds and caches the tree, bed.py boots it and runs commands, demo.py is the
narrated walkthrough behind `make demo`, and `python3 -m testbed shell|demo|build` drives them.
"""

from testbed.bed import USERS, Result, Testbed, install_signal_handlers
from testbed.errors import CommandTimeout, TestbedError, TestbedUnavailable

__all__ = [
    "USERS",
    "CommandTimeout",
    "Result",
    "Testbed",
    "TestbedError",
    "TestbedUnavailable",
    "install_signal_handlers",
]
