"""Streaming methods (Logs, Watch) through the Dispatcher: the journal replaced by a list,
systemd's signals by FakeBackend's watchers."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from methods_fixtures import (
    ALICE,
    BOB,
    ENTRIES_FROM_USEC,
    INTERFACE,
    MALLORY,
    ROOT,
    FakeJournal,
    World,
    entry,
    make_world,
    peer,
)

from capsuled import errors, journal
from capsuled.methods import streams
from capsuled.varlink.errors import ExpectedMore
from capsuled.varlink.messages import Call

TIMEOUT_S = 1.0
ALPHA_CREATED_USEC = ENTRIES_FROM_USEC - 1_000_000


@pytest.fixture
def world(tmp_path: Path) -> World:
    world = make_world(tmp_path).standard()
    # alpha was created before the journal entries the tests read were written (Logs shows
    # non-root callers only what its incarnation wrote: since its record's creation).
    record = world.records.get("alpha")
    assert record is not None
    world.records.put(dataclasses.replace(record, created_usec=ALPHA_CREATED_USEC))
    return world


@pytest.fixture
def fake_journal(world: World) -> FakeJournal:
    world.journal.entries = [entry(n) for n in range(1, 6)]
    return world.journal


class Stream:
    """A call with `more` running as a task; its `continues` replies arrive on a queue."""

    def __init__(self, world: World, method: str, params: dict[str, object], uid: int) -> None:
        self.replies: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        call = Call(f"{INTERFACE}.{method}", params, more=True)
        self.task = asyncio.create_task(world.dispatcher.handle(call, peer(uid), self._notify))

    async def _notify(self, reply: dict[str, object]) -> None:
        self.replies.put_nowait(reply)

    async def next(self) -> dict[str, object]:
        """The next reply; fails if the call ended or nothing came in time."""
        getter = asyncio.ensure_future(self.replies.get())
        done, _ = await asyncio.wait(
            {getter, self.task}, timeout=TIMEOUT_S, return_when="FIRST_COMPLETED"
        )
        if getter not in done:
            getter.cancel()
            if self.task in done:
                raise AssertionError(f"the call ended: {self.task.result()!r}")
            raise AssertionError("no reply in time")
        return getter.result()

    async def close(self) -> None:
        """The client hangs up: the transport cancels the handler."""
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@asynccontextmanager
async def stream(
    world: World, method: str, params: dict[str, object], uid: int = ALICE
) -> AsyncIterator[Stream]:
    s = Stream(world, method, params, uid)
    try:
        yield s
    finally:
        await s.close()


def messages(replies: list[dict[str, object]]) -> list[list[object]]:
    found = []
    for reply in replies:
        entries = reply["entries"]
        assert isinstance(entries, list)
        found.append([e["message"] for e in entries])
    return found


# --- Logs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("uid", [ALICE, ROOT], ids=["owner", "root"])
def test_logs_returns_the_newest_entries(world: World, fake_journal: FakeJournal, uid: int) -> None:
    out = world.run("Logs", {"name": "alpha", "lines": 2}, uid=uid)
    assert out.replies == []
    assert messages([out.reply]) == [["line 4", "line 5"]]
    assert out.reply["entries"] == [entry(4).to_wire(), entry(5).to_wire()]
    # Not root: this incarnation's entries only (since the record's creation).
    since = None if uid == ROOT else ALPHA_CREATED_USEC
    assert fake_journal.asked == [{"capsule": "alpha", "unit": None, "lines": 2, "since": since}]


def test_logs_passes_unit_and_since_and_defaults_lines(
    world: World, fake_journal: FakeJournal
) -> None:
    later = ALPHA_CREATED_USEC + 1234
    world.run("Logs", {"name": "alpha", "unit": "web.service", "since": later})
    assert fake_journal.asked == [
        {"capsule": "alpha", "unit": "web.service", "lines": journal.DEFAULT_LINES, "since": later}
    ]


@pytest.mark.parametrize("lines", [0, journal.MAX_LINES])
def test_logs_line_bounds_are_accepted(world: World, fake_journal: FakeJournal, lines: int) -> None:
    reply = world.run("Logs", {"name": "alpha", "lines": lines}).reply
    assert len(reply["entries"]) == min(lines, 5)  # type: ignore[arg-type]  # a list, checked by the IDL


def test_logs_with_more_sends_one_entry_per_reply(world: World, fake_journal: FakeJournal) -> None:
    out = world.run("Logs", {"name": "alpha", "lines": 3}, more=True)
    assert messages([*out.replies, out.reply]) == [["line 3"], ["line 4"], ["line 5"]]


def test_logs_with_more_and_nothing_to_send(world: World, fake_journal: FakeJournal) -> None:
    fake_journal.entries = []
    out = world.run("Logs", {"name": "alpha"}, more=True)
    assert out.replies == []
    assert out.reply == {"entries": []}


@pytest.mark.parametrize("lines", [-1, journal.MAX_LINES + 1])
def test_logs_lines_out_of_range(world: World, fake_journal: FakeJournal, lines: int) -> None:
    exc = world.error("Logs", {"name": "alpha", "lines": lines})
    assert isinstance(exc, errors.InvalidValue)
    assert exc.parameters["parameter"] == "lines"
    assert fake_journal.asked == []


@pytest.mark.parametrize("unit", ["web", "../web.service", "a/b.service", "web@.service", ""])
def test_logs_invalid_unit(world: World, fake_journal: FakeJournal, unit: str) -> None:
    exc = world.error("Logs", {"name": "alpha", "unit": unit})
    assert isinstance(exc, errors.InvalidUnit)
    assert exc.parameters["unit"] == unit
    assert exc.parameters["line"] is None
    assert fake_journal.asked == []


@pytest.mark.parametrize("bad", ["", "a.b", "x" * 30, "a/b"])
def test_logs_invalid_name(world: World, fake_journal: FakeJournal, bad: str) -> None:
    assert isinstance(world.error("Logs", {"name": bad}, uid=ROOT), errors.InvalidName)
    assert fake_journal.asked == []
    assert world.backend.seen == []


def test_logs_follow_needs_more(world: World, fake_journal: FakeJournal) -> None:
    exc = world.error("Logs", {"name": "alpha", "follow": True})
    assert isinstance(exc, ExpectedMore)
    assert fake_journal.asked == []


@pytest.mark.parametrize("uid", [MALLORY, BOB], ids=["non-member", "other-member"])
def test_logs_of_a_capsule_the_caller_may_not_read(
    world: World, fake_journal: FakeJournal, uid: int
) -> None:
    for name in ("alpha", "ghost"):
        exc = world.error("Logs", {"name": name}, uid=uid)
        assert isinstance(exc, errors.NoSuchCapsule)
        assert exc.parameters == {"name": name}
    assert fake_journal.asked == []
    assert world.backend.seen == []


def test_logs_of_an_absent_capsule(world: World, fake_journal: FakeJournal) -> None:
    assert isinstance(world.error("Logs", {"name": "ghost"}, uid=ROOT), errors.NoSuchCapsule)
    assert fake_journal.asked == []


def test_logs_without_systemd(world: World, fake_journal: FakeJournal) -> None:
    world.backend.unavailable = True
    assert isinstance(world.error("Logs", {"name": "alpha"}), errors.SystemdUnavailable)


def test_logs_follow_sends_old_then_new_entries_and_resumes_after_the_last(
    world: World, fake_journal: FakeJournal
) -> None:
    async def main() -> None:
        fake_journal.new = asyncio.Queue()
        async with stream(world, "Logs", {"name": "alpha", "lines": 2, "follow": True}) as s:
            assert messages([await s.next(), await s.next()]) == [["line 4"], ["line 5"]]
            fake_journal.new.put_nowait(entry(6))
            fake_journal.new.put_nowait(entry(7))
            assert messages([await s.next(), await s.next()]) == [["line 6"], ["line 7"]]
            assert world.services.followers == {ALICE: 1}
            assert fake_journal.followers == [
                {"capsule": "alpha", "unit": None, "after": entry(5).cursor, "since": None}
            ]
        assert world.services.followers == {}  # the hang-up released the follower

    asyncio.run(main())


def test_logs_follow_with_no_old_entries_starts_from_the_call(
    world: World, fake_journal: FakeJournal
) -> None:
    async def main() -> None:
        fake_journal.entries = []
        fake_journal.new = asyncio.Queue()
        params = {"name": "alpha", "unit": "web.service", "follow": True, "since": 5}
        async with stream(world, "Logs", params) as s:
            fake_journal.new.put_nowait(entry(1))
            assert messages([await s.next()]) == [["line 1"]]
            (follower,) = fake_journal.followers
            assert follower["after"] is None
            assert follower["unit"] == "web.service"
            assert isinstance(follower["since"], int)
            assert follower["since"] > 5

    asyncio.run(main())


def test_logs_followers_are_bounded(world: World, fake_journal: FakeJournal) -> None:
    # In all: other users hold every follower.
    world.services.followers = {4242: streams.MAX_FOLLOWERS}
    exc = world.error("Logs", {"name": "alpha", "follow": True}, more=True)
    assert isinstance(exc, errors.QuotaExceeded)
    assert exc.parameters == {"what": "followers", "limit": streams.MAX_FOLLOWERS}
    assert world.services.followers == {4242: streams.MAX_FOLLOWERS}
    assert fake_journal.followers == []


def test_logs_followers_are_bounded_per_caller(world: World, fake_journal: FakeJournal) -> None:
    # One user cannot take them all: past their share they are refused, others are not.
    world.services.followers = {ALICE: streams.MAX_FOLLOWERS_PER_UID}
    exc = world.error("Logs", {"name": "alpha", "follow": True}, more=True)
    assert isinstance(exc, errors.QuotaExceeded)
    assert exc.parameters == {"what": "followers", "limit": streams.MAX_FOLLOWERS_PER_UID}
    assert world.services.followers == {ALICE: streams.MAX_FOLLOWERS_PER_UID}
    assert fake_journal.followers == []


def test_logs_is_not_audited(world: World, fake_journal: FakeJournal) -> None:
    world.run("Logs", {"name": "alpha"})
    assert world.audit_records == []


# --- Watch ----------------------------------------------------------------------------------


def capsule_event(reply: dict[str, object]) -> tuple[object, ...]:
    event = reply["event"]
    assert isinstance(event, dict)
    assert event["kind"] == "capsule"
    assert event["unit"] is None
    assert isinstance(event["timestamp"], int)
    return (event["capsule"], event["state"], event["subState"])


def test_watch_needs_more(world: World) -> None:
    assert isinstance(world.error("Watch", {}), ExpectedMore)
    assert world.backend.seen == []


@pytest.mark.parametrize(
    ("uid", "expected"),
    [
        (ROOT, ["alpha", "beta", "orphan"]),
        (ALICE, ["alpha"]),
        (BOB, ["beta"]),
    ],
)
def test_watch_starts_with_a_snapshot_of_what_the_caller_may_read(
    world: World, uid: int, expected: list[str]
) -> None:
    async def main() -> None:
        async with stream(world, "Watch", {}, uid) as s:
            got = [capsule_event(await s.next())[0] for _ in expected]
            assert got == expected
            assert s.replies.empty()

    asyncio.run(main())


def test_watch_streams_changes_in_order_and_hides_capsules_the_caller_may_not_read(
    world: World,
) -> None:
    async def main() -> None:
        async with stream(world, "Watch", {}, BOB) as s:
            assert capsule_event(await s.next()) == ("beta", "inactive", "dead")
            # Changes of alice's capsule come first, and must not reach bob.
            await world.call("Stop", {"name": "alpha"}, uid=ROOT)
            await world.call("Start", {"name": "beta"}, uid=BOB)
            assert capsule_event(await s.next()) == ("beta", "activating", "start")
            assert capsule_event(await s.next()) == ("beta", "active", "running")
            await world.call("Stop", {"name": "beta"}, uid=BOB)
            assert capsule_event(await s.next()) == ("beta", "deactivating", "stop-sigterm")
            assert capsule_event(await s.next()) == ("beta", "inactive", "dead")
            assert s.replies.empty()

    asyncio.run(main())


def test_watch_names_only_those(world: World) -> None:
    async def main() -> None:
        async with stream(world, "Watch", {"names": ["beta"]}, ROOT) as s:
            assert capsule_event(await s.next()) == ("beta", "inactive", "dead")
            await world.call("Stop", {"name": "alpha"}, uid=ROOT)
            await world.call("Start", {"name": "beta"}, uid=ROOT)
            assert capsule_event(await s.next())[:2] == ("beta", "activating")

    asyncio.run(main())


def test_watch_names_cannot_widen_what_the_caller_may_read(world: World) -> None:
    async def main() -> None:
        async with stream(world, "Watch", {"names": ["alpha", "beta"]}, BOB) as s:
            assert capsule_event(await s.next())[0] == "beta"
            await world.call("Stop", {"name": "alpha"}, uid=ROOT)
            await world.call("Start", {"name": "beta"}, uid=BOB)
            assert capsule_event(await s.next())[:2] == ("beta", "activating")

    asyncio.run(main())


def test_watch_sees_a_capsule_created_while_watching(world: World) -> None:
    async def main() -> None:
        async with stream(world, "Watch", {}, ALICE) as s:
            assert capsule_event(await s.next())[0] == "alpha"
            await world.call("Create", {"name": "fresh"}, uid=ALICE)
            states = [capsule_event(await s.next()) for _ in range(4)]
            assert [e[:2] for e in states] == [
                ("fresh", "activating"),
                ("fresh", "active"),
                ("fresh", "deactivating"),
                ("fresh", "inactive"),
            ]

    asyncio.run(main())


@pytest.mark.parametrize("bad", ["", "a.b", "x" * 30])
def test_watch_invalid_names(world: World, bad: str) -> None:
    exc = world.error("Watch", {"names": ["alpha", bad]}, more=True)
    assert isinstance(exc, errors.InvalidName)
    assert exc.parameters["name"] == bad
    assert world.backend.seen == []


def test_watch_too_many_names(world: World) -> None:
    names: list[object] = [f"c{i}" for i in range(streams.MAX_WATCH_NAMES + 1)]
    exc = world.error("Watch", {"names": names}, more=True)
    assert isinstance(exc, errors.InvalidValue)
    assert exc.parameters["parameter"] == "names"


def test_watch_without_systemd(world: World) -> None:
    world.backend.unavailable = True
    assert isinstance(world.error("Watch", {}, more=True), errors.SystemdUnavailable)


def test_streams_run_while_other_calls_are_served(world: World, fake_journal: FakeJournal) -> None:
    async def main() -> None:
        fake_journal.new = asyncio.Queue()
        async with (
            stream(world, "Watch", {}, ALICE) as watch,
            stream(world, "Logs", {"name": "alpha", "lines": 0, "follow": True}) as logs,
        ):
            await watch.next()
            out = await asyncio.wait_for(world.call("Describe", {"name": "alpha"}), TIMEOUT_S)
            assert out.reply["capsule"]["name"] == "alpha"  # type: ignore[index]  # checked by the IDL
            fake_journal.new.put_nowait(entry(9))
            assert messages([await logs.next()]) == [["line 9"]]

    asyncio.run(main())
