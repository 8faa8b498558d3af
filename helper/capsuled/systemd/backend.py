"""The systemd backend: what capsuled asks of PID 1 and of a capsule's own manager.

``SystemdBackend`` (and ``CapsuleManager``) are Protocols; ``DBusSystemdBackend`` implements them
over ``bus.Link`` (capsuled.dbus underneath: the daemon's one system bus connection for PID 1, a
peer-to-peer link per capsule manager). The in-memory ``FakeBackend`` for tests is
tests/doubles/backend.py, not part of the product. Capsule names and unit names are validated by
the caller (capsuled.names) before they get here.

Errors: capsuled.systemd.errors (BackendError tree); nothing here knows Varlink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Final, Protocol

from .. import dbus
from ..dbus import SignalQueue
from ..names import is_valid_capsule_name
from . import messages as m
from .bus import Link, open_peer
from .capsule_socket import UnsafeSocket, connect_capsule_manager
from .errors import (
    BackendError,
    InvalidArgument,
    JobFailed,
    ManagerUnavailable,
    NoSuchUnit,
    SystemdTooOld,
    SystemdUnavailable,
    UnitBusy,
    WatchOverflow,
)
from .hostfs import (
    AUTOSTART_TARGET,
    admin_config,
    autostart_enabled,
    autostart_names,
    count_unit_files,
    has_state_dir,
    process_uid,
    remove_own_dropins,
    state_dir_names,
)
from .jobs import active_state, run_job, unit_result, unit_state_changes, wait_state
from .manager import DBusCapsuleManager
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
        """Forget the connection's setup; close the bus connection if it is our own."""
        self._link = None
        if self._owns_bus:
            await self._system_bus.close()

    # -- facts -----------------------------------------------------------------------------

    async def version(self) -> int:
        """PID 1's major version (Manager.Version "257.9-1" -> 257)."""
        conn = await self._bus()
        try:
            body = await conn.call(m.manager_version())
        except NoSuchUnit as exc:  # pragma: no cover - PID 1 without the Manager object
            raise SystemdUnavailable("PID 1 is not systemd") from exc
        return m.parse_version(m.parse_get_property(body))

    async def check_version(self) -> int:
        """version(), raising SystemdTooOld below 256."""
        version = await self.version()
        if version < MIN_SYSTEMD_VERSION:
            raise SystemdTooOld(version)
        return version

    async def _loaded_capsule_units(self) -> list[m.UnitListEntry]:
        conn = await self._bus()
        body = await conn.call(m.list_units_by_patterns([], ["capsule@*.service"]))
        return [u for u in m.parse_unit_list(body) if capsule_from_unit(u.name) is not None]

    async def list_capsules(self) -> list[CapsuleInfo]:
        """Union of state dirs, autostart links and capsule@*.service units PID 1 has loaded.

        Names are not validated here; the caller drops names it does not accept.
        """
        names = state_dir_names() | autostart_names()
        for entry in await self._loaded_capsule_units():
            name = capsule_from_unit(entry.name)
            if name is not None:
                names.add(name)
        # A stray directory under /var/lib/private/capsules must not break the listing (PID 1
        # would refuse its unit name with InvalidArgs): only names systemd would accept.
        valid = sorted(n for n in names if is_valid_capsule_name(n))
        infos = await asyncio.gather(*(self._info_if_known(n) for n in valid))
        return [i for i in infos if i is not None]

    async def _info_if_known(self, name: str) -> CapsuleInfo | None:
        # One capsule vanishing or unloadable mid-listing is not the listing's failure.
        try:
            return await self.capsule_info(name)
        except (NoSuchUnit, InvalidArgument):
            return None

    async def _capsule_properties(self, conn: Link, unit: str) -> dict[str, object]:
        # One GetAll with an empty interface name: every interface's properties (~450 on 257)
        # in one message. PID 1's per-message cost dominates: measured for 20 running
        # capsules on a loaded 2-core host, 20 GetAll("") took 277 ms, 40 GetAll(Unit|Service)
        # 291 ms, 220 pipelined Gets of just the 11 properties we use 750 ms; our own CPU was
        # ~55 ms in all three.
        body = await conn.call(m.get_all_properties(m.unit_path(unit), ""), unit=unit)
        return m.parse_properties(body)

    async def capsule_info(self, name: str) -> CapsuleInfo | None:
        """One capsule's state; None when it has no state dir, no autostart link and its unit
        is inactive (a unit that is merely loaded, e.g. by `systemctl status`, is no capsule).
        """
        conn = await self._bus()
        unit = capsule_unit(name)
        props = await self._capsule_properties(conn, unit)
        state = m.prop_str(props, "ActiveState", "inactive")
        state_dir = has_state_dir(name)
        autostart = autostart_enabled(name)
        if not state_dir and not autostart and state == "inactive":
            return None
        pid = m.prop_int(props, "ExecMainPID") or 0
        uid = process_uid(pid) if pid > 0 and state not in FINISHED_STATES else None
        return CapsuleInfo(
            name=name,
            state=state,
            sub_state=m.prop_str(props, "SubState"),
            uid=uid,
            since_usec=m.prop_int(props, "StateChangeTimestamp") or None,
            has_state_dir=state_dir,
            autostart=autostart,
            memory_current=m.prop_u64(props, "MemoryCurrent"),
            tasks_current=m.prop_u64(props, "TasksCurrent"),
            cpu_usage_nsec=m.prop_u64(props, "CPUUsageNSec"),
            memory_max=m.prop_u64(props, "MemoryMax"),
            tasks_max=m.prop_u64(props, "TasksMax"),
            cpu_weight=m.prop_u64(props, "CPUWeight"),
            result=m.prop_str(props, "Result"),
            units_count=count_unit_files(name) if state_dir else 0,
        )

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

    async def clean(self, name: str) -> None:
        """CleanUnit(["all"]) and wait until the unit leaves "maintenance" (cleaning)."""
        conn = await self._bus()
        unit = capsule_unit(name)
        path = m.unit_path(unit)
        rule = m.unit_properties_changed_rule(path)
        local = m.unit_properties_changed_rule(path, sender=conn.signal_sender)
        # PID 1 emits PropertiesChanged on the bus only while somebody is subscribed.
        with conn.signals(local, maxsize=64) as queue:
            async with conn.match(rule), self._subscribed(conn):
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

    @contextlib.asynccontextmanager
    async def _subscribed(self, conn: Link) -> AsyncIterator[None]:
        # Subscribe is counted per client by PID 1 (sd_bus_track, recursive), so nested
        # or concurrent users on our one connection are fine.
        await conn.call(m.subscribe())
        try:
            yield
        finally:
            if not conn.closed:
                with contextlib.suppress(BackendError):
                    await conn.call(m.unsubscribe())

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
        conn = await self._bus()
        unit = capsule_unit(name)
        props = m.parse_properties(
            await conn.call(m.get_all_properties(m.unit_path(unit), m.SERVICE_IFACE), unit=unit)
        )
        pid = m.prop_int(props, "ExecMainPID") or 0
        uid = process_uid(pid) if pid > 0 else None
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
        """Subscribe + PropertiesChanged of all units, filtered to capsule@*.service locally.

        D-Bus match rules cannot match a path prefix inside a component, so the bus routes
        every unit's changes to us while watching; the queue is bounded
        (MAX_WATCH_SIGNALS_QUEUED) and a consumer that falls behind gets WatchOverflow rather
        than unbounded buffering.
        """
        conn = await self._bus()
        rule = m.unit_properties_changed_rule()
        local = m.unit_properties_changed_rule(sender=conn.signal_sender)
        overflow = WatchOverflow("capsule watch fell behind")
        with conn.signals(local, MAX_WATCH_SIGNALS_QUEUED, overflow) as queue:
            async with conn.match(rule), self._subscribed(conn):
                known = {
                    u.name: (u.active_state, u.sub_state)
                    for u in await self._loaded_capsule_units()
                }
                yield _capsule_events(queue, known)


_CAPSULE_PATH_PREFIX: Final = m.unit_path("capsule@")  # ".../unit/capsule_40"


async def _capsule_events(
    queue: SignalQueue, known: dict[str, tuple[str, str]]
) -> AsyncIterator[CapsuleEvent]:
    async for unit, state, sub, since in unit_state_changes(queue, _CAPSULE_PATH_PREFIX, known):
        name = capsule_from_unit(unit)
        if name is not None:
            yield CapsuleEvent(name, state, sub, since)


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
