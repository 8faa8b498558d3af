"""The systemd backend: what capsuled asks of PID 1 and of a capsule's own manager.

``SystemdBackend`` (and ``CapsuleManager``) are Protocols; ``DBusSystemdBackend`` implements them
over ``bus.py``, ``fake.FakeBackend`` in memory. Capsule names and unit names are validated by the
caller (capsuled.names) before they get here.

Errors: capsuled.systemd.errors (BackendError tree); nothing here knows Varlink.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Final, Protocol

from jeepney import HeaderFields, MatchRule, Message

from ..names import is_valid_capsule_name
from . import messages as m
from .bus import BusConnection, SignalQueue, open_peer, open_system_bus
from .capsule_socket import UnsafeSocket, connect_capsule_manager
from .errors import (
    BackendError,
    BackendTimeout,
    BadReply,
    InvalidArgument,
    JobFailed,
    ManagerUnavailable,
    NoSuchUnit,
    SystemdTooOld,
    SystemdUnavailable,
    UnitBusy,
    WatchOverflow,
)

MIN_SYSTEMD_VERSION: Final = 256
STATE_ROOT: Final = "/var/lib/private/capsules"  # DynamicUser= StateDirectory= lives here
LEGACY_STATE_ROOT: Final = "/var/lib/capsules"  # symlinks into private/ (or real dirs, <256?)
SYSTEM_CONFIG_DIR: Final = "/etc/systemd/system"
AUTOSTART_TARGET: Final = "multi-user.target"
# Where capsule units live inside a capsule's home (relative to the state dir).
USER_UNIT_DIR: Final = (".config", "systemd", "user")
UNIT_SUFFIXES: Final = (
    ".service", ".socket", ".target", ".timer", ".path", ".slice", ".mount",
    ".automount", ".swap", ".scope", ".device",
)  # fmt: skip
# systemd's capsule@.service has TimeoutStopSec=120s; give a job that much and a margin.
JOB_TIMEOUT_S: Final = 150.0
CLEAN_TIMEOUT_S: Final = 120.0
WATCH_QUEUE: Final = 1024
MAX_SCANNED_ENTRIES: Final = 10000  # directory entries read when counting a capsule's units
MAX_TRACKED_EXITS: Final = 64  # transient units per manager connection awaiting wait_exit
# Value to pass to set_limits to reset a limit to systemd's default ("infinity" for MemoryMax and
# TasksMax, "unset" i.e. 100 for CPUWeight): systemd's UINT64_MAX.
LIMIT_DEFAULT: Final = m.UINT64_MAX
# What PID 1 (257) accepts, else InvalidArgument: MemoryMax and TasksMax >= 1; CPUWeight 0
# ("idle") or 1..10000 (CGROUP_WEIGHT_MAX).
CPU_WEIGHT_MAX: Final = 10000
FINISHED_STATES: Final = frozenset({"inactive", "failed"})


def capsule_unit(name: str) -> str:
    """capsule@NAME.service."""
    return f"capsule@{name}.service"


def capsule_from_unit(unit: str) -> str | None:
    """NAME from capsule@NAME.service, else None."""
    if unit.startswith("capsule@") and unit.endswith(".service"):
        name = unit[len("capsule@") : -len(".service")]
        return name or None
    return None


# ---------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class CapsuleInfo:
    """What systemd knows about one capsule (None fields: unknown, unset or not running)."""

    name: str
    state: str  # ActiveState: active, inactive, failed, activating, deactivating, maintenance...
    sub_state: str  # SubState: running, dead, failed, start, cleaning...
    uid: int | None  # the dynamic uid while running
    since_usec: int | None  # StateChangeTimestamp (CLOCK_REALTIME, µs)
    has_state_dir: bool
    autostart: bool  # multi-user.target.wants/capsule@NAME.service exists
    memory_current: int | None
    tasks_current: int | None
    cpu_usage_nsec: int | None
    memory_max: int | None  # None: infinity
    tasks_max: int | None  # None: infinity
    cpu_weight: int | None  # None: unset (the default, 100)
    result: str  # unit Result: success, exit-code, signal, timeout, ...
    units_count: int  # unit files (not templates) in ~/.config/systemd/user; 0 without state dir


@dataclass(frozen=True, slots=True)
class CapsuleEvent:
    """A capsule's state changed (from PID 1's PropertiesChanged signal)."""

    name: str
    state: str
    sub_state: str
    since_usec: int | None


@dataclass(frozen=True, slots=True)
class UnitEvent:
    """A unit inside a capsule changed state (from its manager's PropertiesChanged)."""

    unit: str
    state: str
    sub_state: str
    since_usec: int


@dataclass(frozen=True, slots=True)
class UnitInfo:
    """A unit inside a capsule's manager."""

    name: str
    description: str
    load_state: str  # loaded, not-found, masked, ... ("not-loaded" for a file no one loaded)
    active_state: str
    sub_state: str
    unit_file_state: str | None  # enabled, disabled, static, linked, ... (None: no unit file)
    unit_file_path: str | None  # as the capsule sees it (HOME=/var/lib/capsules/NAME)


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a (transient) service ended."""

    unit: str
    result: str  # success, exit-code, signal, core-dump, timeout, ...
    code: str  # exited, killed, dumped ("" if it never ran)
    status: int  # exit status, or signal number when killed/dumped


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

    async def start_transient(
        self,
        unit: str,
        argv: Sequence[str],
        environment: Sequence[str] = (),
        working_directory: str | None = None,
        keep: bool = False,
    ) -> str:
        """Start a transient Type=exec service (like `systemd-run`); returns once it started.

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
        """Remove persistent drop-ins and the autostart link of a removed capsule."""
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
# Filesystem facts (root-owned paths above the capsule's own directory)


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def has_state_dir(name: str) -> bool:
    """/var/lib/private/capsules/NAME (or a real /var/lib/capsules/NAME) is a directory."""
    return _is_real_dir(os.path.join(STATE_ROOT, name)) or _is_real_dir(
        os.path.join(LEGACY_STATE_ROOT, name)
    )


def autostart_link(name: str) -> str:
    """The wants symlink AddDependencyUnitFiles creates for a capsule."""
    return os.path.join(SYSTEM_CONFIG_DIR, f"{AUTOSTART_TARGET}.wants", capsule_unit(name))


def autostart_enabled(name: str) -> bool:
    """The autostart link exists (as a symlink; a file planted there would not be ours)."""
    try:
        return stat.S_ISLNK(os.lstat(autostart_link(name)).st_mode)
    except OSError:
        return False


def state_dir_names() -> set[str]:
    """Names of the capsule state directories on disk (unvalidated; the caller filters)."""
    names: set[str] = set()
    for root in (STATE_ROOT, LEGACY_STATE_ROOT):
        with contextlib.suppress(OSError), os.scandir(root) as it:
            names.update(e.name for e in it if not e.name.startswith("."))
    return names


def autostart_names() -> set[str]:
    """Capsules with an autostart link."""
    wants = os.path.join(SYSTEM_CONFIG_DIR, f"{AUTOSTART_TARGET}.wants")
    names: set[str] = set()
    with contextlib.suppress(OSError), os.scandir(wants) as it:
        for entry in it:
            name = capsule_from_unit(entry.name)
            if name is not None:
                names.add(name)
    return names


def count_unit_files(name: str) -> int:
    """Unit files in the capsule's ~/.config/systemd/user (templates "x@.service" excluded:
    they are not units until instantiated), reached without following symlinks.

    The capsule owns every component below STATE_ROOT (invariant 2): each is opened with
    O_NOFOLLOW relative to its parent's fd, and a symlinked component just counts as nothing.
    Entries themselves are counted by name (lstat-free: a symlink to a unit is a valid unit).
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(os.path.join(STATE_ROOT, name), flags)
    except OSError:
        return 0
    try:
        for component in USER_UNIT_DIR:
            try:
                child = os.open(component, flags, dir_fd=fd)
            except OSError:
                return 0
            os.close(fd)
            fd = child
        count = 0
        with os.scandir(fd) as entries:
            # Bounded: the capsule controls this directory and may fill it with junk.
            for scanned, entry in enumerate(entries):
                if scanned >= MAX_SCANNED_ENTRIES:
                    break
                if entry.name.endswith(UNIT_SUFFIXES) and "@." not in entry.name:
                    count += 1
        return count
    finally:
        os.close(fd)


def process_uid(pid: int) -> int | None:
    """Owner of /proc/PID (the process's effective uid), None if gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Jobs and state waits (shared by PID 1 and the capsule managers)


def _job_rule(conn: BusConnection, unit: str) -> MatchRule:
    # Local filter only (arg2 = unit); the bus-side match is the broad job_removed_rule().
    rule = m.job_removed_rule(sender=conn.signal_sender)
    rule.add_arg_condition(2, unit)
    return rule


async def _wait_job(queue: SignalQueue, job: str, timeout_s: float) -> str:
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                event = m.parse_job_removed((await queue.get()).body)
                if event.job == job:
                    return event.result
    except TimeoutError as exc:
        raise BackendTimeout(f"job {job} did not finish in {timeout_s:.0f}s") from exc


async def _unit_result(conn: BusConnection, unit: str) -> str | None:
    with contextlib.suppress(BackendError):
        body = await conn.call(m.get_property(m.unit_path(unit), m.SERVICE_IFACE, "Result"))
        value = m.parse_get_property(body)
        return value if isinstance(value, str) else None
    return None


async def _run_job(conn: BusConnection, unit: str, call: Message, timeout_s: float) -> str:
    """Queue a job and wait for its JobRemoved; "done" or raise JobFailed."""
    # The queue exists before the call: JobRemoved may arrive right after (even before we
    # read) the reply, and nothing may slip between call and wait.
    with conn.signals(_job_rule(conn, unit), maxsize=64) as queue:
        job = m.parse_object_path(await conn.call(call, unit=unit))
        result = await _wait_job(queue, job, timeout_s)
    if result != "done":
        raise JobFailed(result, await _unit_result(conn, unit))
    return result


async def _active_state(conn: BusConnection, unit: str) -> str:
    body = await conn.call(
        m.get_property(m.unit_path(unit), m.UNIT_IFACE, "ActiveState"), unit=unit
    )
    value = m.parse_get_property(body)
    if not isinstance(value, str):
        raise BadReply("ActiveState is not a string")
    return value


async def _wait_state(
    conn: BusConnection,
    queue: SignalQueue,
    unit: str,
    done: frozenset[str],
    timeout_s: float,
) -> str:
    """Wait until the unit's ActiveState is in ``done``, woken by PropertiesChanged.

    ``queue`` must have been registered before whatever started the change. We re-read the
    state on every signal instead of trusting the signal's payload: signals of other interfaces
    (Service) arrive on the same path, and a re-read is 0.3 ms.
    """
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                state = await _active_state(conn, unit)
                if state in done:
                    return state
                await queue.get()
                while queue.get_nowait() is not None:
                    pass
    except TimeoutError as exc:
        raise BackendTimeout(f"{unit} did not reach {sorted(done)} in {timeout_s:.0f}s") from exc


# ---------------------------------------------------------------------------------------------
# PID 1


class DBusSystemdBackend:
    """SystemdBackend over the system bus (one shared connection, reopened when lost)."""

    def __init__(
        self,
        bus_address: str | None = None,
        job_timeout_s: float = JOB_TIMEOUT_S,
        clean_timeout_s: float = CLEAN_TIMEOUT_S,
    ) -> None:
        self._bus_address = bus_address
        self._job_timeout_s = job_timeout_s
        self._clean_timeout_s = clean_timeout_s
        self._conn: BusConnection | None = None
        self._open_lock = asyncio.Lock()

    async def _bus(self) -> BusConnection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._open_lock:
            if self._conn is None or self._conn.closed:
                conn = (
                    await open_system_bus(self._bus_address)
                    if self._bus_address
                    else await open_system_bus()
                )
                try:
                    owner = (await conn.call(m.get_name_owner()))[0]
                    if not isinstance(owner, str):
                        raise BadReply("GetNameOwner did not return a name")
                    conn.signal_sender = owner
                    # Route JobRemoved to us for the life of the connection (one AddMatch).
                    await conn.add_match(m.job_removed_rule())
                except BaseException:
                    await conn.close()
                    raise
                self._conn = conn
            return self._conn

    async def close(self) -> None:
        """Drop the bus connection (reopened on next use)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

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

    async def _capsule_properties(self, conn: BusConnection, unit: str) -> dict[str, object]:
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
        return await _run_job(conn, unit, m.start_unit(unit), self._job_timeout_s)

    async def stop(self, name: str) -> str:
        """StopUnit(mode=replace) and wait for JobRemoved."""
        unit = capsule_unit(name)
        conn = await self._bus()
        return await _run_job(conn, unit, m.stop_unit(unit), self._job_timeout_s)

    async def restart(self, name: str) -> str:
        """RestartUnit(mode=replace) and wait for JobRemoved."""
        unit = capsule_unit(name)
        conn = await self._bus()
        return await _run_job(conn, unit, m.restart_unit(unit), self._job_timeout_s)

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
                state = await _active_state(conn, unit)
                if state not in FINISHED_STATES:
                    raise UnitBusy(unit)
                try:
                    await conn.call(m.clean_unit(unit, ["all"]), unit=unit)
                except BackendError as exc:
                    if getattr(exc, "name", "") == "org.freedesktop.systemd1.NothingToClean":
                        return
                    raise
                state = await _wait_state(conn, queue, unit, FINISHED_STATES, self._clean_timeout_s)
        if state == "failed":
            raise JobFailed("failed", await _unit_result(conn, unit))

    @contextlib.asynccontextmanager
    async def _subscribed(self, conn: BusConnection) -> AsyncIterator[None]:
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

    async def _remove_autostart(self, conn: BusConnection, name: str) -> None:
        unit = capsule_unit(name)
        # DisableUnitFiles finds the link by name even though capsule@.service has no
        # [Install] (verified on 257); the unlink below is the fallback for older managers.
        await conn.call(m.disable_unit_files_with_flags([unit]), unit=unit)
        with contextlib.suppress(FileNotFoundError):
            link = autostart_link(name)
            if stat.S_ISLNK(os.lstat(link).st_mode):
                os.unlink(link)

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
                if not 0 <= value <= m.UINT64_MAX:
                    raise ValueError(f"{key} out of range")
                props.append((key, ("t", value)))
        if not props:
            return
        conn = await self._bus()
        unit = capsule_unit(name)
        await conn.call(m.set_unit_properties(unit, False, props), unit=unit)

    async def forget(self, name: str) -> None:
        """RevertUnitFiles (drop-ins in /etc, system.control, runtime) + autostart link + reload."""
        conn = await self._bus()
        unit = capsule_unit(name)
        await conn.call(m.revert_unit_files([unit]), unit=unit)
        await self._remove_autostart(conn, name)
        await conn.call(m.reload())

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
            peer = await open_peer(sock, uid=0)
        except SystemdUnavailable as exc:
            raise ManagerUnavailable(name, str(exc)) from exc
        try:
            yield DBusCapsuleManager(peer, name, self._job_timeout_s)
        finally:
            await peer.close()

    # -- watching ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[CapsuleEvent]]:
        """Subscribe + PropertiesChanged of all units, filtered to capsule@*.service locally.

        D-Bus match rules cannot match a path prefix inside a component, so the bus routes
        every unit's changes to us while watching; the queue is bounded (WATCH_QUEUE) and a
        consumer that falls behind gets WatchOverflow rather than unbounded buffering.
        """
        conn = await self._bus()
        rule = m.unit_properties_changed_rule()
        local = m.unit_properties_changed_rule(sender=conn.signal_sender)
        with conn.signals(
            local, maxsize=WATCH_QUEUE, overflow_error=WatchOverflow("capsule watch fell behind")
        ) as queue:
            async with conn.match(rule), self._subscribed(conn):
                known = {
                    u.name: (u.active_state, u.sub_state)
                    for u in await self._loaded_capsule_units()
                }
                yield _capsule_events(queue, known)


_CAPSULE_PATH_PREFIX: Final = m.unit_path("capsule@")  # ".../unit/capsule_40"


async def _unit_state_changes(
    queue: SignalQueue, path_prefix: str, known: dict[str, tuple[str, str]]
) -> AsyncIterator[tuple[str, str, str, int]]:
    """(unit, ActiveState, SubState, StateChangeTimestamp) per real state change of a unit
    whose object path starts with path_prefix; deduplicated against ``known`` (seeded from a
    ListUnits taken after the queue was registered: a reload re-announces every unit's
    unchanged state), malformed signals skipped."""
    last = known
    while True:
        msg = await queue.get()
        path = msg.header.fields.get(HeaderFields.path, "")
        if not (isinstance(path, str) and path.startswith(path_prefix)):
            continue
        unit = m.unit_from_path(path)
        if unit is None:
            continue
        try:
            change = m.parse_properties_changed(msg.body)
            if change.interface != m.UNIT_IFACE or "ActiveState" not in change.changed:
                continue
            state = m.prop_str(change.changed, "ActiveState")
            sub = m.prop_str(change.changed, "SubState")
            since = m.prop_int(change.changed, "StateChangeTimestamp") or 0
        except BadReply:
            continue
        # A unit merely loaded (by anyone's GetUnit/LoadUnit, or our own capsule_info) emits
        # its inactive state with StateChangeTimestamp=0: that is no state change.
        if since == 0 or last.get(unit) == (state, sub):
            continue
        if len(last) > WATCH_QUEUE:  # bound the dedup table too
            last.clear()
        last[unit] = (state, sub)
        yield unit, state, sub, since


async def _capsule_events(
    queue: SignalQueue, known: dict[str, tuple[str, str]]
) -> AsyncIterator[CapsuleEvent]:
    async for unit, state, sub, since in _unit_state_changes(queue, _CAPSULE_PATH_PREFIX, known):
        name = capsule_from_unit(unit)
        if name is not None:
            yield CapsuleEvent(name, state, sub, since)


async def _unit_events(
    queue: SignalQueue, known: dict[str, tuple[str, str]]
) -> AsyncIterator[UnitEvent]:
    async for unit, state, sub, since in _unit_state_changes(queue, m.UNIT_PATH_PREFIX, known):
        yield UnitEvent(unit, state, sub, since)


# ---------------------------------------------------------------------------------------------
# A capsule's manager (peer-to-peer)


class DBusCapsuleManager:
    """CapsuleManager over the capsule's private socket.

    On a private link the manager sends JobRemoved and PropertiesChanged unconditionally
    (bus_foreach_bus() in src/core/dbus.c: "Send to all direct buses, unconditionally"), so there
    is neither AddMatch (no bus daemon) nor Subscribe.
    """

    def __init__(self, conn: BusConnection, name: str, job_timeout_s: float) -> None:
        self._conn = conn
        self.name = name
        self._job_timeout_s = job_timeout_s
        self._exit_trackers: dict[str, tuple[contextlib.ExitStack, SignalQueue]] = {}

    async def list_units(self) -> list[UnitInfo]:
        """ListUnits + ListUnitFiles, merged by unit name."""
        units_body, files_body = await asyncio.gather(
            self._conn.call(m.list_units()), self._conn.call(m.list_unit_files())
        )
        files = {
            os.path.basename(path): (path, state)
            for path, state in m.parse_unit_file_list(files_body)
        }
        out: dict[str, UnitInfo] = {}
        for u in m.parse_unit_list(units_body):
            path, file_state = files.get(u.name, (None, None))
            out[u.name] = UnitInfo(
                u.name, u.description, u.load_state, u.active_state, u.sub_state, file_state, path
            )
        for unit, (path, file_state) in files.items():
            if unit not in out:
                out[unit] = UnitInfo(unit, "", "not-loaded", "inactive", "dead", file_state, path)
        return [out[k] for k in sorted(out)]

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[UnitEvent]]:
        """PropertiesChanged of every unit; a private link delivers them without any match."""
        rule = m.unit_properties_changed_rule(sender=None)
        overflow = WatchOverflow(f"unit watch of capsule {self.name} fell behind")
        with self._conn.signals(rule, maxsize=WATCH_QUEUE, overflow_error=overflow) as queue:
            units = m.parse_unit_list(await self._conn.call(m.list_units()))
            yield _unit_events(queue, {u.name: (u.active_state, u.sub_state) for u in units})

    async def reload(self) -> None:
        """daemon-reload; the reply comes once the manager has reloaded."""
        await self._conn.call(m.reload())

    async def start_unit(self, unit: str) -> str:
        """StartUnit + wait."""
        return await _run_job(self._conn, unit, m.start_unit(unit), self._job_timeout_s)

    async def stop_unit(self, unit: str) -> str:
        """StopUnit + wait."""
        return await _run_job(self._conn, unit, m.stop_unit(unit), self._job_timeout_s)

    async def restart_unit(self, unit: str) -> str:
        """RestartUnit + wait."""
        return await _run_job(self._conn, unit, m.restart_unit(unit), self._job_timeout_s)

    async def reset_failed_unit(self, unit: str) -> None:
        """ResetFailedUnit; not loaded is fine."""
        with contextlib.suppress(NoSuchUnit):
            await self._conn.call(m.reset_failed_unit(unit), unit=unit)

    async def start_transient(
        self,
        unit: str,
        argv: Sequence[str],
        environment: Sequence[str] = (),
        working_directory: str | None = None,
        keep: bool = False,
    ) -> str:
        """StartTransientUnit(mode=fail) + wait for the start job."""
        props = m.transient_service_properties(argv, environment, working_directory)
        call = m.start_transient_unit(unit, props)
        if unit in self._exit_trackers or len(self._exit_trackers) >= MAX_TRACKED_EXITS:
            raise UnitBusy(unit)
        # Track the unit's signals from before the start: with CollectMode=inactive-or-failed
        # a unit that failed is gone before we could ask it for its Result.
        stack = contextlib.ExitStack()
        rule = m.unit_properties_changed_rule(m.unit_path(unit), sender=None)
        queue = stack.enter_context(self._conn.signals(rule, maxsize=256))
        self._exit_trackers[unit] = (stack, queue)
        try:
            await _run_job(self._conn, unit, call, self._job_timeout_s)
        except JobFailed as exc:
            self._drop_tracker(unit)
            result = _fold_signals(queue).get("Result")
            raise JobFailed(exc.result, result if isinstance(result, str) else None) from exc
        except BaseException:
            self._drop_tracker(unit)
            raise
        if not keep:
            self._drop_tracker(unit)
        return unit

    def _drop_tracker(self, unit: str) -> None:
        tracker = self._exit_trackers.pop(unit, None)
        if tracker is not None:
            tracker[0].close()

    async def wait_exit(self, unit: str, timeout_s: float | None = None) -> ExitStatus:
        """From the tracked signals (or, untracked, by re-reading state on each signal)."""
        try:
            async with asyncio.timeout(timeout_s):
                tracker = self._exit_trackers.get(unit)
                if tracker is not None:
                    return await self._exit_from_signals(unit, tracker[1])
                return await self._exit_from_state(unit)
        except TimeoutError as exc:
            raise BackendTimeout(f"{unit} did not exit in {timeout_s}s") from exc
        finally:
            self._drop_tracker(unit)

    async def _exit_from_signals(self, unit: str, queue: SignalQueue) -> ExitStatus:
        # The queue has every PropertiesChanged of the unit since before StartTransientUnit;
        # folding them in order gives the state even after the unit was garbage-collected.
        # ExecMainCode stays 0 until the main process has exited (CLD_EXITED=1 ...).
        props: dict[str, object] = {}
        while True:
            msg = await queue.get()
            try:
                change = m.parse_properties_changed(msg.body)
            except BadReply:
                continue
            props.update(change.changed)
            if (
                m.prop_str(props, "ActiveState", "") in FINISHED_STATES
                and (m.prop_int(props, "ExecMainCode") or 0) != 0
                and "Result" in props
            ):
                return _exit_status(unit, props)

    async def _exit_from_state(self, unit: str) -> ExitStatus:
        path = m.unit_path(unit)
        rule = m.unit_properties_changed_rule(path, sender=None)
        with self._conn.signals(rule, maxsize=64) as queue:
            await _wait_state(self._conn, queue, unit, FINISHED_STATES, 365 * 86400.0)
        body = await self._conn.call(m.get_all_properties(path, m.SERVICE_IFACE), unit=unit)
        return _exit_status(unit, m.parse_properties(body))


def _fold_signals(queue: SignalQueue) -> dict[str, object]:
    """Merge the changed properties of every queued PropertiesChanged, oldest first."""
    props: dict[str, object] = {}
    with contextlib.suppress(BackendError):
        while (msg := queue.get_nowait()) is not None:
            with contextlib.suppress(BadReply):
                props.update(m.parse_properties_changed(msg.body).changed)
    return props


def _exit_status(unit: str, props: dict[str, object]) -> ExitStatus:
    code = m.prop_int(props, "ExecMainCode") or 0
    return ExitStatus(
        unit=unit,
        result=m.prop_str(props, "Result"),
        code={1: "exited", 2: "killed", 3: "dumped"}.get(code, ""),
        status=m.prop_int(props, "ExecMainStatus") or 0,
    )


__all__ = [
    "LIMIT_DEFAULT",
    "CapsuleEvent",
    "CapsuleInfo",
    "CapsuleManager",
    "DBusCapsuleManager",
    "DBusSystemdBackend",
    "ExitStatus",
    "SystemdBackend",
    "UnitEvent",
    "UnitInfo",
    "capsule_unit",
]
