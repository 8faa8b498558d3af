"""The polkit backend without polkitd: message builders, reply mapping, the in-flight cap and
cancellation, against a fake bus link. (Real polkitd 126: tests/e2e/test_policy_matrix.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator

import pytest
from jeepney import HeaderFields, Message, new_error, new_method_return

from capsuled import callslot
from capsuled.dbus import BusClosed
from capsuled.peer import Peer, read_start_time
from capsuled.policy import actions
from capsuled.policy.engine import Decision, Identity, Request
from capsuled.policy.polkit import (
    ALLOW_USER_INTERACTION,
    MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_PER_UID,
    MAX_QUICK_IN_FLIGHT,
    PolkitBackend,
    check_authorization,
    decision_from_reply,
    polkit_details,
)

ME = Peer(uid=1000, gid=1000, pid=os.getpid(), pidfd=None, start_time=4242)
ALICE = Identity(1000, "alice", frozenset({"alice"}))
# The caller's own capsule: one CheckAuthorization, owner details included.
REQUEST = Request(actions.MANAGE, "web-a", 1000, verb="start")
# Someone else's: a read check (no owner details) decides whether the owner is shown.
OTHERS = Request(actions.MANAGE, "web-b", 1001, verb="start")


def interactive(request: Request) -> Request:
    """The request of a call that allowed interactive authentication."""
    return dataclasses.replace(request, allow_interactive=True)


def make_check(**kw: object) -> Message:
    args: dict[str, object] = {
        "pid": 42,
        "start_time": 4242,
        "uid": 1000,
        "pidfd": 7,
        "action": actions.RUN,
        "details": {"capsule": "c"},
        "allow_interactive": False,
        "cancellation_id": "cid-1",
    }
    args.update(kw)
    return check_authorization(**args)  # type: ignore[arg-type]  # keyword-only test helper


def test_check_authorization_message() -> None:
    msg = make_check()
    fields = msg.header.fields
    assert fields[HeaderFields.destination] == "org.freedesktop.PolicyKit1"
    assert fields[HeaderFields.path] == "/org/freedesktop/PolicyKit1/Authority"
    assert fields[HeaderFields.interface] == "org.freedesktop.PolicyKit1.Authority"
    assert fields[HeaderFields.member] == "CheckAuthorization"
    assert fields[HeaderFields.signature] == "(sa{sv})sa{ss}us"
    (kind, subject), action, details, flags, cid = msg.body
    assert kind == "unix-process"
    assert subject == {
        "pid": ("u", 42),
        "start-time": ("t", 4242),
        "uid": ("i", 1000),
        "pidfd": ("h", 7),
    }
    assert (action, details, flags, cid) == (actions.RUN, {"capsule": "c"}, 0, "cid-1")


def test_check_authorization_interactive_and_without_pidfd() -> None:
    msg = make_check(pidfd=None, allow_interactive=True)
    (_, subject), _, _, flags, _ = msg.body
    assert "pidfd" not in subject
    assert flags == ALLOW_USER_INTERACTION == 1


def test_the_pidfd_travels_as_a_unix_fd() -> None:
    import array

    fds = array.array("i")
    make_check(pidfd=5).serialise(serial=1, fds=fds)
    assert list(fds) == [5]


def test_details() -> None:
    assert polkit_details(Request(actions.CREATE, "new", None), None) == {"capsule": "new"}
    assert polkit_details(OTHERS, "bob") == {
        "capsule": "web-b",
        "owner": "bob",
        "owner-uid": "1001",
        "verb": "start",
    }
    got = polkit_details(Request(actions.MANAGE_UNITS, "c", 4242, "stop", "a.service"), None)
    assert got == {
        "capsule": "c",
        "owner": "4242",
        "owner-uid": "4242",
        "verb": "stop",
        "unit": "a.service",
    }


def test_read_details_never_name_the_owner() -> None:
    read = Request(actions.READ, "web-b", 1001)
    assert polkit_details(read, "bob") == {"capsule": "web-b"}
    assert polkit_details(OTHERS, "bob", owner_visible=False) == {
        "capsule": "web-b",
        "verb": "start",
    }


def reply_to(call: Message, authorized: bool, challenge: bool) -> Message:
    return new_method_return(call, "(bba{ss})", ((authorized, challenge, {}),))


@pytest.mark.parametrize(
    ("authorized", "challenge", "expected"),
    [
        (True, False, Decision.YES),
        (False, True, Decision.AUTH_ADMIN),
        (False, False, Decision.NO),
        (True, True, Decision.YES),
    ],
)
def test_decision_from_reply(authorized: bool, challenge: bool, expected: Decision) -> None:
    assert decision_from_reply(reply_to(make_check(), authorized, challenge)) is expected


def test_error_and_malformed_replies_are_value_errors() -> None:
    call = make_check()
    with pytest.raises(ValueError, match="NotAuthorized"):
        decision_from_reply(new_error(call, "org.freedesktop.PolicyKit1.Error.NotAuthorized"))
    with pytest.raises(ValueError, match="unexpected CheckAuthorization reply"):
        decision_from_reply(new_method_return(call, "s", ("x",)))


class FakeLink:
    """Answers CheckAuthorization when `release` is set; records everything sent."""

    def __init__(self, answer: tuple[bool, bool] = (True, False)) -> None:
        self.answer = answer
        self.release = asyncio.Event()
        self.calls: list[Message] = []
        self.waiting = 0
        self.max_waiting = 0
        self.reached: dict[int, asyncio.Event] = {}
        self.error: Exception | None = None

    def when_waiting(self, n: int) -> asyncio.Event:
        return self.reached.setdefault(n, asyncio.Event())

    async def call_raw(self, message: Message, *, timeout_s: float | None = None) -> Message:
        self.calls.append(message)
        member = message.header.fields[HeaderFields.member]
        if member == "CancelCheckAuthorization":
            return new_method_return(message)
        if self.error is not None:
            raise self.error
        self.waiting += 1
        self.max_waiting = max(self.max_waiting, self.waiting)
        if self.waiting in self.reached:
            self.reached[self.waiting].set()
        try:
            await self.release.wait()
        finally:
            self.waiting -= 1
        return reply_to(message, *self.answer)


def backend_for(link: FakeLink, timeout_s: float = 25.0) -> PolkitBackend:
    async def connect() -> FakeLink:
        return link

    return PolkitBackend(connect, timeout_s=timeout_s)


def test_answers_map_through() -> None:
    async def main() -> list[Decision]:
        results = []
        for answer in ((True, False), (False, True), (False, False)):
            link = FakeLink(answer)
            link.release.set()
            results.append(await backend_for(link).check(ME, ALICE, REQUEST))
        return results

    assert asyncio.run(main()) == [Decision.YES, Decision.AUTH_ADMIN, Decision.NO]


@pytest.mark.parametrize(
    ("allow_interactive", "bound"),
    [(False, MAX_QUICK_IN_FLIGHT), (True, MAX_IN_FLIGHT - MAX_QUICK_IN_FLIGHT)],
)
def test_checks_in_flight_are_bounded(allow_interactive: bool, bound: int) -> None:
    async def main() -> tuple[int, list[Decision]]:
        link = FakeLink()
        backend = backend_for(link)
        peers = [dataclasses.replace(ME, uid=1000 + i) for i in range(100)]
        read = Request(actions.READ, "web-a", None)  # one check each: no owner probe
        request = interactive(read) if allow_interactive else read
        tasks = [asyncio.create_task(backend.check(p, ALICE, request)) for p in peers]
        await asyncio.wait_for(link.when_waiting(bound).wait(), 5)
        for _ in range(10):  # give the others every chance to get in
            await asyncio.sleep(0)
        waiting = link.waiting
        link.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert link.max_waiting == bound
        return waiting, results

    waiting, results = asyncio.run(main())
    assert (MAX_IN_FLIGHT, MAX_QUICK_IN_FLIGHT) == (64, 8)
    assert waiting == bound
    assert results == [Decision.YES] * 100


def test_one_uid_keeps_at_most_two_checks_waiting_in_polkitd() -> None:
    # Finding 8: polkitd answers in order, so a uid flooding it delayed everyone's checks.
    async def main() -> tuple[int, list[int]]:
        link = FakeLink()
        backend = backend_for(link)
        flooding = [asyncio.create_task(backend.check(ME, ALICE, REQUEST)) for _ in range(20)]
        await asyncio.wait_for(link.when_waiting(MAX_IN_FLIGHT_PER_UID).wait(), 5)
        other = dataclasses.replace(ME, uid=2000)
        quiet = asyncio.create_task(backend.check(other, ALICE, REQUEST))
        await asyncio.wait_for(link.when_waiting(MAX_IN_FLIGHT_PER_UID + 1).wait(), 5)
        for _ in range(10):  # give the flooding uid every chance to get more in
            await asyncio.sleep(0)
        waiting = link.waiting
        uids = [m.body[0][1]["uid"][1] for m in link.calls]
        link.release.set()
        await asyncio.wait_for(asyncio.gather(quiet, *flooding), 5)
        return waiting, uids

    waiting, uids = asyncio.run(main())
    assert MAX_IN_FLIGHT_PER_UID == 2
    assert waiting == 3
    assert uids == [ME.uid, ME.uid, 2000]  # the quiet uid's check went in at once


def test_a_cancelled_check_is_cancelled_in_polkitd() -> None:
    async def main() -> list[Message]:
        link = FakeLink()
        backend = backend_for(link)
        task = asyncio.create_task(backend.check(ME, ALICE, interactive(REQUEST)))
        await asyncio.wait_for(link.when_waiting(1).wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(backend.aclose(), 5)  # waits for the cancellation call
        return link.calls

    check, cancel = asyncio.run(main())
    assert check.header.fields[HeaderFields.member] == "CheckAuthorization"
    assert cancel.header.fields[HeaderFields.member] == "CancelCheckAuthorization"
    assert cancel.body == (check.body[4],)
    assert check.body[3] == ALLOW_USER_INTERACTION


def test_timeout_refuses_and_cancels() -> None:
    async def main() -> tuple[Decision, list[Message]]:
        link = FakeLink()
        backend = backend_for(link, timeout_s=0.05)
        result = await backend.check(ME, ALICE, REQUEST)
        await backend.aclose()
        return result, link.calls

    result, calls = asyncio.run(main())
    assert result is Decision.NO
    assert [c.header.fields[HeaderFields.member] for c in calls] == [
        "CheckAuthorization",
        "CancelCheckAuthorization",
    ]


def test_unreachable_bus_refuses() -> None:
    async def connect() -> FakeLink:
        raise FileNotFoundError(2, "No such file or directory")

    backend = PolkitBackend(connect)
    assert asyncio.run(backend.check(ME, ALICE, REQUEST)) is Decision.NO


def test_broken_connection_refuses_then_reconnects() -> None:
    links = [FakeLink(), FakeLink()]
    links[0].error = BusClosed("gone")
    links[1].release.set()
    opened: list[FakeLink] = []

    async def connect() -> FakeLink:
        link = links[len(opened)]
        opened.append(link)
        return link

    async def main() -> list[Decision]:
        backend = PolkitBackend(connect)
        first = await backend.check(ME, ALICE, REQUEST)
        second = await backend.check(ME, ALICE, REQUEST)
        return [first, second]

    assert asyncio.run(main()) == [Decision.NO, Decision.YES]
    assert opened == links


def test_polkit_error_reply_refuses() -> None:
    class ErrorLink(FakeLink):
        async def call_raw(self, message: Message, *, timeout_s: float | None = None) -> Message:
            return new_error(message, "org.freedesktop.DBus.Error.ServiceUnknown")

    link = ErrorLink()
    assert asyncio.run(backend_for(link).check(ME, ALICE, REQUEST)) is Decision.NO


def test_gone_process_is_refused_without_asking() -> None:
    link = FakeLink()
    # No start time: the peer was already gone when its connection was accepted.
    gone = Peer(uid=1000, gid=1000, pid=2**22 + 1, pidfd=None, start_time=None)
    assert asyncio.run(backend_for(link).check(gone, ALICE, REQUEST)) is Decision.NO
    assert link.calls == []


def test_the_start_time_recorded_at_connect_is_sent_not_a_fresh_one() -> None:
    # A process that reuses the peer's pid starts later; polkit 122 would judge it by the start
    # time we send, so it must be the peer's (recorded at accept), not whatever /proc says now.
    link = FakeLink()
    link.release.set()
    recorded = read_start_time(os.getpid()) - 1
    subject = Peer(uid=1000, gid=1000, pid=os.getpid(), pidfd=None, start_time=recorded)
    assert asyncio.run(backend_for(link).check(subject, ALICE, REQUEST)) is Decision.YES
    ((_, sent), *_rest) = link.calls[0].body
    assert sent["start-time"] == ("t", recorded)
    assert sent["pid"] == ("u", os.getpid())


class ScriptedLink(FakeLink):
    """Answers each CheckAuthorization by its action id."""

    def __init__(self, answers: dict[str, tuple[bool, bool]]) -> None:
        super().__init__()
        self.answers = answers

    async def call_raw(self, message: Message, *, timeout_s: float | None = None) -> Message:
        self.calls.append(message)
        return reply_to(message, *self.answers[message.body[1]])


def asked(link: FakeLink) -> list[tuple[str, dict[str, str], int]]:
    return [(c.body[1], c.body[2], c.body[3]) for c in link.calls]


def test_read_is_asked_without_owner_details() -> None:
    link = ScriptedLink({actions.READ: (False, True)})
    read = Request(actions.READ, "web-b", 1001)
    assert asyncio.run(backend_for(link).check(ME, ALICE, interactive(read))) is Decision.AUTH_ADMIN
    # One interactive check; the agent it may start sees no owner either.
    assert asked(link) == [(actions.READ, {"capsule": "web-b"}, ALLOW_USER_INTERACTION)]


def test_read_details_are_the_same_whether_the_capsule_exists_or_not() -> None:
    def details(owner: int | None) -> list[tuple[str, dict[str, str], int]]:
        link = ScriptedLink({actions.READ: (False, False)})
        asyncio.run(backend_for(link).check(ME, ALICE, Request(actions.READ, "x", owner)))
        return asked(link)

    assert details(1001) == details(None) == details(0)


def test_an_unreadable_capsules_owner_is_not_shown() -> None:
    link = ScriptedLink({actions.READ: (False, True), actions.MANAGE: (False, True)})
    assert (
        asyncio.run(backend_for(link).check(ME, ALICE, interactive(OTHERS))) is Decision.AUTH_ADMIN
    )
    assert asked(link) == [
        (actions.READ, {"capsule": "web-b"}, 0),  # never interactive: no dialog for the probe
        (actions.MANAGE, {"capsule": "web-b", "verb": "start"}, ALLOW_USER_INTERACTION),
    ]


def test_a_readable_capsules_owner_is_shown() -> None:
    link = ScriptedLink({actions.READ: (True, False), actions.MANAGE: (True, False)})
    assert asyncio.run(backend_for(link).check(ME, ALICE, OTHERS)) is Decision.YES
    (_, first, _), (action, second, _) = asked(link)
    assert first == {"capsule": "web-b"}
    assert action == actions.MANAGE
    assert second["owner-uid"] == "1001"
    assert second["owner"]  # the user name, or "1001" where uid 1001 has none


def test_own_capsule_and_create_need_no_read_probe() -> None:
    for request in (REQUEST, Request(actions.CREATE, "new", 1000)):
        link = ScriptedLink({request.action: (True, False)})
        assert asyncio.run(backend_for(link).check(ME, ALICE, request)) is Decision.YES
        ((action, details, _),) = asked(link)
        assert (action, details["owner-uid"]) == (request.action, "1000")


def test_a_failed_read_probe_refuses_without_asking_more() -> None:
    class ErrorLink(FakeLink):
        async def call_raw(self, message: Message, *, timeout_s: float | None = None) -> Message:
            self.calls.append(message)
            return new_error(message, "org.freedesktop.DBus.Error.ServiceUnknown")

    link = ErrorLink()
    assert asyncio.run(backend_for(link).check(ME, ALICE, OTHERS)) is Decision.NO
    assert [c.body[1] for c in link.calls] == [actions.READ]


class RecordingHolder:
    """A stand-in for the transport's slot holder: records when a call waits without its slot."""

    def __init__(self, link: FakeLink) -> None:
        self.link = link
        self.events: list[str] = []

    @contextlib.asynccontextmanager
    async def released(self) -> AsyncIterator[None]:
        self.events.append(f"released with {self.link.waiting} waiting in polkitd")
        try:
            yield
        finally:
            self.events.append(f"back with {self.link.waiting} waiting in polkitd")


@pytest.mark.parametrize("allow_interactive", [True, False])
def test_an_interactive_check_waits_without_its_call_slot(allow_interactive: bool) -> None:
    # Finding 8: an agent that never answers must not pin a call slot for the 300 s an
    # interactive check may take; a non-interactive one (milliseconds) keeps its slot.
    async def main() -> list[str]:
        link = FakeLink()
        holder = RecordingHolder(link)
        request = interactive(REQUEST) if allow_interactive else REQUEST
        with callslot.holding(holder):
            checking = asyncio.create_task(backend_for(link).check(ME, ALICE, request))
            await asyncio.wait_for(link.when_waiting(1).wait(), 5)
            link.release.set()
            assert await asyncio.wait_for(checking, 5) is Decision.YES
        return holder.events

    events = asyncio.run(main())
    if allow_interactive:
        assert events == ["released with 0 waiting in polkitd", "back with 0 waiting in polkitd"]
    else:
        assert events == []
