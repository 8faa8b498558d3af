"""The systemd backend: what capsuled asks of PID 1 and of a capsule's own manager.

``SystemdBackend`` (and ``CapsuleManager``) are Protocols; ``DBusSystemdBackend`` implements them
over ``bus.Link`` (capsuled.dbus underneath: the daemon's one system bus connection for PID 1, a
peer-to-peer link per capsule manager). Its reads (version, capsule_info, list_capsules, watch)
answer from the live capsule model (capsuled.systemd.model) and the host's files (hostfs); its
jobs and settings go to PID 1, which signals what they changed. The in-memory ``FakeBackend``
for tests is tests/doubles/backend.py, not part of the product. Capsule names and unit names are
validated by the caller (capsuled.names) before they get here.

Errors: capsuled.systemd.errors (BackendError tree); nothing here knows Varlink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from .. import dbus
from ..names import is_valid_capsule_name
from . import messages as m
from .bus import Link, open_peer
from .capsule_socket import UnsafeSocket, connect_capsule_manager
from .errors import (
    BackendError,
    BadReply,
    JobFailed,
    ManagerUnavailable,
    NoSuchUnit,
    SystemdTooOld,
    SystemdUnavailable,
    UnitBusy,
)
from .hostfs import (
    AUTOSTART_TARGET,
    UnitFileCounts,
    admin_config,
    autostart_enabled,
    autostart_names,
    cgroup_cpu_usage_nsec,
    cgroup_memory_current,
    cgroup_tasks_current,
    has_state_dir,
    process_uid,
    real_state_dirs,
    remove_own_dropins,
)
from .jobs import active_state, run_job, unit_result, wait_state
from .manager import DBusCapsuleManager
from .model import CapsuleModel, UnitView
from .values import (
    CLEAN_TIMEOUT_S,
    CPU_WEIGHT_MAX,
    FINISHED_STATES,
    JOB_TIMEOUT_S,
    LIMIT_DEFAULT,
    MAX_TRACKED_EXITS,
    MAX_WATCH_SIGNALS_QUEUED,
    MIN_SYSTEMD_VERSION,
    UINT64_MAX,
    CapsuleEvent,
    CapsuleInfo,
    ExitStatus,
    Stdio,
    UnitEvent,
    UnitInfo,
    capsule_from_unit,
    capsule_unit,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Protocols


class CapsuleManager(Protocol):
    """A connection to one running capsule's `systemd --user` manager."""

    async def list_units(self) -> list[UnitInfo]:
        """Loaded units plus unit files (ListUnits + ListUnitFiles), sorted by name."""
        ...

    async def reload(self) -> None:
        """daemon-reload of the capsule's manager (after unit files changed)."""
        ...

    async def start_unit(self, unit: str) -> str:
        """Start and wait for the job; returns "done". Raises JobFailed, NoSuchUnit."""
        ...

    async def stop_unit(self, unit: str) -> str:
        """Stop and wait for the job; returns "done". Raises JobFailed, NoSuchUnit."""
        ...

    async def restart_unit(self, unit: str) -> str:
        """Restart and wait for the job; returns "done". Raises JobFailed, NoSuchUnit."""
        ...

    async def reset_failed_unit(self, unit: str) -> None:
        """ResetFailedUnit; a unit that is not loaded is not an error."""
        ...

    @property
    def uid(self) -> int:
        """The capsule's dynamic uid (its manager's), as the helper found it when connecting."""
        ...

    async def start_transient(
        self,
        unit: str,
        argv: Sequence[str],
        environment: Sequence[str] = (),
        working_directory: str | None = None,
        keep: bool = False,
        stdio: Stdio | None = None,
    ) -> str:
        """Start a transient Type=exec service (like `systemd-run`); returns once it started.

        `stdio`: its stdin, stdout and stderr (duplicated to the manager; still the caller's).

        keep=True: keep the unit's state signals, recorded from before the start, so that
        ``wait_exit`` gets the exit status even though the unit is garbage-collected the moment
        it ends (CollectMode=inactive-or-failed). AddRef cannot do this on a peer-to-peer link.
        The argv is passed verbatim (no $VAR expansion). Raises JobFailed (e.g. the binary does
        not exist; unit_result from the signals), UnitBusy (name in use).
        """
        ...

    async def wait_exit(self, unit: str, timeout_s: float | None = None) -> ExitStatus:
        """Wait until the service has ended and return how its main process ended.

        Without keep at start, a unit already gone raises NoSuchUnit.
        Raises BackendTimeout after timeout_s (None: no bound; the caller cancels).
        """
        ...

    def watch(self) -> AbstractAsyncContextManager[AsyncIterator[UnitEvent]]:
        """State changes of the capsule's units, from signals (bounded; WatchOverflow)."""
        ...


