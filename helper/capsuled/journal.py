"""One capsule's journal entries: the newest N (``read_tail``) and new ones (``Follower``).

Which entries belong to a capsule (verified in a trixie container, systemd 257):

- Everything logged from inside ``capsule@NAME.service`` (its user manager and every user unit)
  carries the trusted field ``_SYSTEMD_UNIT=capsule@NAME.service``; a user unit's own output also
  carries ``_SYSTEMD_CGROUP=/capsule.slice/capsule@NAME.service/<slices>/UNIT``; the user manager
  logs from ``.../init.scope`` and tags messages about a unit with ``USER_UNIT=UNIT``.  There is no
  ``_SYSTEMD_USER_UNIT`` (journald's cg_path_get_user_unit() only knows ``user@.service``).
- PID 1 logs about the capsule service itself ("Started capsule@web.service") with ``_PID=1`` and
  ``UNIT=capsule@NAME.service``.

Without a unit filter we select exactly what ``journalctl -u capsule@NAME.service`` selects
(journalctl's add_matches_for_unit()): the unit's own entries, PID 1's messages about it,
privileged daemons' messages about it (``OBJECT_SYSTEMD_UNIT`` from ``_UID=0``) and
systemd-coredump's records of it.  ``systemctl status capsule@NAME.service`` shows the same set.

Deliberate divergence from the obvious ``CAPSULE=NAME`` match: that field comes from the
service's ``LogExtraFields=``, but any local process may also send ``CAPSULE=web`` itself (it is
not a trusted ``_`` field), so matching on it would let another capsule or user inject lines into
web's log view.  Every term we match on is either a trusted field or a field only trusted senders
(PID 1, root, the capsule's own manager) can make count.

With a unit filter we mirror ``journalctl --user-unit`` (add_matches_for_user_unit()), adapted
to capsules, where the cgroup is the only trusted record of the unit: entries whose
``_SYSTEMD_CGROUP`` is the unit's cgroup or below it (a unit may create sub-cgroups), plus the
capsule manager's messages with ``USER_UNIT=UNIT``.  Journal matches are exact, so the unit's
cgroups are found first among the journal's unique ``_SYSTEMD_CGROUP`` values and matched one by
one; that keeps a tail read of a quiet unit in a chatty capsule an index lookup, not a scan.
Coredumps are not attributed to user units (journald does not set ``COREDUMP_USER_UNIT`` for
capsules either); they show up in the capsule-wide view.

Every entry the library hands back is checked again in Python against the same selection
(``accepts``) before it becomes an ``Entry``: a capsule named "web" must never see "web2".

Bounds: at most ``MAX_LINES`` entries per read, messages capped at ``MESSAGE_MAX_BYTES`` bytes,
a tail read's messages together capped at ``TAIL_MAX_BYTES`` (as JSON text), the follower
reads ``FOLLOW_BATCH`` entries per worker-thread hop and holds at most that many.
Each Follower holds one inotify instance (sd_journal_get_fd), and the kernel allows a user 128
by default (fs.inotify.max_user_instances, shared by all of root's processes): callers must cap
how many follow at once.  read_tail() opens no inotify instance.

Assumes the capsule runs in capsule.slice, as upstream's capsule@.service says; an admin's
Slice= override would hide the unit attribution (entries still show, with unit None).

Short-lived processes: journald reads a stdout line's trusted fields from /proc/PID when the line
arrives; a process that has already exited leaves them out (seen on 257 with ``/bin/echo``), and
then the line belongs to no capsule, here as for ``journalctl -u``.

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
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, TypeVar, cast

from capsuled import wire
from capsuled.names import is_valid_capsule_name, is_valid_unit_name

MAX_LINES = 10000
DEFAULT_LINES = 100

# One huge entry (journald accepts fields up to 64 MiB by default, DATA_SIZE_MAX) must not blow a
# reply: the message text is cut after this many bytes and TRUNCATION_MARK appended.  64 KiB is
# also sd-journal's default data threshold, so nothing we show was shortened by the library.
MESSAGE_MAX_BYTES = 64 * 1024
TRUNCATION_MARK = "\u2026 [truncated]"

# The most one message can weigh as JSON text (message_wire_bytes): every byte of a capped
# message may be a control character that JSON escapes as \u00XX (6 bytes).
MESSAGE_MAX_WIRE_BYTES = 6 * MESSAGE_MAX_BYTES + len(TRUNCATION_MARK.encode())

# read_tail()'s default budget for the messages it returns, counted as JSON text. MAX_LINES
# entries of MESSAGE_MAX_BYTES could be 640 MiB (far beyond a Varlink reply's 16 MiB cap, and a
# lot of memory for a root daemon); 4 MiB of messages plus the other fields of MAX_LINES entries
# (cursor, unit, identifier...: a few hundred bytes each, ~3 MiB) keeps a plain Logs reply
# under the cap. The newest entries are kept: a tail cut by the budget has fewer lines.
TAIL_MAX_BYTES = 4 * 1024 * 1024

# Entries read per hop to the worker thread while following: bounds the time one hop holds the
# reader and the memory a burst costs before the consumer takes them.
FOLLOW_BATCH = 256
# The follower re-checks the journal at least this often even if inotify stays quiet (files on
# a file system without inotify, or a missed rotation); sd_journal_get_timeout() may ask for less.
FOLLOW_RECHECK_S = 5.0

# systemd's capsule@.service puts the capsule in capsule.slice (units/capsule@.service upstream);
# the manager itself sits in the init.scope subgroup (DelegateSubgroup=init.scope, systemd >= 254),
# or, with the compat unit on older systemd, directly in the service's cgroup.
CAPSULE_SLICE = "capsule.slice"
MANAGER_SUBGROUP = "init.scope"

# sd-messages.h SD_MESSAGE_COREDUMP: what journalctl -u uses to find coredumps of a unit.
_MESSAGE_ID_COREDUMP = "fc2e22bc6ee647b6b90729ab34a250b1"

# The fields we read from each entry: everything Entry needs and everything a selection tests.
_ENTRY_FIELDS = (
    "MESSAGE",
    "PRIORITY",
    "SYSLOG_IDENTIFIER",
    "_PID",
    "_SYSTEMD_CGROUP",
    "USER_UNIT",
)

Match = str  # "FIELD=value", as sd_journal_add_match() takes it
MatchGroups = tuple[tuple[Match, ...], ...]  # groups ORed; inside a group sd-journal semantics


def capsule_service(capsule: str) -> str:
    """The system unit running the capsule's manager."""
    return f"capsule@{capsule}.service"


