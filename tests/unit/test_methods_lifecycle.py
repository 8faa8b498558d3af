"""Lifecycle methods (List, Describe, Create, Start, Stop, Restart, Remove, SetAutostart,
SetLimits, CheckAccess, Info) through the Dispatcher, against FakeBackend and the builtin policy.

Each call goes through `Dispatcher.handle` with validate_replies=True, so a reply or error whose
shape the IDL does not declare fails the test too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from methods_fixtures import (
    ALICE,
    BOB,
    MALLORY,
    MUTATING_BACKEND_CALLS,
    ROOT,
    ObservedLocks,
    SpyBackend,
    World,
    config,
    items,
    lookup,
    make_world,
    params_for,
)

from capsuled import errors
from capsuled.audit import MESSAGE_IDS
from capsuled.peer import Peer
from capsuled.policy import actions as act
from capsuled.policy.authorizer import Authorizer
from capsuled.policy.engine import Decision, Identity, Quota, Request, Rule, Who
from capsuled.records import Phase, Record, RecordStore
from capsuled.systemd import errors as sd
from capsuled.systemd.backend import CapsuleInfo
from capsuled.varlink.errors import PermissionDenied, VarlinkError

LIFECYCLE_NAMED = ("Describe", "Start", "Stop", "Restart", "Remove", "SetAutostart", "SetLimits")
GIB = 1 << 30


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path).standard()


def capsule_of(reply: dict[str, object]) -> dict[str, object]:
    capsule = reply["capsule"]
    assert isinstance(capsule, dict)
    return capsule


def names_in(reply: dict[str, object]) -> list[str]:
    capsules = reply["capsules"]
    assert isinstance(capsules, list)
    return [c["name"] for c in capsules]


def read_rule() -> Rule:
    """bob may read every capsule (but nothing else beyond his own)."""
    return Rule(Decision.YES, who=Who(users=frozenset({"bob"})), actions=frozenset({act.READ}))


# --- success as the owner and as root -------------------------------------------------------


def _stopped(w: World) -> None:
    asyncio.run(w.backend.stop("alpha"))
    w.forget_history()


def _check_describe(w: World, reply: dict[str, object]) -> None:
    capsule = capsule_of(reply)
    assert (capsule["name"], capsule["owner"], capsule["state"]) == ("alpha", ALICE, "active")
    assert capsule["units"] == 1
    assert capsule["hasData"] is True


def _check_start(w: World, reply: dict[str, object]) -> None:
    assert reply["job"] == "done"
    assert capsule_of(reply)["state"] == "active"
    assert w.backend.capsules["alpha"].state == "active"


def _check_stop(w: World, reply: dict[str, object]) -> None:
    assert reply["job"] == "done"
    assert capsule_of(reply)["state"] == "inactive"
    assert capsule_of(reply)["uid"] is None


def _check_restart(w: World, reply: dict[str, object]) -> None:
    assert reply["job"] == "done"
    assert capsule_of(reply)["state"] == "active"
    assert ("stop", "alpha") in w.backend.calls
    assert ("start", "alpha") in w.backend.calls


def _check_remove(w: World, reply: dict[str, object]) -> None:
    assert reply == {}
    assert w.records.get("alpha") is None
    assert "alpha" not in w.backend.capsules  # no state dir, no limits, no autostart: gone
    assert ("clean", "alpha") in w.backend.calls


def _check_autostart(w: World, reply: dict[str, object]) -> None:
    assert capsule_of(reply)["autostart"] is True
    assert w.backend.capsules["alpha"].autostart


def _check_limits(w: World, reply: dict[str, object]) -> None:
    assert capsule_of(reply)["memoryMax"] == GIB
    assert w.backend.capsules["alpha"].memory_max == GIB


SUCCESS: dict[
    str, tuple[Callable[[World], None] | None, Callable[[World, dict[str, object]], None]]
] = {
    "Describe": (None, _check_describe),
    "Start": (_stopped, _check_start),
    "Stop": (None, _check_stop),
    "Restart": (None, _check_restart),
    "Remove": (None, _check_remove),
    "SetAutostart": (None, _check_autostart),
    "SetLimits": (None, _check_limits),
}


@pytest.mark.parametrize("uid", [ALICE, ROOT], ids=["owner", "root"])
@pytest.mark.parametrize("method", sorted(SUCCESS))
def test_succeeds_for_owner_and_root(world: World, method: str, uid: int) -> None:
    setup, check = SUCCESS[method]
    if setup is not None:
        setup(world)
    check(world, world.run(method, params_for(method, "alpha"), uid=uid).reply)


@pytest.mark.parametrize("uid", [ALICE, ROOT], ids=["member", "root"])
def test_create_records_the_caller_as_owner_and_leaves_it_stopped(world: World, uid: int) -> None:
    capsule = capsule_of(world.run("Create", {"name": "fresh"}, uid=uid).reply)
    assert (capsule["name"], capsule["owner"], capsule["state"]) == ("fresh", uid, "inactive")
    assert capsule["hasData"] is True  # started once so that systemd made the state directory
    record = world.records.get("fresh")
    assert record is not None
    assert (record.owner, record.phase) == (uid, Phase.READY)
    assert world.backend.calls == [("start", "fresh"), ("stop", "fresh")]


class FullRecordStore(RecordStore):
    """A store whose file system is full: every write fails as os.open would (ENOSPC)."""

    def _put(self, record: Record) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_create_with_unwritable_records_says_so_and_touches_nothing(world: World) -> None:
    # The fault proof's "/var/lib/capsuled full" (tests/e2e/test_faults.py does it on a real
    # tmpfs): a clear error, not InternalError, and systemd never asked, since the record is
    # written before systemd is touched.
    world.services.records = FullRecordStore(world.root / "state")
    exc = world.error("Create", {"name": "fresh"})
    assert isinstance(exc, errors.RecordsUnwritable)
    assert exc.parameters == {"reason": "fresh: No space left on device"}
    assert world.backend.calls == []
    assert world.services.records.get("fresh") is None


def test_create_with_start_leaves_it_running(world: World) -> None:
    capsule = capsule_of(world.run("Create", {"name": "fresh", "start": True}).reply)
    assert capsule["state"] == "active"
    assert isinstance(capsule["uid"], int)
    assert world.backend.calls == [("start", "fresh")]


def test_remove_keep_data_keeps_the_directory_and_its_owner(world: World) -> None:
    world.run("Remove", {"name": "alpha", "keepData": True})
    record = world.records.get("alpha")
    assert record is not None
    assert record.phase is Phase.KEPT
    assert ("clean", "alpha") not in world.backend.calls
    assert world.backend.capsules["alpha"].has_state_dir
    # Still alice's (issue 11, item 13: a kept home is not free for anybody to inherit).
    assert "alpha" in names_in(world.run("List", uid=ROOT).reply)
    assert "alpha" in names_in(world.run("List", uid=ALICE).reply)
    assert "alpha" not in names_in(world.run("List", uid=BOB).reply)
    assert isinstance(world.error("Create", {"name": "alpha"}, uid=BOB), errors.CapsuleExists)


def test_the_owner_takes_a_kept_home_back_with_create(world: World) -> None:
    created = world.records.get("alpha")
    assert created is not None
    world.run("Remove", {"name": "alpha", "keepData": True})
    capsule = capsule_of(world.run("Create", {"name": "alpha", "start": True}).reply)
    assert capsule["state"] == "active"
    record = world.records.get("alpha")
    assert record is not None
    assert record.phase is Phase.READY
    # The same incarnation: its logs stay readable to the owner (Logs starts at created_usec).
    assert record.created_usec == created.created_usec


def test_remove_of_a_kept_home_deletes_it_for_good(world: World) -> None:
    world.run("Remove", {"name": "alpha", "keepData": True})
    world.run("Remove", {"name": "alpha"})
    assert world.records.get("alpha") is None
    assert ("clean", "alpha") in world.backend.calls
    world.run("Create", {"name": "alpha"}, uid=BOB)  # now the name is free


def test_set_limits_minus_one_resets_to_default(world: World) -> None:
    world.run("SetLimits", {"name": "alpha", "memoryMax": GIB, "tasksMax": 50, "cpuWeight": 200})
    capsule = capsule_of(
        world.run("SetLimits", {"name": "alpha", "memoryMax": -1, "cpuWeight": -1}).reply
    )
    # -1 resets; a null field stays as it was.
    assert (capsule["memoryMax"], capsule["tasksMax"], capsule["cpuWeight"]) == (None, 50, None)


def test_set_autostart_off(world: World) -> None:
    world.run("SetAutostart", {"name": "alpha", "enabled": True})
    reply = world.run("SetAutostart", {"name": "alpha", "enabled": False}).reply
    assert capsule_of(reply)["autostart"] is False


def test_list_shows_only_what_the_caller_may_read(world: World) -> None:
    assert names_in(world.run("List", uid=ROOT).reply) == ["alpha", "beta", "orphan"]
    assert names_in(world.run("List", uid=ALICE).reply) == ["alpha"]
    assert names_in(world.run("List", uid=BOB).reply) == ["beta"]
    assert names_in(world.run("List", uid=MALLORY).reply) == []


def test_list_shows_capsules_made_outside_capsuled_with_null_owner(world: World) -> None:
    (orphan,) = [
        c for c in items(world.run("List", uid=ROOT).reply, "capsules") if c["name"] == "orphan"
    ]
    assert orphan["owner"] is None
    assert orphan["ownerName"] is None


def test_list_with_more_sends_one_capsule_per_reply(world: World) -> None:
    out = world.run("List", uid=ROOT, more=True)
    assert [names_in(r) for r in [*out.replies, out.reply]] == [["alpha"], ["beta"], ["orphan"]]


def test_list_with_more_never_sends_hidden_capsules(world: World) -> None:
    world.own("gamma", ALICE)
    world.backend.add_capsule("gamma")
    out = world.run("List", uid=ALICE, more=True)
    assert [names_in(r) for r in [*out.replies, out.reply]] == [["alpha"], ["gamma"]]
    out = world.run("List", uid=MALLORY, more=True)
    assert out.replies == []
    assert out.reply == {"capsules": []}


def test_list_includes_a_capsule_known_only_from_a_record(world: World) -> None:
    world.own("half", ALICE, Phase.CREATING)
    (half,) = [c for c in items(world.run("List").reply, "capsules") if c["name"] == "half"]
    assert (half["state"], half["hasData"], half["owner"]) == ("inactive", False, ALICE)


def test_info_answers_everybody(world: World) -> None:
    reply = world.run("Info", uid=MALLORY).reply
    assert reply == {
        "version": "0-test",
        "systemdVersion": 257,
        "policyBackend": "builtin",
        "callerUid": MALLORY,
    }


@pytest.mark.parametrize(
    ("uid", "name", "action", "expected", "reason"),
    [
        (ROOT, "beta", "remove", "yes", "root"),
        (ALICE, "alpha", "org.capsuled.manage", "yes", "owner"),
        (ALICE, "beta", "manage", "no", "builtin"),
        (ALICE, "fresh", "create", "yes", "create-group"),
        (MALLORY, "fresh", "create", "no", "builtin"),
        (MALLORY, "alpha", "read", "no", "builtin"),
    ],
)
def test_check_access_tells_the_decision(
    world: World, uid: int, name: str, action: str, expected: str, reason: str
) -> None:
    reply = world.run("CheckAccess", {"name": name, "action": action}, uid=uid).reply
    assert reply["access"] == {"result": expected, "reason": reason}
    assert world.backend.calls == []


def test_check_access_auth_admin(tmp_path: Path) -> None:
    world = make_world(tmp_path, policy=config(default=Decision.AUTH_ADMIN)).standard()
    reply = world.run("CheckAccess", {"name": "alpha", "action": "manage"}, uid=BOB).reply
    assert reply["access"] == {"result": "auth_admin", "reason": "builtin"}


@pytest.mark.parametrize("action", ["", "manage-everything", "org.capsuled.", "org.capsuled.root"])
def test_check_access_unknown_action_is_invalid_value(world: World, action: str) -> None:
    exc = world.error("CheckAccess", {"name": "alpha", "action": action})
    assert isinstance(exc, errors.InvalidValue)
    assert exc.parameters["parameter"] == "action"


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", LIFECYCLE_NAMED)
@pytest.mark.parametrize("uid", [MALLORY, BOB], ids=["non-member", "other-member"])
def test_a_caller_who_may_not_read_gets_the_same_reply_for_existing_and_absent(
    world: World, method: str, uid: int
) -> None:
    before = sorted(r.name for r in world.records.all())
    replies = []
    for name in ("alpha", "ghost"):
        exc = world.error(method, params_for(method, name), uid=uid)
        replies.append((type(exc), exc.name, exc.parameters))
    assert replies == [
        (errors.NoSuchCapsule, errors.NoSuchCapsule.name, {"name": "alpha"}),
        (errors.NoSuchCapsule, errors.NoSuchCapsule.name, {"name": "ghost"}),
    ]
    # Refused before systemd was asked anything (not even whether the capsule exists).
    assert world.backend.seen == []
    assert sorted(r.name for r in world.records.all()) == before
    assert world.backend.capsules["alpha"].state == "active"


@pytest.mark.parametrize("method", ["Start", "Stop", "Restart", "Remove", "SetAutostart"])
@pytest.mark.parametrize(
    ("default", "refusal"),
    [
        (Decision.NO, PermissionDenied),
        (Decision.AUTH_ADMIN, errors.InteractiveAuthenticationRequired),
    ],
)
def test_a_reader_who_may_not_act_gets_the_policy_refusal(
    tmp_path: Path, method: str, default: Decision, refusal: type[VarlinkError]
) -> None:
    world = make_world(tmp_path, policy=config(default=default, rules=[read_rule()])).standard()
    assert isinstance(world.error(method, params_for(method, "alpha"), uid=BOB), refusal)
    assert not set(world.backend.seen) & MUTATING_BACKEND_CALLS
    assert world.records.get("alpha") is not None
    # Describe is allowed by the rule: the refusal above was about acting, not reading.
    world.run("Describe", {"name": "alpha"}, uid=BOB)


def test_owner_who_left_the_group_loses_the_owner_grants(tmp_path: Path) -> None:
    world = make_world(tmp_path).standard()
    world.own("lapsed", MALLORY)  # mallory is not in group "capsule"
    world.backend.add_capsule("lapsed")
    assert isinstance(world.error("Start", {"name": "lapsed"}, uid=MALLORY), errors.NoSuchCapsule)


@pytest.mark.parametrize("name", ["alpha", "ghost"])
@pytest.mark.parametrize(
    ("default", "refusal"),
    [
        (Decision.NO, PermissionDenied),
        (Decision.AUTH_ADMIN, errors.InteractiveAuthenticationRequired),
    ],
)
def test_create_by_a_non_member_is_refused_whether_or_not_the_name_exists(
    tmp_path: Path, name: str, default: Decision, refusal: type[VarlinkError]
) -> None:
    world = make_world(tmp_path, policy=config(default=default)).standard()
    assert isinstance(world.error("Create", {"name": name}, uid=MALLORY), refusal)
    assert world.backend.seen == []
    assert world.records.get("ghost") is None


@pytest.mark.parametrize("method", ["List", "Info"])
def test_methods_without_a_name_answer_a_non_member(world: World, method: str) -> None:
    world.run(method, uid=MALLORY)


# --- InvalidName ----------------------------------------------------------------------------

BAD_NAMES = ["", "a.b", "x" * 30, "caf\u00e9", "a/b", "..", "a b", "a@b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
@pytest.mark.parametrize("method", [*LIFECYCLE_NAMED, "Create", "CheckAccess"])
@pytest.mark.parametrize("uid", [ROOT, MALLORY], ids=["root", "non-member"])
def test_invalid_names_never_reach_systemd(world: World, method: str, bad: str, uid: int) -> None:
    exc = world.error(method, params_for(method, bad), uid=uid)
    assert isinstance(exc, errors.InvalidName)
    assert exc.parameters["name"] == bad
    assert isinstance(exc.parameters["reason"], str)
    assert world.backend.seen == []
    assert world.audit_records == []


def test_longest_valid_name_is_accepted(world: World) -> None:
    world.run("Create", {"name": "x" * 29})
    assert world.records.get("x" * 29) is not None


# --- CapsuleExists, QuotaExceeded ------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "name"),
    [(ALICE, "alpha"), (BOB, "alpha"), (ROOT, "alpha"), (ALICE, "orphan"), (ROOT, "orphan")],
)
def test_create_of_an_existing_capsule(world: World, uid: int, name: str) -> None:
    before = world.records.get(name)
    exc = world.error("Create", {"name": name}, uid=uid)
    assert isinstance(exc, errors.CapsuleExists)
    assert exc.parameters == {"name": name}
    assert not set(world.backend.seen) & MUTATING_BACKEND_CALLS
    assert world.records.get(name) == before


def test_create_beyond_the_capsule_quota(tmp_path: Path) -> None:
    world = make_world(tmp_path, policy=config(quota=Quota(1, None, None, None))).standard()
    exc = world.error("Create", {"name": "fresh"}, uid=ALICE)
    assert isinstance(exc, errors.QuotaExceeded)
    assert exc.parameters == {"what": "capsules", "limit": 1}
    assert world.records.get("fresh") is None
    assert not set(world.backend.seen) & MUTATING_BACKEND_CALLS
    (record,) = world.audit_records
    assert (record["CAPSULE"], record["CAPSULED_RESULT"]) == ("fresh", "quota-exceeded")
    # Root has no quota.
    world.run("Create", {"name": "fresh"}, uid=ROOT)


def test_the_capsule_quota_counts_only_the_callers_own(tmp_path: Path) -> None:
    world = make_world(tmp_path, policy=config(quota=Quota(2, None, None, None))).standard()
    world.run("Create", {"name": "fresh"}, uid=ALICE)  # alice: alpha + fresh; bob: beta
    assert isinstance(world.error("Create", {"name": "more"}, uid=ALICE), errors.QuotaExceeded)
    world.run("Create", {"name": "more"}, uid=BOB)


CEILINGS = Quota(None, GIB, 100, 500)


@pytest.mark.parametrize(
    ("field", "value", "limit"),
    [
        ("memoryMax", GIB + 1, GIB),
        ("memoryMax", -1, GIB),
        ("tasksMax", 101, 100),
        ("tasksMax", -1, 100),
        ("cpuWeight", 501, 500),
    ],
)
def test_set_limits_above_a_ceiling(tmp_path: Path, field: str, value: int, limit: int) -> None:
    world = make_world(tmp_path, policy=config(quota=CEILINGS)).standard()
    exc = world.error("SetLimits", {"name": "alpha", field: value})
    assert isinstance(exc, errors.QuotaExceeded)
    assert exc.parameters == {"what": field, "limit": limit}
    assert "set_limits" not in world.backend.seen
    # Root is not bound by the ceilings.
    world.run("SetLimits", {"name": "alpha", field: value}, uid=ROOT)


def test_cpu_weight_reset_above_a_low_ceiling(tmp_path: Path) -> None:
    # -1 resets CPUWeight= to systemd's default weight, 100 (CGROUP_WEIGHT_DEFAULT).
    world = make_world(tmp_path, policy=config(quota=Quota(None, None, None, 50))).standard()
    exc = world.error("SetLimits", {"name": "alpha", "cpuWeight": -1})
    assert isinstance(exc, errors.QuotaExceeded)
    assert exc.parameters == {"what": "cpuWeight", "limit": 50}


def test_cpu_weight_reset_below_the_ceiling_is_allowed(tmp_path: Path) -> None:
    world = make_world(tmp_path, policy=config(quota=CEILINGS)).standard()
    world.run("SetLimits", {"name": "alpha", "cpuWeight": 200})
    capsule = capsule_of(world.run("SetLimits", {"name": "alpha", "cpuWeight": -1}).reply)
    assert capsule["cpuWeight"] is None


def test_set_limits_at_the_ceilings(tmp_path: Path) -> None:
    world = make_world(tmp_path, policy=config(quota=CEILINGS)).standard()
    limits = {"memoryMax": GIB, "tasksMax": 100, "cpuWeight": 500}
    capsule = capsule_of(world.run("SetLimits", {"name": "alpha", **limits}).reply)
    assert {k: capsule[k] for k in limits} == limits


@pytest.mark.parametrize(
    ("values", "parameter"),
    [
        ({"memoryMax": -2}, "memoryMax"),
        ({"tasksMax": 0}, "tasksMax"),
        ({"tasksMax": -2}, "tasksMax"),
        ({"cpuWeight": 0}, "cpuWeight"),
        ({"cpuWeight": 10001}, "cpuWeight"),
        ({"cpuWeight": -2}, "cpuWeight"),
        ({}, "memoryMax"),
    ],
)
@pytest.mark.parametrize("uid", [ALICE, ROOT])
def test_set_limits_invalid_values(
    world: World, values: dict[str, int], parameter: str, uid: int
) -> None:
    exc = world.error("SetLimits", {"name": "alpha", **values}, uid=uid)
    assert isinstance(exc, errors.InvalidValue)
    assert exc.parameters["parameter"] == parameter
    assert "set_limits" not in world.backend.seen


def test_set_limits_extremes_are_accepted(world: World) -> None:
    # PID 1 refuses MemoryMax=0 (systemd 257, tests/contract/backend.py): 1 is the lowest.
    capsule = capsule_of(
        world.run(
            "SetLimits", {"name": "alpha", "memoryMax": 1, "tasksMax": 1, "cpuWeight": 10000}
        ).reply
    )
    assert (capsule["memoryMax"], capsule["tasksMax"], capsule["cpuWeight"]) == (1, 1, 10000)


# --- systemd's failures ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["Start", "Restart"])
def test_a_failed_start_is_job_failed_with_the_unit_result(world: World, method: str) -> None:
    asyncio.run(world.backend.stop("alpha"))
    world.backend.fail_start.add("alpha")
    world.forget_history()
    exc = world.error(method, {"name": "alpha"})
    assert isinstance(exc, errors.JobFailed)
    assert exc.parameters == {"result": "failed", "unitResult": "exit-code"}
    (record,) = world.audit_records
    assert record["CAPSULED_RESULT"] == "failed"
    assert record["CAPSULED_JOB_RESULT"] == "failed"
    # The capsule is still known, failed; Describe says so.
    capsule = capsule_of(world.run("Describe", {"name": "alpha"}).reply)
    assert (capsule["state"], capsule["result"]) == ("failed", "exit-code")


MUTATING_LIFECYCLE = ["Create", "Start", "Stop", "Restart", "Remove", "SetAutostart", "SetLimits"]


@pytest.mark.parametrize("method", MUTATING_LIFECYCLE)
def test_systemd_too_old_refuses_mutating_calls(tmp_path: Path, method: str) -> None:
    world = make_world(tmp_path, version=252).standard()
    name = "fresh" if method == "Create" else "alpha"
    exc = world.error(method, params_for(method, name))
    assert isinstance(exc, errors.SystemdTooOld)
    assert exc.parameters == {"version": 252}
    assert not set(world.backend.seen) & MUTATING_BACKEND_CALLS
    assert world.records.get("fresh") is None
    assert world.records.get("alpha") is not None


def test_info_still_answers_on_old_systemd(tmp_path: Path) -> None:
    world = make_world(tmp_path, version=252).standard()
    assert world.run("Info").reply["systemdVersion"] == 252
    world.run("Describe", {"name": "alpha"})  # reading works; only capsule changes are refused


@pytest.mark.parametrize(
    "method", ["List", "Describe", "Create", "Start", "Stop", "Remove", "SetLimits", "SetAutostart"]
)
def test_systemd_unavailable(world: World, method: str) -> None:
    world.backend.unavailable = True
    name = "fresh" if method == "Create" else "alpha"
    params = {} if method == "List" else params_for(method, name)
    exc = world.error(method, params, uid=ROOT)
    assert isinstance(exc, errors.SystemdUnavailable)
    assert exc.parameters == {}
    assert world.records.get("fresh") is None


def test_info_without_systemd_has_a_null_version(world: World) -> None:
    world.backend.unavailable = True
    assert world.run("Info").reply["systemdVersion"] is None


def test_clean_refused_while_running_is_capsule_running_and_remove_can_be_retried(
    world: World,
) -> None:
    backend = world.backend
    clean = SpyBackend.clean

    async def busy(name: str) -> None:
        raise sd.UnitBusy(f"capsule@{name}.service")

    backend.clean = busy  # type: ignore[method-assign]  # a PID 1 that refuses CleanUnit
    exc = world.error("Remove", {"name": "alpha"})
    assert isinstance(exc, errors.CapsuleRunning)
    assert exc.parameters == {"name": "alpha"}
    record = world.records.get("alpha")
    assert record is not None
    assert record.phase is Phase.REMOVING
    # The owner still owns it and a retry finishes the job.
    backend.clean = clean.__get__(backend)  # type: ignore[method-assign]  # the real fake again
    world.run("Remove", {"name": "alpha"})
    assert world.records.get("alpha") is None
    assert "alpha" not in backend.capsules


# --- crash consistency ----------------------------------------------------------------------


@pytest.mark.parametrize("started", [False, True], ids=["before-start", "after-start"])
def test_create_resumes_its_own_half_done_create(tmp_path: Path, started: bool) -> None:
    # Quota of one, already used by the half-done record: resuming must not count it twice.
    world = make_world(tmp_path, policy=config(quota=Quota(1, None, None, None)))
    world.own("half", ALICE, Phase.CREATING)
    if started:
        world.backend.add_capsule("half")  # killed after systemd made the state directory
    capsule = capsule_of(world.run("Create", {"name": "half"}).reply)
    assert capsule["owner"] == ALICE
    assert capsule["hasData"] is True
    record = world.records.get("half")
    assert record is not None
    assert record.phase is Phase.READY


def test_create_does_not_take_over_another_users_half_done_create(world: World) -> None:
    world.own("half", ALICE, Phase.CREATING)
    exc = world.error("Create", {"name": "half"}, uid=BOB)
    assert isinstance(exc, errors.CapsuleExists)
    record = world.records.get("half")
    assert record is not None
    assert (record.owner, record.phase) == (ALICE, Phase.CREATING)
    assert not set(world.backend.seen) & MUTATING_BACKEND_CALLS


def test_create_does_not_resume_a_removal(world: World) -> None:
    world.own("going", ALICE, Phase.REMOVING)
    assert isinstance(world.error("Create", {"name": "going"}), errors.CapsuleExists)


@pytest.mark.parametrize("systemd_knows", [True, False])
def test_remove_finishes_a_half_done_remove(world: World, systemd_knows: bool) -> None:
    world.own("going", ALICE, Phase.REMOVING)
    if systemd_knows:
        world.backend.add_capsule("going")
    world.run("Remove", {"name": "going"})
    assert world.records.get("going") is None
    assert "going" not in world.backend.capsules


def test_create_whose_start_fails_leaves_nothing(world: World) -> None:
    world.backend.fail_start.add("fresh")
    exc = world.error("Create", {"name": "fresh"})
    assert isinstance(exc, errors.JobFailed)
    assert exc.parameters == {"result": "failed", "unitResult": "exit-code"}
    assert world.records.get("fresh") is None
    assert asyncio.run(world.backend.capsule_info("fresh")) is None  # no state dir, not failed
    assert ("clean", "fresh") in world.backend.calls
    (record,) = world.audit_records
    assert (record["CAPSULE"], record["CAPSULED_RESULT"]) == ("fresh", "failed")
    # And the name is free again.
    world.backend.fail_start.clear()
    world.run("Create", {"name": "fresh"})


def test_create_whose_rollback_fails_leaves_a_record_a_retry_finishes(world: World) -> None:
    world.backend.fail_start.add("fresh")

    async def broken(name: str) -> None:
        raise sd.SystemdUnavailable("bus went away")

    world.backend.clean = broken  # type: ignore[method-assign]  # cleaning fails too
    assert isinstance(world.error("Create", {"name": "fresh"}), errors.JobFailed)
    record = world.records.get("fresh")
    assert record is not None
    assert record.phase is Phase.CREATING
    # The owner sees it (and nobody else can take the name); Remove finishes the job.
    assert "fresh" in names_in(world.run("List").reply)
    assert isinstance(world.error("Create", {"name": "fresh"}, uid=BOB), errors.CapsuleExists)


# --- concurrency ----------------------------------------------------------------------------


class GatedBackend(SpyBackend):
    """start() reports each arrival on a queue, then waits for the test's gate."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: asyncio.Queue[str] = asyncio.Queue()
        self.order: list[tuple[str, str]] = []

    async def start(self, name: str) -> str:
        self.order.append(("enter", name))
        self.arrived.put_nowait(name)
        try:
            return await super().start(name)
        finally:
            self.order.append(("leave", name))


