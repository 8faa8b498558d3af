"""Capsule lifecycle: List, Describe, Create, Start, Stop, Restart, Remove,
SetAutostart, SetLimits, plus Info and CheckAccess.

Every handler runs in the same order (style: systemd's mountwork.c): the
parameters arrive validated against the IDL -> cross-field checks -> the one
`ctx.authorize` line -> the work under the capsule's lock -> audit -> reply.
"""

from __future__ import annotations

import grp
import pwd
from typing import cast

from capsuled import errors
from capsuled.audit import RESULT_FAILED, RESULT_OK, AuditAction
from capsuled.methods.context import CallContext, backend_errors
from capsuled.names import CAPSULE_USER_PREFIX, capsule_name_problem, unit_name_problem
from capsuled.policy import actions as act
from capsuled.policy.engine import Request
from capsuled.records import CorruptRecord, Phase, Record, new_record
from capsuled.safefs import DYNAMIC_UID_MAX, DYNAMIC_UID_MIN
from capsuled.systemd import errors as sd
from capsuled.systemd.backend import LIMIT_DEFAULT, CapsuleInfo

Params = dict[str, object]
Wire = dict[str, object]

# Values SetLimits accepts besides -1 ("reset to systemd's default").
CPU_WEIGHT_RANGE = range(1, 10001)  # CGROUP_WEIGHT_MIN..CGROUP_WEIGHT_MAX
DEFAULT_CPU_WEIGHT = 100  # CGROUP_WEIGHT_DEFAULT
# Verbs CheckAccess accepts, per action (what the methods pass as the polkit detail).
MANAGE_VERBS = frozenset({"start", "stop", "restart", "autostart"})
MANAGE_UNITS_VERBS = frozenset(
    {"install", "remove", "start", "stop", "restart", "enable", "disable"}
)


def checked_name(p: Params, field: str = "name") -> str:
    """The capsule name parameter, refused before anything reaches systemd (invariant 3)."""
    name = cast(str, p[field])
    problem = capsule_name_problem(name)
    if problem is not None:
        raise errors.InvalidName(name=name, reason=problem)
    return name


def _owner_name(uid: int | None) -> str | None:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def capsule_to_wire(name: str, info: CapsuleInfo | None, record: Record | None) -> Wire:
    owner = record.owner if record is not None else None
    if info is None:
        # Known only from our record: a Create or Remove that has not finished yet.
        return {
            "name": name,
            "state": "inactive",
            "subState": "dead",
            "result": None,
            "owner": owner,
            "ownerName": _owner_name(owner),
            "uid": None,
            "since": None,
            "autostart": False,
            "hasData": False,
            "memoryCurrent": None,
            "tasksCurrent": None,
            "cpuUsageNSec": None,
            "memoryMax": None,
            "tasksMax": None,
            "cpuWeight": None,
            "units": 0,
        }
    return {
        "name": name,
        "state": info.state,
        "subState": info.sub_state,
        "result": info.result,
        "owner": owner,
        "ownerName": _owner_name(owner),
        "uid": info.uid,
        "since": info.since_usec,
        "autostart": info.autostart,
        "hasData": info.has_state_dir,
        "memoryCurrent": info.memory_current,
        "tasksCurrent": info.tasks_current,
        "cpuUsageNSec": info.cpu_usage_nsec,
        "memoryMax": info.memory_max,
        "tasksMax": info.tasks_max,
        "cpuWeight": info.cpu_weight,
        "units": info.units_count,
    }


async def require_systemd(ctx: CallContext) -> None:
    """Refuse clearly on a PID 1 without capsules (SystemdTooOld), before any effect."""
    with backend_errors(""):
        await ctx.backend.check_version()


async def existing(ctx: CallContext, name: str, record: Record | None) -> CapsuleInfo | None:
    """systemd's view of the capsule; NoSuchCapsule if neither systemd nor we know it."""
    with backend_errors(name):
        info = await ctx.backend.capsule_info(name)
    if info is None and record is None:
        raise errors.NoSuchCapsule(name=name)
    return info


