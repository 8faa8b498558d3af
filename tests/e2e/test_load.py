"""The load proof (issue 11, "Then prove it"): hostile connections from three uids while a
well-behaved client works, against the real socket-activated helper in the testbed.

    make load                                   # the full proof: 500 connections for 60 s
    CAPSULED_LOAD_SECONDS=10 pytest tests/e2e/test_load.py -s    # what CI runs

Ten accounts (bob, carol, mallory and seven made for the test; CAPSULED_LOAD_UIDS) keep
CAPSULED_LOAD_CONNECTIONS (default 500) hostile connections open between them: idle, one byte
a second, an unterminated call of the helper's whole message cap, pipelined floods of valid
calls (e2e/inbed/hostile.py), each reopened a second after the helper closed or refused it.
Meanwhile alice makes one call after another on fresh connections (e2e/inbed/steady.py) and
root samples the helper's memory and fds (e2e/inbed/monitor.py).

What must hold: none of alice's calls fails; the helper never restarts; its resident memory stays
under RSS_BOUND_MIB (the bound capsuled.service's comment documents); afterwards its open fds are
back to what they were and its memory within RSS_SLACK_MIB of it. "Before" is measured after a
short warm-up round of the same attack: a helper's first polkit check, first refusal and so on
load code and fill caches once (about 17 MiB in the testbed, not given back, and not growing
on later rounds). alice's p99 latency within
10x of the unloaded run's is asserted by `make load` (CAPSULED_LOAD_LATENCY_BOUND=1) only: on
the shared 2-core CI machine a timing assertion would fail for reasons not the helper's (design
brief: no timing assertions in tests); the slice prints the ratio.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import time
from dataclasses import dataclass

import pytest

from e2e.vcall import ok
from testbed import Testbed
from testbed.bed import POLL_INTERVAL_S
from testbed.errors import TestbedError

pytestmark = pytest.mark.e2e

LOAD_SECONDS = float(os.environ.get("CAPSULED_LOAD_SECONDS", "10"))
HOSTILE_CONNECTIONS = int(os.environ.get("CAPSULED_LOAD_CONNECTIONS", "500"))
ASSERT_LATENCY = os.environ.get("CAPSULED_LOAD_LATENCY_BOUND", "") == "1"
# bob, carol and mallory, and as many more accounts as CAPSULED_LOAD_UIDS asks for (made for the
# test): with 1/16 of the connections per account, ten accounts hold 320 of the 512 at once.
HOSTILE_UIDS = int(os.environ.get("CAPSULED_LOAD_UIDS", "10"))
NAMED_USERS = ("bob", "carol", "mallory")
# The helper's message cap (transport.MAX_CALL_BYTES) less a little: held, not refused.
UNTERMINATED_BYTES = 1024 * 1024 - 64
RETRY_S = 1.0
RSS_BOUND_MIB = 256
RSS_SLACK_MIB = 16
LATENCY_FACTOR = 10.0
SETTLE_TIMEOUT_S = 30.0
WARMUP_SECONDS = 3.0


@dataclass(frozen=True)
class HelperState:
    pid: int
    rss_kib: int
    fds: int


def helper_state(bed: Testbed) -> HelperState:
    pid = int(bed.as_root("systemctl", "show", "-P", "MainPID", "capsuled.service").stdout)
    status = bed.as_root("cat", f"/proc/{pid}/status").check().stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    fds = bed.as_root("ls", f"/proc/{pid}/fd").check().stdout.split()
    return HelperState(pid, int(fields["VmRSS"].split()[0]), len(fds))


def start(
    bed: Testbed, user: str, module: str, *args: str, nice: bool = False
) -> subprocess.Popen[str]:
    argv = bed.module_command(user, module, *args)
    if nice:
        # The hostile clients run at the lowest priority: on a host, cgroup CPU weights keep
        # users' processes (user.slice) from starving system services (system.slice); the
        # testbed's host delegates no cpu controller, so without this the kernel would share
        # the two cores thread by thread, and the helper's latency would measure the
        # attackers' Python more than the helper.
        python = argv.index("python3")
        argv[python:python] = ["nice", "-n", "19"]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    value = json.loads(out.strip().splitlines()[-1])
    assert isinstance(value, dict)
    return value


def p99(latencies: object) -> float:
    assert isinstance(latencies, list)
    assert latencies, "no calls were made"
    return float(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))])


def steady(bed: Testbed, capsule: str, seconds: float) -> dict[str, object]:
    config = json.dumps({"seconds": seconds, "capsule": capsule, "pause_s": 0.02})
    return result(start(bed, "alice", "e2e.inbed.steady", config), seconds + 60)


def hostile_users(bed: Testbed) -> list[str]:
    """The hostile accounts: the bed's bob, carol, mallory, then loadN users made here."""
    extra = [f"load{i}" for i in range(max(0, HOSTILE_UIDS - len(NAMED_USERS)))]
    for user in extra:
        if bed.as_root("id", user).returncode != 0:
            bed.as_root("useradd", "--create-home", "--user-group", user).check()
    return [*NAMED_USERS[:HOSTILE_UIDS], *extra]