def _gated_world(
    tmp_path: Path, names: list[str], lock_wait_s: float = 10.0
) -> tuple[World, GatedBackend, ObservedLocks]:
    locks = ObservedLocks(lock_wait_s)
    world = make_world(tmp_path, locks=locks)
    backend = GatedBackend()
    world.services.backend = backend
    world.backend = backend
    for name in names:
        world.own(name, ALICE)
        backend.add_capsule(name)
    locks.arrivals = asyncio.Queue()
    backend.gate = asyncio.Event()
    return world, backend, locks


def test_two_starts_of_one_capsule_are_serialised(tmp_path: Path) -> None:
    async def main() -> None:
        world, backend, locks = _gated_world(tmp_path, ["alpha"])
        assert backend.gate is not None
        assert locks.arrivals is not None
        first = asyncio.create_task(world.call("Start", {"name": "alpha"}))
        assert await asyncio.wait_for(backend.arrived.get(), 1.0) == "alpha"
        second = asyncio.create_task(world.call("Start", {"name": "alpha"}))
        # Both reached the capsule's lock; only the first got to systemd.
        assert await asyncio.wait_for(locks.arrivals.get(), 1.0) == "alpha"
        assert await asyncio.wait_for(locks.arrivals.get(), 1.0) == "alpha"
        done, _ = await asyncio.wait({second}, timeout=0.05)
        assert not done
        assert backend.arrived.empty()
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(first, second), 1.0)
        assert backend.order == [
            ("enter", "alpha"),
            ("leave", "alpha"),
            ("enter", "alpha"),
            ("leave", "alpha"),
        ]
        assert backend.overlaps == []
        assert len(locks) == 0  # the lock table does not keep idle names

    asyncio.run(main())