async def describe_wire(ctx: CallContext, name: str) -> Wire:
    with backend_errors(name):
        info = await ctx.backend.capsule_info(name)
    return capsule_to_wire(name, info, ctx.record_of(name))


# --- read ---------------------------------------------------------------------------------


async def list_capsules(ctx: CallContext, p: Params) -> Wire:
    with backend_errors(""):
        infos = {info.name: info for info in await ctx.backend.list_capsules()}
    records = {r.name: r for r in ctx.records.all()}
    visible: list[Wire] = []
    for name in sorted(infos.keys() | records.keys()):
        record = records.get(name)
        if await ctx.may_read(name, record.owner if record else None):
            visible.append(capsule_to_wire(name, infos.get(name), record))
    if ctx.more and visible:
        for capsule in visible[:-1]:
            await ctx.notify({"capsules": [capsule]})
        return {"capsules": [visible[-1]]}
    return {"capsules": visible}


async def describe(ctx: CallContext, p: Params) -> Wire:
    name = checked_name(p)
    record = await ctx.authorize(act.READ, name, interactive=p["allowInteractiveAuthentication"])
    info = await existing(ctx, name, record)
    return {"capsule": capsule_to_wire(name, info, record)}


# --- create and remove --------------------------------------------------------------------


async def create(ctx: CallContext, p: Params) -> Wire:
    name = checked_name(p)
    uid = ctx.peer.uid
    await ctx.authorize(
        act.CREATE, name, interactive=p["allowInteractiveAuthentication"], owner=uid
    )
    await require_systemd(ctx)
    async with ctx.locked(name):
        try:
            record = ctx.records.get(name)
        except CorruptRecord:
            # Not ours to overwrite: records.py leaves such a file for an admin.
            raise errors.CapsuleExists(name=name) from None
        with backend_errors(name):
            info = await ctx.backend.capsule_info(name)
        resuming = record is not None and record.phase is Phase.CREATING and record.owner == uid
        if not resuming and (record is not None or info is not None):
            raise errors.CapsuleExists(name=name)
        if (problem := static_identity_problem(name)) is not None:
            raise errors.InvalidName(name=name, reason=problem)
        quota = ctx.services.authorizer.quota(ctx.peer)
        if not resuming:
            owned = len(ctx.records.owned_by(uid))
            if quota.max_capsules is not None and owned >= quota.max_capsules:
                ctx.audit(AuditAction.CREATE, name, "quota-exceeded")
                raise errors.QuotaExceeded(what="capsules", limit=quota.max_capsules)
            record = new_record(name, uid)
            # Written before systemd is touched, so a crash leaves a record a retry resumes.
            ctx.records.put(record)
        assert record is not None
        try:
            with backend_errors(name):
                # The caller's ceilings hold from the first start, not only for SetLimits.
                ceilings = (quota.max_memory_bytes, quota.max_tasks, quota.max_cpu_weight)
                if any(c is not None for c in ceilings):
                    await ctx.backend.set_limits(
                        name, memory_max=ceilings[0], tasks_max=ceilings[1], cpu_weight=ceilings[2]
                    )
                # Starting the capsule once makes systemd create its state directory with
                # the ownership it wants (65534 + ID mapping on 257, the dynamic uid before).
                await ctx.backend.start(name)
                if not p["start"]:
                    await ctx.backend.stop(name)
        except errors.JobFailed:
            await _undo_create(ctx, name)
            ctx.audit(AuditAction.CREATE, name, RESULT_FAILED)
            raise
        ctx.records.put(record.with_phase(Phase.READY))
        ctx.audit(AuditAction.CREATE, name, RESULT_OK, owner=uid)
        return {"capsule": await describe_wire(ctx, name)}


def static_identity_problem(name: str) -> str | None:
    """Why NAME must not become a capsule because c-NAME already names a static user or group.

    With DynamicUser=, systemd reuses an existing user of that name instead of allocating a
    dynamic one (systemd.exec(5)), so capsule@NAME.service would run as - and Run would
    execute as - that real account.
    """
    account = CAPSULE_USER_PREFIX + name
    for kind, lookup in (("user", pwd.getpwnam), ("group", grp.getgrnam)):
        try:
            entry = lookup(account)
        except KeyError:
            continue
        ident = entry[2]
        if not DYNAMIC_UID_MIN <= ident <= DYNAMIC_UID_MAX:
            return f"{account} is an existing {kind} (id {ident}), not a dynamic one"
    return None


