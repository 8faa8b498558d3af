"""Two capsules whose names are prefixes of each other, seen through capsuled.sdjournal (as root,
as the daemon reads it; test_journal.py).

    python3 -m e2e.inbed.journal_prefixes A B

Follows both capsules (and A's marker unit), starts a marker unit in each (B first: if A's
reader could see B's lines, they would arrive before A's own marker), waits on journal events,
bounded by STEP_S, until each follower has seen its capsule's marker, then reads the tails.
Prints one JSON document: followed_NAME, followed_unit, tail_NAME, unit_tail_NAME.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from capsuled.sdjournal import Follower, read_tail
from capsuled.wire import LogEntry

UNIT = "marker.service"
STEP_S = 20.0
TAIL_LINES = 200


def marker(name: str) -> str:
    return "hello-marker-" + name


async def until_marker(follower: Follower, name: str) -> list[LogEntry]:
    seen: list[LogEntry] = []

    async def scan() -> None:
        async for entry in follower:
            seen.append(entry.to_wire())
            if entry.message == marker(name):
                return

    await asyncio.wait_for(scan(), STEP_S)
    return seen


async def tail(name: str, unit: str | None) -> list[LogEntry]:
    entries = await asyncio.to_thread(read_tail, name, unit=unit, lines=TAIL_LINES, since_usec=None)
    return [e.to_wire() for e in entries]


async def observe(a: str, b: str) -> dict[str, object]:
    out: dict[str, object] = {}
    followers = {name: Follower(name, unit=None, after_cursor=None) for name in (a, b)}
    unit_follower = Follower(a, unit=UNIT, after_cursor=None)
    for f in (*followers.values(), unit_follower):
        await f.start()
    for name in (b, a):
        subprocess.run(
            [
                "systemd-run",
                "--quiet",
                "--capsule=" + name,
                "--unit=" + UNIT,
                "/bin/sh",
                "-c",
                # Still running when journald reads the line (see test_journal.py).
                "echo " + marker(name) + "; exec sleep 300",
            ],
            check=True,
        )
    for name, f in followers.items():
        out["followed_" + name] = await until_marker(f, name)
    out["followed_unit"] = await until_marker(unit_follower, a)
    for f in (*followers.values(), unit_follower):
        await f.aclose()
        await asyncio.wait_for(f.wait_closed(), STEP_S)
    for name in (a, b):
        out["tail_" + name] = await tail(name, None)
        out["unit_tail_" + name] = await tail(name, UNIT)
    return out


def main(argv: list[str]) -> int:
    a, b = argv[1:]
    json.dump(asyncio.run(observe(a, b)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
