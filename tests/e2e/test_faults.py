"""The fault proof (issue 11, "Then prove it"): crashes and failures around the helper, against
real systemd in the testbed.

    make faults                                   # the full proof: 100 SIGKILLed calls
    pytest tests/e2e/test_faults.py               # what CI runs: 10 of them, and the rest

- SIGKILL at seeded random points inside Create, Remove, InstallUnit, SetLimits, SetAutostart
  (CAPSULED_FAULT_RUNS runs, CAPSULED_FAULT_SEED; e2e/inbed/faults.py): after socket activation
  every record agrees with systemd and the retried call succeeds.
- polkitd SIGKILLed in the middle of a check: that call is denied, the next ones are decided.
- `systemctl daemon-reexec` during calls: each is answered (PID 1 comes back under a new bus
  name), and the calls after it work.
- /var/lib/capsuled full (a tiny tmpfs): RecordsUnwritable, no record half written, nothing
  in systemd; the same call works once there is room.
- journald stopped: calls still work, in a helper that was running and in one started after.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from e2e.conftest import remove_capsule
from e2e.vcall import call as vcall
from testbed import Testbed

pytestmark = pytest.mark.e2e

FAULT_RUNS = int(os.environ.get("CAPSULED_FAULT_RUNS", "10"))
FAULT_SEED = int(os.environ.get("CAPSULED_FAULT_SEED", "20261211"))
RUN_TIMEOUT_S = 60.0  # per killed call, its checks and its retry


@pytest.fixture
def prefix(bed: Testbed) -> Iterator[str]:
    """A name prefix for this test's capsules; all of them are removed afterwards."""
    value = f"f-{secrets.token_hex(3)}"
    yield value
    listing = bed.as_root("ls", "/var/lib/private/capsules").stdout.split()
    records = bed.as_root("ls", "/var/lib/capsuled/capsules").stdout.split()
    names = {n for n in listing if value in n}
    names |= {r.removesuffix(".json") for r in records if value in r}
    for name in names | {f"{value}-m"}:
        remove_capsule(bed, name)