async def _undo_create(ctx: CallContext, name: str) -> None:
    """A capsule whose manager would not start is not created: leave nothing behind."""
    try:
        await ctx.backend.stop(name)
        await ctx.backend.reset_failed(name)
        await ctx.backend.clean(name)
        await ctx.backend.forget(name)
    except sd.BackendError:
        # The record stays in phase "creating": Remove or a retried Create finishes the job.
        return
    ctx.records.delete(name)


async def remove(ctx: CallContext, p: Params) -> Wire:
    name = checked_name(p)
    await ctx.authorize(act.REMOVE, name, interactive=p["allowInteractiveAuthentication"])
    await require_systemd(ctx)
    async with ctx.locked(name):
        record = ctx.record_of(name)
        await existing(ctx, name, record)
        if record is not None:
            # From here on a crash leaves "removing": a retry finishes, nothing else resumes it.
            ctx.records.put(record.with_phase(Phase.REMOVING))
        with backend_errors(name):
            await ctx.backend.stop(name)
            await ctx.backend.reset_failed(name)
            if not p["keepData"]:
                await ctx.backend.clean(name)
            await ctx.backend.forget(name)
        ctx.records.delete(name)
        ctx.audit(AuditAction.REMOVE, name, RESULT_OK, keep_data=int(bool(p["keepData"])))
        return {}


# --- start, stop, restart, autostart, limits ----------------------------------------------


# The job each verb queues, and what it is audited as.
_JOB_AUDIT = {"start": AuditAction.START, "stop": AuditAction.STOP, "restart": AuditAction.RESTART}


async def _run_job(ctx: CallContext, p: Params, verb: str) -> Wire:
    name = checked_name(p)
    await ctx.authorize(
        act.MANAGE, name, interactive=p["allowInteractiveAuthentication"], verb=verb
    )
    await require_systemd(ctx)
    async with ctx.locked(name):
        await existing(ctx, name, ctx.record_of(name))
        job = {"start": ctx.backend.start, "stop": ctx.backend.stop, "restart": ctx.backend.restart}
        audit = _JOB_AUDIT[verb]
        try:
            with backend_errors(name):
                result = await job[verb](name)
        except errors.JobFailed as failure:
            ctx.audit(audit, name, RESULT_FAILED, job_result=str(failure.parameters.get("result")))
            raise
        ctx.audit(audit, name, RESULT_OK)
        return {"capsule": await describe_wire(ctx, name), "job": result}


async def start(ctx: CallContext, p: Params) -> Wire:
    return await _run_job(ctx, p, "start")


async def stop(ctx: CallContext, p: Params) -> Wire:
    return await _run_job(ctx, p, "stop")


async def restart(ctx: CallContext, p: Params) -> Wire:
    return await _run_job(ctx, p, "restart")


async def set_autostart(ctx: CallContext, p: Params) -> Wire:
    name = checked_name(p)
    enabled = bool(p["enabled"])
    await ctx.authorize(
        act.MANAGE, name, interactive=p["allowInteractiveAuthentication"], verb="autostart"
    )
    await require_systemd(ctx)
    async with ctx.locked(name):
        await existing(ctx, name, ctx.record_of(name))
        with backend_errors(name):
            await ctx.backend.set_autostart(name, enabled)
        ctx.audit(AuditAction.SET_AUTOSTART, name, RESULT_OK, enabled=int(enabled))
        return {"capsule": await describe_wire(ctx, name)}