class SystemdBackend(Protocol):
    """Everything capsuled asks of PID 1 about capsules."""

    async def version(self) -> int:
        """PID 1's major version. Raises SystemdUnavailable."""
        ...

    async def check_version(self) -> int:
        """version(), raising SystemdTooOld below 256."""
        ...

    async def list_capsules(self) -> list[CapsuleInfo]:
        """Capsules with a state dir, an autostart link, or a loaded non-inactive unit."""
        ...

    async def capsule_info(self, name: str) -> CapsuleInfo | None:
        """One capsule, or None if systemd knows nothing of it (see list_capsules)."""
        ...

    async def start(self, name: str) -> str:
        """Start capsule@NAME.service and wait for the job. Raises JobFailed, BackendTimeout."""
        ...

    async def stop(self, name: str) -> str:
        """Stop and wait. Raises JobFailed, BackendTimeout."""
        ...

    async def restart(self, name: str) -> str:
        """Restart and wait. Raises JobFailed, BackendTimeout."""
        ...

    async def clean(self, name: str) -> None:
        """Delete the capsule's state/runtime/cache/log dirs (CleanUnit "all") and wait.

        Raises UnitBusy while running; JobFailed if cleaning failed.
        """
        ...

    async def set_autostart(self, name: str, enabled: bool) -> None:
        """Add/remove multi-user.target.wants/capsule@NAME.service and reload PID 1."""
        ...

    async def set_limits(
        self,
        name: str,
        memory_max: int | None = None,
        tasks_max: int | None = None,
        cpu_weight: int | None = None,
    ) -> None:
        """Persistent MemoryMax/TasksMax/CPUWeight (None: unchanged; LIMIT_DEFAULT: reset)."""
        ...

    async def forget(self, name: str) -> None:
        """Remove the drop-ins capsuled wrote (limits) and the autostart link of a removed
        capsule; an administrator's configuration stays."""
        ...

    def admin_config(self, name: str) -> list[str]:
        """Paths of an administrator's unit file and drop-ins for capsule@NAME.service."""
        ...

    async def reset_failed(self, name: str) -> None:
        """ResetFailedUnit; a unit that is not loaded is not an error."""
        ...

    def capsule_manager(self, name: str) -> AbstractAsyncContextManager[CapsuleManager]:
        """Connect to a running capsule's manager. Raises ManagerUnavailable."""
        ...

    def watch(self) -> AbstractAsyncContextManager[AsyncIterator[CapsuleEvent]]:
        """State changes of capsule@*.service, from signals. Iterator raises WatchOverflow."""
        ...

    async def close(self) -> None:
        """Drop the bus connection (reopened on next use)."""
        ...


# ---------------------------------------------------------------------------------------------
# PID 1


