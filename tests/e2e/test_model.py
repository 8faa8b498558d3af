"""The live capsule model (capsuled.systemd.model) is never visibly stale, against real systemd.

Reads (Describe, List, Watch) answer from what capsuled has heard from PID 1, not from a
question to it. Each promise of issue 12 is tried here with one helper process serving every
read (its MainPID is compared): after a call returns, the next read reflects it; a change made
behind capsuled's back shows once PID 1 has signalled it (a Watch event says when); after PID 1
re-executes or reloads, reads are right again before they answer. The bus connection dropping
is test_zz_systemd_unavailable.py's (stopping D-Bus disturbs the rest of the bed).

Every read is also held to what systemd itself says (systemctl show), so neither can lie.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from e2e.vcall import ok
from testbed import Testbed

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
Step = dict[str, Any]


def helper_pid(bed: Testbed) -> int:
    out = bed.as_root("systemctl", "show", "-p", "MainPID", "--value", "capsuled.service")
    return int(out.check().stdout.strip())


def in_bed(bed: Testbed, mode: str, name: str) -> dict[str, Any]:
    res = bed.run_module("root", "e2e.inbed.model", mode, name, timeout=240).check()
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert isinstance(out, dict)
    return out


def agrees(step: Step, state: str, sub: str) -> dict[str, Any]:
    """Describe, List and systemd all say STATE/SUB; Describe's capsule."""
    described, listed, systemd = step["describe"], step["list"], step["systemd"]
    assert (systemd["ActiveState"], systemd["SubState"]) == (state, sub)
    assert (described["state"], described["subState"]) == (state, sub)
    assert len(listed) == 1
    assert (listed[0]["state"], listed[0]["subState"]) == (state, sub)
    assert described["result"] == systemd["Result"]
    assert isinstance(described, dict)
    return described


def test_after_a_call_returns_the_next_read_reflects_it(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    pid = helper_pid(bed)

    ok(bed, "alice", "Start", name=name)
    assert ok(bed, "alice", "Describe", name=name)["capsule"]["state"] == "active"
    listed = {c["name"]: c for c in ok(bed, "alice", "List")["capsules"]}
    assert listed[name]["state"] == "active"
    assert isinstance(listed[name]["uid"], int)

    # PID 1 signals no change of limits (model.py): SetLimits must read them back.
    ok(bed, "alice", "SetLimits", name=name, memoryMax=128 * MIB, tasksMax=33, cpuWeight=70)
    described = ok(bed, "alice", "Describe", name=name)["capsule"]
    assert (described["memoryMax"], described["tasksMax"], described["cpuWeight"]) == (
        128 * MIB,
        33,
        70,
    )
    listed = {c["name"]: c for c in ok(bed, "alice", "List")["capsules"]}
    assert (listed[name]["memoryMax"], listed[name]["tasksMax"]) == (128 * MIB, 33)
    ok(bed, "alice", "SetLimits", name=name, tasksMax=-1)
    assert ok(bed, "alice", "Describe", name=name)["capsule"]["tasksMax"] is None

    ok(bed, "alice", "Stop", name=name)
    described = ok(bed, "alice", "Describe", name=name)["capsule"]
    assert (described["state"], described["uid"]) == ("inactive", None)
    listed = {c["name"]: c for c in ok(bed, "alice", "List")["capsules"]}
    assert listed[name]["state"] == "inactive"

    ok(bed, "alice", "Remove", name=name)
    assert name not in {c["name"] for c in ok(bed, "root", "List")["capsules"]}
    assert helper_pid(bed) == pid  # one process answered every read: its model, not a new one


def test_a_change_behind_capsuleds_back_shows_once_pid1_signals_it(
    bed: Testbed, capsule_name: str
) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    out = in_bed(bed, "behind", name)
    steps = out["steps"]
    agrees(steps["before"], "inactive", "dead")
    started = agrees(steps["started"], "active", "running")
    assert started["uid"] == steps["dynamic_uid"]  # the model learnt the capsule's main PID
    crashed = agrees(steps["crashed"], "failed", "failed")
    assert crashed["result"] == "signal"
    assert crashed["uid"] is None
    agrees(steps["reset"], "inactive", "dead")
    stopped = agrees(steps["stopped"], "inactive", "dead")
    assert stopped["uid"] is None
    states = [e["state"] for e in out["events"] if e["kind"] == "capsule"]
    assert "failed" in states
    before, after = out["pids"]
    assert before == after  # the same helper process (and model) all along


def test_after_pid1_reexecutes_or_reloads_reads_are_right_again(
    bed: Testbed, capsule_name: str
) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    ok(bed, "alice", "SetLimits", name=name, tasksMax=44)
    out = in_bed(bed, "reexec", name)
    steps = out["steps"]
    started = agrees(steps["started"], "active", "running")
    # During a re-execution PID 1 drops and loads every unit again: none of that may show.
    reexecuted = agrees(steps["reexecuted"], "active", "running")
    assert reexecuted["uid"] == started["uid"]
    assert reexecuted["since"] == started["since"]
    assert reexecuted["tasksMax"] == 44
    agrees(steps["stopped_after_reexec"], "inactive", "dead")  # PID 1's new name is followed
    assert steps["start_reply"]["job"] == "done"  # a job's JobRemoved, from the new name
    agrees(steps["started_after_reexec"], "active", "running")
    reloaded = agrees(steps["reloaded"], "active", "running")
    assert reloaded["tasksMax"] == 44
    assert reloaded["uid"] == steps["started_after_reexec"]["describe"]["uid"]
    assert steps["stop_reply"]["job"] == "done"
    agrees(steps["stopped_after_reload"], "inactive", "dead")
    # The stream saw the real changes only (stop, start, stop), none of the reexec's or the
    # reload's dropping and loading the unit again: that would go inactive and back to active.
    # PID 1 may fold deactivating/activating into the next change, so only these hold.
    states = [e["state"] for e in out["events_after_reexec"] if e["kind"] == "capsule"]
    assert states.count("active") == 1
    assert states[-1] == "inactive"
    before, after = out["pids"]
    assert before == after
