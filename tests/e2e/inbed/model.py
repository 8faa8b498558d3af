"""The live capsule model seen from inside the testbed, as root (test_model.py).

    python3 -m e2e.inbed.model behind NAME   # systemctl start, a crash, systemctl stop
    python3 -m e2e.inbed.model reexec NAME   # daemon-reexec and daemon-reload of PID 1

Both hold a Watch of NAME open from the start: it keeps one capsuled process serving every
read (the daemon exits when idle), and its events say when capsuled has heard from PID 1, so
the reads that follow wait on an event, not on time. Every change is made with systemctl or
kill, behind capsuled's back. Prints one JSON document: what each read said after each step,
what systemd said, the events seen, and capsuled's MainPID at the start and at the end.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Callable

from e2e.inbed.wire import Connection, Message

Event = dict[str, object]
Doc = dict[str, object]
TIMEOUT_S = 60.0


def systemctl(*args: str) -> str:
    res = subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    if res.returncode != 0 and args[0] not in ("is-active", "show"):
        raise SystemExit(f"systemctl {' '.join(args)}: {res.returncode} {res.stderr}")
    return res.stdout.strip()


def helper_pid() -> int:
    return int(systemctl("show", "-p", "MainPID", "--value", "capsuled.service"))


def show(name: str) -> dict[str, str]:
    out = systemctl("show", "-p", "ActiveState,SubState,Result,MainPID", f"capsule@{name}.service")
    return dict(line.split("=", 1) for line in out.splitlines())


class Model:
    """One Watch of NAME (held open) and one connection for reads."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.watch = Connection(timeout_s=TIMEOUT_S)
        self.watch.send("Watch", {"names": [name]}, more=True)
        self.events: list[Event] = [self._event()]  # the snapshot: we are subscribed
        self.reads = Connection(timeout_s=TIMEOUT_S)

    def _event(self) -> Event:
        reply = self.watch.read()
        if "error" in reply:
            raise SystemExit(f"Watch ended: {reply}")
        event = reply["parameters"]["event"]
        assert isinstance(event, dict), event
        return event

    def until(self, done: Callable[[Event], bool]) -> None:
        while not done(self.events[-1]):
            self.events.append(self._event())

    def reached(self, state: str) -> None:
        self.until(lambda e: e["kind"] == "capsule" and e["state"] == state)

    def call(self, method: str, **params: object) -> Message:
        reply = self.reads.call(method, params)
        if "error" in reply:
            raise SystemExit(f"{method}: {reply}")
        params = reply["parameters"]
        assert isinstance(params, dict), reply
        return params

    def read(self) -> Doc:
        """What Describe and List say of the capsule now, and systemd."""
        described = self.call("Describe", name=self.name)["capsule"]
        listed = [c for c in self.call("List")["capsules"] if c["name"] == self.name]
        return {"describe": described, "list": listed, "systemd": show(self.name)}


def behind(name: str) -> Doc:
    unit = f"capsule@{name}.service"
    model = Model(name)
    pid_before = helper_pid()
    steps: Doc = {"before": model.read()}
    systemctl("start", unit)
    model.reached("active")
    steps["started"] = model.read()
    steps["dynamic_uid"] = pwd.getpwnam(f"c-{name}").pw_uid  # while it runs (NSS, systemd)
    # A crash: the capsule's manager killed outright (Restart= is not set: it stays failed).
    os.kill(int(show(name)["MainPID"]), signal.SIGKILL)
    model.reached("failed")
    steps["crashed"] = model.read()
    systemctl("reset-failed", unit)
    model.reached("inactive")
    steps["reset"] = model.read()
    systemctl("start", unit)
    model.reached("active")
    systemctl("stop", unit)
    model.reached("inactive")
    steps["stopped"] = model.read()
    return {"steps": steps, "events": model.events, "pids": [pid_before, helper_pid()]}


def reexec(name: str) -> Doc:
    unit = f"capsule@{name}.service"
    model = Model(name)
    pid_before = helper_pid()
    systemctl("start", unit)
    model.reached("active")
    steps: Doc = {"started": model.read()}
    seen = len(model.events)
    # PID 1 re-executes: it takes a new unique name on the bus and loads every unit again.
    systemctl("daemon-reexec")
    steps["reexecuted"] = model.read()
    # A change after it still reaches the model: it follows PID 1 under its new name.
    systemctl("stop", unit)
    model.reached("inactive")
    steps["stopped_after_reexec"] = model.read()
    # And capsuled's own jobs see their JobRemoved, now sent under that name.
    steps["start_reply"] = model.call("Start", name=name)
    steps["started_after_reexec"] = model.read()
    model.reached("active")  # the stream's part of it, for events_after_reexec
    systemctl("daemon-reload")
    steps["reloaded"] = model.read()
    steps["stop_reply"] = model.call("Stop", name=name)
    model.reached("inactive")
    steps["stopped_after_reload"] = model.read()
    return {
        "steps": steps,
        "events_after_reexec": model.events[seen:],
        "pids": [pid_before, helper_pid()],
    }


def main(argv: list[str]) -> int:
    mode, name = argv[1:]
    scenarios = {"behind": behind, "reexec": reexec}
    if mode not in scenarios:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(scenarios[mode](name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
