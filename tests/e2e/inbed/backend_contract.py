"""One check of the backend contract (contract/backend.py) against real systemd, as root.

    python3 -m e2e.inbed.backend_contract CHECK CAPSULE

Runs CHECK with DBusSystemdBackend (the installed wheel's) on capsule CAPSULE, which the test
cleans up afterwards; what the harness changed outside the capsule (a drop-in) it undoes itself.
Prints the check's observations as one JSON document; a failed check exits 1 with its traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from capsuled.systemd.backend import DBusSystemdBackend, SystemdBackend
from contract import backend as contract

TIMEOUT_S = 60.0  # a job or a clean waits at most this long


def systemctl(*args: str) -> str:
    return subprocess.run(["systemctl", *args], check=True, capture_output=True, text=True).stdout


class SystemdHarness:
    """The contract's world in the testbed: PID 1, systemctl and the file system."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.unit = f"capsule@{name}.service"
        self.backend: SystemdBackend = DBusSystemdBackend(
            job_timeout_s=TIMEOUT_S, clean_timeout_s=TIMEOUT_S
        )
        self._drivers: list[DBusSystemdBackend] = []
        self._dropins: list[Path] = []

    def driver(self) -> SystemdBackend:
        driver = DBusSystemdBackend(job_timeout_s=TIMEOUT_S, clean_timeout_s=TIMEOUT_S)
        self._drivers.append(driver)
        return driver

    async def start_outside(self) -> None:
        await asyncio.to_thread(systemctl, "start", self.unit)

    async def break_start(self) -> None:
        dropin = Path(f"/etc/systemd/system/{self.unit}.d")
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "contract.conf").write_text("[Service]\nExecStart=\nExecStart=/bin/false\n")
        self._dropins.append(dropin)
        await asyncio.to_thread(systemctl, "daemon-reload")

    async def write_unit_file(self, unit: str, text: str) -> None:
        # As root, like the tests before this harness: the capsule's manager only reads it.
        directory = Path(f"/var/lib/capsules/{self.name}/.config/systemd/user")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / unit).write_text(text)

    async def show(self, *properties: str) -> dict[str, str] | None:
        out = await asyncio.to_thread(systemctl, "show", "-p", ",".join(properties), self.unit)
        return dict(line.split("=", 1) for line in out.splitlines())

    def exists(self, path: str) -> bool | None:
        return os.path.lexists(path)

    def owner(self, path: str) -> int | None:
        return os.stat(path).st_uid

    async def close(self) -> None:
        for driver in self._drivers:
            await driver.close()
        await self.backend.close()
        for dropin in self._dropins:
            for f in dropin.iterdir():
                f.unlink()
            dropin.rmdir()
        if self._dropins:
            await asyncio.to_thread(systemctl, "daemon-reload")


async def run(check: str, name: str) -> contract.Observations:
    harness = SystemdHarness(name)
    try:
        return await contract.run(check, harness)
    finally:
        await harness.close()


def main(argv: list[str]) -> int:
    check, name = argv[1:]
    print(json.dumps(asyncio.run(run(check, name))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
