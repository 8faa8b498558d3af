"""Audit: the audit trail's records about one capsule (read-only).

The trail (capsuled.trail) is root's alone (/var/log/capsuled, mode 0700); this method is how a
caller who may read a capsule sees who did what to it. Reading is bounded: at most MAX_LINES
records per reply, and at most MAX_SCAN_BYTES of the newest trail files are read for them, in a
worker thread (the files may be large; the event loop never waits on them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from capsuled import errors, wire
from capsuled.methods import params
from capsuled.methods.context import CallContext
from capsuled.policy import actions as act
from capsuled.trail import AUDIT_DIR, read_records, trail_files

DEFAULT_LINES: Final = 100
MAX_LINES: Final = 10_000
# The newest 64 MiB of the trail: eight rotated files' worth (trail.ROTATE_BYTES).
MAX_SCAN_BYTES: Final = 64 * 1024 * 1024


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def record_wire(record: Mapping[str, object]) -> wire.AuditRecord:
    """A trail record as the IDL's AuditRecord (the trail is ours: fields have their types)."""
    raw_details = record.get("details")
    details = (
        {str(k): str(v) for k, v in raw_details.items()} if isinstance(raw_details, dict) else {}
    )
    return {
        "seq": _number(record.get("seq")) or 0,
        "time": _number(record.get("time")) or 0,
        "callerUid": _number(record.get("uid")) or 0,
        "callerPid": _number(record.get("pid")),
        "callerUnit": _text(record.get("unit")),
        "action": _text(record.get("action")) or "",
        "capsule": _text(record.get("capsule")),
        "result": _text(record.get("result")) or "",
        "details": details,
    }


def is_about(record: Mapping[str, object], name: str) -> bool:
    """A record about capsule `name`: its own, or a summary of refusals that lists it (capsuled
    .audit aggregates one uid's refusals into one record per action, naming the capsules)."""
    if record.get("capsule") == name:
        return True
    details = record.get("details")
    listed = details.get("capsules") if isinstance(details, dict) else None
    return isinstance(listed, str) and name in listed.split(",")


def records_about(directory: Path, name: str, lines: int) -> list[wire.AuditRecord]:
    """The newest `lines` records about capsule `name` (blocking)."""
    found = read_records(trail_files(directory), lambda r: is_about(r, name), lines, MAX_SCAN_BYTES)
    return [record_wire(r) for r in found]


async def audit(ctx: CallContext, p: wire.AuditParams) -> wire.AuditReply:
    name = params.capsule_name(p["name"])
    lines = p["lines"]
    if lines is None:
        lines = DEFAULT_LINES
    if not 0 <= lines <= MAX_LINES:
        raise errors.InvalidValue(parameter="lines", reason=f"0..{MAX_LINES}")
    await ctx.authorize(act.READ, name, interactive=p["allowInteractiveAuthentication"])
    directory = ctx.services.audit.trail_directory or AUDIT_DIR
    # Records outlive the capsule (Remove is recorded too): no existence check beyond read.
    records = await asyncio.to_thread(records_about, directory, name, lines)
    return {"records": records}
