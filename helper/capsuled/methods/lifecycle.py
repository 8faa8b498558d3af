"""Capsule lifecycle: List, Describe, Create, Start, Stop, Restart, Remove,
SetAutostart, SetLimits, plus CheckAccess (Info is methods/info.py).

Every handler runs in the same order (style: systemd's mountwork.c): the
parameters arrive validated against the IDL -> value checks (params.py) ->
the one `ctx.authorize` line -> the work under the capsule's lock -> audit ->
reply.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import pwd
import typing
from collections.abc import Callable
from typing import Final, TypeGuard

from capsuled import errors, wire
from capsuled.audit import RESULT_FAILED, RESULT_OK, AuditAction
from capsuled.bundle import is_signer_name
from capsuled.deployments import CorruptDeployment, Deployment
from capsuled.methods import params
from capsuled.methods.context import CallContext, backend_errors
from capsuled.names import CAPSULE_USER_PREFIX
from capsuled.policy import actions as act
from capsuled.policy.engine import Request
from capsuled.policy.identity import user_name
from capsuled.records import CorruptRecord, Phase, new_record
from capsuled.safefs import DYNAMIC_UID_MAX, DYNAMIC_UID_MIN
from capsuled.systemd import errors as sd
from capsuled.systemd.backend import LIMIT_DEFAULT, CapsuleInfo

log = logging.getLogger(__name__)

# Values SetLimits accepts besides -1 ("reset to systemd's default").
CPU_WEIGHT_RANGE = range(1, 10001)  # CGROUP_WEIGHT_MIN..CGROUP_WEIGHT_MAX
DEFAULT_CPU_WEIGHT = 100  # CGROUP_WEIGHT_DEFAULT
# Verbs CheckAccess accepts, per action (what the methods pass as the polkit detail).
MANAGE_VERBS = frozenset({"start", "stop", "restart", "autostart"})
MANAGE_UNITS_VERBS = frozenset(
    {"install", "remove", "start", "stop", "restart", "enable", "disable"}
)
DEPLOY_VERBS = frozenset({"deploy", "downgrade", "rollback"})
ACCESS_VERBS = MANAGE_VERBS | MANAGE_UNITS_VERBS | DEPLOY_VERBS
# systemd's ActiveState values (unit_active_state_table, 257), the IDL's CapsuleState.
_CAPSULE_STATES: Final = frozenset(typing.get_args(wire.CapsuleState))


def _is_capsule_state(value: str) -> TypeGuard[wire.CapsuleState]:
    return value in _CAPSULE_STATES


def _capsule_state(value: str) -> wire.CapsuleState:
    if _is_capsule_state(value):
        return value
    # Not a state systemd 256..262 has: never sent, since the IDL declares the enum.
    log.warning("unknown ActiveState %r of a capsule; reporting it as inactive", value)
    return "inactive"


def deployed_wire(state: Deployment) -> wire.DeployedBundle | None:
    """A capsule's deployment as Describe reports it (null without a current bundle)."""
    current = state.current
    if current is None:
        return None
    return {
        "name": current.name,
        "version": current.version,
        "signer": current.signer,
        "keyId": current.key_id,
        "sha256": current.sha256,
        "deployed": current.deployed_usec,
        "deployedBy": current.deployed_by,
        "previousVersion": state.previous.version if state.previous else None,
        "unfinishedVersion": state.pending.version if state.pending else None,
    }


def deployment_of(ctx: CallContext, name: str) -> Deployment:
    """The capsule's deployment state; one we did not write is logged and shown as none."""
    try:
        return ctx.services.deployments.get(name)
    except CorruptDeployment as exc:
        log.error("deployment state of %s refused: %s", name, exc)
        return Deployment()


def capsule_to_wire(
    name: str,
    info: CapsuleInfo | None,
    owner: int | None,
    deployment: Deployment | None = None,
    *,
    name_of: Callable[[int], str | None] = user_name,
) -> wire.Capsule:
    """The IDL's Capsule; `owner` is the record's owner as ctx.owner_of says (None: none),
    named by `name_of` (a List passes its pass's, ctx.user_name)."""
    bundle = deployed_wire(deployment) if deployment is not None else None
    owner_name = name_of(owner) if owner is not None else None
    if info is None:
        # Known only from our record: a Create or Remove that has not finished yet.
        return {
            "name": name,
            "state": "inactive",
            "subState": "dead",
            "result": None,
            "owner": owner,
            "ownerName": owner_name,
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
            "bundle": bundle,
        }
    return {
        "name": name,
        "state": _capsule_state(info.state),
        "subState": info.sub_state,
        "result": info.result,
        "owner": owner,
        "ownerName": owner_name,
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
        "bundle": bundle,
    }


async def describe_wire(ctx: CallContext, name: str) -> wire.Capsule:
    with backend_errors(name):
        info = await ctx.backend.capsule_info(name)
    owner = ctx.owner_of(ctx.record_of(name))
    return capsule_to_wire(name, info, owner, deployment_of(ctx, name))


# --- read ---------------------------------------------------------------------------------


