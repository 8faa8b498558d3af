"""Structured journal records for every mutating call (invariant 6).

One record per call, written after the decision and the work: who (``CAPSULED_CALLER_UID``, from
the socket), what (``CAPSULED_ACTION``, and a fixed ``MESSAGE_ID`` per action so that
``journalctl _SYSTEMD_UNIT=capsuled.service _UID=0 _TRANSPORT=journal MESSAGE_ID=...`` finds
every ``Create``), on which capsule (``CAPSULE=``, the field
systemd itself uses for capsules) and how it ended (``CAPSULED_RESULT``: ``ok``, ``denied``,
``failed`` or an error name).  Extra fields become ``CAPSULED_<NAME>``.

Secrets: a value wrapped in :class:`Sensitive` (e.g. the environment of ``Run``) is never
written, only the marker ``(redacted)``; like systemd's ``SD_JSON_SENSITIVE`` it is a property of
the value, so a caller cannot forget it at one log site and remember it at another.

Two sinks, one record: the journal (above), and the verifiable trail under /var/log/capsuled/
(capsuled.trail: JSON lines, hash-chained across rotations, checkpoints signed with the
helper's Ed25519 key). `_write` is the one place a record goes out, to both, whether a
handler's, the method table's or a summary of refusals; the trail's copy is fsynced by `sync`,
which the method table's audit wrapper awaits before any reply goes out, so a caller who got an
answer knows its record is on disk. A trail that cannot be written fails the call (TrailError,
answered as InternalError; the journal still has the record).

The journal copy carries its own, weaker chain: ``CAPSULED_CHAIN_SEQ`` (1, 2, ... per daemon
process), ``CAPSULED_CHAIN_ID`` (random per process) and ``CAPSULED_CHAIN`` = sha256 over the
previous record's chain value and this record's canonical fields (:func:`verify_chain`). It is
not a signature: someone who can rewrite the journal can recompute it, and a whole run can vanish
unnoticed. The trail is what `capsuled audit verify` checks.

``PRIORITY``: notice (5) for ``denied``, warning (4) for ``failed`` or an error name, info (6) for
anything else (``ok``, ``started``, ...).

Refusals are aggregated per uid (issue 11, finding 5). Any local user can make calls that are
refused (``denied`` by the policy, or answered with an error name: nothing changed), thousands a
second; one record each would trip journald's rate limit (RateLimitBurst= per service) and the
records it then drops could be the real ones of other users. So of one uid's refusals, the first
``REFUSALS_RECORDED_PER_WINDOW`` in a ``REFUSAL_WINDOW_S`` window are written as they come, and
the rest are counted per action and written, when the window ends, as one record per action:
"N refusals of ACTION by uid U in the last T s" with ``CAPSULED_RESULT=refused``,
``CAPSULED_REFUSALS=N``,
``CAPSULED_WINDOW_S=T`` and ``CAPSULED_CAPSULES`` (the first few names they were about). What
one uid makes is then bounded by (K + number of actions) records per window, whatever it sends.

Trusting a record: any local process can send a journal entry with ``CAPSULED_ACTION=`` and
``SYSLOG_IDENTIFIER=capsuled`` (they are not trusted fields). Only journald sets the fields that
start with ``_``, so a record is capsuled's only if it also has ``_SYSTEMD_UNIT=capsuled.service``,
``_UID=0`` and ``_TRANSPORT=journal``; every query the documentation shows matches on all three::

    journalctl _SYSTEMD_UNIT=capsuled.service _UID=0 _TRANSPORT=journal CAPSULED_ACTION=start

``systemd.journal`` is imported lazily (unit tests and hosts without it fall back to
``logging``); a record that cannot be delivered to journald is logged to stderr, never raised:
the call it describes has already happened, and the trail has it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final

from capsuled.trail import Trail, TrailError

Sink = Callable[[dict[str, str]], None]

log = logging.getLogger("capsuled.audit")

MAX_FIELD_CHARS: Final = 4096  # bound every value: a record's size must not depend on input

RESULT_OK: Final = "ok"
RESULT_DENIED: Final = "denied"
RESULT_FAILED: Final = "failed"
RESULT_CANCELLED: Final = "cancelled"  # the client hung up mid-call
RESULT_REFUSED: Final = "refused"  # a summary of refusals (see the module docstring)

# syslog priorities, as journald's PRIORITY= field wants them.
_PRIORITY_NOTICE: Final = 5
_PRIORITY_INFO: Final = 6
_PRIORITY_WARNING: Final = 4

# Refusal aggregation (see the module docstring): per uid and window, this many refusals are
# written one by one, the rest counted into one summary per action when the window ends.
REFUSAL_WINDOW_S: Final = 60.0
REFUSALS_RECORDED_PER_WINDOW: Final = 10
# uids with a window open at once; past this every open window is summarised early, so the
# table stays bounded whatever number of uids (dynamic users included) refuse.
MAX_REFUSING_UIDS: Final = 1024
# Capsule names a summary lists (the rest are only counted).
SUMMARY_MAX_CAPSULES: Final = 8

# The fields only journald sets, that make a record capsuled's (see the module docstring).
TRUSTED_MATCH: Final = "_SYSTEMD_UNIT=capsuled.service _UID=0 _TRANSPORT=journal"

REDACTED: Final = "(redacted)"
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,54}")  # journal: [A-Z0-9_], no leading '_'/digit, <=64


class AuditAction(StrEnum):
    """The mutating calls; each has a fixed MESSAGE_ID below."""

    CREATE = "create"
    REMOVE = "remove"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    SET_AUTOSTART = "set-autostart"
    SET_LIMITS = "set-limits"
    INSTALL_UNIT = "install-unit"
    REMOVE_UNIT = "remove-unit"
    START_UNIT = "start-unit"
    STOP_UNIT = "stop-unit"
    RESTART_UNIT = "restart-unit"
    ENABLE_UNIT = "enable-unit"
    DISABLE_UNIT = "disable-unit"
    RUN = "run"
    DEPLOY = "deploy"
    ROLLBACK = "rollback"


# Generated once with uuid.uuid4().hex and fixed forever: journal catalogs and admins' queries
# depend on them.  Never reuse an id for a different meaning.
MESSAGE_IDS: Final[Mapping[str, str]] = {
    AuditAction.CREATE: "c0aabc2dcc8d4268b01430145a7fe200",
    AuditAction.REMOVE: "99f351b5abad4174b9531d4f9ef6c07c",
    AuditAction.START: "a27ebe3ee67b44feb572906afe55ab9a",
    AuditAction.STOP: "23e3bb4a9e1a4557b8035fce0e3bd048",
    AuditAction.RESTART: "d32b22eb7971406087ac15cc73993efc",
    AuditAction.SET_AUTOSTART: "b4f78e196352413890e5ea85831c84fc",
    AuditAction.SET_LIMITS: "43257756108e462890da20abe6faab54",
    AuditAction.INSTALL_UNIT: "3af7d7af25af46079a31dd5b33ddbda5",
    AuditAction.REMOVE_UNIT: "b05487950af642df99c64aa50bc3f055",
    AuditAction.START_UNIT: "b23c4f86d61e43178ddae6a098b99525",
    AuditAction.STOP_UNIT: "0cfe37e88e5145e8b29b774f586caa60",
    AuditAction.RESTART_UNIT: "ad9628ee7069490899d826008df2a17f",
    AuditAction.ENABLE_UNIT: "3936ec1653694c638b2d5383073f3266",
    AuditAction.DISABLE_UNIT: "404151ebf9b145f1b2397e60cd8b8879",
    AuditAction.RUN: "e68d8652e10d4985a7a0a89713b007d3",
    AuditAction.DEPLOY: "f824009ac1b74641880310df077b6199",
    AuditAction.ROLLBACK: "4b6803d8866e4ae3a23c3ae1afba3e7f",
}
MESSAGE_ID_OTHER: Final = "c89625c9446f46feb511fdcc7c4432e2"  # an action not listed above


@dataclass(frozen=True, slots=True)
class Sensitive:
    """A value that must never reach a log; recorded as ``(redacted)``."""

    value: object

    def __repr__(self) -> str:  # so that even an accidental repr() does not leak it
        return f"Sensitive({REDACTED})"


FieldValue = str | int | Sensitive | None


def _bounded(value: str) -> str:
    if len(value) <= MAX_FIELD_CHARS:
        return value
    return value[: MAX_FIELD_CHARS - 1] + "\u2026"


def _priority(result: str) -> int:
    """notice for a denial, warning for a failure or an error name (it has dots), else info."""
    if result in (RESULT_DENIED, RESULT_REFUSED):
        return _PRIORITY_NOTICE
    if result == RESULT_FAILED or "." in result:
        return _PRIORITY_WARNING
    return _PRIORITY_INFO


_CHAINED_FIELDS: Final = frozenset(
    {"MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "CAPSULE"}
)


def _canonical(fields: Mapping[str, str]) -> bytes:
    # Only the fields we write: journald adds its own (_PID, __CURSOR, CODE_*), so a record read
    # back with `journalctl -o json` verifies as is.
    body = {
        k: v
        for k, v in fields.items()
        if (k in _CHAINED_FIELDS or k.startswith("CAPSULED_")) and k != "CAPSULED_CHAIN"
    }
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def chain_hash(previous: str, fields: Mapping[str, str]) -> str:
    """sha256(previous chain value, newline, canonical JSON of the record without CHAIN)."""
    import hashlib  # here, not at start: it loads OpenSSL's libcrypto (issue 12, cold start)

    return hashlib.sha256(previous.encode() + b"\n" + _canonical(fields)).hexdigest()


def verify_chain(records: Iterable[Mapping[str, str]]) -> int | None:
    """Check one run's records in order; return the 1-based index of the first bad one, or None.

    A record is bad if its sequence number is not the next one, its chain id differs from the
    first record's, or its CAPSULED_CHAIN does not match.  The first record's predecessor is
    its chain id (so a run's first record cannot be forged without knowing the id).
    """
    previous: str | None = None
    chain_id: str | None = None
    for index, record in enumerate(records, start=1):
        if chain_id is None:
            chain_id = record.get("CAPSULED_CHAIN_ID")
            previous = chain_id
        if (
            previous is None
            or record.get("CAPSULED_CHAIN_ID") != chain_id
            or record.get("CAPSULED_CHAIN_SEQ") != str(index)
            or record.get("CAPSULED_CHAIN") != chain_hash(previous, record)
        ):
            return index
        previous = record["CAPSULED_CHAIN"]
    return None


def journal_sink(fields: dict[str, str]) -> None:
    """Send a record with systemd.journal.send; fall back to logging without systemd-python."""
    try:
        # Lazy: systemd-python is optional at import time (unit tests, hosts without it).
        from systemd import journal  # untyped; pyproject.toml tells mypy to ignore it
    except ImportError:
        logging_sink(fields)
        return
    message = fields["MESSAGE"]
    rest = {k: v for k, v in fields.items() if k not in ("MESSAGE", "MESSAGE_ID")}
    # CODE_* given explicitly so send() does not walk the stack for every record.
    journal.send(
        message,
        MESSAGE_ID=fields.get("MESSAGE_ID"),
        CODE_FILE=__file__,
        CODE_FUNC="AuditLog.record",
        CODE_LINE=0,
        **rest,
    )


def logging_sink(fields: dict[str, str]) -> None:
    """Write a record through ``logging`` as one line of sorted KEY=value pairs."""
    details = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(fields.items()) if k != "MESSAGE")
    level = (
        logging.WARNING if int(fields.get("PRIORITY", "6")) <= _PRIORITY_WARNING else logging.INFO
    )
    log.log(level, "%s %s", fields["MESSAGE"], details)


def is_refusal(result: str) -> bool:
    """A call that changed nothing: denied by the policy, or refused with an error name."""
    return result == RESULT_DENIED or "." in result


@dataclass(slots=True)
class _Window:
    """One uid's refusals since `opened`: how many, and those not written, per action."""

    opened: float
    seen: int = 0
    held: dict[str, int] = field(default_factory=dict)  # action -> refusals not written
    capsules: dict[str, set[str]] = field(default_factory=dict)  # action -> first few names


# The journal fields a trail record has fields of its own for (trail_event); the other
# CAPSULED_* fields are its details.
_TRAIL_OWN_FIELDS: Final = frozenset(
    {
        "CAPSULED_ACTION",
        "CAPSULED_CALLER_UID",
        "CAPSULED_CALLER_PID",
        "CAPSULED_CALLER_UNIT",
        "CAPSULED_RESULT",
        "CAPSULED_CHAIN",
        "CAPSULED_CHAIN_ID",
        "CAPSULED_CHAIN_SEQ",
    }
)


def trail_event(entry: Mapping[str, str]) -> dict[str, object]:
    """The trail's copy of a journal record (docs/AUDIT.md): the same facts, typed, and the
    record's own fields as `details` (CAPSULED_KEY_ID -> key_id)."""
    pid = entry.get("CAPSULED_CALLER_PID")
    return {
        "time": time.time_ns() // 1000,
        "uid": int(entry["CAPSULED_CALLER_UID"]),
        "pid": int(pid) if pid is not None else None,
        "unit": entry.get("CAPSULED_CALLER_UNIT"),
        "action": entry["CAPSULED_ACTION"],
        "capsule": entry.get("CAPSULE"),
        "result": entry["CAPSULED_RESULT"],
        "details": {
            key.removeprefix("CAPSULED_").lower(): value
            for key, value in entry.items()
            if key.startswith("CAPSULED_") and key not in _TRAIL_OWN_FIELDS
        },
    }


class AuditLog:
    """Writes one structured record per mutating call (refusals aggregated per uid) to the
    journal and the trail.

    Thread-safe. The journal's delivery never raises (a record that cannot reach journald goes
    to stderr); the trail's does (TrailError): that is the record a reply promises.
    """

    def __init__(
        self,
        sink: Sink | None = None,
        *,
        trail: Trail | None = None,
        identifier: str = "capsuled",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink: Sink = sink if sink is not None else journal_sink
        self._trail = trail
        self._identifier = identifier
        self._clock = clock
        self._lock = threading.Lock()
        # os.urandom is what secrets.token_hex reads; secrets itself imports hmac (libcrypto).
        self._chain_id = os.urandom(16).hex()
        self._previous = self._chain_id
        self._seq = 0
        self._windows: dict[int, _Window] = {}
        self._next_due = float("inf")  # when the oldest open window ends
        self._sync_lock: asyncio.Lock | None = None

    @property
    def trail_directory(self) -> Path | None:
        """Where the trail is (None: this log writes to the journal only)."""
        return self._trail.directory if self._trail is not None else None

    @property
    def chain_id(self) -> str:
        """This process's chain id (CAPSULED_CHAIN_ID of every record it writes)."""
        return self._chain_id

    def record(
        self,
        action: str,
        *,
        caller_uid: int,
        capsule: str | None,
        result: str,
        caller_pid: int | None = None,
        caller_unit: str | None = None,
        **fields: FieldValue,
    ) -> dict[str, str]:
        """Write one record and return the journal fields written (for tests that chain).

        Extra ``fields`` become ``CAPSULED_<NAME.upper()>`` in the journal and the trail's
        ``details``; None values are left out; :class:`Sensitive` values are written as
        ``(redacted)``. A refusal past the uid's allowance for this window is only counted
        (see the module docstring): then nothing is written and the fields are returned
        without the chain.

        Raises:
            ValueError: a field name that cannot be a journal field (a caller bug).
            TrailError: the trail could not be written (the journal has the record).
        """
        entry = self._fields(action, caller_uid, capsule, result, fields)
        if caller_pid is not None:
            entry["CAPSULED_CALLER_PID"] = str(caller_pid)
        if caller_unit is not None:
            entry["CAPSULED_CALLER_UNIT"] = _bounded(caller_unit)
        self.flush_refusals()
        if is_refusal(result) and not self._admit_refusal(caller_uid, action, capsule):
            return entry
        return self._write(entry)

    def flush_refusals(self, *, everything: bool = False) -> int:
        """Write the summaries of refusal windows that ended (all open ones if `everything`,
        as at exit); returns how many summaries were written."""
        now = self._clock()
        with self._lock:
            if not everything and now < self._next_due:
                return 0  # the common case, checked at every record: no scan
            ended = [
                (uid, window)
                for uid, window in self._windows.items()
                if everything or now - window.opened >= REFUSAL_WINDOW_S
            ]
            for uid, _ in ended:
                del self._windows[uid]
            opened = [w.opened for w in self._windows.values()]
            self._next_due = min(opened) + REFUSAL_WINDOW_S if opened else float("inf")
        written = 0
        for uid, window in ended:
            span = max(1, round(min(now - window.opened, REFUSAL_WINDOW_S)))
            for action, count in sorted(window.held.items()):
                names = sorted(window.capsules.get(action, ()))
                entry = self._fields(
                    action,
                    uid,
                    None,
                    RESULT_REFUSED,
                    {
                        "refusals": count,
                        "window_s": span,
                        "capsules": ",".join(names) or None,
                    },
                )
                entry["MESSAGE"] = f"{count} refusals of {action} by uid {uid} in the last {span} s"
                self._write(entry)
                written += 1
        return written

    def _admit_refusal(self, uid: int, action: str, capsule: str | None) -> bool:
        """Whether this refusal is written now (True) or only counted into a summary."""
        with self._lock:
            window = self._windows.get(uid)
            if window is None:
                overflow = len(self._windows) >= MAX_REFUSING_UIDS
                window = self._windows[uid] = _Window(self._clock())
                self._next_due = min(self._next_due, window.opened + REFUSAL_WINDOW_S)
            else:
                overflow = False
            window.seen += 1
            if window.seen <= REFUSALS_RECORDED_PER_WINDOW:
                admitted = True
            else:
                admitted = False
                window.held[action] = window.held.get(action, 0) + 1
                names = window.capsules.setdefault(action, set())
                if capsule is not None and len(names) < SUMMARY_MAX_CAPSULES:
                    names.add(capsule)
        if overflow:
            # Too many uids at once: summarise the open windows now (bounded memory); their
            # refusals are still all counted.
            self.flush_refusals(everything=True)
        return admitted

    def _fields(
        self,
        action: str,
        caller_uid: int,
        capsule: str | None,
        result: str,
        fields: Mapping[str, FieldValue],
    ) -> dict[str, str]:
        entry: dict[str, str] = {
            "MESSAGE": _bounded(self._message(action, caller_uid, capsule, result)),
            "MESSAGE_ID": MESSAGE_IDS.get(action, MESSAGE_ID_OTHER),
            "PRIORITY": str(_priority(result)),
            "SYSLOG_IDENTIFIER": self._identifier,
            "CAPSULED_ACTION": _bounded(action),
            "CAPSULED_CALLER_UID": str(caller_uid),
            "CAPSULED_RESULT": _bounded(result),
        }
        if capsule is not None:
            entry["CAPSULE"] = _bounded(capsule)
        for name, value in fields.items():
            key = "CAPSULED_" + name.upper()
            if _FIELD_NAME.fullmatch(key) is None:
                raise ValueError(f"not a journal field name: {key!r}")
            if key in entry or key.startswith(("CAPSULED_CHAIN", "CAPSULED_CALLER_")):
                raise ValueError(f"field {key} is reserved")
            if value is None:
                continue
            if isinstance(value, Sensitive):
                entry[key] = REDACTED
            elif isinstance(value, bool):
                entry[key] = "yes" if value else "no"
            else:
                entry[key] = _bounded(str(value))
        return entry

    def _write(self, entry: dict[str, str]) -> dict[str, str]:
        """The one place a record goes out: chained, to the journal, then to the trail."""
        with self._lock:
            self._seq += 1
            entry["CAPSULED_CHAIN_ID"] = self._chain_id
            entry["CAPSULED_CHAIN_SEQ"] = str(self._seq)
            entry["CAPSULED_CHAIN"] = chain_hash(self._previous, entry)
            self._previous = entry["CAPSULED_CHAIN"]
            try:
                self._sink(dict(entry))
            except OSError:
                # journald unreachable: stderr still ends up somewhere an admin looks.
                log.exception("cannot write audit record %s", entry["CAPSULED_CHAIN_SEQ"])
                logging_sink(entry)
            if self._trail is not None:
                try:
                    self._trail.append(trail_event(entry))
                except TrailError:
                    log.exception("cannot append to the audit trail: %s", entry["MESSAGE"])
                    raise
        return entry

    async def sync(self) -> None:
        """Wait until every record written so far is on disk in the trail (one fsync, in a
        worker thread, for all the records written while the previous one ran).

        Raises:
            TrailError: fsync failed.
        """
        trail = self._trail
        if trail is None:
            return
        target = trail.written_seq
        if trail.synced_seq >= target:
            return
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()  # made on the loop that uses it
        async with self._sync_lock:
            if trail.synced_seq >= target:
                return  # the fsync we waited behind covered our record
            await asyncio.to_thread(trail.sync)

    def close(self) -> None:
        """At exit: write the refusal summaries still open, then sign a last checkpoint over
        everything and close the trail."""
        self.flush_refusals(everything=True)
        if self._trail is not None:
            self._trail.close()

    @staticmethod
    def _message(action: str, caller_uid: int, capsule: str | None, result: str) -> str:
        target = f" of capsule {capsule}" if capsule is not None else ""
        return f"{action}{target} by uid {caller_uid}: {result}"