class DBusSystemdBackend:
    """SystemdBackend over the system bus (the daemon's one shared connection, reopened when
    lost; see capsuled.dbus.SystemBus)."""

    def __init__(
        self,
        system_bus: dbus.SystemBus | None = None,
        job_timeout_s: float = JOB_TIMEOUT_S,
        clean_timeout_s: float = CLEAN_TIMEOUT_S,
    ) -> None:
        # Without a shared bus (a test, a one-off script), a connection of our own.
        self._owns_bus = system_bus is None
        self._system_bus = system_bus if system_bus is not None else dbus.SystemBus()
        self._job_timeout_s = job_timeout_s
        self._clean_timeout_s = clean_timeout_s
        self._link: Link | None = None
        self._setup_lock = asyncio.Lock()
        # Reads answer from here; it shares this backend's Link, so that a job's signals and
        # the model's arrive in one order (see model.py).
        self._model = CapsuleModel(self._bus)
        self._unit_counts = UnitFileCounts()  # each capsule's unit files, counted when changed
        self._warming: asyncio.Task[None] | None = None  # the model's first look, see version()

    async def _bus(self) -> Link:
        """PID 1's side of the current system bus connection, set up once per connection."""
        try:
            conn = await self._system_bus.connection()
        except dbus.BusClosed as exc:
            raise SystemdUnavailable(str(exc)) from exc
        link = self._link
        if link is not None and link.conn is conn:
            return link
        async with self._setup_lock:
            if self._link is None or self._link.conn is not conn:
                # PID 1's signals by its well-known name, not the unique name it has now: it
                # gets a new one each time it re-executes (daemon-reexec, an upgrade), and a
                # job waiting across that would never see its JobRemoved (dbus.header_matches
                # says how a well-known sender is checked).
                link = Link(conn, signal_sender=m.SYSTEMD_BUS_NAME)
                # Route JobRemoved to us for the life of the connection (one AddMatch).
                await link.add_match(m.job_removed_rule())
                self._link = link
            return self._link

    async def close(self) -> None:
        """Forget the connection's setup and the model; close the bus connection if ours."""
        warming, self._warming = self._warming, None
        if warming is not None:
            warming.cancel()
            await asyncio.gather(warming, return_exceptions=True)
        await self._model.close()
        self._link = None
        if self._owns_bus:
            await self._system_bus.close()

    # -- facts -----------------------------------------------------------------------------

    async def version(self) -> int:
        """PID 1's major version (Manager.Version "257.9-1" -> 257): the model's, while it is
        current (it looks again when PID 1 re-executes); else one Get, so that Info, often a
        client's first call, never waits for the model's whole first look at PID 1."""
        version: object = self._model.current_version()
        if version is None:
            conn = await self._bus()
            try:
                version = m.parse_get_property(await conn.call(m.manager_version()))
            except NoSuchUnit as exc:  # pragma: no cover - PID 1 without the Manager object
                raise SystemdUnavailable("PID 1 is not systemd") from exc
            # This call's answer goes out first; meanwhile the model takes its first look, so
            # that the next Info reads the version from it instead of asking PID 1 each time
            # (a client that only ever calls Info paid a D-Bus round trip per call).
            self._warm_model()
        return m.parse_version(version)

    def _warm_model(self) -> None:
        if self._warming is None or self._warming.done():
            self._warming = asyncio.create_task(self._warm(), name="capsuled-model-first-look")

    async def _warm(self) -> None:
        try:
            await self._model.ready()
        except BackendError as exc:  # the next read that needs the model tries again, and says
            log.debug("the model's first look at PID 1 failed: %s", exc)

    async def check_version(self) -> int:
        """version(), raising SystemdTooOld below 256."""
        version = await self.version()
        if version < MIN_SYSTEMD_VERSION:
            raise SystemdTooOld(version)
        return version

    async def list_capsules(self) -> list[CapsuleInfo]:
        """Union of state dirs, autostart links and capsule@*.service units PID 1 has loaded.

        Names are not validated here; the caller drops names it does not accept.
        """
        await self._model.ready()
        dirs, links = real_state_dirs(), autostart_names()  # dirs: name -> its lstat, or None
        self._unit_counts.forget(dirs)
        names = dirs.keys() | links | self._model.loaded_names()
        # A stray directory under /var/lib/private/capsules must not break the listing (PID 1
        # would refuse its unit name with InvalidArgs): only names systemd would accept.
        valid = sorted(n for n in names if is_valid_capsule_name(n))
        autostart = {n: autostart_enabled(n) for n in valid if n in links}
        # A state dir or an autostart link shows a capsule whatever its unit's state: only the
        # names PID 1 alone knows need a first look (one view a row, not two).
        undecided = [n for n in valid if n not in dirs and not autostart.get(n)]
        states = await self._model.views(undecided)
        shown = [
            n
            for n in valid
            if n in dirs or autostart.get(n) or states[n].active_state != "inactive"
        ]
        views = await self._model.views(shown, shown)
        count = self._unit_counts.count
        return [
            _capsule_info(
                n,
                views[n],
                n in dirs,
                autostart.get(n, False),
                count(n, dirs[n]) if n in dirs else 0,
            )
            for n in shown
        ]

    async def capsule_info(self, name: str) -> CapsuleInfo | None:
        """One capsule's state; None when it has no state dir, no autostart link and its unit
        is inactive (a unit that is merely loaded, e.g. by `systemctl status`, is no capsule).
        """
        state_dir = has_state_dir(name)
        autostart = autostart_enabled(name)
        known = state_dir or autostart
        view = await self._model.view(name, with_config=known)
        if not known:
            if view.active_state == "inactive":
                return None
            view = await self._model.view(name, with_config=True)
        units = self._unit_counts.count(name) if state_dir else 0
        return _capsule_info(name, view, state_dir, autostart, units)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, name: str) -> str:
        """StartUnit(mode=replace) and wait for JobRemoved."""
        unit = capsule_unit(name)
        conn = await self._bus()
        return await run_job(conn, unit, m.start_unit(unit), self._job_timeout_s)

    async def stop(self, name: str) -> str:
        """StopUnit(mode=replace) and wait for JobRemoved."""
        unit = capsule_unit(name)
        conn = await self._bus()
        return await run_job(conn, unit, m.stop_unit(unit), self._job_timeout_s)

    async def restart(self, name: str) -> str:
        """RestartUnit(mode=replace) and wait for JobRemoved."""
        unit = capsule_unit(name)
        conn = await self._bus()
        return await run_job(conn, unit, m.restart_unit(unit), self._job_timeout_s)

    async def reset_failed(self, name: str) -> None:
        """ResetFailedUnit; NoSuchUnit (not loaded: nothing failed) is swallowed."""
        conn = await self._bus()
        unit = capsule_unit(name)
        with contextlib.suppress(NoSuchUnit):
            await conn.call(m.reset_failed_unit(unit), unit=unit)
        # PID 1 replies before it sends the state change (failed -> inactive).
        await self._model.barrier()

    async def clean(self, name: str) -> None:
        """CleanUnit(["all"]) and wait until the unit leaves "maintenance" (cleaning)."""
        # PID 1 emits PropertiesChanged on the bus only while somebody is subscribed: the
        # model is, for the life of the connection, and its AddMatch routes every unit's.
        conn = await self._model.ready()
        unit = capsule_unit(name)
        local = m.unit_properties_changed_rule(m.unit_path(unit), sender=conn.signal_sender)
        with conn.signals(local, maxsize=64) as queue:
            state = await active_state(conn, unit)
            if state not in FINISHED_STATES:
                raise UnitBusy(unit)
            try:
                await conn.call(m.clean_unit(unit, ["all"]), unit=unit)
            except BackendError as exc:
                if getattr(exc, "name", "") == "org.freedesktop.systemd1.NothingToClean":
                    return
                raise
            state = await wait_state(conn, queue, unit, FINISHED_STATES, self._clean_timeout_s)
        if state == "failed":
            raise JobFailed("failed", await unit_result(conn, unit))

    # -- persistent configuration ------------------------------------------------------------

    async def set_autostart(self, name: str, enabled: bool) -> None:
        """`systemctl add-wants multi-user.target capsule@NAME.service` (or its undo) + reload."""
        conn = await self._bus()
        unit = capsule_unit(name)
        if enabled:
            await conn.call(
                m.add_dependency_unit_files([unit], AUTOSTART_TARGET, "Wants"), unit=unit
            )
        else:
            await self._remove_autostart(conn, name)
        await conn.call(m.reload())

    async def _remove_autostart(self, conn: Link, name: str) -> None:
        unit = capsule_unit(name)
        # Through PID 1 only: /etc is read-only for us (ProtectSystem=strict in capsuled.service).
        # DisableUnitFiles removes every symlink of that name in the unit search path even
        # though capsule@.service has no [Install] (install.c matches links by name; verified on
        # 257: reply [("unlink", ".../multi-user.target.wants/capsule@NAME.service", "")]), on
        # every version we run on (>= 256). A former os.unlink() fallback here could only fail
        # with EROFS under the service's sandbox, so it is gone.
        await conn.call(m.disable_unit_files_with_flags([unit]), unit=unit)

    async def set_limits(
        self,
        name: str,
        memory_max: int | None = None,
        tasks_max: int | None = None,
        cpu_weight: int | None = None,
    ) -> None:
        """SetUnitProperties(runtime=false): drop-ins in /etc/systemd/system.control/."""
        props: list[tuple[str, m.PropertyValue]] = []
        for key, value in (
            ("MemoryMax", memory_max),
            ("TasksMax", tasks_max),
            ("CPUWeight", cpu_weight),
        ):
            if value is not None:
                if not 0 <= value <= UINT64_MAX:
                    raise ValueError(f"{key} out of range")
                props.append((key, ("t", value)))
        if not props:
            return
        conn = await self._bus()
        unit = capsule_unit(name)
        await conn.call(m.set_unit_properties(unit, False, props), unit=unit)
        # PID 1 signals no change of these (see model.py): read them back before returning.
        await self._model.refresh_config(name)

    async def forget(self, name: str) -> None:
        """Undo what capsuled configured for the capsule (its limits' drop-ins, its autostart
        link) + reload. Not RevertUnitFiles: that also removes an administrator's drop-ins in
        /etc/systemd/system/capsule@NAME.service.d/, so an owner could shed restrictions put
        on a capsule by removing and creating it again (issue 11, finding 11)."""
        conn = await self._bus()
        try:
            remove_own_dropins(name)
        except OSError as exc:
            # Not fatal to Remove (the capsule is gone either way); the limits stay in place
            # until an administrator runs `systemctl revert`.
            log.warning("cannot remove the limits of capsule %s: %s", name, exc)
        await self._remove_autostart(conn, name)
        await conn.call(m.reload())

    def admin_config(self, name: str) -> list[str]:
        """An administrator's unit file and drop-ins for this capsule's service (hostfs)."""
        return admin_config(name)

    # -- capsule managers ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def capsule_manager(self, name: str) -> AsyncIterator[CapsuleManager]:
        """Connect to /run/capsules/NAME/systemd/private, pinned, as uid 0 (no Hello)."""
        view = await self._model.view(name, with_config=False)
        pid = view.main_pid
        uid = process_uid(pid) if pid > 0 and view.running else None
        if uid is None:
            raise ManagerUnavailable(name, "capsule is not running")
        try:
            sock = connect_capsule_manager(name, expected_uid=uid)
        except UnsafeSocket as exc:
            raise ManagerUnavailable(name, str(exc)) from exc
        except OSError as exc:
            raise ManagerUnavailable(name, exc.strerror or str(exc)) from exc
        try:
            # Untrusted-peer caps: anything in the capsule can answer on this socket (see bus.py).
            peer = await open_peer(sock, uid=0, name=f"capsule {name}'s manager")
        except SystemdUnavailable as exc:
            raise ManagerUnavailable(name, str(exc)) from exc
        try:
            yield DBusCapsuleManager(peer, name, self._job_timeout_s, uid=uid)
        finally:
            await peer.close()

    # -- watching ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[CapsuleEvent]]:
        """State changes of capsule@*.service as the model learns them from PID 1's signals
        (a bounded queue per watcher: WatchOverflow rather than unbounded buffering)."""
        async with self._model.watch() as events:
            yield events


