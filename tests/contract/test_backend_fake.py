"""The backend contract (contract/backend.py) against FakeBackend: the fake does what systemd
does, for every check the e2e suite also runs against PID 1 (tests/e2e/test_backend.py)."""

from __future__ import annotations

import asyncio

import pytest

from capsuled.systemd.backend import SystemdBackend
from contract import backend as contract
from doubles.backend import FakeBackend


class FakeHarness:
    """The contract's world in memory: the outside world is FakeBackend's test helpers."""

    def __init__(self) -> None:
        self.fake = FakeBackend()
        self.backend: SystemdBackend = self.fake
        self.name = "contract"

    def driver(self) -> SystemdBackend:
        return self.fake  # one systemd, one fake: every client sees the same state

    async def start_outside(self) -> None:
        self.fake.add_capsule(self.name, state="active")

    async def break_start(self) -> None:
        self.fake.fail_start.add(self.name)

    async def write_unit_file(self, unit: str, text: str) -> None:
        fake_unit = self.fake.add_unit(self.name, unit, enabled=False)
        if "[Install]" not in text:
            fake_unit.unit_file_state = "static"  # what systemd calls a unit it cannot enable

    async def show(self, *properties: str) -> dict[str, str] | None:
        return None

    def exists(self, path: str) -> bool | None:
        return None

    def owner(self, path: str) -> int | None:
        return None


@pytest.mark.parametrize("check", sorted(contract.CHECKS))
def test_the_fake_keeps_the_contract(check: str) -> None:
    harness = FakeHarness()
    observed = asyncio.run(contract.run(check, harness))
    assert isinstance(observed, dict)


def test_the_suite_is_the_one_the_e2e_tests_run() -> None:
    # Guard against an empty registry (every parametrized test above would vanish with it).
    assert len(contract.CHECKS) >= 10
    assert all(callable(c) for c in contract.CHECKS.values())