def test_starts_of_different_capsules_run_in_parallel(tmp_path: Path) -> None:
    async def main() -> None:
        world, backend, _ = _gated_world(tmp_path, ["alpha", "beta"])
        assert backend.gate is not None
        tasks = [
            asyncio.create_task(world.call("Start", {"name": name})) for name in ("alpha", "beta")
        ]
        # Both are inside systemd's start at once while the gate is still closed.
        arrived = {await asyncio.wait_for(backend.arrived.get(), 1.0) for _ in tasks}
        assert arrived == {"alpha", "beta"}
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 1.0)

    asyncio.run(main())


def test_remove_waits_for_a_start_in_flight(tmp_path: Path) -> None:
    async def main() -> None:
        world, backend, locks = _gated_world(tmp_path, ["alpha"])
        assert backend.gate is not None
        assert locks.arrivals is not None
        start = asyncio.create_task(world.call("Start", {"name": "alpha"}))
        await asyncio.wait_for(backend.arrived.get(), 1.0)
        remove = asyncio.create_task(world.call("Remove", {"name": "alpha"}))
        await asyncio.wait_for(locks.arrivals.get(), 1.0)
        await asyncio.wait_for(locks.arrivals.get(), 1.0)
        assert ("stop", "alpha") not in backend.calls
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(start, remove), 1.0)
        assert backend.calls.index(("start", "alpha")) < backend.calls.index(("stop", "alpha"))
        assert backend.overlaps == []
        assert world.records.get("alpha") is None

    asyncio.run(main())


