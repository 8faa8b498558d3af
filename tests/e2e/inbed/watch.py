"""Watch streams seen from inside the testbed, as whichever user runs this (test_inside.py).

    python3 -m e2e.inbed.watch start-stop NAME       # Start, then Stop NAME while watching it
    python3 -m e2e.inbed.watch units NAME            # Start NAME; until web.service is active
    python3 -m e2e.inbed.watch hidden PRIVATE SHARED # snapshot, then a line on stdin, then...

Each prints the events it saw as one JSON list; `hidden` first prints the snapshot event on a
line of its own, then waits for a line on stdin (the test changes both capsules meanwhile) and
reads until SHARED is active.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from e2e.inbed.wire import Connection, Message

Event = dict[str, object]


def subscribe(names: list[str]) -> tuple[Connection, Event]:
    """Watch names; returns once the snapshot arrived, so we are subscribed."""
    watch = Connection()
    watch.send("Watch", {"names": names}, more=True)
    return watch, next_event(watch)


def next_event(watch: Connection) -> Event:
    event = watch.read()["parameters"]["event"]
    assert isinstance(event, dict), event
    return event


def events_until(watch: Connection, done: Callable[[Event], bool]) -> list[Event]:
    """Events up to and including the first for which done() is true."""
    seen = []
    while True:
        event = next_event(watch)
        seen.append(event)
        if done(event):
            return seen


def succeeded(reply: Message) -> Message:
    if "error" in reply:
        raise SystemExit(f"call failed: {reply}")
    return reply


def start_stop(name: str) -> list[Event]:
    watch, snapshot = subscribe([name])
    events = [snapshot]
    with Connection() as calls:
        for verb, want in (("Start", "active"), ("Stop", "inactive")):
            succeeded(calls.call(verb, {"name": name}))
            events += events_until(watch, capsule_reached(want))
    return events


def capsule_reached(state: str) -> Callable[[Event], bool]:
    return lambda e: e["kind"] == "capsule" and e["state"] == state


def units(name: str) -> list[Event]:
    watch, snapshot = subscribe([name])
    with Connection() as calls:
        calls.send("Start", {"name": name})
        later = events_until(
            watch,
            lambda e: e["kind"] == "unit" and e["unit"] == "web.service" and e["state"] == "active",
        )
    return [snapshot, *later]


def hidden(private: str, shared: str) -> list[Event]:
    watch, snapshot = subscribe([private, shared])  # the snapshot: only what we may read
    print(json.dumps(snapshot), flush=True)
    sys.stdin.readline()  # the test starts the private capsule, then the shared one
    later = events_until(
        watch,
        lambda e: e["capsule"] == shared and e["kind"] == "capsule" and e["state"] == "active",
    )
    return [snapshot, *later]


def main(argv: list[str]) -> int:
    mode, *names = argv[1:]
    if mode == "start-stop":
        events = start_stop(*names)
    elif mode == "units":
        events = units(*names)
    elif mode == "hidden":
        events = hidden(*names)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(events), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
