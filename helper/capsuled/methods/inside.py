"""Inside a capsule: its user units (ListUnits, InstallUnit, RemoveUnit,
Start/Stop/Restart/Enable/DisableUnit) and commands (Run).

Unit files live in the capsule's home, which the capsule controls: every file
operation goes through safefs (dir fds, O_NOFOLLOW, atomic rename; invariant
2), in a worker thread (`in_home`: the event loop never waits on the disk).
The capsule's manager is reached over its private socket by the backend,
which refuses a socket the capsule's own uid does not own.

"Enabled" here means wanted by capsule@.target - the capsule's manager runs
with --unit=capsule@NAME.target, which does not pull in default.target, so a
unit's own [Install] WantedBy=default.target would never start it.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import secrets
from collections.abc import Callable, Iterator
from typing import TypeVar

from capsuled import errors, fdpass, wire
from capsuled.audit import RESULT_FAILED, RESULT_OK, AuditAction
from capsuled.methods import params
from capsuled.methods.context import CallContext, backend_errors
from capsuled.names import unit_name_problem
from capsuled.policy import actions as act
from capsuled.safefs import CapsuleHome, EntryKind, NoHome, SafeFsError
from capsuled.systemd import errors as sd
from capsuled.systemd.backend import CapsuleManager, Stdio, UnitInfo
from capsuled.terminal import allocate_pty
from capsuled.unitfile import InvalidUnitFile, check_unit_file

UNIT_DIR = (".config", "systemd", "user")
WANTS_DIR = (*UNIT_DIR, "capsule@.target.wants")
# The capsule's home as its own processes see it (capsule@.service: HOME=/var/lib/capsules/%i);
# wants links point there, as `systemctl --user enable` inside the capsule would make them.
CAPSULE_HOME_IN_CAPSULE = "/var/lib/capsules"
# Unit file size cap (see unitfile.UNIT_FILE_MAX_BYTES for why this size).
MAX_RUN_ARGS = 4096
MAX_RUN_ENV = 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
T = TypeVar("T")
# ActiveState values of a unit that has nothing left to stop.
INACTIVE_STATES = frozenset({"inactive", "failed"})
# What each verb on a unit is audited as.
_UNIT_AUDIT = {
    "start": AuditAction.START_UNIT,
    "stop": AuditAction.STOP_UNIT,
    "restart": AuditAction.RESTART_UNIT,
    "enable": AuditAction.ENABLE_UNIT,
    "disable": AuditAction.DISABLE_UNIT,
}


async def in_home(ctx: CallContext, name: str, work: Callable[[CapsuleHome], T]) -> T:
    """``work(home)`` on the capsule's home, opened safely, in a worker thread (safefs's
    CapsuleHomes); errors become replies that change nothing.

    Raises:
        CapsuleNotRunning: the capsule has no home yet.
        UnsafeCapsuleHome: something planted there refused the work.
    """
    try:
        return await ctx.services.homes.run(name, work)
    except NoHome:
        raise errors.CapsuleNotRunning(name=name) from None
    except SafeFsError as exc:
        raise errors.UnsafeCapsuleHome(name=name, path=exc.path, reason=exc.reason) from exc


def _unit_on_disk(home: CapsuleHome, unit: str) -> tuple[bool, bool]:
    """(its file exists, it is enabled): two lookups of one name, never a listing, since the
    capsule decides how big its directories are."""
    has_file = home.entry_kind(UNIT_DIR, unit) is EntryKind.FILE
    return has_file, home.entry_kind(WANTS_DIR, unit) is EntryKind.SYMLINK


def _unit_files(home: CapsuleHome) -> dict[str, EntryKind]:
    # The capsule may plant any name here, and a crashed write leaves a hidden temp file:
    # only names that are units count.
    return {n: k for n, k in home.list_dir(UNIT_DIR) if unit_name_problem(n) is None}


def _wanted(home: CapsuleHome) -> set[str]:
    return {n for n, kind in home.list_dir(WANTS_DIR) if kind is EntryKind.SYMLINK}


def _listing(home: CapsuleHome) -> tuple[dict[str, EntryKind], set[str]]:
    return _unit_files(home), _wanted(home)


def _is_transient(unit: UnitInfo) -> bool:
    # A user manager keeps transient unit files in $XDG_RUNTIME_DIR/systemd/transient/.
    return unit.unit_file_path is not None and "/systemd/transient/" in unit.unit_file_path


def is_capsule_unit(unit: UnitInfo) -> bool:
    """A unit the capsule's users put there (a file in its home, or Run), not a built-in one."""
    path = unit.unit_file_path
    return path is not None and ("/.config/systemd/user/" in path or _is_transient(unit))