# --- audit ----------------------------------------------------------------------------------

AUDITED: list[tuple[str, str]] = [
    ("Create", "create"),
    ("Start", "start"),
    ("Stop", "stop"),
    ("Restart", "restart"),
    ("Remove", "remove"),
    ("SetLimits", "set-limits"),
]


@pytest.mark.parametrize("uid", [ALICE, ROOT])
@pytest.mark.parametrize(("method", "action"), AUDITED)
def test_every_mutating_call_writes_one_audit_record(
    world: World, method: str, action: str, uid: int
) -> None:
    name = "fresh" if method == "Create" else "alpha"
    world.run(method, params_for(method, name), uid=uid)
    (record,) = world.audit_records
    assert record["CAPSULE"] == name
    assert record["CAPSULED_ACTION"] == action
    assert record["CAPSULED_CALLER_UID"] == str(uid)
    assert record["CAPSULED_RESULT"] == "ok"
    assert record["MESSAGE_ID"] == MESSAGE_IDS[action]


def test_set_autostart_is_audited_under_its_own_message_id(world: World) -> None:
    world.run("SetAutostart", {"name": "alpha", "enabled": True})
    (record,) = world.audit_records
    assert record["CAPSULE"] == "alpha"
    assert record["CAPSULED_RESULT"] == "ok"
    assert record["CAPSULED_ACTION"] == "set-autostart"
    assert record["MESSAGE_ID"] == MESSAGE_IDS["set-autostart"]