async def list_capsules(ctx: CallContext, p: wire.NoParams) -> wire.ListReply:
    with backend_errors(""):
        infos = {info.name: info for info in await ctx.backend.list_capsules()}
    records = {r.name: r for r in ctx.records.all()}
    deployed = ctx.services.deployments.names()
    visible: list[wire.Capsule] = []
    # One pass: the caller's account and each owner's are read once for all the rows; the
    # owner and group grants are the engine's, only rows they do not decide go to polkit,
    # and those together (Authorizer.decide_many).
    with ctx.one_pass():
        rows = [(n, ctx.owner_of(records.get(n))) for n in sorted(infos.keys() | records.keys())]
        allowed = await ctx.may_read_many(rows)
        for (name, owner), readable in zip(rows, allowed, strict=True):
            if readable:
                state = deployment_of(ctx, name) if name in deployed else None
                wired = capsule_to_wire(name, infos.get(name), owner, state, name_of=ctx.user_name)
                visible.append(wired)
    if ctx.more and visible:
        for capsule in visible[:-1]:
            await ctx.notify({"capsules": [capsule]})
        return {"capsules": [visible[-1]]}
    return {"capsules": visible}


async def describe(ctx: CallContext, p: wire.CapsuleParams) -> wire.CapsuleReply:
    name = params.capsule_name(p["name"])
    with ctx.one_pass():
        record = await ctx.authorize(
            act.READ, name, interactive=p["allowInteractiveAuthentication"]
        )
        info = await ctx.existing(name, record)
        owner = ctx.owner_of(record)
        # The owner's name from this pass too: the caller's own account when they own it.
        wired = capsule_to_wire(name, info, owner, deployment_of(ctx, name), name_of=ctx.user_name)
    return {"capsule": wired}


# --- create and remove --------------------------------------------------------------------


async def create(ctx: CallContext, p: wire.CreateParams) -> wire.CapsuleReply:
    name = params.capsule_name(p["name"])
    uid = ctx.peer.uid
    await ctx.authorize(
        act.CREATE, name, interactive=p["allowInteractiveAuthentication"], owner=uid
    )
    await ctx.require_systemd()
    async with ctx.locked(name):
        try:
            record = ctx.records.get(name)
        except CorruptRecord:
            # Not ours to overwrite: records.py leaves such a file for an admin.
            raise errors.CapsuleExists(name=name) from None
        with backend_errors(name):
            info = await ctx.backend.capsule_info(name)
        user = ctx.user_name(uid)
        mine = record is not None and record.is_owner(uid, user)
        # A Create killed half-way is finished by its creator's retry; a home kept by
        # `remove --keep-data` is taken back by its owner's Create (and by nobody else's).
        resuming = mine and record is not None and record.phase in (Phase.CREATING, Phase.KEPT)
        if not resuming and (record is not None or info is not None):
            # As with systemd, a creator learns that the name is taken whoever holds it: a name
            # is one namespace for everybody (documented in the README's security section).
            raise errors.CapsuleExists(name=name)
        if (problem := static_identity_problem(name)) is not None:
            raise errors.InvalidName(name=name, reason=problem)
        quota = ctx.services.authorizer.quota(ctx.peer)
        if not resuming:
            owned = len(ctx.records.owned_by(uid, user))
            if quota.max_capsules is not None and owned >= quota.max_capsules:
                ctx.audit(AuditAction.CREATE, name, "quota-exceeded")
                raise errors.QuotaExceeded(what="capsules", limit=quota.max_capsules)
            record = new_record(name, uid, user)
            # Written before systemd is touched, so a crash leaves a record a retry resumes.
            ctx.records.put(record)
            ctx.services.grants.changed(name)
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
        # Configuration an administrator put in place for this name (drop-ins in
        # /etc/systemd/system/capsule@NAME.service.d/, ...) applies to the new capsule: it is
        # adopted deliberately (an admin may restrict a name before anybody creates it), and
        # the record says so. capsuled never removes it (Remove undoes only its own writes).
        adopted = ctx.backend.admin_config(name)
        ctx.audit(
            AuditAction.CREATE, name, RESULT_OK, owner=uid, admin_config=",".join(adopted) or None
        )
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
    ctx.services.grants.changed(name)


async def remove(ctx: CallContext, p: wire.RemoveParams) -> wire.EmptyReply:
    name = params.capsule_name(p["name"])
    await ctx.authorize(act.REMOVE, name, interactive=p["allowInteractiveAuthentication"])
    await ctx.require_systemd()
    async with ctx.locked(name):
        record = ctx.record_of(name)
        await ctx.existing(name, record)
        if record is not None:
            # From here on a crash leaves "removing": a retry finishes, nothing else resumes it.
            ctx.records.put(record.with_phase(Phase.REMOVING))
        with backend_errors(name):
            await ctx.backend.stop(name)
            await ctx.backend.reset_failed(name)
            if not p["keepData"]:
                await ctx.backend.clean(name)
            await ctx.backend.forget(name)
        if p["keepData"] and record is not None:
            # The kept home stays its owner's: the name is not free for somebody else to
            # create and inherit the data, and the owner may create it again or remove it.
            ctx.records.put(record.with_phase(Phase.KEPT))
        else:
            ctx.records.delete(name)
        if not p["keepData"]:
            # What was deployed into it goes with its data; a kept home keeps both the files
            # and the record of which version they are.
            ctx.services.deployments.forget(name)
        # Streams bound to this capsule end now if their grant went with the record.
        ctx.services.grants.changed(name)
        ctx.audit(AuditAction.REMOVE, name, RESULT_OK, keep_data=int(bool(p["keepData"])))
        return {}