def _unit_wire(unit: str, live: UnitInfo | None, has_file: bool, enabled: bool) -> wire.Unit:
    return {
        "name": unit,
        "description": live.description if live else None,
        "loadState": live.load_state if live else ("loaded" if has_file else "not-found"),
        "activeState": live.active_state if live else "inactive",
        "subState": live.sub_state if live else "dead",
        "enabled": enabled,
        "hasFile": has_file,
    }


async def _live_units(ctx: CallContext, name: str) -> dict[str, UnitInfo] | None:
    """The running manager's view of its units, or None while the capsule is stopped."""
    try:
        async with ctx.backend.capsule_manager(name) as mgr:
            return {u.name: u for u in await mgr.list_units()}
    except sd.ManagerUnavailable:
        return None


async def _describe_unit(ctx: CallContext, name: str, unit: str) -> wire.Unit:
    has_file, enabled = await in_home(ctx, name, lambda home: _unit_on_disk(home, unit))
    live = await _live_units(ctx, name)
    return _unit_wire(unit, (live or {}).get(unit), has_file, enabled)


async def list_units(ctx: CallContext, p: wire.CapsuleParams) -> wire.ListUnitsReply:
    name = params.capsule_name(p["name"])
    record = await ctx.authorize(act.READ, name, interactive=p["allowInteractiveAuthentication"])
    await ctx.existing(name, record)
    try:
        files, wanted = await in_home(ctx, name, _listing)
    except errors.CapsuleNotRunning:
        files, wanted = {}, set()  # never started: no home, so no unit files either
    with backend_errors(name):
        live = await _live_units(ctx, name)
    names = {n for n, kind in files.items() if kind is EntryKind.FILE}
    if live is not None:
        # Beside the files: transient units started with Run, still known to the manager.
        names |= {u.name for u in live.values() if _is_transient(u)}
    units = [_unit_wire(u, (live or {}).get(u), u in files, u in wanted) for u in sorted(names)]
    return {"units": units}


async def _manager_job(ctx: CallContext, name: str, unit: str, verb: str) -> str:
    try:
        async with ctx.backend.capsule_manager(name) as mgr:
            job = {"start": mgr.start_unit, "stop": mgr.stop_unit, "restart": mgr.restart_unit}
            return await job[verb](unit)
    except sd.NoSuchUnit:
        raise errors.NoSuchUnit(name=name, unit=unit) from None
    except sd.ManagerUnavailable:
        raise errors.CapsuleNotRunning(name=name) from None


async def _reload_if_running(ctx: CallContext, name: str) -> bool:
    try:
        async with ctx.backend.capsule_manager(name) as mgr:
            await mgr.reload()
            return True
    except sd.ManagerUnavailable:
        return False


async def install_unit(ctx: CallContext, p: wire.InstallUnitParams) -> wire.UnitReply:
    name = params.capsule_name(p["name"])
    unit = params.unit_name(p["unit"], installable=True)
    content = p["content"].encode()
    try:
        check_unit_file(content, unit_name=unit)
    except InvalidUnitFile as exc:
        raise errors.InvalidUnit(unit=unit, reason=exc.reason, line=exc.line) from None
    enable, start_now = bool(p["enable"]), bool(p["start"])
    interactive = p["allowInteractiveAuthentication"]
    # Every effect is authorized before anything is written: a grant of "install" alone does
    # not enable or start (issue 11, finding 6).
    for verb in ("install", *(["enable"] if enable else []), *(["start"] if start_now else [])):
        await ctx.authorize(act.MANAGE_UNITS, name, interactive=interactive, unit=unit, verb=verb)
    # A unit file is code: its ExecStart= runs as the capsule's user, as Run's command would.
    # So installing one needs `run` too, and a policy that forbids running commands in a
    # capsule forbids installing units there (finding 7). Starting, enabling and removing an
    # installed unit do not: they run only what someone allowed to run code put there.
    await ctx.authorize(act.RUN, name, interactive=interactive)
    await ctx.require_systemd()
    async with ctx.locked(name):
        info = await ctx.existing(name, ctx.record_of(name))
        running = info is not None and info.state == "active"
        if start_now and not running:
            raise errors.CapsuleNotRunning(name=name)

        def install(home: CapsuleHome) -> None:
            if enable:
                # Before writing anything: a planted link on the way refuses the whole call.
                os.close(home.open_dir(WANTS_DIR, create=True))
            home.write_file_atomically(UNIT_DIR, unit, content)
            if enable:
                _link_wanted(home, name, unit)

        await in_home(ctx, name, install)
        try:
            with backend_errors(name):
                await _reload_if_running(ctx, name)
                job = await _manager_job(ctx, name, unit, "start") if start_now else None
        except errors.JobFailed:
            ctx.audit(AuditAction.INSTALL_UNIT, name, RESULT_FAILED, unit=unit, enable=int(enable))
            raise
        ctx.audit(AuditAction.INSTALL_UNIT, name, RESULT_OK, unit=unit, enable=int(enable), job=job)
        return {"unit": await _describe_unit(ctx, name, unit)}