def test_reads_are_not_audited(world: World) -> None:
    world.run("List")
    world.run("Describe", {"name": "alpha"})
    world.run("Info")
    world.run("CheckAccess", {"name": "alpha", "action": "manage"})
    assert world.audit_records == []


@pytest.mark.parametrize("method", ["Start", "Remove", "Create"])
def test_a_refused_mutating_call_is_audited_as_denied(world: World, method: str) -> None:
    world.error(method, params_for(method, "alpha"), uid=MALLORY)
    (record,) = world.audit_records
    assert record["CAPSULE"] == "alpha"
    assert record["CAPSULED_CALLER_UID"] == str(MALLORY)
    assert record["CAPSULED_RESULT"] == "denied"


def test_a_mutating_call_failing_otherwise_is_audited_with_the_error(world: World) -> None:
    world.backend.unavailable = True
    world.error("Stop", {"name": "alpha"})
    (record,) = world.audit_records
    assert record["CAPSULE"] == "alpha"
    assert record["CAPSULED_RESULT"] == errors.SystemdUnavailable.name


def test_concurrent_creates_of_one_name_make_one_capsule(tmp_path: Path) -> None:
    async def main() -> None:
        world, backend, _ = _gated_world(tmp_path, [])
        assert backend.gate is not None
        tasks = [
            asyncio.create_task(world.call("Create", {"name": "fresh"}, uid=uid))
            for uid in (ALICE, BOB)
        ]
        await asyncio.wait_for(backend.arrived.get(), 1.0)
        backend.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.0)
        assert isinstance(results[1], errors.CapsuleExists)
        assert not isinstance(results[0], BaseException)
        record = world.records.get("fresh")
        assert record is not None
        assert (record.owner, record.phase) == (ALICE, Phase.READY)
        assert backend.overlaps == []

    asyncio.run(main())