def capsule_cgroup(capsule: str) -> str:
    """The capsule service's cgroup, as journald records it in _SYSTEMD_CGROUP."""
    return f"/{CAPSULE_SLICE}/{capsule_service(capsule)}"


def _cg_unescape(component: str) -> str:
    # cgroup-util.c cg_escape() prefixes "_" to names that start with "_" or ".", that collide
    # with cgroupfs files ("cgroup.*", "tasks", ...) or with controller names ("cpu.service" ->
    # "_cpu.service"); cg_unescape() drops exactly one leading "_".
    return component[1:] if component.startswith("_") else component


def _capsule_relative(capsule: str, cgroup: str) -> list[str] | None:
    """The path components of ``cgroup`` below the capsule's cgroup, or None if not inside it."""
    root = capsule_cgroup(capsule)
    if cgroup == root:
        return []
    # The "/" keeps "capsule@web.service" from claiming "capsule@web2.service"'s cgroups.
    if not cgroup.startswith(root + "/"):
        return None
    return [c for c in cgroup[len(root) + 1 :].split("/") if c]


def is_manager_cgroup(capsule: str, cgroup: str) -> bool:
    """True for the cgroup of the capsule's own service manager."""
    rel = _capsule_relative(capsule, cgroup)
    return rel is not None and (rel == [] or rel == [MANAGER_SUBGROUP])


def unit_of_cgroup(capsule: str, cgroup: str) -> str | None:
    """The user unit a cgroup inside the capsule belongs to, or None.

    Like cgroup-util.c cg_path_get_user_unit() below the manager's cgroup: skip slices (a user
    slice "a-b.slice" nests as "a.slice/a-b.slice"), and the first other component is the unit;
    anything below it (a delegated or sub-cgroup) still belongs to that unit.  The manager's own
    init.scope is not a user unit.
    """
    rel = _capsule_relative(capsule, cgroup)
    if not rel:
        return None
    for depth, component in enumerate(rel):
        name = _cg_unescape(component)
        if name.endswith(".slice"):
            continue
        if depth == 0 and component == MANAGER_SUBGROUP:
            return None
        return name if is_valid_unit_name(name) else None
    return None


def decode_message(raw: bytes | None) -> str:
    """MESSAGE as text: binary is decoded with replacement characters, and capped."""
    if raw is None:
        return ""
    if len(raw) <= MESSAGE_MAX_BYTES:
        return raw.decode("utf-8", errors="replace")
    # Cutting may split a multi-byte character; "ignore" on the last few bytes keeps one cut
    # character from turning into a replacement character.
    head = raw[: MESSAGE_MAX_BYTES - 3].decode("utf-8", errors="replace")
    tail = raw[MESSAGE_MAX_BYTES - 3 : MESSAGE_MAX_BYTES].decode("utf-8", errors="ignore")
    return head + tail + TRUNCATION_MARK