def _link_wanted(home: CapsuleHome, name: str, unit: str) -> None:
    target = posixpath.join(CAPSULE_HOME_IN_CAPSULE, name, *UNIT_DIR, unit)
    home.symlink(WANTS_DIR, unit, target)


async def remove_unit(ctx: CallContext, p: wire.UnitParams) -> wire.EmptyReply:
    name = params.capsule_name(p["name"])
    unit = params.unit_name(p["unit"])
    interactive = p["allowInteractiveAuthentication"]
    await ctx.authorize(act.MANAGE_UNITS, name, interactive=interactive, unit=unit, verb="remove")
    await ctx.require_systemd()
    async with ctx.locked(name):
        await ctx.existing(name, ctx.record_of(name))
        has_file, enabled = await in_home(ctx, name, lambda home: _unit_on_disk(home, unit))
        if not has_file and not enabled:
            raise errors.NoSuchUnit(name=name, unit=unit)
        with backend_errors(name):
            live = (await _live_units(ctx, name) or {}).get(unit)
        running = live is not None and live.active_state not in INACTIVE_STATES
        # Removing a unit also disables it (its wants link goes) and stops it if it runs: each
        # effect needs its own grant, decided before anything changes (finding 6).
        for verb, needed in (("disable", enabled), ("stop", running)):
            if needed:
                await ctx.authorize(
                    act.MANAGE_UNITS, name, interactive=interactive, unit=unit, verb=verb
                )
        if running:
            with (
                backend_errors(name),
                contextlib.suppress(errors.NoSuchUnit, errors.CapsuleNotRunning),
            ):
                await _manager_job(ctx, name, unit, "stop")

        def remove(home: CapsuleHome) -> None:
            home.remove_file(WANTS_DIR, unit)
            home.remove_file(UNIT_DIR, unit)

        await in_home(ctx, name, remove)
        with backend_errors(name):
            await _reload_if_running(ctx, name)
        ctx.audit(AuditAction.REMOVE_UNIT, name, RESULT_OK, unit=unit)
        return {}


async def _unit_job(ctx: CallContext, p: wire.UnitParams, verb: str) -> wire.UnitJobReply:
    name = params.capsule_name(p["name"])
    unit = params.unit_name(p["unit"])
    await ctx.authorize(
        act.MANAGE_UNITS,
        name,
        interactive=p["allowInteractiveAuthentication"],
        unit=unit,
        verb=verb,
    )
    await ctx.require_systemd()
    async with ctx.locked(name):
        await ctx.existing(name, ctx.record_of(name))
        try:
            with backend_errors(name):
                job = await _manager_job(ctx, name, unit, verb)
        except errors.JobFailed:
            ctx.audit(_UNIT_AUDIT[verb], name, RESULT_FAILED, unit=unit)
            raise
        ctx.audit(_UNIT_AUDIT[verb], name, RESULT_OK, unit=unit)
        return {"unit": await _describe_unit(ctx, name, unit), "job": job}


async def start_unit(ctx: CallContext, p: wire.UnitParams) -> wire.UnitJobReply:
    return await _unit_job(ctx, p, "start")


async def stop_unit(ctx: CallContext, p: wire.UnitParams) -> wire.UnitJobReply:
    return await _unit_job(ctx, p, "stop")