class SlowInfoBackend(SpyBackend):
    """capsule_info() waits on `gate_info`: every concurrent Create is past it before any quota
    check, as with a real D-Bus round trip."""

    def __init__(self, waiting: int) -> None:
        super().__init__()
        self.gate_info = asyncio.Event()
        self._waiting = waiting
        self.all_waiting = asyncio.Event()

    async def capsule_info(self, name: str) -> CapsuleInfo | None:
        self._waiting -= 1
        if self._waiting == 0:
            self.all_waiting.set()
        await self.gate_info.wait()
        return await super().capsule_info(name)


def test_concurrent_creates_cannot_exceed_the_capsule_quota(tmp_path: Path) -> None:
    async def main() -> None:
        world = make_world(tmp_path, policy=config(quota=Quota(1, None, None, None)))
        backend = SlowInfoBackend(waiting=2)
        world.services.backend = world.backend = backend
        tasks = [
            asyncio.create_task(world.call("Create", {"name": name})) for name in ("one", "two")
        ]
        await asyncio.wait_for(backend.all_waiting.wait(), 1.0)
        backend.gate_info.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.0)
        refused = [r for r in results if isinstance(r, errors.QuotaExceeded)]
        assert len(refused) == 1, results
        assert len(world.records.owned_by(ALICE, "alice")) == 1

    asyncio.run(main())


