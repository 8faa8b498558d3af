"""capsuled.sdjournal against the real journal of systemd in the testbeds (257, the newest).

Everything runs inside the container as root (as the daemon does), through the installed
capsuled package: two capsules whose names are prefixes of each other ("NAME" and "NAME2", the
web/web2 case) each run a unit that prints a marker; each capsule must see its own marker with the
right unit, and never the other's.

The marker units keep running after printing (``exec sleep``): journald attributes a stdout line
to a unit by reading /proc/PID when the line arrives, and a process that has already exited leaves
the line without _SYSTEMD_UNIT/_SYSTEMD_CGROUP (seen on 257 with `/bin/echo`), so it would
belong to no capsule at all -- the same as for `journalctl -u`.
"""

from __future__ import annotations

import json

import pytest

from testbed.bed import Testbed

pytestmark = pytest.mark.e2e


def other_name(name: str) -> str:
    """A second capsule whose name has the first one as a prefix (web -> web2)."""
    return f"{name}2" if len(name) < 29 else f"{name[:-1]}2"


def messages(entries: list[dict[str, object]]) -> list[object]:
    return [e["message"] for e in entries]


def test_each_capsule_sees_its_own_marker_and_never_the_others(
    bed: Testbed, capsule_name: str
) -> None:
    a, b = capsule_name, other_name(capsule_name)
    try:
        for name in (a, b):
            bed.as_root("systemctl", "start", f"capsule@{name}.service").check()
        # Follows both, starts a marker unit in each, reads the tails: e2e/inbed/journal_prefixes.py
        result = bed.run_module("root", "e2e.inbed.journal_prefixes", a, b, timeout=120)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
    finally:
        for name in (a, b):
            bed.as_root("systemctl", "stop", f"capsule@{name}.service")
        bed.as_root("systemctl", "clean", "--what=all", f"capsule@{b}.service")

    mark_a, mark_b = f"hello-marker-{a}", f"hello-marker-{b}"
    for name, own, other in ((a, mark_a, mark_b), (b, mark_b, mark_a)):
        followed = out[f"followed_{name}"]
        assert messages(followed)[-1] == own
        assert other not in messages(followed)
        assert followed[-1]["unit"] == "marker.service"
        assert followed[-1]["identifier"] == "sh"

        tail = out[f"tail_{name}"]
        lines = [e for e in tail if e["message"] == own]
        assert len(lines) == 1, messages(tail)
        assert lines[0]["unit"] == "marker.service"
        assert isinstance(lines[0]["pid"], int)
        assert lines[0]["pid"] > 1
        assert other not in messages(tail)
        # PID 1's messages about the capsule service itself are part of the capsule's log.
        assert any(
            e["unit"] is None and f"capsule@{name}.service" in str(e["message"]) for e in tail
        ), messages(tail)
        timestamps = [e["timestamp"] for e in tail]
        assert timestamps == sorted(timestamps)

        unit_tail = out[f"unit_tail_{name}"]
        assert own in messages(unit_tail)
        assert {e["unit"] for e in unit_tail} == {"marker.service"}
        # The manager's "Started marker.service" comes with the unit, as with --user-unit.
        assert any(str(e["message"]).startswith("Started marker.service") for e in unit_tail)

    unit_followed = out["followed_unit"]
    assert messages(unit_followed)[-1] == mark_a
    assert {e["unit"] for e in unit_followed} == {"marker.service"}
    assert mark_b not in messages(unit_followed)
