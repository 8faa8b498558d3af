"""The Authorizer facade: order of checks, liveness by pidfd, errors, quota, backend choice."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from capsuled.peer import Peer, process_is_alive, read_start_time
from capsuled.policy import actions, polkit
from capsuled.policy.authorizer import ROWS_CHECKED_AT_ONCE, Authorizer, Verdict, polkit_available
from capsuled.policy.builtin import BuiltinBackend
from capsuled.policy.engine import (
    DEFAULT_CONFIG,
    DENY_ALL,
    Decision,
    Identity,
    PolicyConfig,
    Quota,
    Request,
)
from capsuled.policy.identity import lookup_identity
from capsuled.varlink.errors import PermissionDenied

ALICE_UID, BOB_UID, MALLORY_UID = 1000, 1001, 1002


class Directory:
    """A user database the test edits between calls (gpasswd -d, in effect)."""

    def __init__(self) -> None:
        self.groups = {
            ALICE_UID: {"alice", "capsule"},
            BOB_UID: {"bob", "capsule"},
            MALLORY_UID: {"mallory"},
        }
        self.lookups = 0

    def lookup(self, uid: int) -> Identity:
        self.lookups += 1
        names = {ALICE_UID: "alice", BOB_UID: "bob", MALLORY_UID: "mallory"}
        return Identity(uid, names.get(uid), frozenset(self.groups.get(uid, set())))


class RecordingBackend:
    """Answers `answer` and records what it was asked."""

    name = "fake"

    def __init__(self, answer: Decision, together: int = ROWS_CHECKED_AT_ONCE) -> None:
        self.answer = answer
        self.together = together
        self.asked: list[tuple[Identity, Request, bool]] = []

    async def check(self, peer: Peer, identity: Identity, request: Request) -> Decision:
        self.asked.append((identity, request, request.allow_interactive))
        return self.answer

    async def aclose(self) -> None:
        return None


def subject(uid: int, pidfd: int | None = None) -> Peer:
    """This test process as the peer, as peer_credentials records it."""
    pid = os.getpid()
    return Peer(uid=uid, gid=uid, pid=pid, pidfd=pidfd, start_time=read_start_time(pid))


def make(
    answer: Decision = Decision.AUTH_ADMIN, config: PolicyConfig = DEFAULT_CONFIG
) -> tuple[Authorizer, Directory, RecordingBackend]:
    directory = Directory()
    backend = RecordingBackend(answer)
    return Authorizer(config, backend, lookup=directory.lookup), directory, backend


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]  # any coroutine of these tests


async def check(
    auth: Authorizer,
    peer: Peer,
    action: str,
    *,
    capsule: str,
    owner: int | None,
    verb: str | None = None,
    unit: str | None = None,
    allow_interactive: bool = False,
) -> Decision:
    """The decision alone, for a request built the way CallContext.authorize builds it."""
    request = Request(actions.resolve(action), capsule, owner, verb, unit, allow_interactive)
    return (await auth.decide(peer, request)).decision


def test_root_is_allowed_without_lookup_or_backend() -> None:
    auth, directory, backend = make(Decision.NO, DENY_ALL)
    for action in actions.ALL:
        got = run(check(auth, subject(0), action, capsule="c", owner=ALICE_UID))
        assert got is Decision.YES
    assert directory.lookups == 0
    assert backend.asked == []


def test_owner_in_group_is_allowed_without_the_backend() -> None:
    auth, _, backend = make(Decision.NO)
    got = run(check(auth, subject(ALICE_UID), "manage", capsule="c", owner=ALICE_UID, verb="stop"))
    assert got is Decision.YES
    assert backend.asked == []


def test_others_go_to_the_backend_with_every_detail() -> None:
    auth, _, backend = make(Decision.YES)
    got = run(
        check(
            auth,
            subject(BOB_UID),
            actions.MANAGE_UNITS,
            capsule="c",
            owner=ALICE_UID,
            verb="start",
            unit="a.service",
            allow_interactive=True,
        )
    )
    assert got is Decision.YES
    ((identity, request, interactive),) = backend.asked
    assert identity.uid == BOB_UID
    assert "capsule" in identity.groups
    assert request == Request(actions.MANAGE_UNITS, "c", ALICE_UID, "start", "a.service", True)
    assert interactive is True


def test_group_removal_takes_effect_at_the_next_call() -> None:
    auth, directory, _ = make(Decision.AUTH_ADMIN)
    alice = subject(ALICE_UID)
    assert run(check(auth, alice, "run", capsule="c", owner=ALICE_UID)) is Decision.YES
    assert run(check(auth, alice, "create", capsule="d", owner=None)) is Decision.YES
    directory.groups[ALICE_UID].discard("capsule")
    assert run(check(auth, alice, "run", capsule="c", owner=ALICE_UID)) is Decision.AUTH_ADMIN
    assert run(check(auth, alice, "create", capsule="d", owner=None)) is Decision.AUTH_ADMIN
    directory.groups[ALICE_UID].add("capsule")
    assert run(check(auth, alice, "run", capsule="c", owner=ALICE_UID)) is Decision.YES
    assert directory.lookups == 5


def test_unknown_action_is_a_value_error() -> None:
    auth, _, _ = make()
    with pytest.raises(ValueError, match="unknown action"):
        run(auth.decide(subject(ALICE_UID), Request("org.capsuled.frobnicate", "c", None)))


def test_decide_hands_back_the_backends_answer_and_never_raises_it() -> None:
    # Turning no / auth_admin into PermissionDenied / InteractiveAuthenticationRequired is
    # CallContext.authorize's one job (tests/unit/test_methods_lifecycle.py checks that mapping).
    for answer in (Decision.NO, Decision.AUTH_ADMIN, Decision.YES):
        auth, _, _ = make(answer)
        request = Request(actions.READ, "c", ALICE_UID)
        assert run(auth.decide(subject(MALLORY_UID), request)) == Verdict(answer, "fake")


def test_permission_denied_is_the_varlink_standard_error() -> None:
    assert PermissionDenied.name == "org.varlink.service.PermissionDenied"


def test_deny_all_refuses_owner_and_group_but_not_root() -> None:
    auth, _, backend = make(Decision.YES, DENY_ALL)
    got = run(check(auth, subject(ALICE_UID), "read", capsule="c", owner=ALICE_UID))
    assert got is Decision.NO
    assert run(check(auth, subject(ALICE_UID), "create", capsule="c", owner=None)) is Decision.NO
    assert backend.asked == []
    assert auth.quota(subject(ALICE_UID)).max_capsules == 0
    assert auth.quota(subject(0)) == Quota(None, None, None, None)


def test_quota() -> None:
    auth, _, _ = make()
    assert auth.quota(subject(ALICE_UID)) == Quota(8, None, None, None)
    assert auth.quota(subject(0)) == Quota(None, None, None, None)


@pytest.fixture
def dead_pidfd() -> Iterator[tuple[int, int]]:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    pidfd = os.pidfd_open(child.pid)
    child.wait()  # reaped: the pid may be reused from here on, the pidfd never refers to that
    yield child.pid, pidfd
    os.close(pidfd)


def test_dead_peer_is_refused_before_anything_else(dead_pidfd: tuple[int, int]) -> None:
    pid, pidfd = dead_pidfd
    auth, directory, backend = make(Decision.YES)
    dead = Peer(uid=ALICE_UID, gid=ALICE_UID, pid=pid, pidfd=pidfd)
    assert run(check(auth, dead, "read", capsule="c", owner=ALICE_UID)) is Decision.NO
    assert directory.lookups == 0
    assert backend.asked == []
    verdict = run(auth.decide(dead, Request(actions.READ, "c", ALICE_UID)))
    assert verdict == Verdict(Decision.NO, "peer-gone")
    assert not process_is_alive(dead)


def test_live_peer_by_pidfd() -> None:
    pidfd = os.pidfd_open(os.getpid())
    try:
        alive = Peer(uid=ALICE_UID, gid=ALICE_UID, pid=os.getpid(), pidfd=pidfd)
        assert process_is_alive(alive)
        auth, _, _ = make(Decision.NO)
        assert run(check(auth, alive, "read", capsule="c", owner=ALICE_UID)) is Decision.YES
    finally:
        os.close(pidfd)


class FakeProc:
    """A /proc of start times the test edits: exit (del) and pid reuse (a new value)."""

    def __init__(self, **start_times: int) -> None:
        self.start_times = {int(pid.lstrip("p")): t for pid, t in start_times.items()}

    def __call__(self, pid: int) -> int:
        try:
            return self.start_times[pid]
        except KeyError:
            raise ProcessLookupError(pid) from None


def test_without_pidfd_the_start_time_recorded_at_connect_decides() -> None:
    proc = FakeProc(p4242=1000)
    peer = Peer(uid=1, gid=1, pid=4242, pidfd=None, start_time=1000)
    assert process_is_alive(peer, proc)
    proc.start_times[4242] = 1007  # the peer exited and a later process got its pid
    assert not process_is_alive(peer, proc)
    del proc.start_times[4242]  # exited, pid not reused (yet)
    assert not process_is_alive(peer, proc)
    # Gone already at accept (nothing recorded): nothing can prove it is the same process.
    proc.start_times[4242] = 1000
    assert not process_is_alive(Peer(uid=1, gid=1, pid=4242, pidfd=None), proc)


def test_with_a_pidfd_the_pidfd_decides_not_the_start_time() -> None:
    pidfd = os.pidfd_open(os.getpid())
    try:
        mismatch = FakeProc(**{f"p{os.getpid()}": 1})
        me = Peer(uid=1, gid=1, pid=os.getpid(), pidfd=pidfd, start_time=2)
        assert process_is_alive(me, mismatch)
    finally:
        os.close(pidfd)


def test_without_pidfd_a_child_that_exited_is_refused() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    assert child.stdin is not None
    try:
        peer = Peer(
            uid=ALICE_UID,
            gid=ALICE_UID,
            pid=child.pid,
            pidfd=None,
            start_time=read_start_time(child.pid),
        )
        assert process_is_alive(peer)
        auth, _, backend = make(Decision.YES)
        assert run(check(auth, peer, "read", capsule="c", owner=BOB_UID)) is Decision.YES
    finally:
        child.stdin.close()
        child.wait()
    # Reaped: /proc/PID is gone, or belongs to a newer process with a later start time.
    assert not process_is_alive(peer)
    asked_before = len(backend.asked)
    assert run(check(auth, peer, "read", capsule="c", owner=BOB_UID)) is Decision.NO
    assert len(backend.asked) == asked_before


def test_process_start_time_reads_field_22(tmp_path: Path) -> None:
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        expected = int(f.read().rsplit(b")", 1)[1].split()[19])
    assert read_start_time(os.getpid()) == expected
    with pytest.raises(ProcessLookupError):
        read_start_time(2**22 + 1)


def test_process_start_time_with_a_hostile_comm() -> None:
    # comm is chosen by the process; ") R 1 2 (x" must not shift the fields.
    code = (
        "import ctypes,sys; ctypes.CDLL(None).prctl(15, b') R 1 2 (x', 0, 0, 0);"
        "print(flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        child.stdout.readline()  # prctl(PR_SET_NAME) has run
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            raw = f.read()
        assert b"() R 1 2 (x)" in raw
        expected = int(raw.rsplit(b")", 1)[1].split()[19])
        assert read_start_time(child.pid) == expected
    finally:
        child.stdin.close()
        child.wait()


def test_lookup_identity_reads_the_user_database() -> None:
    root = lookup_identity(0)
    assert root.user == "root"
    assert "root" in root.groups
    unknown = lookup_identity(2**31 - 2)
    assert unknown.user is None
    assert unknown.groups == frozenset()


def test_from_config_backend_choice(tmp_path: Path) -> None:
    auth = Authorizer.from_config(tmp_path / "none", backend="builtin")
    assert auth.backend_name == "builtin"
    assert isinstance(auth._backend, BuiltinBackend)
    auth = Authorizer.from_config(tmp_path / "none", backend="polkit")
    assert auth.backend_name == "polkit"
    with pytest.raises(ValueError, match="unknown policy backend"):
        Authorizer.from_config(tmp_path / "none", backend="ldap")


def test_polkit_available_needs_polkitd_and_our_actions(tmp_path: Path) -> None:
    service, policy = tmp_path / "svc", tmp_path / "policy"
    assert not polkit_available(service, policy)
    service.write_text("")
    assert not polkit_available(service, policy)
    policy.write_text("")
    assert polkit_available(service, policy)


def test_builtin_backend_ignores_interaction() -> None:
    backend = BuiltinBackend(DEFAULT_CONFIG)
    identity = Identity(MALLORY_UID, "mallory", frozenset())
    request = Request(actions.READ, "c", None)
    interactive = dataclasses.replace(request, allow_interactive=True)
    got = run(backend.check(subject(MALLORY_UID), identity, interactive))
    assert got is Decision.AUTH_ADMIN


# --- decide_many: a List's rows ------------------------------------------------------------


class SlowBackend:
    """A polkit-like backend whose answers all wait for one event: how many it holds at once
    says whether the rows were asked together or one after the other."""

    name = "slow"

    def __init__(self, answer: Decision, together: int = ROWS_CHECKED_AT_ONCE) -> None:
        self.answer = answer
        self.together = together
        self.asked: list[Request] = []
        self.in_flight = self.most_in_flight = 0
        self.release: asyncio.Event | None = None

    async def check(self, peer: Peer, identity: Identity, request: Request) -> Decision:
        self.asked.append(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        assert self.release is not None
        if self.in_flight == self.together:
            self.release.set()  # as many rows as may be asked at once are waiting now
        await self.release.wait()
        await asyncio.sleep(0)  # a set Event does not suspend: hold the slot for a turn
        self.in_flight -= 1
        return self.answer

    async def aclose(self) -> None:
        return None


def _rows(*owners: int | None) -> list[Request]:
    return [Request(actions.READ, f"c{i}", owner) for i, owner in enumerate(owners)]


def test_decide_many_answers_as_decide_does_row_by_row() -> None:
    requests = _rows(ALICE_UID, BOB_UID, None, ALICE_UID, MALLORY_UID)
    for uid in (0, ALICE_UID, BOB_UID, MALLORY_UID):
        for answer in (Decision.YES, Decision.NO, Decision.AUTH_ADMIN):
            for config in (DEFAULT_CONFIG, DENY_ALL):
                auth, _, _ = make(answer, config)
                peer = subject(uid)
                one_by_one = [run(auth.decide(peer, r)) for r in requests]
                assert run(auth.decide_many(peer, requests)) == one_by_one


def test_decide_many_asks_the_backend_only_for_rows_the_engine_leaves() -> None:
    auth, _, backend = make(Decision.NO)
    requests = _rows(ALICE_UID, BOB_UID, ALICE_UID, None)
    verdicts = run(auth.decide_many(subject(ALICE_UID), requests))
    assert [v.step for v in verdicts] == ["owner", "fake", "owner", "fake"]  # type: ignore[attr-defined]
    assert [r for _, r, _ in backend.asked] == [requests[1], requests[3]]


def test_decide_many_asks_a_polkit_like_backend_for_all_its_rows_at_once() -> None:
    backend = SlowBackend(Decision.YES)
    auth = Authorizer(DEFAULT_CONFIG, backend, lookup=Directory().lookup)

    async def go() -> list[Verdict]:
        backend.release = asyncio.Event()
        requests = _rows(ALICE_UID, BOB_UID, None, ALICE_UID, MALLORY_UID)
        async with asyncio.timeout(5):  # asked one at a time, the first would wait forever
            return await auth.decide_many(subject(ALICE_UID), requests)

    verdicts = run(go())
    assert [v.decision for v in verdicts] == [Decision.YES] * 5  # type: ignore[attr-defined]
    assert len(backend.asked) == 3
    assert backend.most_in_flight == 2  # one after the other would hold one at a time


def test_decide_many_holds_no_more_rows_with_the_backend_than_polkit_serves_at_once() -> None:
    # alice owns one of 1,000 rows: the others are polkit's, and each waiting check costs the
    # helper memory, so only as many wait as polkit's per-caller slots take.
    backend = SlowBackend(Decision.NO)
    auth = Authorizer(DEFAULT_CONFIG, backend, lookup=Directory().lookup)

    rows = _rows(ALICE_UID, *[BOB_UID] * 999)

    async def go() -> tuple[list[Verdict], int]:
        backend.release = asyncio.Event()
        async with asyncio.timeout(5):
            verdicts = await auth.decide_many(subject(ALICE_UID), rows)
        return verdicts, len(asyncio.all_tasks())

    verdicts, tasks_left = cast(tuple[list[Verdict], int], run(go()))
    assert [v.decision for v in verdicts[1:]] == [Decision.NO] * 999
    assert len(backend.asked) == 999
    assert backend.most_in_flight == ROWS_CHECKED_AT_ONCE == polkit.MAX_IN_FLIGHT_PER_UID
    assert tasks_left == 1  # go() itself


class FailingBackend:
    """Answers NO, but the check of row `fail_at` raises; the rest wait their turn."""

    name = "failing"

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.started, self.running = fail_at, 0, 0

    async def check(self, peer: Peer, identity: Identity, request: Request) -> Decision:
        self.started += 1
        self.running += 1
        try:
            await asyncio.sleep(0)
            if request.capsule == f"c{self.fail_at}":
                raise RuntimeError("polkit went away")
            return Decision.NO
        finally:
            self.running -= 1

    async def aclose(self) -> None:
        return None


def test_decide_many_stops_asking_when_one_row_fails() -> None:
    backend = FailingBackend(fail_at=10)
    auth = Authorizer(DEFAULT_CONFIG, backend, lookup=Directory().lookup)

    async def go() -> int:
        with pytest.raises(RuntimeError, match="polkit went away"):
            await auth.decide_many(subject(MALLORY_UID), _rows(*[ALICE_UID] * 100))
        return len(asyncio.all_tasks())

    assert run(go()) == 1  # no check left running behind the error
    assert backend.running == 0
    assert backend.started < 100


def test_decide_many_checks_liveness_once_and_refuses_every_row_of_a_gone_peer() -> None:
    calls: list[Peer] = []

    def alive(peer: Peer) -> bool:
        calls.append(peer)
        return False

    backend = RecordingBackend(Decision.YES)
    auth = Authorizer(DEFAULT_CONFIG, backend, lookup=Directory().lookup, is_alive=alive)
    verdicts = run(auth.decide_many(subject(ALICE_UID), _rows(ALICE_UID, BOB_UID, None)))
    assert [v.step for v in verdicts] == ["peer-gone"] * 3  # type: ignore[attr-defined]
    assert len(calls) == 1
    assert backend.asked == []
