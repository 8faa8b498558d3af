"""The org.capsuled.Manager wire types, as TypedDicts mirroring the IDL one to one.

Shared by the helper's handlers (capsuled.methods: their parameters and replies) and the client
(capsulectl: the replies it reads), so both sides are typed from one declaration. Importing this
module loads nothing but `typing`; the client imports it only for the type checker.

Keys keep the IDL's camelCase. A `?type` field is `T | None`: the helper always sends it (null when
unknown), and the Dispatcher hands a handler an absent optional parameter as None. Reply types carry
exactly the reply parameters, so a result printed with `--json` is the Varlink reply itself;
parameter types exactly what the IDL declares, checked by the Dispatcher before a handler runs.

The client checks only the reply's shape at its top level (see capsulectl/client.py): the helper
validates everything it sends against the same IDL, and capsulectl enforces nothing (design brief).
Unit tests (tests/unit/test_client_wire.py for replies, tests/unit/test_wire.py for parameters)
keep these declarations equal to the IDL's.
"""

from __future__ import annotations

from typing import Literal, TypedDict

__all__ = [
    "AccessResult",
    "AuditParams",
    "AuditRecord",
    "AuditReply",
    "Capsule",
    "CapsuleParams",
    "CapsuleReply",
    "CapsuleState",
    "CheckAccessParams",
    "CheckAccessReply",
    "CreateParams",
    "DeployParams",
    "DeployReply",
    "DeployedBundle",
    "EmptyReply",
    "Event",
    "InfoReply",
    "InstallUnitParams",
    "JobReply",
    "ListReply",
    "ListUnitsReply",
    "LogEntry",
    "LogsParams",
    "LogsReply",
    "NoParams",
    "RemoveParams",
    "RunParams",
    "RunReply",
    "ServiceInfo",
    "SetAutostartParams",
    "SetLimitsParams",
    "Unit",
    "UnitJobReply",
    "UnitParams",
    "UnitReply",
    "WatchParams",
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
    bundle: DeployedBundle | None


class DeployedBundle(TypedDict):
    """A bundle deployed into a capsule (IDL type DeployedBundle)."""

    name: str
    version: str
    signer: str
    keyId: str
    sha256: str
    deployed: int
    deployedBy: int
    previousVersion: str | None
    unfinishedVersion: str | None


class AuditRecord(TypedDict):
    """One record of the audit trail (IDL type AuditRecord)."""

    seq: int
    time: int
    callerUid: int
    callerPid: int | None
    callerUnit: str | None
    action: str
    capsule: str | None
    result: str
    details: dict[str, str]


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


# --- method parameters (as handlers get them: absent optional fields are None) ------------------


class NoParams(TypedDict):
    """List, Info."""


class CapsuleParams(TypedDict):
    """Describe, Start, Stop, Restart, ListUnits: one capsule."""

    name: str
    allowInteractiveAuthentication: bool | None


class CreateParams(TypedDict):
    """Create."""

    name: str
    start: bool | None
    allowInteractiveAuthentication: bool | None


class RemoveParams(TypedDict):
    """Remove."""

    name: str
    keepData: bool | None
    allowInteractiveAuthentication: bool | None


class SetAutostartParams(TypedDict):
    """SetAutostart."""

    name: str
    enabled: bool
    allowInteractiveAuthentication: bool | None


class SetLimitsParams(TypedDict):
    """SetLimits."""

    name: str
    memoryMax: int | None
    tasksMax: int | None
    cpuWeight: int | None
    allowInteractiveAuthentication: bool | None


class CheckAccessParams(TypedDict):
    """CheckAccess."""

    name: str
    action: str
    verb: str | None
    unit: str | None
    signer: str | None


class InstallUnitParams(TypedDict):
    """InstallUnit."""

    name: str
    unit: str
    content: str
    enable: bool | None
    start: bool | None
    allowInteractiveAuthentication: bool | None


class UnitParams(TypedDict):
    """RemoveUnit, StartUnit, StopUnit, RestartUnit, EnableUnit, DisableUnit: one unit."""

    name: str
    unit: str
    allowInteractiveAuthentication: bool | None


class RunParams(TypedDict):
    """Run."""

    name: str
    command: list[str]
    unit: str | None
    environment: list[str] | None
    workingDirectory: str | None
    stdio: Literal["pipe", "pty"] | None
    rows: int | None
    columns: int | None
    allowInteractiveAuthentication: bool | None


class LogsParams(TypedDict):
    """Logs."""

    name: str
    unit: str | None
    lines: int | None
    follow: bool | None
    since: int | None
    allowInteractiveAuthentication: bool | None


class WatchParams(TypedDict):
    """Watch."""

    names: list[str] | None


class DeployParams(TypedDict):
    """Deploy."""

    name: str
    bundle: str
    allowDowngrade: bool | None
    allowInteractiveAuthentication: bool | None


class AuditParams(TypedDict):
    """Audit."""

    name: str
    lines: int | None
    allowInteractiveAuthentication: bool | None


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


class DeployReply(TypedDict):
    """Deploy, Rollback."""

    capsule: Capsule
    deployed: DeployedBundle
    started: list[str]


class AuditReply(TypedDict):
    """Audit."""

    records: list[AuditRecord]


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