def message_wire_bytes(message: str) -> int:
    """Bytes ``message`` takes as a JSON string on the wire (UTF-8, escapes, no quotes)."""
    # ensure_ascii=False as capsuled.varlink.messages encodes replies.
    return len(json.dumps(message, ensure_ascii=False).encode("utf-8")) - 2


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def _small_int(raw: bytes | None, low: int, high: int) -> int | None:
    if raw is None or not raw.isdigit() or len(raw) > 10:
        return None
    value = int(raw)
    return value if low <= value <= high else None


_PID_MAX = 4194304  # kernel PID_MAX_LIMIT on 64-bit


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal entry of a capsule, as Logs returns it."""

    timestamp_usec: int
    cursor: str
    unit: str | None
    priority: int | None
    identifier: str | None
    pid: int | None
    message: str

    def to_wire(self) -> wire.LogEntry:
        """The IDL's LogEntry."""
        return {
            "timestamp": self.timestamp_usec,
            "cursor": self.cursor,
            "unit": self.unit,
            "priority": self.priority,
            "identifier": self.identifier,
            "pid": self.pid,
            "message": self.message,
        }


def entry_from_fields(
    capsule: str, fields: Mapping[str, bytes], *, timestamp_usec: int, cursor: str
) -> Entry:
    """Build an Entry from raw journal fields (values without the "FIELD=" prefix).

    unit: the user unit the entry came from (from _SYSTEMD_CGROUP); for the capsule manager's
    own messages, the unit it is talking about (USER_UNIT); else None (PID 1's messages about the
    capsule, the manager's general messages).
    """
    cgroup = _text(fields.get("_SYSTEMD_CGROUP"))
    unit: str | None = None
    if cgroup is not None:
        unit = unit_of_cgroup(capsule, cgroup)
        if unit is None and is_manager_cgroup(capsule, cgroup):
            user_unit = _text(fields.get("USER_UNIT"))
            unit = user_unit if user_unit is not None and is_valid_unit_name(user_unit) else None
    return Entry(
        timestamp_usec=timestamp_usec,
        cursor=cursor,
        unit=unit,
        priority=_small_int(fields.get("PRIORITY"), 0, 7),
        identifier=_text(fields.get("SYSLOG_IDENTIFIER")),
        pid=_small_int(fields.get("_PID"), 1, _PID_MAX),
        message=decode_message(fields.get("MESSAGE")),
    )


# --- selections -----------------------------------------------------------------------------


def capsule_match_groups(capsule: str) -> MatchGroups:
    """What journalctl -u capsule@NAME.service matches (add_matches_for_unit(), systemd 257)."""
    service = capsule_service(capsule)
    return (
        # The capsule's own processes: its manager and every user unit.
        (f"_SYSTEMD_UNIT={service}",),
        # PID 1 about the capsule service: "Started capsule@web.service".
        ("_PID=1", f"UNIT={service}"),
        # Privileged daemons about it.
        ("_UID=0", f"OBJECT_SYSTEMD_UNIT={service}"),
        # systemd-coredump's records of crashes inside it.
        (f"MESSAGE_ID={_MESSAGE_ID_COREDUMP}", "_UID=0", f"COREDUMP_UNIT={service}"),
    )


def unit_match_groups(capsule: str, unit: str, cgroups: Iterable[str]) -> MatchGroups:
    """Journal matches for one user unit, given the unit's cgroups known to the journal."""
    service = capsule_service(capsule)
    root = capsule_cgroup(capsule)
    own = tuple(f"_SYSTEMD_CGROUP={cg}" for cg in sorted(set(cgroups)))
    about = (
        f"_SYSTEMD_UNIT={service}",
        f"_SYSTEMD_CGROUP={root}",
        f"_SYSTEMD_CGROUP={root}/{MANAGER_SUBGROUP}",
        f"USER_UNIT={unit}",
    )
    groups: list[tuple[Match, ...]] = []
    if own:
        groups.append((f"_SYSTEMD_UNIT={service}", *own))
    groups.append(about)
    return tuple(groups)


def unit_cgroups(capsule: str, unit: str, known: Iterable[str]) -> list[str]:
    """The cgroups among ``known`` that belong to ``unit`` of ``capsule``."""
    return sorted(cg for cg in known if unit_of_cgroup(capsule, cg) == unit)


def groups_accept(groups: MatchGroups, fields: Mapping[str, bytes]) -> bool:
    """Evaluate match groups the way sd-journal does: groups are ORed; inside a group, terms on
    the same field are ORed and different fields ANDed.  An absent field matches nothing."""
    for group in groups:
        wanted: dict[str, set[bytes]] = collections.defaultdict(set)
        for term in group:
            field, _, value = term.partition("=")
            wanted[field].add(value.encode())
        if all(fields.get(field) in values for field, values in wanted.items()):
            return True
    return False


