"""The fault proof's driver (tests/e2e/test_faults.py), run as root inside the testbed.

    python3 -m e2e.inbed.faults kill '{"runs": N, "seed": S, "prefix": P}'

`kill`: N runs, each one of Create, Remove, InstallUnit, SetLimits and SetAutostart in turn,
made by alice (a fresh process per call, as capsulectl would be), the helper SIGKILLed once the
call is sent, after a delay drawn from a seeded generator between 0 and the time the helper
took to answer that method unkilled (measured first). After each kill, the next connection
starts a fresh helper (socket activation); then the records are checked against systemd, the
same call is made again, and the outcome is checked. Prints one JSON report: the seed, each
run's method, delay and what the killed call saw, every disagreement found, and each retry's
outcome.

Other modes print what they saw for the test to judge:
    records PREFIX      the record check alone (for the other fault tests)

Records agree with systemd when: every record file parses as one of ours (records.py, as
installed); no temporary file of ours is left in the records directory; a capsule systemd has
a state directory for (of this test's names) has a record; a "ready" record's capsule has its
state directory. "creating" and "removing" are allowed between a killed call and its retry
(invariant 5: a retry finishes the job), and not after it.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from capsuled.records import CorruptRecord, RecordStore
from e2e.inbed.wire import Closed, Connection

RECORDS = Path("/var/lib/capsuled")
STATE_ROOT = Path("/var/lib/private/capsules")
WANTS = Path("/etc/systemd/system/multi-user.target.wants")
UNIT = "fault.service"
METHODS = ("Create", "Remove", "InstallUnit", "SetLimits", "SetAutostart")
CALL_TIMEOUT_S = 120.0
ALICE = "alice"

Reply = dict[str, Any]


def call(method: str, params: dict[str, object], user: str = ALICE) -> subprocess.Popen[str]:
    """A call as `user` in a process of its own (`client` mode below), returned once the call
    is on its way to the helper; read its reply with `outcome`."""
    argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
    proc = subprocess.Popen(
        [*argv, sys.executable, "-m", "e2e.inbed.faults", "client", method, json.dumps(params)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "sent" (or nothing, if it failed: outcome says how)
    return proc


def client(method: str, params: str) -> int:
    """`client` mode: connect, send the call, say "sent", print the reply (or {"closed": true})."""
    with Connection(timeout_s=CALL_TIMEOUT_S) as conn:
        conn.send(method, json.loads(params))
        print("sent", flush=True)
        try:
            print(json.dumps(conn.read()), flush=True)
        except Closed:
            print(json.dumps({"closed": True}), flush=True)
    return 0


def outcome(proc: subprocess.Popen[str]) -> Reply:
    """The reply the call got ({"closed": true} if the helper went away first)."""
    out, err = proc.communicate(timeout=CALL_TIMEOUT_S + 10)
    lines = [line for line in out.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"client-failed": err.strip()[-300:]}
    reply = json.loads(lines[-1])
    assert isinstance(reply, dict)
    return reply


def done(method: str, params: dict[str, object]) -> Reply:
    return outcome(call(method, params))


def timed(method: str, params: dict[str, object]) -> tuple[Reply, float]:
    """The reply, and the seconds from the call being sent to its reply."""
    proc = call(method, params)
    started = time.monotonic()
    assert proc.stdout is not None
    line = proc.stdout.readline()
    seconds = time.monotonic() - started
    reply = json.loads(line) if line.strip() else outcome(proc)
    proc.communicate()
    return reply, seconds


def kill_helper() -> None:
    subprocess.run(["systemctl", "kill", "--signal=SIGKILL", "capsuled.service"], check=False)


def record_problems(prefix: str) -> list[str]:
    """Disagreements between the records and systemd (see the module docstring)."""
    problems = []
    store = RecordStore(RECORDS)
    names = set()
    capsules = RECORDS / "capsules"
    for entry in sorted(os.listdir(capsules)) if capsules.is_dir() else []:
        if entry.startswith("."):
            problems.append(f"temporary file left in the records: {entry}")
            continue
        name = entry.removesuffix(".json")
        names.add(name)
        try:
            record = store.get(name)
        except CorruptRecord as exc:
            problems.append(f"corrupt record {entry}: {exc}")
            continue
        if record is not None and record.phase == "ready" and not (STATE_ROOT / name).is_dir():
            problems.append(f"{name}: record ready, but systemd has no state directory")
    for state in sorted(STATE_ROOT.iterdir()) if STATE_ROOT.is_dir() else []:
        if state.name.startswith(prefix) and state.name not in names:
            problems.append(f"{state.name}: systemd has a state directory, we have no record")
    return problems


def phase_of(name: str) -> str | None:
    record = RecordStore(RECORDS).get(name)
    return None if record is None else str(record.phase)


def systemd(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()


class Runs:
    """What each method's run calls, and how its end state is checked."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.shared = f"{prefix}-m"  # InstallUnit, SetLimits, SetAutostart act on this one
        self.alice = pwd.getpwnam(ALICE).pw_uid

    def prepare(self, method: str, i: int, rng: random.Random) -> dict[str, object]:
        if method == "Create":
            return {"name": f"{self.prefix}-c{i}", "start": rng.random() < 0.5}
        if method == "Remove":
            name = f"{self.prefix}-r{i}"
            done("Create", {"name": name})
            return {"name": name}
        if method == "InstallUnit":
            content = f"[Service]\nExecStart=/bin/true\n# run {i}\n"
            return {"name": self.shared, "unit": UNIT, "content": content, "enable": True}
        if method == "SetLimits":
            return {"name": self.shared, "memoryMax": rng.randrange(64, 512) * 1024 * 1024}
        return {"name": self.shared, "enabled": bool(i % 2)}

    def accepted(self, method: str, params: dict[str, object], reply: Reply) -> bool:
        """Whether the retry's answer is a success (or, for Create and Remove, says the killed
        call had got there already)."""
        error = reply.get("error")
        name = str(params["name"])
        if error is None and "closed" not in reply and "client-failed" not in reply:
            return True
        if method == "Create" and error == "org.capsuled.Manager.CapsuleExists":
            return phase_of(name) == "ready"
        if method == "Remove" and error == "org.capsuled.Manager.NoSuchCapsule":
            return phase_of(name) is None and not (STATE_ROOT / name).exists()
        return False

    def end_state(self, method: str, params: dict[str, object]) -> list[str]:
        """What must hold once the retried call has answered."""
        name = str(params["name"])
        store = RecordStore(RECORDS)
        problems = []
        if method == "Create":
            record = store.get(name)
            if record is None or record.phase != "ready" or record.owner != self.alice:
                problems.append(f"{name}: after Create, record {record}")
            if not (STATE_ROOT / name).is_dir():
                problems.append(f"{name}: after Create, no state directory")
        elif method == "Remove":
            if store.get(name) is not None or (STATE_ROOT / name).exists():
                problems.append(f"{name}: after Remove, record or state directory left")
        elif method == "InstallUnit":
            path = STATE_ROOT / name / ".config/systemd/user" / UNIT
            if not path.is_file() or path.read_text() != params["content"]:
                problems.append(f"{name}: after InstallUnit, {path} does not hold the content")
        elif method == "SetLimits":
            shown = systemd("systemctl", "show", "-P", "MemoryMax", f"capsule@{name}.service")
            if shown != str(params["memoryMax"]):
                problems.append(f"{name}: after SetLimits, MemoryMax={shown}")
        else:
            linked = (WANTS / f"capsule@{name}.service").is_symlink()
            if linked != params["enabled"]:
                problems.append(f"{name}: after SetAutostart({params['enabled']}), link {linked}")
        return problems


