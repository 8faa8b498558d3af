"""Streaming methods: Logs (journal of a capsule) and Watch (state changes).

Both stream with `ctx.notify`, which waits for the transport to drain: a
client that stops reading stalls only its own call, and the transport drops it
when its write buffer stays full (bounded memory, invariant 4). Neither blocks
the event loop: journal reads run in a worker thread or behind the journal's
own fd, D-Bus signals arrive on the bus connection's reader task.

One incarnation (issue 11, findings 1 and 2). A capsule name can be removed
and created again by somebody else; its journal keeps both. For everyone but
root, Logs shows only entries written since the capsule's record was created
(`created_usec`: the incarnation the caller was authorized for), and a stream
stays bound to that incarnation and to the grant that allowed it (`Binding`):
a followed Logs, or a Watch of named capsules, ends with AccessChanged when
the record goes away or is replaced (Remove, created again, owner changed) or
the caller may no longer read the capsule. A Watch of every capsule never
ends that way; it re-decides which capsules it shows instead.

When a grant is checked again: at once when capsuled itself changes a record
or reloads its policy (GrantChanges wakes the stream, and every relay compares
the change counter before it sends, so nothing is relayed after the change
that ends it), and otherwise every STREAM_RECHECK_S, for what nobody tells us
(a user leaving a group in NSS, a record edited by hand). Periodic, not per
event: a decision costs an NSS lookup and, with polkit, a D-Bus round trip,
which a chatty log would pay per line; 5 s with at most MAX_FOLLOWERS
followers bounds that cost, and how long a withdrawn grant lingers. A Watch
of named capsules decides STREAM_RECHECK_BATCH of them per round, in turn
(a capsule whose record changed at once), so a Watch of many names costs no
more, and notices a withdrawn grant within a few rounds. Each re-check reads
the caller's account through the account cache (policy/accounts.py): a change
of the user database's files is seen by the next re-check, any other change by
the first one ACCOUNT_TTL_S (1 s) after it.

A capsule without a record (made by root outside capsuled) has no incarnation
we know of: its readers see its whole journal, as with `journalctl -u`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, replace
from typing import NoReturn, TypeVar

from capsuled import errors, journal, wire
from capsuled.methods import params
from capsuled.methods.context import CallContext, GrantSubscription, backend_errors
from capsuled.methods.inside import is_capsule_unit
from capsuled.policy import actions as act
from capsuled.policy.engine import Decision, Request
from capsuled.records import Record
from capsuled.systemd import errors as sd
from capsuled.systemd.backend import CapsuleEvent
from capsuled.varlink.errors import ExpectedMore

# How often a stream checks its grant again without being told (see the module docstring);
# also how long a Watch trusts one "may this caller read capsule X" answer.
STREAM_RECHECK_S = 5.0
# Capsules a Watch of named capsules decides again per round (_Watch._recheck).
STREAM_RECHECK_BATCH = 32
# Journal followers at once, for all callers (each costs an inotify instance).
MAX_FOLLOWERS = 32
# ...and for one caller, so a single user cannot take them all.
MAX_FOLLOWERS_PER_UID = 4
# Events one Watch call holds for a slow client; past this the backend's own bounded signal
# queue (systemd.values.MAX_WATCH_SIGNALS_QUEUED) overflows and the call ends with an error
# rather than buffering without bound.
MAX_WATCH_EVENTS_QUEUED = 256
# Capsules whose units one Watch follows (each is a connection to that capsule's manager).
MAX_UNIT_WATCHES = 16
# A Watch on more names than this is refused: each name costs a filter entry.
MAX_WATCH_NAMES = 1024

T = TypeVar("T")
# What identifies one incarnation of a capsule: its record's owner (uid and name) and creation.
Incarnation = tuple[int, str | None, int]


def incarnation(record: Record | None) -> Incarnation | None:
    """The incarnation a record stands for; None: no record."""
    if record is None:
        return None
    return (record.owner, record.owner_name, record.created_usec)


def _changed_reason(record: Record | None) -> str:
    return "removed" if record is None else "replaced"


class Binding:
    """One stream's grant on one capsule: the request authorize() allowed, and the capsule's
    incarnation then. `check` raises AccessChanged once either no longer holds."""

    def __init__(
        self, ctx: CallContext, name: str, request: Request, record: Record | None
    ) -> None:
        self._ctx = ctx
        self._name = name
        self._request = replace(request, allow_interactive=False)  # a re-check never prompts
        self._bound = incarnation(record)
        self._seen = ctx.services.grants.generation
        self._due = time.monotonic() + STREAM_RECHECK_S
        # The watcher task and the relay both check: one at a time, and a failure sticks, so
        # the relay never sends while the other has found (or is still finding) a change.
        self._checking = asyncio.Lock()
        self._failed: str | None = None  # the reason, once the grant failed

    @classmethod
    @contextlib.contextmanager
    def held(
        cls, ctx: CallContext, name: str, record: Record | None
    ) -> Iterator[tuple[Binding | None, GrantSubscription]]:
        """The binding of what authorize() allowed on `name` (None for root, whose grant never
        changes), and the subscription GrantChanges wakes when it may have changed."""
        request = ctx.authorized(name)
        with ctx.services.grants.subscribe(name) as changes:
            if ctx.peer.uid == 0 or request is None:
                yield None, changes
            else:
                yield cls(ctx, name, request, record), changes

    async def check(self) -> None:
        """Cheap unless something changed or the periodic re-check is due.

        Raises:
            AccessChanged: the record is gone or another one, or the caller lost the grant.
        """
        async with self._checking:
            if self._failed is None:
                self._failed = await self._recheck()
            if self._failed is not None:
                raise errors.AccessChanged(name=self._name, reason=self._failed)

    async def _recheck(self) -> str | None:
        """Why the grant no longer holds, or None (also when nothing is due)."""
        grants = self._ctx.services.grants
        if grants.generation == self._seen and time.monotonic() < self._due:
            return None
        self._seen, self._due = grants.generation, time.monotonic() + STREAM_RECHECK_S
        record = self._ctx.record_of(self._name)
        if incarnation(record) != self._bound:
            return _changed_reason(record)
        request = replace(self._request, owner=self._ctx.owner_of(record))
        verdict = await self._ctx.services.authorizer.decide(self._ctx.peer, request)
        return None if verdict.decision is Decision.YES else "access-withdrawn"

    async def watch(self, changes: GrantSubscription) -> NoReturn:
        """Check when woken or every STREAM_RECHECK_S, until the grant fails (raises)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STREAM_RECHECK_S):
                    await changes.woken.wait()
            changes.take()  # one capsule: whatever changed, check it
            await self.check()


