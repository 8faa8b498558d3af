"""The sd-journal adapter: reads a capsule's entries (capsuled.journal selects which).

`SdJournal` is what the daemon injects as `Services.journal`; `read_tail` and `Follower` do the
work. Every entry the library hands back is checked again against the selection
(journal.accepts) before it becomes an Entry.

Bounds: the follower reads ``FOLLOW_BATCH`` entries per worker-thread hop and holds at most that
many. Each Follower holds one inotify instance (sd_journal_get_fd), and the kernel allows a user
128 by default (fs.inotify.max_user_instances, shared by all of root's processes): callers must
cap how many follow at once. read_tail() opens no inotify instance.

systemd-python is imported lazily (inside functions) so that importing this module is cheap and
works where the C extension is missing (the unit tests of the pure parts, the client).  We use
``Reader``'s raw accessors (``_next``, ``_previous``, ``_get``, ``_get_realtime``,
``_get_cursor``): ``Reader.get_next()`` decodes every field of an entry and turns the timestamp
into a ``datetime`` through a float, losing microseconds; we need exact microseconds, raw bytes
for MESSAGE, and only a handful of fields.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, TypeVar, cast

from capsuled.journal import (
    MAX_LINES,
    MAX_TAIL_SCANNED,
    MESSAGE_MAX_BYTES,
    MESSAGE_MAX_WIRE_BYTES,
    TAIL_MAX_BYTES,
    Entry,
    MatchGroups,
    accepts,
    check_names,
    entry_from_fields,
    match_fields,
    message_wire_bytes,
    selection_match_groups,
)

__all__ = ["FOLLOW_BATCH", "FOLLOW_RECHECK_S", "Follower", "SdJournal", "read_tail"]

# Entries read per hop to the worker thread while following: bounds the time one hop holds the
# reader and the memory a burst costs before the consumer takes them.
FOLLOW_BATCH = 256
# The follower re-checks the journal at least this often even if inotify stays quiet (files on
# a file system without inotify, or a missed rotation); sd_journal_get_timeout() may ask for less.
FOLLOW_RECHECK_S = 5.0


class Reader(Protocol):
    """The part of systemd.journal.Reader we use (systemd-python ships no type information)."""

    data_threshold: int

    def add_match(self, match: str) -> None: ...
    def add_disjunction(self) -> None: ...
    def seek_tail(self) -> None: ...
    def seek_cursor(self, cursor: str) -> None: ...
    def seek_realtime(self, realtime: int) -> None: ...
    def test_cursor(self, cursor: str) -> bool: ...
    def fileno(self) -> int: ...
    def process(self) -> int: ...
    def get_timeout_ms(self) -> int: ...
    def close(self) -> None: ...
    def _next(self) -> bool: ...
    def _previous(self) -> bool: ...
    def _get(self, field: str) -> bytes: ...
    def _get_realtime(self) -> int: ...
    def _get_cursor(self) -> str: ...


def _open_reader(journal_dir: str | None) -> Reader:
    from systemd import journal  # untyped (pyproject mypy overrides); see Reader

    if journal_dir is not None:
        reader = cast(Reader, journal.Reader(path=journal_dir))
    else:
        # Capsule entries (dynamic uids, PID 1) all land in the system journal: no need to open
        # every user's files too.
        reader = cast(Reader, journal.Reader(flags=journal.LOCAL_ONLY | journal.SYSTEM))
    # A few bytes over our cap so we can still tell that a message was longer than the cap.
    reader.data_threshold = MESSAGE_MAX_BYTES + 64
    return reader


def _apply_groups(reader: Reader, groups: MatchGroups) -> None:
    for index, group in enumerate(groups):
        if index:
            reader.add_disjunction()
        for term in group:
            reader.add_match(term)


def _read_fields(reader: Reader, names: Sequence[str]) -> dict[str, bytes]:
    fields: dict[str, bytes] = {}
    for name in names:
        try:
            fields[name] = reader._get(name)
        except KeyError:  # the field is absent from this entry
            continue
    return fields


def _current_entry(
    reader: Reader, capsule: str, unit: str | None, names: Sequence[str]
) -> Entry | None:
    """The entry the reader points at, if it belongs to the selection."""
    fields = _read_fields(reader, names)
    if not accepts(capsule, unit, fields):
        return None
    return entry_from_fields(
        capsule, fields, timestamp_usec=reader._get_realtime(), cursor=reader._get_cursor()
    )


def read_tail(
    capsule: str,
    *,
    unit: str | None,
    lines: int,
    since_usec: int | None,
    journal_dir: str | None = None,
    max_bytes: int = TAIL_MAX_BYTES,
    max_scanned: int = MAX_TAIL_SCANNED,
) -> list[Entry]:
    """The newest ``lines`` entries of the capsule (or of one unit in it), oldest first.

    At most ``max_bytes`` of message text (``message_wire_bytes``) in all: the read stops at
    the first (walking back: newest first) entry that would not fit, so what is returned is
    still the newest entries without a gap, just fewer of them. Likewise it stops after
    looking at ``max_scanned`` of the capsule's entries (most may be other units').

    Blocking (file I/O on the journal): call it through asyncio.to_thread.

    Raises:
        ValueError: lines outside 0..MAX_LINES, max_bytes below MESSAGE_MAX_WIRE_BYTES (one
            entry must always fit), or an invalid name.
        OSError: the journal could not be opened.
    """
    check_names(capsule, unit)
    if not 0 <= lines <= MAX_LINES:
        raise ValueError(f"lines must be between 0 and {MAX_LINES}")
    if max_bytes < MESSAGE_MAX_WIRE_BYTES:
        raise ValueError(f"max_bytes must be at least {MESSAGE_MAX_WIRE_BYTES}")
    if lines == 0:
        return []
    reader = _open_reader(journal_dir)
    try:
        groups = selection_match_groups(capsule, unit)
        _apply_groups(reader, groups)
        names = match_fields(groups)
        newest_first: list[Entry] = []
        budget = max_bytes
        reader.seek_tail()
        scanned = 0
        while len(newest_first) < lines and scanned < max_scanned and reader._previous():
            scanned += 1
            # Walking back, the first entry older than since ends the read (journalctl -n with
            # --since agrees except across a wall-clock jump backwards, where it may show more).
            if since_usec is not None and reader._get_realtime() < since_usec:
                break
            entry = _current_entry(reader, capsule, unit, names)
            if entry is not None:
                budget -= message_wire_bytes(entry.message)
                if budget < 0:
                    break
                newest_first.append(entry)
        newest_first.reverse()
        return newest_first
    finally:
        reader.close()


_T = TypeVar("_T")


class Follower:
    """Async iterator over the capsule's entries as they are written.

    Where it starts: after the entry ``after_cursor`` names; else at the first entry at or after
    ``since_usec``; else at the end of the journal as it is when start() (or the first
    ``__anext__``) runs.  To continue read_tail() without a gap or a duplicate, pass the cursor
    of its last entry; if it returned nothing, pass ``since_usec`` = a realtime taken before the
    read_tail() call (nothing of the selection existed then, so everything from that time on is
    new).

    Journal access runs in worker threads, one hop at a time; the event loop only waits on the
    journal's inotify fd (add_reader).  The reader is closed by close()/aclose(), by leaving an
    ``async with`` block, or when a pending ``__anext__`` is cancelled (the Follower is then
    finished); if a worker thread is still using the reader, it is closed when the thread returns.
    """

    def __init__(
        self,
        capsule: str,
        *,
        unit: str | None,
        after_cursor: str | None,
        since_usec: int | None = None,
        journal_dir: str | None = None,
    ) -> None:
        check_names(capsule, unit)
        self._capsule = capsule
        self._unit = unit
        self._after_cursor = after_cursor
        self._since_usec = since_usec if since_usec is not None else 0
        self._starts_at_time = after_cursor is None and since_usec is not None
        self._journal_dir = journal_dir
        self._groups = selection_match_groups(capsule, unit)
        self._names = match_fields(self._groups)
        self._reader: Reader | None = None
        self._fd: int | None = None
        self._watching = False
        self._hop_running = False
        self._pending: collections.deque[Entry] = collections.deque()
        self._deliver_current = False
        self._closed = False
        self._released = asyncio.Event()

    # -- worker-thread side: only ever one of these runs at a time --

    def _open(self) -> None:
        reader = _open_reader(self._journal_dir)
        self._reader = reader
        # sd_journal_get_fd() before positioning: it sets up the inotify watches, and changes
        # after that point are then guaranteed to wake us (sd_journal_get_fd(3)).
        self._fd = reader.fileno()
        _apply_groups(reader, self._groups)
        if self._after_cursor is not None:
            reader.seek_cursor(self._after_cursor)
            # seek_cursor() positions *before* the entry; stepping onto it consumes it, unless it
            # is gone (vacuumed) and we landed on a later one, which is then new to the caller.
            if reader._next() and not reader.test_cursor(self._after_cursor):
                self._deliver_current = True
        elif self._starts_at_time:
            # seek_realtime() positions before the first entry at or after that time; the next
            # _next() lands on it.
            reader.seek_realtime(self._since_usec)
        else:
            # sd-journal idiom for "only new entries": stand on the last existing entry.
            reader.seek_tail()
            reader._previous()

    def _read_batch(self) -> tuple[list[Entry], bool]:
        """Up to FOLLOW_BATCH new entries, and whether more may be waiting."""
        reader = self._reader
        if reader is None:
            return [], False
        batch: list[Entry] = []
        if self._deliver_current:
            self._deliver_current = False
            entry = _current_entry(reader, self._capsule, self._unit, self._names)
            if entry is not None:
                batch.append(entry)
        for _ in range(FOLLOW_BATCH):
            if not reader._next():
                return batch, False
            if self._starts_at_time and reader._get_realtime() < self._since_usec:
                continue  # realtime is not monotonic across journal files: seeking is a hint
            entry = _current_entry(reader, self._capsule, self._unit, self._names)
            if entry is not None:
                batch.append(entry)
        return batch, True

    def _process(self) -> float:
        """Consume the wake-up (sd_journal_process) and say how long the next wait may be."""
        reader = self._reader
        if reader is None:
            return FOLLOW_RECHECK_S
        reader.process()
        timeout_ms = reader.get_timeout_ms()
        if timeout_ms < 0:
            return FOLLOW_RECHECK_S
        return min(timeout_ms / 1000, FOLLOW_RECHECK_S)

    # -- event-loop side --

    async def _in_thread(self, work: Callable[[], _T]) -> _T:
        if self._closed:
            raise StopAsyncIteration
        future = asyncio.get_running_loop().run_in_executor(None, work)
        self._hop_running = True

        def finished(done: asyncio.Future[_T]) -> None:
            self._hop_running = False
            if not done.cancelled():
                done.exception()  # mark retrieved: an abandoned hop has nobody awaiting it
            if self._closed:
                self._close_reader()

        future.add_done_callback(finished)
        try:
            # shield: cancelling us must not abandon the thread while it holds the reader;
            # the reader is closed when the hop returns instead (finished above).
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.close()
            raise

    async def _wait_for_change(self, timeout_s: float) -> None:
        fd = self._fd
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            # One shot: the fd stays readable until _process() runs in a thread, and a
            # level-triggered reader would spin the loop meanwhile.
            self._stop_watching()
            if not woken.done():
                woken.set_result(None)

        loop.add_reader(fd, on_readable)
        self._watching = True
        try:
            await asyncio.wait_for(woken, timeout_s)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            self.close()
            raise
        finally:
            self._stop_watching()

    def _stop_watching(self) -> None:
        if self._watching and self._fd is not None:
            self._watching = False
            asyncio.get_running_loop().remove_reader(self._fd)

    def __aiter__(self) -> Self:
        return self

    async def start(self) -> None:
        """Open the journal and take the starting position (the first __anext__ does it too).

        Raises:
            OSError: the journal could not be opened.
        """
        if self._reader is None:
            await self._in_thread(self._open)

    async def __anext__(self) -> Entry:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        # The first pass after running dry only calls sd_journal_process() (files may have been
        # added or rotated since we opened); after that we wait for inotify or the recheck.
        wait_s = 0.0
        while not self._pending:
            batch, more = await self._in_thread(self._read_batch)
            self._pending.extend(batch)
            if self._pending or more:
                continue
            if wait_s > 0:
                await self._wait_for_change(wait_s)
            wait_s = await self._in_thread(self._process)
        return self._pending.popleft()

    def close(self) -> None:
        """Stop following and release the journal (now, or when the worker thread returns)."""
        self._closed = True
        self._pending.clear()
        try:
            self._stop_watching()
        except RuntimeError:  # no running loop: nothing can be registered with it either
            self._watching = False
        if not self._hop_running:
            self._close_reader()

    def _close_reader(self) -> None:
        reader, self._reader, self._fd = self._reader, None, None
        if reader is not None:
            reader.close()
        self._released.set()

    async def wait_closed(self) -> None:
        """Wait until, after close(), the journal has really been released."""
        await self._released.wait()

    async def aclose(self) -> None:
        """Async spelling of close(), for contextlib.aclosing() and async generators' habits."""
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class SdJournal:
    """capsuled.journal.Journal over the system's journal (or the files under `journal_dir`)."""

    journal_dir: str | None = None

    async def tail(
        self, capsule: str, *, unit: str | None, lines: int, since_usec: int | None
    ) -> list[Entry]:
        """read_tail in a worker thread: it is file I/O on the journal."""
        return await asyncio.to_thread(
            read_tail,
            capsule,
            unit=unit,
            lines=lines,
            since_usec=since_usec,
            journal_dir=self.journal_dir,
        )

    def follow(
        self,
        capsule: str,
        *,
        unit: str | None,
        after_cursor: str | None,
        since_usec: int | None,
    ) -> Follower:
        """A Follower: an async iterator and its own async context manager."""
        return Follower(
            capsule,
            unit=unit,
            after_cursor=after_cursor,
            since_usec=since_usec,
            journal_dir=self.journal_dir,
        )