def test_sigkill_inside_calls_leaves_records_that_agree_with_systemd(
    bed: Testbed, prefix: str
) -> None:
    config = json.dumps({"runs": FAULT_RUNS, "seed": FAULT_SEED, "prefix": prefix})
    result = bed.run_module(
        "root", "e2e.inbed.faults", "kill", config, timeout=60 + FAULT_RUNS * RUN_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    runs = report["runs"]
    print(json.dumps({"seed": report["seed"], "durations_s": report["durations_s"]}))
    for run in runs:
        print(json.dumps(run))
    assert len(runs) == FAULT_RUNS
    assert [r for r in runs if r["problems"]] == []
    assert [r for r in runs if not r["retry_accepted"]] == []
    # The kills landed inside calls (the killed call saw its connection closed), not only
    # between them.
    assert sum(1 for r in runs if r["killed_call_saw"] == "closed") >= FAULT_RUNS // 3


# -- helpers for the scenarios below ----------------------------------------------------------

POLL_S = 0.05
WAIT_S = 30.0


def in_background(bed: Testbed, user: str, method: str, **params: object) -> subprocess.Popen[str]:
    """A call as `user` in the bed, returned once it has been sent (e2e/inbed/faults.py)."""
    proc = subprocess.Popen(
        bed.module_command(user, "e2e.inbed.faults", "client", method, json.dumps(params)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "sent", proc.stderr.read() if proc.stderr else ""
    return proc


def reply_of(proc: subprocess.Popen[str], timeout: float = WAIT_S) -> dict[str, Any]:
    """What a background call got; fails the test if it got nothing within `timeout`."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"no answer within {timeout} s")
    assert proc.returncode == 0, err
    reply = json.loads(out.strip().splitlines()[-1])
    assert isinstance(reply, dict)
    return reply


def until(check: Callable[[], bool], what: str) -> None:
    """Wait (polling the bed) until `check()` holds."""
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(POLL_S)


def records_agree(bed: Testbed, prefix: str) -> list[str]:
    result = bed.run_module("root", "e2e.inbed.faults", "records", prefix)
    assert result.returncode == 0, result.stderr
    problems = json.loads(result.stdout)["problems"]
    assert isinstance(problems, list)
    return problems


# -- polkitd killed in the middle of a check --------------------------------------------------

# mallory is not in group `capsule`: her Create is polkit's to decide. For a name starting
# "slow-" the rule first runs `sleep` (polkit.spawn is synchronous), which keeps the check open
# long enough to kill polkitd under it.
SLOW_RULE = """\
polkit.addRule(function(action, subject) {
    if (action.id == "org.capsuled.create" && subject.user == "mallory") {
        if ((action.lookup("capsule") || "").indexOf("slow-") == 0) {
            polkit.spawn(["/bin/sleep", "20"]);
        }
        return polkit.Result.YES;
    }
});
"""
RULES_FILE = "/etc/polkit-1/rules.d/10-capsuled-faults.rules"


def test_polkitd_killed_mid_check_denies_that_call_and_later_ones_recover(
    bed: Testbed, prefix: str
) -> None:
    bed.as_root("sh", "-c", f"cat > {RULES_FILE}", input=SLOW_RULE).check()
    try:
        warm = f"{prefix}-p0"
        # polkitd re-reads rules.d on change: once mallory may create, the rule is in force.
        until(lambda: "error" not in ok_or_error(bed, "mallory", warm), "the polkit rule")
        slow = f"slow-{prefix}"
        proc = in_background(bed, "mallory", "Create", name=slow)
        until(lambda: bed.as_root("pgrep", "-u", "polkitd", "-x", "sleep").ok, "the slow check")
        bed.as_root("systemctl", "kill", "--signal=SIGKILL", "polkit.service").check()
        assert reply_of(proc) == {"error": "org.varlink.service.PermissionDenied", "parameters": {}}
        assert bed.as_root("test", "-e", f"/var/lib/private/capsules/{slow}").returncode == 1
        assert records_agree(bed, prefix) == []
        assert "slow-" not in bed.as_root("ls", "/var/lib/capsuled/capsules").stdout
        # polkitd is started again by the next check (bus activation): later calls recover.
        assert "error" not in ok_or_error(bed, "mallory", f"{prefix}-p1")
    finally:
        bed.as_root("rm", "-f", RULES_FILE)
        bed.as_root("pkill", "-u", "polkitd", "-x", "sleep")


def ok_or_error(bed: Testbed, user: str, name: str) -> dict[str, Any]:
    """Create NAME as user; the reply (the capsule is this test's: `prefix` removes it)."""
    return vcall(bed, user, "Create", {"name": name}).last


# -- PID 1 re-executing during calls ----------------------------------------------------------


def test_daemon_reexec_during_calls_leaves_them_answered_and_the_next_ones_working(
    bed: Testbed, prefix: str
) -> None:
    name = f"{prefix}-x"
    assert "error" not in ok_or_error(bed, "alice", name)
    for verb in ("Start", "Stop", "Start"):
        proc = in_background(bed, "alice", verb, name=name)
        bed.as_root("systemctl", "daemon-reexec").check()
        # Answered, and well within the job timeout (150 s): success, or a clear error.
        reply = reply_of(proc)
        assert reply.get("error") in (None, "org.capsuled.Manager.SystemdUnavailable"), reply
    # After the re-execution the helper (still the same one) works with the new PID 1.
    for verb, state in (("Stop", "inactive"), ("Start", "active"), ("Stop", "inactive")):
        reply = reply_of(in_background(bed, "alice", verb, name=name))
        assert "error" not in reply, reply
        assert reply["parameters"]["capsule"]["state"] == state


# -- /var/lib/capsuled full ---------------------------------------------------------------------


def test_a_full_records_directory_gives_a_clear_error_and_no_corrupt_record(
    bed: Testbed, prefix: str
) -> None:
    # The helper's mount namespace is made when it starts: stop it, then put a tiny tmpfs with
    # a copy of the records in place and fill it to the last block.
    bed.as_root("systemctl", "stop", "capsuled.service").check()
    bed.as_root(
        "sh",
        "-ec",
        "install -d -m 0700 /var/lib/capsuled; rm -rf /var/tmp/capsuled-saved; "
        "cp -a /var/lib/capsuled /var/tmp/capsuled-saved; "
        "mount -t tmpfs -o size=256k,mode=0700 tmpfs /var/lib/capsuled; "
        "cp -a /var/tmp/capsuled-saved/. /var/lib/capsuled/; "
        "dd if=/dev/zero of=/var/lib/capsuled/filler bs=1k 2>/dev/null || true",
    ).check()
    try:
        name = f"{prefix}-full"
        reply = vcall(bed, "alice", "Create", {"name": name}).last
        assert reply["error"] == "org.capsuled.Manager.RecordsUnwritable", reply
        assert "No space left on device" in reply["parameters"]["reason"]
        # Nothing half made: no record (not even a temporary one), nothing in systemd.
        assert records_agree(bed, prefix) == []
        assert name not in bed.as_root("ls", "-a", "/var/lib/capsuled/capsules").stdout
        assert bed.as_root("test", "-e", f"/var/lib/private/capsules/{name}").returncode == 1
        # With room again, the same call goes through.
        bed.as_root("rm", "/var/lib/capsuled/filler").check()
        assert "error" not in vcall(bed, "alice", "Create", {"name": name}).last
        assert records_agree(bed, prefix) == []
    finally:
        bed.as_root("systemctl", "stop", "capsuled.service")
        bed.as_root("umount", "/var/lib/capsuled")
        bed.as_root("rm", "-rf", "/var/tmp/capsuled-saved")


# -- journald stopped ---------------------------------------------------------------------------

JOURNALD = (
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "systemd-journald.service",
)


def test_calls_work_while_journald_is_stopped(bed: Testbed, prefix: str) -> None:
    bed.as_root("systemctl", "stop", *JOURNALD).check()
    try:
        assert bed.as_root("systemctl", "is-active", "systemd-journald.service").stdout.strip() != (
            "active"
        )
        # The helper was running when journald went; then one started without it.
        for fresh in (False, True):
            if fresh:
                bed.as_root("systemctl", "stop", "capsuled.service").check()
            name = f"{prefix}-j{int(fresh)}"
            steps: list[tuple[str, dict[str, object]]] = [
                ("Create", {"name": name, "start": True}),
                ("Describe", {"name": name}),
                ("Stop", {"name": name}),
                ("Remove", {"name": name}),
            ]
            for method, params in steps:
                reply = vcall(bed, "alice", method, params).last
                assert "error" not in reply, (method, fresh, reply)
    finally:
        bed.as_root("systemctl", "start", *JOURNALD)
    assert bed.as_root("systemctl", "is-active", "systemd-journald.service").stdout.strip() == (
        "active"
    )