async def while_bound(binding: Binding | None, changes: GrantSubscription, work: Awaitable[T]) -> T:
    """`work`'s result, unless the binding fails first: then its AccessChanged, work cancelled."""
    task = asyncio.ensure_future(work)
    if binding is None:
        return await task
    watcher = asyncio.create_task(binding.watch(changes))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done():
            watcher.result()  # raises AccessChanged (watch never returns)
        return task.result()
    finally:
        for running in (task, watcher):
            running.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def logs(ctx: CallContext, p: wire.LogsParams) -> wire.LogsReply:
    name = params.capsule_name(p["name"])
    unit = params.optional_unit_name(p["unit"])
    lines = p["lines"]
    if lines is None:
        lines = journal.DEFAULT_LINES
    if not 0 <= lines <= journal.MAX_LINES:
        raise errors.InvalidValue(parameter="lines", reason=f"must be 0..{journal.MAX_LINES}")
    follow = bool(p["follow"])
    if follow and not ctx.more:
        raise ExpectedMore()
    record = await ctx.authorize(act.READ, name, interactive=p["allowInteractiveAuthentication"])
    await ctx.existing(name, record)
    since = p["since"]
    if record is not None and ctx.peer.uid != 0:
        # This incarnation's lines only: a name created again must not show the previous
        # owner's (finding 1). By wall-clock time, as journalctl --since.
        since = max(since or 0, record.created_usec)
    started_usec = time.time_ns() // 1000
    entries = await ctx.services.journal.tail(name, unit=unit, lines=lines, since_usec=since)
    wire = [e.to_wire() for e in entries]
    if not ctx.more:
        return {"entries": wire}
    if not follow:
        if not wire:
            return {"entries": []}
        for entry in wire[:-1]:
            await ctx.notify({"entries": [entry]})
        return {"entries": [wire[-1]]}
    followers = ctx.services.followers
    uid = ctx.peer.uid
    if sum(followers.values()) >= MAX_FOLLOWERS:
        # Each follower holds an inotify instance; the kernel allows 128 per user, for all of root.
        raise errors.QuotaExceeded(what="followers", limit=MAX_FOLLOWERS)
    if followers.get(uid, 0) >= MAX_FOLLOWERS_PER_UID:
        raise errors.QuotaExceeded(what="followers", limit=MAX_FOLLOWERS_PER_UID)
    followers[uid] = followers.get(uid, 0) + 1
    try:
        with Binding.held(ctx, name, record) as (binding, changes):
            await while_bound(
                binding,
                changes,
                _follow(ctx, name, unit, binding, entries, max(started_usec, since or 0)),
            )
    finally:
        followers[uid] -= 1
        if not followers[uid]:
            del followers[uid]
    # The journal never ends a follow; only the client's hang-up (cancellation) does.
    return {"entries": []}