async def restart_unit(ctx: CallContext, p: wire.UnitParams) -> wire.UnitJobReply:
    return await _unit_job(ctx, p, "restart")


async def _set_enabled(ctx: CallContext, p: wire.UnitParams, enabled: bool) -> wire.UnitReply:
    name = params.capsule_name(p["name"])
    unit = params.unit_name(p["unit"])
    verb = "enable" if enabled else "disable"
    await ctx.authorize(
        act.MANAGE_UNITS,
        name,
        interactive=p["allowInteractiveAuthentication"],
        unit=unit,
        verb=verb,
    )
    await ctx.require_systemd()
    async with ctx.locked(name):
        await ctx.existing(name, ctx.record_of(name))

        def switch(home: CapsuleHome) -> None:
            if enabled:
                if home.entry_kind(UNIT_DIR, unit) is not EntryKind.FILE:
                    raise errors.NoSuchUnit(name=name, unit=unit)
                _link_wanted(home, name, unit)
            # Disabling needs no file: a link left dangling by hand must be removable too.
            elif not home.remove_file(WANTS_DIR, unit) and (
                home.entry_kind(UNIT_DIR, unit) is not EntryKind.FILE
            ):
                raise errors.NoSuchUnit(name=name, unit=unit)

        await in_home(ctx, name, switch)
        with backend_errors(name):
            await _reload_if_running(ctx, name)
        ctx.audit(_UNIT_AUDIT[verb], name, RESULT_OK, unit=unit)
        return {"unit": await _describe_unit(ctx, name, unit)}


async def enable_unit(ctx: CallContext, p: wire.UnitParams) -> wire.UnitReply:
    return await _set_enabled(ctx, p, True)


async def disable_unit(ctx: CallContext, p: wire.UnitParams) -> wire.UnitReply:
    return await _set_enabled(ctx, p, False)


def _checked_run(p: wire.RunParams) -> tuple[list[str], str | None, list[str], str | None]:
    command = p["command"]
    if not command or len(command) > MAX_RUN_ARGS:
        raise errors.InvalidValue(parameter="command", reason=f"1..{MAX_RUN_ARGS} arguments")
    if not os.path.isabs(command[0]):
        raise errors.InvalidValue(parameter="command", reason="command[0] must be an absolute path")
    if any("\0" in arg for arg in command):
        raise errors.InvalidValue(parameter="command", reason="arguments may not contain NUL")
    unit = p["unit"]
    if unit is not None:
        if "." not in unit:
            unit += ".service"
        problem = unit_name_problem(unit)
        if problem is None and not unit.endswith(".service"):
            problem = "a command runs as a .service"
        if problem is not None:
            raise errors.InvalidUnit(unit=unit, reason=problem, line=None)
    environment = p["environment"] or []
    if len(environment) > MAX_RUN_ENV:
        raise errors.InvalidValue(parameter="environment", reason=f"at most {MAX_RUN_ENV}")
    for assignment in environment:
        key, sep, value = assignment.partition("=")
        # systemd's env_name_is_valid(): ASCII letters, digits, '_', not starting with a digit.
        # Never echo the assignment: its value may be a secret.
        if not sep or not ENV_NAME.fullmatch(key) or "\0" in value:
            raise errors.InvalidValue(
                parameter="environment", reason="entries must be KEY=VALUE, without NUL"
            )
    cwd = p["workingDirectory"]
    if cwd is not None and (not os.path.isabs(cwd) or "\0" in cwd):
        raise errors.InvalidValue(parameter="workingDirectory", reason="must be an absolute path")
    return command, unit, environment, cwd


# Run's stdio modes and the fds each takes with the call (methods.TAKES_FDS holds the most).
_STDIO_FDS = {None: 0, "pipe": 3, "pty": 0}