def hostile_config(seconds: float, users: int) -> str:
    per_user = HOSTILE_CONNECTIONS // users
    quarter = per_user // 4
    return json.dumps(
        {
            "seconds": seconds,
            "idle": quarter,
            "trickle": quarter,
            "unterminated": quarter,
            "flood": per_user - 3 * quarter,
            "size": UNTERMINATED_BYTES,
            "retry_s": RETRY_S,
        }
    )


def _tally(tallies: object, kind: str, what: str) -> int:
    assert isinstance(tallies, dict)
    value = tallies[kind][what]
    assert isinstance(value, int)
    return value


def settled(bed: Testbed, before: HelperState) -> HelperState:
    """The helper's state once it holds no more fds than `before` (its clients are gone; a
    call the helper was still answering when its client left may take a moment to end)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while (now := helper_state(bed)).fds > before.fds:
        if time.monotonic() > deadline:
            raise TestbedError(f"the helper still holds {now.fds} fds, {before.fds} before")
        time.sleep(POLL_INTERVAL_S * 10)
    return now


def hostile_round(bed: Testbed, users: list[str], seconds: float) -> list[dict[str, object]]:
    """Every hostile account's connections for `seconds`; what each saw."""
    config = hostile_config(seconds, len(users))
    attackers = [start(bed, user, "e2e.inbed.hostile", config, nice=True) for user in users]
    for proc in attackers:  # each prints a line once its connections are on their way
        assert proc.stdout is not None
        assert "started" in proc.stdout.readline()
    return [result(proc, seconds + 60) for proc in attackers]


def test_the_helper_serves_well_behaved_clients_through_hostile_load(
    bed: Testbed, capsule_name: str
) -> None:
    ok(bed, "alice", "Create", name=capsule_name)
    users = hostile_users(bed)
    # Warm-up: every code path the load takes runs once (polkit's, the refusals', lazily
    # imported modules), so that "before" is the baseline of a helper that has served it all.
    hostile_round(bed, users, WARMUP_SECONDS)
    unloaded = steady(bed, capsule_name, max(3.0, LOAD_SECONDS / 2))
    assert unloaded["failures"] == []
    before = helper_state(bed)

    monitor = start(bed, "root", "e2e.inbed.monitor", str(LOAD_SECONDS + 5), "0.25")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        attacking = pool.submit(hostile_round, bed, users, LOAD_SECONDS + 5)
        loaded = steady(bed, capsule_name, LOAD_SECONDS)
        seen = attacking.result(LOAD_SECONDS + 120)
    watched = result(monitor, LOAD_SECONDS + 60)
    after = settled(bed, before)
    ratio = p99(loaded["latencies_ms"]) / p99(unloaded["latencies_ms"])
    report = {
        "unloaded": {
            "calls": unloaded["calls"],
            "p99_ms": p99(unloaded["latencies_ms"]),
            "worst_ms": unloaded["worst_ms_by_method"],
        },
        "loaded": {
            "calls": loaded["calls"],
            "p99_ms": p99(loaded["latencies_ms"]),
            "worst_ms": loaded["worst_ms_by_method"],
        },
        "p99_ratio": round(ratio, 2),
        "helper": {"before": before.__dict__, "peak": watched, "after": after.__dict__},
        "hostile": dict(zip(users, seen, strict=True)),
    }
    print(json.dumps(report, indent=1))

    assert loaded["failures"] == [], loaded["failures"]
    assert watched["pids"] == [before.pid], "the helper restarted under load"
    assert after.pid == before.pid
    assert isinstance(watched["max_rss_kib"], int)
    assert watched["max_rss_kib"] < RSS_BOUND_MIB * 1024
    assert after.fds == before.fds
    assert after.rss_kib < before.rss_kib + RSS_SLACK_MIB * 1024
    # The attack was real: every kind of hostile connection got through to the helper.
    for kind in ("idle", "trickle", "unterminated", "flood"):
        assert sum(_tally(tallies, kind, "admitted") for tallies in seen) > 0, kind
    if ASSERT_LATENCY:
        assert ratio <= LATENCY_FACTOR, report