async def _follow(
    ctx: CallContext,
    name: str,
    unit: str | None,
    binding: Binding | None,
    tail: list[journal.Entry],
    since_usec: int,
) -> None:
    for entry in tail:
        await ctx.notify({"entries": [entry.to_wire()]})
    # Resume after the last entry sent, or (none) from when we started reading: no gap,
    # no duplicate.
    async with ctx.services.journal.follow(
        name,
        unit=unit,
        after_cursor=tail[-1].cursor if tail else None,
        since_usec=None if tail else since_usec,
    ) as follower:
        async for new in follower:
            if binding is not None:
                await binding.check()  # nothing after a change that ends the grant
            await ctx.notify({"entries": [new.to_wire()]})


async def watch(ctx: CallContext, p: wire.WatchParams) -> wire.WatchReply:
    watcher = _Watch(ctx, params.capsule_names(p["names"], MAX_WATCH_NAMES))
    try:
        with backend_errors(""), ctx.services.grants.subscribe(None) as changes:
            return await watcher.run(changes)
    finally:
        await watcher.close()


@dataclass(frozen=True, slots=True)
class _Access:
    """What a Watch decided about one capsule: for which incarnation, when, under which
    generation of GrantChanges."""

    incarnation: Incarnation | None
    allowed: bool
    checked: float
    generation: int


# A queued event: the reply, its capsule, and the incarnation it belongs to.
_Queued = tuple[wire.WatchReply, str, Incarnation | None]