def _capsule_info(
    name: str, view: UnitView, state_dir: bool, autostart: bool, units: int
) -> CapsuleInfo:
    """A capsule as reported: the model's unit, the host's files, the live cgroup figures."""
    config = view.config
    if config is None:  # the caller asked the model for it
        raise BadReply(f"no configuration of capsule@{name}.service")
    running = view.running
    cgroup = view.control_group if running else None
    memory = tasks = cpu = None
    if cgroup is not None:
        memory = cgroup_memory_current(cgroup) if config.memory_accounting else None
        tasks = cgroup_tasks_current(cgroup) if config.tasks_accounting else None
        raw = cgroup_cpu_usage_nsec(cgroup) if config.cpu_accounting else None
        cpu = None if raw is None else max(0, raw - view.cpu_usage_base)
    elif config.cpu_accounting:
        cpu = view.cpu_usage_last
    pid = view.main_pid
    return CapsuleInfo(
        name=name,
        state=view.active_state,
        sub_state=view.sub_state,
        uid=process_uid(pid) if pid > 0 and running else None,
        since_usec=view.since_usec or None,
        has_state_dir=state_dir,
        autostart=autostart,
        memory_current=memory,
        tasks_current=tasks,
        cpu_usage_nsec=cpu,
        memory_max=config.memory_max,
        tasks_max=config.tasks_max,
        cpu_weight=config.cpu_weight,
        result=view.result,
        units_count=units,
    )


__all__ = [
    "CLEAN_TIMEOUT_S",
    "CPU_WEIGHT_MAX",
    "FINISHED_STATES",
    "JOB_TIMEOUT_S",
    "LIMIT_DEFAULT",
    "MAX_TRACKED_EXITS",
    "MAX_WATCH_SIGNALS_QUEUED",
    "MIN_SYSTEMD_VERSION",
    "CapsuleEvent",
    "CapsuleInfo",
    "CapsuleManager",
    "DBusCapsuleManager",
    "DBusSystemdBackend",
    "ExitStatus",
    "Stdio",
    "SystemdBackend",
    "UnitEvent",
    "UnitInfo",
    "capsule_from_unit",
    "capsule_unit",
]