def _checked_limits(ctx: CallContext, p: Params) -> dict[str, int | None]:
    """Validate SetLimits values and hold them against the caller's ceilings."""
    memory_max, tasks_max, cpu_weight = (
        cast(int | None, p[k]) for k in ("memoryMax", "tasksMax", "cpuWeight")
    )
    if memory_max is not None and memory_max < -1:
        raise errors.InvalidValue(parameter="memoryMax", reason="must be bytes >= 0, or -1")
    if tasks_max is not None and (tasks_max < -1 or tasks_max == 0):
        raise errors.InvalidValue(parameter="tasksMax", reason="must be >= 1, or -1")
    if cpu_weight is not None and cpu_weight != -1 and cpu_weight not in CPU_WEIGHT_RANGE:
        raise errors.InvalidValue(parameter="cpuWeight", reason="must be 1..10000, or -1")
    if memory_max is None and tasks_max is None and cpu_weight is None:
        raise errors.InvalidValue(parameter="memoryMax", reason="no limit given")
    quota = ctx.services.authorizer.quota(ctx.peer)
    ceilings = {
        "memoryMax": (memory_max, quota.max_memory_bytes),
        "tasksMax": (tasks_max, quota.max_tasks),
        "cpuWeight": (cpu_weight, quota.max_cpu_weight),
    }
    for what, (value, ceiling) in ceilings.items():
        if value == -1 and what == "cpuWeight":
            value = DEFAULT_CPU_WEIGHT  # a reset goes back to systemd's default weight
        # Otherwise -1 means "no limit", which is above any ceiling.
        if value is not None and ceiling is not None and (value == -1 or value > ceiling):
            raise errors.QuotaExceeded(what=what, limit=ceiling)
    return {"memoryMax": memory_max, "tasksMax": tasks_max, "cpuWeight": cpu_weight}


async def set_limits(ctx: CallContext, p: Params) -> Wire:
    name = checked_name(p)
    await ctx.authorize(act.SET_LIMITS, name, interactive=p["allowInteractiveAuthentication"])
    limits = _checked_limits(ctx, p)
    await require_systemd(ctx)
    async with ctx.locked(name):
        await existing(ctx, name, ctx.record_of(name))
        # -1 on the wire is "back to systemd's default", the backend's LIMIT_DEFAULT.
        backend_value = {k: (LIMIT_DEFAULT if v == -1 else v) for k, v in limits.items()}
        with backend_errors(name):
            await ctx.backend.set_limits(
                name,
                memory_max=backend_value["memoryMax"],
                tasks_max=backend_value["tasksMax"],
                cpu_weight=backend_value["cpuWeight"],
            )
        ctx.audit(
            AuditAction.SET_LIMITS,
            name,
            RESULT_OK,
            **{k: v for k, v in limits.items() if v is not None},
        )
        return {"capsule": await describe_wire(ctx, name)}


# --- about the helper and the policy ------------------------------------------------------


async def info(ctx: CallContext, p: Params) -> Wire:
    try:
        version: int | None = await ctx.backend.version()
    except sd.BackendError:
        version = None
    return {
        "version": ctx.services.version,
        "systemdVersion": version,
        "policyBackend": ctx.services.authorizer.backend_name,
        "callerUid": ctx.peer.uid,
    }


async def check_access(ctx: CallContext, p: Params) -> Wire:
    name = checked_name(p)
    try:
        action = act.resolve(cast(str, p["action"]))
    except ValueError:
        raise errors.InvalidValue(
            parameter="action", reason=f"one of {', '.join(act.BY_SHORT_NAME)}"
        ) from None
    # Both become polkit details (D-Bus strings): nothing unchecked goes there.
    verb, unit = cast(str | None, p["verb"]), cast(str | None, p["unit"])
    if verb is not None and verb not in MANAGE_VERBS | MANAGE_UNITS_VERBS:
        raise errors.InvalidValue(
            parameter="verb",
            reason=f"one of {', '.join(sorted(MANAGE_VERBS | MANAGE_UNITS_VERBS))}",
        )
    if unit is not None and (problem := unit_name_problem(unit)) is not None:
        raise errors.InvalidUnit(unit=unit, reason=problem, line=None)
    record = ctx.record_of(name)
    owner = ctx.peer.uid if action == act.CREATE else (record.owner if record else None)
    # Never interactive: CheckAccess asks, it does not authenticate.
    request = Request(action, name, owner, verb, unit)
    verdict = await ctx.services.authorizer.decide(ctx.peer, request)
    return {"access": {"result": str(verdict.decision), "reason": verdict.step}}