class _Watch:
    """One Watch call: PID 1's capsule events, filtered to what the caller may read, and for
    capsules named explicitly their units' events too, all relayed through one bounded queue.

    Each event is relayed only if the caller may read its capsule's current incarnation (the
    answer kept for STREAM_RECHECK_S, or until GrantChanges counts a change). With names given,
    a capsule the caller could read that is removed, replaced or no longer readable ends the
    call with AccessChanged; unit events are followed per incarnation (a new one gets a new
    unit watch, the old one's events are dropped).
    """

    def __init__(self, ctx: CallContext, wanted: frozenset[str] | None) -> None:
        self._ctx = ctx
        self._wanted = wanted  # None: every capsule the caller may read
        self._access: dict[str, _Access] = {}
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(MAX_WATCH_EVENTS_QUEUED)
        self._unit_watches: dict[str, tuple[Incarnation | None, asyncio.Task[None]]] = {}
        self._pumping: asyncio.Task[None] | None = None  # PID 1's events into the queue
        self._rechecking: asyncio.Task[None] | None = None  # grants, when woken or due
        self._getting: asyncio.Task[_Queued] | None = None  # the queue's next event

    async def run(self, changes: GrantSubscription) -> wire.WatchReply:
        """Relay events until PID 1's stream ends (SystemdUnavailable), a named capsule's
        grant fails (AccessChanged) or the client hangs up."""
        async with self._ctx.backend.watch() as events:
            # Subscribed first, then the snapshot: a change between the two is seen twice
            # rather than lost, and the client knows we are listening.
            for info in await self._ctx.backend.list_capsules():
                access = await self._visible(info.name)
                if access is not None and access.allowed:
                    self._watch_units(info.name, info.state, access.incarnation)
                    await self._ctx.notify(
                        _event("capsule", info.name, None, info.state, info.sub_state)
                    )
            pumping = self._pumping = asyncio.create_task(self._pump(events))
            rechecking = self._rechecking = asyncio.create_task(self._recheck(changes))
            while True:
                getting = self._getting = asyncio.create_task(self._queue.get())
                await asyncio.wait(
                    {getting, pumping, rechecking}, return_when=asyncio.FIRST_COMPLETED
                )
                if not getting.done():
                    getting.cancel()
                    for ended in (pumping, rechecking):
                        if ended.done():
                            ended.result()  # raises what ended the stream
                reply, name, bound = getting.result()
                # Checked again at relay time: a change since it was queued drops it.
                access = await self._visible(name)
                if access is not None and access.allowed and access.incarnation == bound:
                    await self._ctx.notify(reply)

    async def close(self) -> None:
        """Stop every task the call started and wait for them."""
        tasks: list[asyncio.Task[None] | asyncio.Task[_Queued]] = [
            task for _, task in self._unit_watches.values()
        ]
        tasks += [t for t in (self._pumping, self._rechecking, self._getting) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _visible(self, name: str) -> _Access | None:
        """What the caller may see of `name` now; None: not a name this Watch follows.

        Raises:
            AccessChanged: a named capsule the caller could read is gone, replaced or no
                longer readable.
        """
        if self._wanted is not None and name not in self._wanted:
            return None
        now, generation = time.monotonic(), self._ctx.services.grants.generation
        cached = self._access.get(name)
        if (
            cached is not None
            and cached.generation == generation
            and now - cached.checked < STREAM_RECHECK_S
        ):
            return cached
        record = self._ctx.record_of(name)
        allowed = await self._ctx.may_read(name, self._ctx.owner_of(record))
        access = _Access(incarnation(record), allowed, now, generation)
        if len(self._access) >= MAX_WATCH_NAMES:
            self._access.clear()
        self._access[name] = access
        if self._wanted is not None and cached is not None and cached.allowed:
            if self._ctx.peer.uid != 0 and access.incarnation != cached.incarnation:
                raise errors.AccessChanged(name=name, reason=_changed_reason(record))
            if not allowed:
                raise errors.AccessChanged(name=name, reason="access-withdrawn")
        return access

    async def _recheck(self, changes: GrantSubscription) -> NoReturn:
        """Named capsules' grants, so that a quiet Watch ends too (a Watch of everything
        re-decides as events come): a capsule whose record capsuled changed at once; after a
        policy reload, and every STREAM_RECHECK_S, the readable ones STREAM_RECHECK_BATCH at a
        time, in turn (a Watch may name MAX_WATCH_NAMES capsules, each decision may be a
        polkit round trip, and polkit's slots are everybody's)."""
        turn = 0
        while True:
            timed_out = False
            try:
                async with asyncio.timeout(STREAM_RECHECK_S):
                    await changes.woken.wait()
            except TimeoutError:
                timed_out = True
            names, everything = changes.take()
            if self._wanted is None:
                continue
            if timed_out or everything:
                readable = sorted(n for n, a in self._access.items() if a.allowed)
                if readable:
                    turn %= len(readable)
                    names = frozenset(readable[turn : turn + STREAM_RECHECK_BATCH])
                    turn += STREAM_RECHECK_BATCH
            for name in sorted(names & self._wanted):
                await self._visible(name)

    async def _pump(self, events: AsyncIterator[CapsuleEvent]) -> None:
        async for event in events:
            access = await self._visible(event.name)
            if access is not None and access.allowed:
                self._watch_units(event.name, event.state, access.incarnation)
                reply = _event("capsule", event.name, None, event.state, event.sub_state)
                await self._queue.put((reply, event.name, access.incarnation))
        raise sd.SystemdUnavailable("PID 1's signal stream ended")

    def _watch_units(self, name: str, state: str, bound: Incarnation | None) -> None:
        # Units are followed only for capsules named explicitly: each costs a connection.
        if self._wanted is None or state != "active":
            return
        current = self._unit_watches.get(name)
        if current is not None and current[0] == bound and not current[1].done():
            return
        if current is not None:
            current[1].cancel()  # another incarnation's manager: not ours to follow
        elif len(self._unit_watches) >= MAX_UNIT_WATCHES:
            return
        self._unit_watches[name] = (bound, asyncio.create_task(self._follow_units(name, bound)))

    async def _follow_units(self, name: str, bound: Incarnation | None) -> None:
        # Ends quietly when the capsule stops: its manager and socket go away with it.
        with contextlib.suppress(sd.BackendError):
            async with self._ctx.backend.capsule_manager(name) as mgr, mgr.watch() as events:
                # Units may have started before we connected: say where they are now.
                for unit in await mgr.list_units():
                    if is_capsule_unit(unit):
                        reply = _event("unit", name, unit.name, unit.active_state, unit.sub_state)
                        await self._queue.put((reply, name, bound))
                async for ev in events:
                    reply = _event("unit", name, ev.unit, ev.state, ev.sub_state)
                    await self._queue.put((reply, name, bound))


def _event(
    kind: str, capsule: str, unit: str | None, state: str, sub_state: str | None
) -> wire.WatchReply:
    return {
        "event": {
            "kind": kind,
            "capsule": capsule,
            "unit": unit,
            "state": state,
            "subState": sub_state,
            "timestamp": time.time_ns() // 1000,
        }
    }
