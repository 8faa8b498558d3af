"""What the tests of capsulectl's command line share: running `capsulectl` against the scripted
fake capsuled and looking at what it printed. A test module imports the autouse fixture
`plain_env` (and lists it in `__all__`) so that it applies there."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from capsulectl import cli
from doubles.scripted_capsuled import FakeCapsuled

M = "org.capsuled.Manager."
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def json_lines(self) -> list[object]:
        return [json.loads(line) for line in self.out.splitlines()]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def capsulectl_(fake: FakeCapsuled, *argv: str, stdout: io.StringIO | None = None) -> Run:
    out = stdout if stdout is not None else io.StringIO()
    errs = io.StringIO()
    code = cli.main(["--address", fake.address, "--timeout", "5", *argv], out=out, err=errs)
    return Run(code, out.getvalue(), errs.getvalue())


@pytest.fixture(autouse=True)
def plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NO_COLOR", "SYSTEMD_COLORS", "CAPSULECTL_ADDRESS", "CAPSULECTL_SSH", "TERM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TZ", "UTC")


def call(method: str, **params: object) -> dict[str, object]:
    c: dict[str, object] = {"method": M + method}
    if params:
        c["parameters"] = params
    return c