def test_a_caller_cancelled_while_waiting_for_the_lock_leaves_no_entry(tmp_path: Path) -> None:
    async def main() -> None:
        world, backend, locks = _gated_world(tmp_path, ["alpha"])
        assert backend.gate is not None
        assert locks.arrivals is not None
        first = asyncio.create_task(world.call("Start", {"name": "alpha"}))
        await asyncio.wait_for(backend.arrived.get(), 1.0)
        second = asyncio.create_task(world.call("Stop", {"name": "alpha"}))
        await asyncio.wait_for(locks.arrivals.get(), 1.0)
        await asyncio.wait_for(locks.arrivals.get(), 1.0)
        second.cancel()  # the client hung up while queued behind the first call
        with pytest.raises(asyncio.CancelledError):
            await second
        backend.gate.set()
        await asyncio.wait_for(first, 1.0)
        assert len(locks) == 0
        assert ("stop", "alpha") not in backend.calls
        # The capsule is usable afterwards: nothing stayed locked.
        await asyncio.wait_for(world.call("Stop", {"name": "alpha"}), 1.0)

    asyncio.run(main())


def test_a_call_waiting_too_long_for_the_lock_is_answered_busy(tmp_path: Path) -> None:
    # Finding 8: a call queued behind a slow one on the same capsule must not hold its call
    # slot for as long as the slow one takes (a Stop may take TimeoutStopSec=, 90 s).
    async def main() -> None:
        world, backend, locks = _gated_world(tmp_path, ["alpha"], lock_wait_s=0.1)
        assert backend.gate is not None
        first = asyncio.create_task(world.call("Start", {"name": "alpha"}))
        await asyncio.wait_for(backend.arrived.get(), 1.0)
        with pytest.raises(errors.Busy):
            await asyncio.wait_for(world.call("Stop", {"name": "alpha"}), 1.0)
        assert ("stop", "alpha") not in backend.calls
        backend.gate.set()
        await asyncio.wait_for(first, 1.0)
        assert len(locks) == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"unit": "a\x00b.service"}, errors.InvalidUnit),
        ({"unit": "../etc.service"}, errors.InvalidUnit),
        ({"verb": "st\x00art"}, errors.InvalidValue),
    ],
)
def test_check_access_validates_verb_and_unit(
    world: World, extra: dict[str, str], error: type[VarlinkError]
) -> None:
    params: dict[str, object] = {"name": "alpha", "action": "manage-units", **extra}
    assert isinstance(world.error("CheckAccess", params, uid=MALLORY), error)


# --- what each method asks the policy -------------------------------------------------------


class RecordingPolicy:
    """A policy backend that allows everything and records each request it is asked."""

    name = "recording"

    def __init__(self) -> None:
        self.asked: list[tuple[Request, bool]] = []

    async def check(self, peer: Peer, identity: Identity, request: Request) -> Decision:
        # The interactive flag apart, as the method put it: (details, allowed interaction).
        flag = request.allow_interactive
        self.asked.append((dataclasses.replace(request, allow_interactive=False), flag))
        return Decision.YES

    async def aclose(self) -> None:
        return None