def calibrate(runs: Runs) -> dict[str, float]:
    """Each method's duration unkilled, on throwaway or the shared capsule."""
    done("Create", {"name": runs.shared, "start": True})
    durations = {}
    rng = random.Random(0)
    for method in METHODS:
        params = runs.prepare(method, 10_000, rng)
        reply, durations[method] = timed(method, params)
        if "error" in reply:
            raise SystemExit(f"calibration: {method} failed: {reply}")
    done("Remove", {"name": f"{runs.prefix}-c10000"})
    return durations


def kill_runs(config: dict[str, Any]) -> dict[str, object]:
    runs = Runs(str(config["prefix"]))
    seed = int(config["seed"])
    durations = calibrate(runs)
    report: list[dict[str, object]] = []
    for i in range(int(config["runs"])):
        method = METHODS[i % len(METHODS)]
        rng = random.Random(f"{seed}-{i}")
        params = runs.prepare(method, i, rng)
        delay = rng.uniform(0, durations[method])
        proc = call(method, params)
        time.sleep(delay)
        kill_helper()
        killed_saw = outcome(proc)
        after_kill = record_problems(runs.prefix)  # the next call activates a fresh helper
        retry = done(method, params)
        problems = after_kill + record_problems(runs.prefix) + runs.end_state(method, params)
        if phase_of(str(params["name"])) not in (None, "ready"):
            problems.append(f"{params['name']}: phase {phase_of(str(params['name']))} after retry")
        report.append(
            {
                "run": i,
                "method": method,
                "delay_s": round(delay, 3),
                "killed_call_saw": killed_saw.get(
                    "error", "closed" if "closed" in killed_saw else "ok"
                ),
                "retry": retry.get("error", "ok"),
                "retry_accepted": runs.accepted(method, params, retry),
                "problems": problems,
            }
        )
        if method == "Create":
            done("Remove", {"name": params["name"]})  # keep the bed small
    return {"seed": seed, "durations_s": {k: round(v, 3) for k, v in durations.items()},
            "runs": report}  # fmt: skip


def main(argv: list[str]) -> int:
    mode = argv[1]
    if mode == "client":
        return client(argv[2], argv[3])
    if mode == "kill":
        print(json.dumps(kill_runs(json.loads(argv[2]))), flush=True)
    elif mode == "records":
        print(json.dumps({"problems": record_problems(argv[2])}), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