def accepts(capsule: str, unit: str | None, fields: Mapping[str, bytes]) -> bool:
    """The final word on whether an entry may be shown for (capsule, unit)."""
    if unit is None:
        return groups_accept(capsule_match_groups(capsule), fields)
    if fields.get("_SYSTEMD_UNIT") != capsule_service(capsule).encode():
        return False
    cgroup = _text(fields.get("_SYSTEMD_CGROUP"))
    if cgroup is None:
        return False
    if unit_of_cgroup(capsule, cgroup) == unit:
        return True
    return is_manager_cgroup(capsule, cgroup) and fields.get("USER_UNIT") == unit.encode()


def _match_fields(groups: MatchGroups) -> tuple[str, ...]:
    names = {term.partition("=")[0] for group in groups for term in group}
    return tuple(sorted(names.union(_ENTRY_FIELDS, ("_SYSTEMD_UNIT",))))


def _check_names(capsule: str, unit: str | None) -> None:
    # Names become match strings; the caller validated them already (InvalidName), this only
    # keeps a programming error from turning into a broader match.
    if not is_valid_capsule_name(capsule):
        raise ValueError(f"invalid capsule name {capsule!r}")
    if unit is not None and not is_valid_unit_name(unit):
        raise ValueError(f"invalid unit name {unit!r}")


# --- reading --------------------------------------------------------------------------------


class Reader(Protocol):
    """The part of systemd.journal.Reader we use (systemd-python ships no type information)."""

    data_threshold: int

    def add_match(self, match: str) -> None: ...
    def add_disjunction(self) -> None: ...
    def seek_tail(self) -> None: ...
    def seek_cursor(self, cursor: str) -> None: ...
    def seek_realtime(self, realtime: int) -> None: ...
    def test_cursor(self, cursor: str) -> bool: ...
    def query_unique(self, field: str) -> set[str | bytes]: ...
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


def _selection_groups(reader: Reader, capsule: str, unit: str | None) -> MatchGroups:
    if unit is None:
        return capsule_match_groups(capsule)
    known = (
        cg.decode("utf-8", errors="replace") if isinstance(cg, bytes) else str(cg)
        for cg in reader.query_unique("_SYSTEMD_CGROUP")
    )
    return unit_match_groups(capsule, unit, unit_cgroups(capsule, unit, known))


def read_tail(
    capsule: str,
    *,
    unit: str | None,
    lines: int,
    since_usec: int | None,
    journal_dir: str | None = None,
    max_bytes: int = TAIL_MAX_BYTES,
) -> list[Entry]:
    """The newest ``lines`` entries of the capsule (or of one unit in it), oldest first.

    At most ``max_bytes`` of message text (``message_wire_bytes``) in all: the read stops at
    the first (walking back: newest first) entry that would not fit, so what is returned is
    still the newest entries without a gap, just fewer of them.

    Blocking (file I/O on the journal): call it through asyncio.to_thread.

    Raises:
        ValueError: lines outside 0..MAX_LINES, max_bytes below MESSAGE_MAX_WIRE_BYTES (one
            entry must always fit), or an invalid name.
        OSError: the journal could not be opened.
    """
    _check_names(capsule, unit)
    if not 0 <= lines <= MAX_LINES:
        raise ValueError(f"lines must be between 0 and {MAX_LINES}")
    if max_bytes < MESSAGE_MAX_WIRE_BYTES:
        raise ValueError(f"max_bytes must be at least {MESSAGE_MAX_WIRE_BYTES}")
    if lines == 0:
        return []
    reader = _open_reader(journal_dir)
    try:
        groups = _selection_groups(reader, capsule, unit)
        _apply_groups(reader, groups)
        names = _match_fields(groups)
        newest_first: list[Entry] = []
        budget = max_bytes
        reader.seek_tail()
        while len(newest_first) < lines and reader._previous():
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
        _check_names(capsule, unit)
        self._capsule = capsule
        self._unit = unit
        self._after_cursor = after_cursor
        self._since_usec = since_usec if since_usec is not None else 0
        self._starts_at_time = after_cursor is None and since_usec is not None
        self._journal_dir = journal_dir
        # New cgroups of the unit may appear while we follow, so a unit is selected by the
        # capsule's trusted _SYSTEMD_UNIT and narrowed by accepts(); the volume is what is being
        # written now, not the history.
        self._groups: MatchGroups = (
            capsule_match_groups(capsule)
            if unit is None
            else ((f"_SYSTEMD_UNIT={capsule_service(capsule)}",),)
        )
        self._names = _match_fields(self._groups)
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