POLICY_REQUESTS: dict[str, tuple[str, str | None, str | None]] = {
    "Describe": (act.READ, None, None),
    "Start": (act.MANAGE, "start", None),
    "Stop": (act.MANAGE, "stop", None),
    "Restart": (act.MANAGE, "restart", None),
    "SetAutostart": (act.MANAGE, "autostart", None),
    "Remove": (act.REMOVE, None, None),
    "SetLimits": (act.SET_LIMITS, None, None),
    "ListUnits": (act.READ, None, None),
    "InstallUnit": (act.MANAGE_UNITS, "install", "new.service"),
    "RemoveUnit": (act.MANAGE_UNITS, "remove", "web.service"),
    "StartUnit": (act.MANAGE_UNITS, "start", "web.service"),
    "StopUnit": (act.MANAGE_UNITS, "stop", "web.service"),
    "RestartUnit": (act.MANAGE_UNITS, "restart", "web.service"),
    "EnableUnit": (act.MANAGE_UNITS, "enable", "web.service"),
    "DisableUnit": (act.MANAGE_UNITS, "disable", "web.service"),
    "Run": (act.RUN, None, None),
    "Logs": (act.READ, None, None),
}
# Requests a method makes after its first one: a unit file is code, so installing one needs
# `run` too (issue 11, finding 7).
FURTHER_REQUESTS: dict[str, list[tuple[str, str | None, str | None]]] = {
    "InstallUnit": [(act.RUN, None, None)],
}


def _recording_world(tmp_path: Path) -> tuple[World, RecordingPolicy]:
    world = make_world(tmp_path).standard()
    policy = RecordingPolicy()
    world.services.authorizer = Authorizer(
        config(), policy, lookup=lookup, is_alive=lambda _subject: True
    )
    return world, policy


@pytest.mark.parametrize("interactive", [None, False, True])
@pytest.mark.parametrize("method", sorted(POLICY_REQUESTS))
def test_each_method_asks_the_policy_once_with_its_details(
    tmp_path: Path, method: str, interactive: bool | None
) -> None:
    world, policy = _recording_world(tmp_path)
    params = params_for(method, "alpha")
    if interactive is not None:
        params["allowInteractiveAuthentication"] = interactive
    world.run(method, params, uid=BOB)  # bob owns nothing here: the backend decides
    wanted = [POLICY_REQUESTS[method], *FURTHER_REQUESTS.get(method, [])]
    assert policy.asked == [
        (Request(action, "alpha", ALICE, verb, unit), interactive is True)
        for action, verb, unit in wanted
    ]


@pytest.mark.parametrize("interactive", [False, True])
def test_create_asks_the_policy_with_the_caller_as_owner(tmp_path: Path, interactive: bool) -> None:
    world, policy = _recording_world(tmp_path)
    world.run(
        "Create", {"name": "fresh", "allowInteractiveAuthentication": interactive}, uid=MALLORY
    )
    assert policy.asked == [(Request(act.CREATE, "fresh", MALLORY), interactive)]


def test_list_reads_each_account_once_for_all_its_rows(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The policy filter is one pass: the caller's account and each owner's are read from the
    # user database once per List, not once per row and decision (~0.7 ms each with NSS); an
    # owner's groups are never needed, only the name (is the uid still the creator's account?).
    world.own("gamma", ALICE)
    world.backend.add_capsule("gamma")
    read: list[tuple[str, int]] = []
    real_lookup, real_name = world.authorizer._lookup, world.authorizer._name_of

    def lookup(uid: int) -> Identity:
        read.append(("groups", uid))
        return real_lookup(uid)

    def name_of(uid: int) -> str | None:
        read.append(("name", uid))
        return real_name(uid)

    monkeypatch.setattr(world.authorizer, "_lookup", lookup)
    monkeypatch.setattr(world.authorizer, "_name_of", name_of)
    assert names_in(world.run("List", uid=ALICE).reply) == ["alpha", "gamma"]
    # alice's own name comes from her account, read whole for the decision anyway.
    assert sorted(read) == [("groups", ALICE), ("name", BOB)]
    read.clear()
    capsule_of(world.run("Describe", {"name": "alpha"}, uid=ALICE).reply)
    assert sorted(read) == [("groups", ALICE)]
    read.clear()
    # Outside a pass every decision reads the database anew: two calls, two reads each.
    for _ in range(2):
        assert isinstance(world.error("Describe", {"name": "beta"}), errors.NoSuchCapsule)
    assert read == [("name", BOB), ("groups", ALICE)] * 2


@pytest.mark.parametrize("method", ["Stop", "Start", "Restart"])
def test_a_job_is_answered_only_once_its_record_is_on_disk(world: World, method: str) -> None:
    # The record's fsync runs while the capsule is read back for the reply; the reply still
    # waits for it (invariant 6, audit.py).
    if method == "Start":
        asyncio.run(world.backend.stop("alpha"))
    trail = world.services.audit._trail
    assert trail is not None
    world.forget_history()
    reply = world.run(method, {"name": "alpha"}).reply
    assert reply["job"] == "done"
    (record,) = world.audit_records
    assert record["CAPSULED_ACTION"] == method.lower()
    assert trail.written_seq > 0
    assert trail.synced_seq == trail.written_seq


def test_a_mutation_cut_short_by_a_failure_that_is_no_varlink_error_is_still_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug, or an import, allocation or fd failing mid-call (the transport answers
    # InternalError): Remove has stopped and cleaned the capsule and deleted its record by the
    # time it forgets the deployments (whose `import shutil` happens there since start-up
    # stopped importing it). The trail must still have the call.
    world = make_world(tmp_path).standard()

    def unimportable(name: str) -> None:
        raise ImportError("shutil")

    monkeypatch.setattr(world.services.deployments, "forget", unimportable)
    with pytest.raises(ImportError):
        world.run("Remove", {"name": "alpha"})
    assert world.records.get("alpha") is None
    assert ("clean", "alpha") in world.backend.calls
    (record,) = world.audit_for("remove")
    assert record["CAPSULE"] == "alpha"
    assert record["CAPSULED_RESULT"] == "org.capsuled.Manager.InternalError"
