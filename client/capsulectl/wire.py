"""The org.capsuled.Manager wire types, as TypedDicts mirroring the IDL one to one.

Keys keep the IDL's camelCase. A `?type` field is `T | None` (the server always sends it, null when
unknown). Reply types are named after their method (`StartReply` for `Start`), and carry exactly the
reply parameters, so a result printed with `--json` is the Varlink reply itself.

The client checks only the reply's shape at its top level (see client.py): the helper validates
everything it sends against the same IDL, and capsulectl enforces nothing (design brief). A unit
test (tests/unit/test_client_wire.py) keeps these declarations equal to the IDL's.
"""

from __future__ import annotations

from typing import Literal, TypedDict

__all__ = [
    "AccessResult",
    "Capsule",
    "CapsuleReply",
    "CapsuleState",
    "CheckAccessReply",
    "EmptyReply",
    "Event",
    "InfoReply",
    "JobReply",
    "ListReply",
    "ListUnitsReply",
    "LogEntry",
    "LogsReply",
    "RunReply",
    "ServiceInfo",
    "Unit",
    "UnitJobReply",
    "UnitReply",
    "WatchReply",
]

CapsuleState = Literal[
    "active",
    "reloading",
    "inactive",
    "failed",
    "activating",
    "deactivating",
    "maintenance",
    "refreshing",
]


class Capsule(TypedDict):
    """One capsule as the helper and systemd know it (IDL type Capsule)."""

    name: str
    state: CapsuleState
    subState: str
    result: str | None
    owner: int | None
    ownerName: str | None
    uid: int | None
    since: int | None
    autostart: bool
    hasData: bool
    memoryCurrent: int | None
    tasksCurrent: int | None
    cpuUsageNSec: int | None
    memoryMax: int | None
    tasksMax: int | None
    cpuWeight: int | None
    units: int


class Unit(TypedDict):
    """A user unit inside a capsule (IDL type Unit)."""

    name: str
    description: str | None
    loadState: str
    activeState: str
    subState: str
    enabled: bool
    hasFile: bool


class LogEntry(TypedDict):
    """One journal entry of a capsule (IDL type LogEntry)."""

    timestamp: int
    cursor: str
    unit: str | None
    priority: int | None
    identifier: str | None
    pid: int | None
    message: str


class Event(TypedDict):
    """A change seen by Watch (IDL type Event)."""

    kind: str
    capsule: str
    unit: str | None
    state: str
    subState: str | None
    timestamp: int


class AccessResult(TypedDict):
    """The decision the policy would take (IDL type AccessResult)."""

    result: str
    reason: str | None


# --- method replies -----------------------------------------------------------------------------


class EmptyReply(TypedDict):
    """Remove, RemoveUnit."""


class ListReply(TypedDict):
    """List."""

    capsules: list[Capsule]


class CapsuleReply(TypedDict):
    """Describe, Create, SetAutostart, SetLimits."""

    capsule: Capsule


class JobReply(TypedDict):
    """Start, Stop, Restart."""

    capsule: Capsule
    job: str


class CheckAccessReply(TypedDict):
    """CheckAccess."""

    access: AccessResult


class ListUnitsReply(TypedDict):
    """ListUnits."""

    units: list[Unit]


class UnitReply(TypedDict):
    """InstallUnit, EnableUnit, DisableUnit."""

    unit: Unit


class UnitJobReply(TypedDict):
    """StartUnit, StopUnit, RestartUnit."""

    unit: Unit
    job: str


class RunReply(TypedDict):
    """Run: exitStatus and result are set only in the last reply of a call with `more`."""

    unit: str
    exitStatus: int | None
    result: str | None


class LogsReply(TypedDict):
    """Logs (with `more`, one entry per reply)."""

    entries: list[LogEntry]


class WatchReply(TypedDict):
    """Watch (always streamed)."""

    event: Event


class InfoReply(TypedDict):
    """Info."""

    version: str
    systemdVersion: int | None
    policyBackend: str
    callerUid: int


class ServiceInfo(TypedDict):
    """org.varlink.service.GetInfo."""

    vendor: str
    product: str
    version: str
    url: str
    interfaces: list[str]
