"""Which journal entries belong to a capsule, and how one becomes a LogEntry: pure, no I/O.

capsuled.sdjournal reads the journal with these selections (its newest entries and new ones);
the method handlers reach it only through the `Journal` protocol below, injected as
`Services.journal`, so method tests give a fake.

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
capsule manager's messages with ``USER_UNIT=UNIT``.  Journal matches are exact and a unit's
cgroups are not known in advance (sub-cgroups, nested slices), so the journal is asked for the
capsule's entries (the trusted ``_SYSTEMD_UNIT``, an index lookup) and ``accepts`` narrows them
to the unit, for a tail read as for a follower.  A tail read looks at most ``MAX_TAIL_SCANNED``
of the capsule's newest entries: a quiet unit in a chatty capsule then gets fewer lines, never
an unbounded scan.  (It used to look the unit's cgroups up among the journal's unique
``_SYSTEMD_CGROUP`` values, but sd_journal_query_unique() ignores matches: that set spans every
cgroup the whole journal ever saw, and grows without bound; issue 11, item 13.)
Coredumps are not attributed to user units (journald does not set ``COREDUMP_USER_UNIT`` for
capsules either); they show up in the capsule-wide view.

Every entry the library hands back is checked again in Python against the same selection
(``accepts``) before it becomes an ``Entry``: a capsule named "web" must never see "web2".

Bounds: at most ``MAX_LINES`` entries per read and ``MAX_TAIL_SCANNED`` looked at, messages
capped at ``MESSAGE_MAX_BYTES`` bytes, a tail read's messages together capped at
``TAIL_MAX_BYTES`` (as JSON text).

Assumes the capsule runs in capsule.slice, as upstream's capsule@.service says; an admin's
Slice= override would hide the unit attribution (entries still show, with unit None).

Short-lived processes: journald reads a stdout line's trusted fields from /proc/PID when the line
arrives; a process that has already exited leaves them out (seen on 257 with ``/bin/echo``), and
then the line belongs to no capsule, here as for ``journalctl -u``.
"""

from __future__ import annotations

import collections
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from capsuled.names import is_valid_capsule_name, is_valid_unit_name

if TYPE_CHECKING:  # the wire types are imported with the methods that use them (cold start)
    from capsuled import wire

MAX_LINES = 10000
DEFAULT_LINES = 100
# Entries of the capsule one tail read looks at (with a unit filter most may be other units').
MAX_TAIL_SCANNED = 100_000

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


def selection_match_groups(capsule: str, unit: str | None) -> MatchGroups:
    """What a tail read or a follower asks the journal for; `accepts` narrows it to the
    selection. A unit is selected by the capsule's trusted _SYSTEMD_UNIT: its cgroups are not
    known in advance (and new ones may appear while we follow)."""
    if unit is None:
        return capsule_match_groups(capsule)
    return ((f"_SYSTEMD_UNIT={capsule_service(capsule)}",),)


def match_fields(groups: MatchGroups) -> tuple[str, ...]:
    """The fields to read of each entry: what an Entry needs and what the selection tests."""
    names = {term.partition("=")[0] for group in groups for term in group}
    return tuple(sorted(names.union(_ENTRY_FIELDS, ("_SYSTEMD_UNIT",))))


def check_names(capsule: str, unit: str | None) -> None:
    """Refuse a name that could widen a match (ValueError); the caller validated them already."""
    # Names become match strings; the caller validated them already (InvalidName), this only
    # keeps a programming error from turning into a broader match.
    if not is_valid_capsule_name(capsule):
        raise ValueError(f"invalid capsule name {capsule!r}")
    if unit is not None and not is_valid_unit_name(unit):
        raise ValueError(f"invalid unit name {unit!r}")


class Journal(Protocol):
    """The journal as the method handlers use it (capsuled.sdjournal.SdJournal; a fake in tests)."""

    async def tail(
        self, capsule: str, *, unit: str | None, lines: int, since_usec: int | None
    ) -> list[Entry]:
        """The newest `lines` entries of the capsule (or of one unit in it), oldest first.

        Raises:
            OSError: the journal could not be opened.
        """
        ...

    def follow(
        self,
        capsule: str,
        *,
        unit: str | None,
        after_cursor: str | None,
        since_usec: int | None,
    ) -> AbstractAsyncContextManager[AsyncIterator[Entry]]:
        """New entries as they are written, from after `after_cursor` (else from `since_usec`,
        else from now), until the block is left. Each follower holds an inotify instance:
        callers cap how many follow at once."""
        ...