def _checked_stdio(ctx: CallContext, p: wire.RunParams) -> tuple[int, int] | None:
    """The fds that came with the call fit the mode, and the mode fits the call; returns the
    pty's size if one was given."""
    mode = p["stdio"]
    size = None
    for field in ("rows", "columns"):
        value = p[field]
        if value is not None and not 1 <= value <= 65535:
            raise errors.InvalidValue(parameter=field, reason="1..65535")
        if value is not None and mode != "pty":
            raise errors.InvalidValue(parameter=field, reason="only with stdio pty")
    if p["rows"] is not None and p["columns"] is not None:
        size = (p["rows"], p["columns"])
    elif p["rows"] is not None or p["columns"] is not None:
        raise errors.InvalidValue(parameter="rows", reason="rows and columns come together")
    wanted, got = _STDIO_FDS[mode], len(fdpass.received())
    if got != wanted:
        reason = f"stdio {mode or 'absent'} takes {wanted} file descriptors, the call brought {got}"
        raise errors.InvalidValue(parameter="stdio", reason=reason)
    if mode is not None and not ctx.more:
        raise errors.InvalidValue(parameter="stdio", reason="pipe and pty need more (to wait)")
    return size


@contextlib.contextmanager
def _stdio(
    mode: str | None, uid: int, size: tuple[int, int] | None
) -> Iterator[tuple[Stdio | None, int | None]]:
    """The unit's stdio for `mode`, and the pty master to send back (taken by the caller,
    who must push or close it); everything else opened here is closed when the block ends."""
    if mode == "pipe":
        stdin, stdout, stderr = fdpass.received()
        yield Stdio(stdin, stdout, stderr), None
    elif mode == "pty":
        pty = allocate_pty(uid, size)
        try:
            yield Stdio(pty.peer, pty.peer, pty.peer, tty_path=pty.path), pty.master
        except BaseException:
            os.close(pty.master)
            raise
        finally:
            os.close(pty.peer)  # the manager has its own copies now, or nobody needs it
    else:
        yield None, None


async def _start_transient(
    mgr: CapsuleManager,
    unit: str,
    command: list[str],
    *,
    environment: list[str],
    working_directory: str | None,
    keep: bool,
    stdio: Stdio | None = None,
) -> str:
    try:
        return await mgr.start_transient(
            unit,
            command,
            environment=environment,
            working_directory=working_directory,
            keep=keep,
            stdio=stdio,
        )
    except sd.UnitBusy:
        raise errors.InvalidUnit(
            unit=unit, reason="a unit of this name is already loaded", line=None
        ) from None


async def run(ctx: CallContext, p: wire.RunParams) -> wire.RunReply:
    name = params.capsule_name(p["name"])
    command, unit, environment, cwd = _checked_run(p)
    mode = p["stdio"]
    size = _checked_stdio(ctx, p)
    await ctx.authorize(act.RUN, name, interactive=p["allowInteractiveAuthentication"])
    await ctx.require_systemd()
    async with contextlib.AsyncExitStack() as stack:
        # The capsule's lock and the owner re-check, as for every other mutating method
        # (finding 9): a capsule removed and re-created by someone else while we waited runs
        # nothing of ours. Held for the start only: waiting for the command's exit must not
        # block every other call on the capsule.
        async with ctx.locked(name):
            await ctx.existing(name, ctx.record_of(name))
            try:
                with backend_errors(name):
                    mgr = await stack.enter_async_context(ctx.backend.capsule_manager(name))
                    with _stdio(mode, mgr.uid, size) as (stdio, master):
                        started = await _start_transient(
                            mgr,
                            unit or f"run-u{secrets.token_hex(8)}.service",
                            command,
                            environment=environment,
                            working_directory=cwd,
                            keep=ctx.more,
                            stdio=stdio,
                        )
                    if master is not None:
                        # The transport's from here: sent with the next reply (the started
                        # one below), closed if that never goes out.
                        fdpass.push_fd(master)
            except errors.JobFailed:
                ctx.audit(AuditAction.RUN, name, RESULT_FAILED, command=command[0])
                raise
            finally:
                # The manager holds its own copies now (or the start failed): the helper keeps
                # none of the caller's fds while the command runs.
                fdpass.close_received()
            ctx.audit(
                AuditAction.RUN, name, "started", unit=started, command=command[0], stdio=mode
            )
        if not ctx.more:
            return {"unit": started, "exitStatus": None, "result": None}
        await ctx.notify({"unit": started, "exitStatus": None, "result": None})
        with backend_errors(name):
            ended = await mgr.wait_exit(started)
    ctx.audit(
        AuditAction.RUN,
        name,
        "exited",
        unit=started,
        exit_result=ended.result,
        status=ended.status,
    )
    # A signal is not an exit status; result ("signal", "core-dump") says what happened.
    status = ended.status if ended.code == "exited" else None
    return {"unit": started, "exitStatus": status, "result": ended.result}
