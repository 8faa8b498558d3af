"""Streaming methods: Logs (journal of a capsule) and Watch (state changes).

Both stream with `ctx.notify`, which waits for the transport to drain: a
client that stops reading stalls only its own call, and the transport drops it
when its write buffer stays full (bounded memory, invariant 4). Neither blocks
the event loop: journal reads run in a worker thread or behind the journal's
own fd, D-Bus signals arrive on the bus connection's reader task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from capsuled import errors, journal, wire
from capsuled.methods import params
from capsuled.methods.context import CallContext, backend_errors
from capsuled.methods.inside import is_capsule_unit
from capsuled.policy import actions as act
from capsuled.systemd import errors as sd
from capsuled.systemd.backend import CapsuleEvent
from capsuled.varlink.errors import ExpectedMore

# How long a Watch trusts one "may this caller read capsule X" answer; group
# changes take effect within this time without a query per event.
WATCH_ACCESS_TTL_S = 5.0
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
        for entry in wire:
            await ctx.notify({"entries": [entry]})
        # Resume after the last entry sent, or (none) from when we started reading: no gap,
        # no duplicate.
        async with ctx.services.journal.follow(
            name,
            unit=unit,
            after_cursor=entries[-1].cursor if entries else None,
            since_usec=None if entries else max(started_usec, since or 0),
        ) as follower:
            async for new in follower:
                await ctx.notify({"entries": [new.to_wire()]})
    finally:
        followers[uid] -= 1
        if not followers[uid]:
            del followers[uid]
    # The journal never ends a follow; only the client's hang-up (cancellation) does.
    return {"entries": []}


async def watch(ctx: CallContext, p: wire.WatchParams) -> wire.WatchReply:
    watcher = _Watch(ctx, params.capsule_names(p["names"], MAX_WATCH_NAMES))
    try:
        with backend_errors(""):
            return await watcher.run()
    finally:
        await watcher.close()


class _Watch:
    """One Watch call: PID 1's capsule events, filtered to what the caller may read, and for
    capsules named explicitly their units' events too, all relayed through one bounded queue."""

    def __init__(self, ctx: CallContext, wanted: frozenset[str] | None) -> None:
        self._ctx = ctx
        self._wanted = wanted  # None: every capsule the caller may read
        # name -> (may the caller read it, when we asked): a cache that expires, so group
        # changes take effect within WATCH_ACCESS_TTL_S without a query per event.
        self._access: dict[str, tuple[bool, float]] = {}
        self._queue: asyncio.Queue[wire.WatchReply] = asyncio.Queue(MAX_WATCH_EVENTS_QUEUED)
        self._unit_watches: dict[str, asyncio.Task[None]] = {}
        self._pumping: asyncio.Task[None] | None = None  # PID 1's events into the queue
        self._getting: asyncio.Task[wire.WatchReply] | None = None  # the queue's next event

    async def run(self) -> wire.WatchReply:
        """Relay events until PID 1's stream ends (SystemdUnavailable) or the client hangs up."""
        async with self._ctx.backend.watch() as events:
            # Subscribed first, then the snapshot: a change between the two is seen twice
            # rather than lost, and the client knows we are listening.
            for info in await self._ctx.backend.list_capsules():
                if await self._visible(info.name):
                    self._watch_units(info.name, info.state)
                    await self._ctx.notify(
                        _event("capsule", info.name, None, info.state, info.sub_state)
                    )
            pumping = self._pumping = asyncio.create_task(self._pump(events))
            while True:
                getting = self._getting = asyncio.create_task(self._queue.get())
                await asyncio.wait({getting, pumping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    pumping.result()  # raises what ended the signal stream
                await self._ctx.notify(getting.result())

    async def close(self) -> None:
        """Stop every task the call started and wait for them."""
        tasks: list[asyncio.Task[None] | asyncio.Task[wire.WatchReply]] = [
            *self._unit_watches.values()
        ]
        tasks += [task for task in (self._pumping, self._getting) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _visible(self, name: str) -> bool:
        if self._wanted is not None and name not in self._wanted:
            return False
        now = time.monotonic()
        cached = self._access.get(name)
        if cached is not None and now - cached[1] < WATCH_ACCESS_TTL_S:
            return cached[0]
        record = self._ctx.record_of(name)
        allowed = await self._ctx.may_read(name, self._ctx.owner_of(record))
        if len(self._access) >= MAX_WATCH_NAMES:
            self._access.clear()
        self._access[name] = (allowed, now)
        return allowed

    async def _pump(self, events: AsyncIterator[CapsuleEvent]) -> None:
        async for event in events:
            if await self._visible(event.name):
                self._watch_units(event.name, event.state)
                await self._queue.put(
                    _event("capsule", event.name, None, event.state, event.sub_state)
                )
        raise sd.SystemdUnavailable("PID 1's signal stream ended")

    def _watch_units(self, name: str, state: str) -> None:
        # Units are followed only for capsules named explicitly: each costs a connection.
        if self._wanted is None or state != "active":
            return
        if len(self._unit_watches) >= MAX_UNIT_WATCHES:
            return
        task = self._unit_watches.get(name)
        if task is None or task.done():
            self._unit_watches[name] = asyncio.create_task(self._follow_units(name))

    async def _follow_units(self, name: str) -> None:
        # Ends quietly when the capsule stops: its manager and socket go away with it.
        with contextlib.suppress(sd.BackendError):
            async with self._ctx.backend.capsule_manager(name) as mgr, mgr.watch() as events:
                # Units may have started before we connected: say where they are now.
                for unit in await mgr.list_units():
                    if is_capsule_unit(unit):
                        await self._queue.put(
                            _event("unit", name, unit.name, unit.active_state, unit.sub_state)
                        )
                async for ev in events:
                    await self._queue.put(_event("unit", name, ev.unit, ev.state, ev.sub_state))


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