# --- start, stop, restart, autostart, limits ----------------------------------------------


# The job each verb queues, and what it is audited as.
_JOB_AUDIT = {"start": AuditAction.START, "stop": AuditAction.STOP, "restart": AuditAction.RESTART}


async def _run_job(ctx: CallContext, p: wire.CapsuleParams, verb: str) -> wire.JobReply:
    name = params.capsule_name(p["name"])
    await ctx.authorize(
        act.MANAGE, name, interactive=p["allowInteractiveAuthentication"], verb=verb
    )
    await ctx.require_systemd()
    async with ctx.locked(name):
        await ctx.existing(name, ctx.record_of(name))
        job = {"start": ctx.backend.start, "stop": ctx.backend.stop, "restart": ctx.backend.restart}
        audit = _JOB_AUDIT[verb]
        try:
            with backend_errors(name):
                result = await job[verb](name)
        except errors.JobFailed as failure:
            ctx.audit(audit, name, RESULT_FAILED, job_result=str(failure.parameters.get("result")))
            raise
        ctx.audit(audit, name, RESULT_OK)
        # The record's fsync (which the reply waits for: `audited`) runs while the capsule is
        # read back, not after it.
        on_disk = asyncio.ensure_future(ctx.services.audit.sync())
        try:
            capsule = await describe_wire(ctx, name)
        finally:
            await on_disk
        return {"capsule": capsule, "job": result}


async def start(ctx: CallContext, p: wire.CapsuleParams) -> wire.JobReply:
    return await _run_job(ctx, p, "start")


async def stop(ctx: CallContext, p: wire.CapsuleParams) -> wire.JobReply:
    return await _run_job(ctx, p, "stop")


async def restart(ctx: CallContext, p: wire.CapsuleParams) -> wire.JobReply:
    return await _run_job(ctx, p, "restart")


async def set_autostart(ctx: CallContext, p: wire.SetAutostartParams) -> wire.CapsuleReply:
    name = params.capsule_name(p["name"])
    enabled = p["enabled"]
    await ctx.authorize(
        act.MANAGE, name, interactive=p["allowInteractiveAuthentication"], verb="autostart"
    )
    await ctx.require_systemd()
    async with ctx.locked(name):
        await ctx.existing(name, ctx.record_of(name))
        with backend_errors(name):
            await ctx.backend.set_autostart(name, enabled)
        ctx.audit(AuditAction.SET_AUTOSTART, name, RESULT_OK, enabled=int(enabled))
        return {"capsule": await describe_wire(ctx, name)}


def _checked_limits(ctx: CallContext, p: wire.SetLimitsParams) -> dict[str, int | None]:
    """Validate SetLimits values and hold them against the caller's ceilings."""
    memory_max, tasks_max, cpu_weight = p["memoryMax"], p["tasksMax"], p["cpuWeight"]
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


async def set_limits(ctx: CallContext, p: wire.SetLimitsParams) -> wire.CapsuleReply:
    name = params.capsule_name(p["name"])
    await ctx.authorize(act.SET_LIMITS, name, interactive=p["allowInteractiveAuthentication"])
    limits = _checked_limits(ctx, p)
    await ctx.require_systemd()
    async with ctx.locked(name):
        await ctx.existing(name, ctx.record_of(name))
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


async def check_access(ctx: CallContext, p: wire.CheckAccessParams) -> wire.CheckAccessReply:
    name = params.capsule_name(p["name"])
    try:
        action = act.resolve(p["action"])
    except ValueError:
        raise errors.InvalidValue(
            parameter="action", reason=f"one of {', '.join(act.BY_SHORT_NAME)}"
        ) from None
    # Both become polkit details (D-Bus strings): nothing unchecked goes there.
    verb = p["verb"]
    if verb is not None and verb not in ACCESS_VERBS:
        raise errors.InvalidValue(
            parameter="verb", reason=f"one of {', '.join(sorted(ACCESS_VERBS))}"
        )
    unit = params.optional_unit_name(p["unit"])
    signer = p["signer"]
    if signer is not None and not is_signer_name(signer):
        raise errors.InvalidValue(parameter="signer", reason="not a signer name")
    record = ctx.record_of(name)
    owner = ctx.peer.uid if action == act.CREATE else ctx.owner_of(record)
    # Never interactive: CheckAccess asks, it does not authenticate.
    request = Request(action, name, owner, verb, unit, signer=signer)
    verdict = await ctx.services.authorizer.decide(ctx.peer, request)
    return {"access": {"result": str(verdict.decision), "reason": verdict.step}}
