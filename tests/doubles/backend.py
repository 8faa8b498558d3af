"""FakeBackend: the SystemdBackend Protocol in memory, for unit and method tests.

It keeps the semantics tests rely on, as verified against systemd 257:
- a capsule exists when it has a state dir, an autostart link, or a non-inactive unit;
- start creates the state dir (StateDirectory=) and gives a dynamic uid; stop keeps the dir;
- clean refuses a running capsule (UnitBusy) and deletes the dir;
- limits: None leaves a value unchanged, LIMIT_DEFAULT resets it (reads back as None);
- forget drops limits and the autostart link;
- a capsule manager is reachable only while the capsule is active;
- limits outside PID 1's ranges (MemoryMax or TasksMax 0, CPUWeight above 10000) are refused
  with InvalidArgument, as systemd refuses them;
- a transient unit runs (listed "transient", under $XDG_RUNTIME_DIR/systemd/transient/, its
  name busy) until wait_exit() sees it end or stop_unit() stops it; then it is garbage-collected
  (unlisted, its name free again). A binary that does not exist fails the start (JobFailed);
  a binary named *false exits 1, any other exits 0.

tests/contract/backend.py holds the fake and DBusSystemdBackend to the same checks (the latter in
the testbed, against systemd 257): a semantic above that the contract does not cover is a claim,
not a fact.

Knobs for tests: ``fail_start`` (names whose start fails with JobFailed("failed", "exit-code")),
``version_value``, ``unavailable`` (every call raises SystemdUnavailable), ``gate`` (an
asyncio.Event every mutating call waits on, to hold calls in flight), ``calls`` (a log of
(method, name) pairs), ``overlaps`` (names on which two mutating calls ran at once: a test of
the caller's per-capsule serialisation).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from capsuled.systemd.backend import (
    CPU_WEIGHT_MAX,
    FINISHED_STATES,
    LIMIT_DEFAULT,
    MAX_WATCH_SIGNALS_QUEUED,
    MIN_SYSTEMD_VERSION,
    CapsuleEvent,
    CapsuleInfo,
    CapsuleManager,
    ExitStatus,
    Stdio,
    UnitEvent,
    UnitInfo,
    capsule_unit,
)
from capsuled.systemd.errors import (
    InvalidArgument,
    JobFailed,
    ManagerUnavailable,
    NoSuchUnit,
    SystemdTooOld,
    SystemdUnavailable,
    UnitBusy,
    WatchOverflow,
)

FIRST_DYNAMIC_UID = 61184  # systemd's DYNAMIC_UID_MIN
E = TypeVar("E")


TRANSIENT = "transient"  # a transient unit's UnitFileState, as a user manager reports it


@dataclass
class FakeUnit:
    """A unit inside a fake capsule."""

    active_state: str = "inactive"
    sub_state: str = "dead"
    unit_file_state: str | None = "disabled"  # TRANSIENT: started by start_transient, no file
    fail_start: bool = False
    exit: ExitStatus | None = None  # how a transient unit will end
    # A transient unit's stdin/stdout/stderr as inodes (the fds were the caller's), TTYPath=.
    stdio_inodes: tuple[int, int, int] | None = None
    tty_path: str | None = None

    @property
    def has_file(self) -> bool:
        """A unit file in the capsule's home (not a transient unit's)."""
        return self.unit_file_state not in (None, TRANSIENT)


@dataclass
class FakeCapsule:
    """One capsule's state in the fake."""

    name: str
    state: str = "inactive"
    sub_state: str = "dead"
    has_state_dir: bool = False
    autostart: bool = False
    uid: int | None = None
    since_usec: int | None = None
    result: str = "success"
    memory_max: int | None = None
    tasks_max: int | None = None
    cpu_weight: int | None = None
    units: dict[str, FakeUnit] = field(default_factory=dict)
    started: list[FakeUnit] = field(default_factory=list)  # transient units, in start order

    def info(self) -> CapsuleInfo:
        running = self.state not in FINISHED_STATES
        return CapsuleInfo(
            name=self.name,
            state=self.state,
            sub_state=self.sub_state,
            uid=self.uid if running else None,
            since_usec=self.since_usec,
            has_state_dir=self.has_state_dir,
            autostart=self.autostart,
            memory_current=4 * 1024 * 1024 if running else None,
            tasks_current=2 if running else None,
            cpu_usage_nsec=1_000_000 if running else None,
            memory_max=self.memory_max,
            tasks_max=self.tasks_max,
            cpu_weight=self.cpu_weight,
            result=self.result,
            units_count=sum(1 for u in self.units.values() if u.has_file),
        )

    @property
    def exists(self) -> bool:
        return self.has_state_dir or self.autostart or self.state != "inactive"


class FakeBackend:
    """SystemdBackend in memory."""

    def __init__(self, version_value: int = 257) -> None:
        self.version_value = version_value
        self.capsules: dict[str, FakeCapsule] = {}
        self.fail_start: set[str] = set()
        self.unavailable = False
        self.gate: asyncio.Event | None = None
        self.calls: list[tuple[str, str]] = []
        # What capsule managers were asked: (capsule, method, unit or "").
        self.manager_calls: list[tuple[str, str, str]] = []
        self.overlaps: list[str] = []
        self._busy: set[str] = set()
        self._uids = itertools.count(FIRST_DYNAMIC_UID)
        self._watchers: set[_Watcher[CapsuleEvent]] = set()
        # name -> paths of an administrator's unit file and drop-ins (admin_config).
        self.admin_configs: dict[str, list[str]] = {}

    # -- test helpers ------------------------------------------------------------------------

    def add_capsule(
        self, name: str, state: str = "inactive", has_state_dir: bool = True
    ) -> FakeCapsule:
        """Make a capsule appear as if created outside capsuled (`systemctl start capsule@x`)."""
        capsule = self._capsule(name)
        capsule.has_state_dir = has_state_dir
        if state != "inactive":
            if state not in FINISHED_STATES:
                capsule.uid = next(self._uids)  # a running capsule has its dynamic user
            self._set_state(capsule, state, "running" if state == "active" else state)
        return capsule

    def add_unit(self, name: str, unit: str, enabled: bool = False) -> FakeUnit:
        """A unit file in the capsule's ~/.config/systemd/user."""
        fake = FakeUnit(unit_file_state="enabled" if enabled else "disabled")
        self._capsule(name).units[unit] = fake
        return fake

    # -- internals ---------------------------------------------------------------------------

    def _capsule(self, name: str) -> FakeCapsule:
        return self.capsules.setdefault(name, FakeCapsule(name))

    def _check(self) -> None:
        if self.unavailable:
            raise SystemdUnavailable("fake: system bus unavailable")

    @contextlib.asynccontextmanager
    async def _mutating(self, method: str, name: str) -> AsyncIterator[FakeCapsule]:
        self._check()
        self.calls.append((method, name))
        if name in self._busy:
            self.overlaps.append(name)
        self._busy.add(name)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)  # let concurrent callers interleave, as real D-Bus does
            yield self._capsule(name)
        finally:
            self._busy.discard(name)

    def _set_state(self, capsule: FakeCapsule, state: str, sub_state: str) -> None:
        capsule.state, capsule.sub_state = state, sub_state
        capsule.since_usec = time.time_ns() // 1000
        for watcher in list(self._watchers):
            watcher.push(CapsuleEvent(capsule.name, state, sub_state, capsule.since_usec))

    # -- SystemdBackend ------------------------------------------------------------------------

    async def version(self) -> int:
        """The configured version."""
        self._check()
        return self.version_value

    async def check_version(self) -> int:
        """version(), raising SystemdTooOld below 256."""
        version = await self.version()
        if version < MIN_SYSTEMD_VERSION:
            raise SystemdTooOld(version)
        return version

    async def list_capsules(self) -> list[CapsuleInfo]:
        """Every capsule that exists, by name."""
        self._check()
        return [c.info() for _, c in sorted(self.capsules.items()) if c.exists]

    async def capsule_info(self, name: str) -> CapsuleInfo | None:
        """One capsule or None."""
        self._check()
        capsule = self.capsules.get(name)
        return capsule.info() if capsule is not None and capsule.exists else None

    async def start(self, name: str) -> str:
        """inactive -> active; state dir created; JobFailed for names in fail_start."""
        async with self._mutating("start", name) as capsule:
            capsule.has_state_dir = True  # StateDirectory= is created before ExecStart
            if name in self.fail_start:
                capsule.result = "exit-code"
                capsule.uid = None
                self._set_state(capsule, "failed", "failed")
                raise JobFailed("failed", "exit-code")
            if capsule.state != "active":
                capsule.uid = next(self._uids)
                capsule.result = "success"
                self._set_state(capsule, "activating", "start")
                self._set_state(capsule, "active", "running")
                for unit in capsule.units.values():
                    if unit.unit_file_state == "enabled":
                        unit.active_state, unit.sub_state = "active", "running"
            return "done"

    async def stop(self, name: str) -> str:
        """-> inactive; units inside stop."""
        async with self._mutating("stop", name) as capsule:
            if capsule.state != "inactive":
                self._set_state(capsule, "deactivating", "stop-sigterm")
                self._set_state(capsule, "inactive", "dead")
                capsule.uid = None
                for unit in capsule.units.values():
                    unit.active_state, unit.sub_state = "inactive", "dead"
                capsule.units = {k: u for k, u in capsule.units.items() if u.has_file}
            return "done"

    async def restart(self, name: str) -> str:
        """stop + start."""
        await self.stop(name)
        return await self.start(name)

    async def clean(self, name: str) -> None:
        """UnitBusy while running; else the state dir (and unit files in it) go."""
        async with self._mutating("clean", name) as capsule:
            if capsule.state not in FINISHED_STATES:
                raise UnitBusy(capsule_unit(name))
            capsule.has_state_dir = False
            capsule.units.clear()

    async def set_autostart(self, name: str, enabled: bool) -> None:
        """Toggle the autostart link."""
        async with self._mutating("set_autostart", name) as capsule:
            capsule.autostart = enabled

    async def set_limits(
        self,
        name: str,
        memory_max: int | None = None,
        tasks_max: int | None = None,
        cpu_weight: int | None = None,
    ) -> None:
        """None: unchanged; LIMIT_DEFAULT: back to the default (reads as None).

        Raises InvalidArgument where PID 1 does (257: "Value specified in X is out of range").
        """
        for key, value, low, high in (
            ("MemoryMax", memory_max, 1, LIMIT_DEFAULT),
            ("TasksMax", tasks_max, 1, LIMIT_DEFAULT),
            ("CPUWeight", cpu_weight, 0, CPU_WEIGHT_MAX),
        ):
            if value is not None and value != LIMIT_DEFAULT and not low <= value <= high:
                raise InvalidArgument(f"Value specified in {key} is out of range")
        async with self._mutating("set_limits", name) as capsule:
            if memory_max is not None:
                capsule.memory_max = None if memory_max == LIMIT_DEFAULT else memory_max
            if tasks_max is not None:
                capsule.tasks_max = None if tasks_max == LIMIT_DEFAULT else tasks_max
            if cpu_weight is not None:
                capsule.cpu_weight = None if cpu_weight == LIMIT_DEFAULT else cpu_weight

    def admin_config(self, name: str) -> list[str]:
        """What a test put in `admin_configs` for the capsule (an administrator's drop-ins)."""
        return list(self.admin_configs.get(name, []))

    async def forget(self, name: str) -> None:
        """Limits and autostart go; a capsule with nothing left disappears."""
        async with self._mutating("forget", name) as capsule:
            capsule.memory_max = capsule.tasks_max = capsule.cpu_weight = None
            capsule.autostart = False
            if not capsule.exists:
                del self.capsules[name]

    async def reset_failed(self, name: str) -> None:
        """failed -> inactive."""
        async with self._mutating("reset_failed", name) as capsule:
            if capsule.state == "failed":
                capsule.result = "success"
                self._set_state(capsule, "inactive", "dead")

    @contextlib.asynccontextmanager
    async def capsule_manager(self, name: str) -> AsyncIterator[CapsuleManager]:
        """A FakeCapsuleManager while the capsule is active."""
        self._check()
        capsule = self.capsules.get(name)
        if capsule is None or capsule.state != "active":
            raise ManagerUnavailable(name, "capsule is not running")
        yield FakeCapsuleManager(capsule, self.manager_calls)

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[CapsuleEvent]]:
        """State changes as the fake makes them; bounded like the real one."""
        self._check()
        watcher: _Watcher[CapsuleEvent] = _Watcher(MAX_WATCH_SIGNALS_QUEUED)
        self._watchers.add(watcher)
        try:
            yield watcher.events()
        finally:
            self._watchers.discard(watcher)

    async def close(self) -> None:
        """Nothing to close."""


class _Watcher(Generic[E]):
    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[E] = asyncio.Queue(maxsize)
        self._overflow = False

    def push(self, event: E) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._overflow = True

    async def events(self) -> AsyncIterator[E]:
        while True:
            if self._queue.empty() and self._overflow:
                raise WatchOverflow("fake watch fell behind")
            yield await self._queue.get()


class FakeCapsuleManager:
    """CapsuleManager over a FakeCapsule's units."""

    def __init__(self, capsule: FakeCapsule, log: list[tuple[str, str, str]] | None = None) -> None:
        self._capsule = capsule
        self._log = log if log is not None else []
        self.reloads = 0
        self._watchers: set[_Watcher[UnitEvent]] = set()

    @property
    def uid(self) -> int:
        """The capsule's uid (a dynamic one by default, as systemd picks them)."""
        return self._capsule.uid if self._capsule.uid is not None else 61184

    def _set(self, unit: str, fake: FakeUnit, state: str, sub_state: str) -> None:
        fake.active_state, fake.sub_state = state, sub_state
        for watcher in list(self._watchers):
            watcher.push(UnitEvent(unit, state, sub_state, time.time_ns() // 1000))

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[UnitEvent]]:
        """Unit state changes this manager makes."""
        watcher: _Watcher[UnitEvent] = _Watcher(MAX_WATCH_SIGNALS_QUEUED)
        self._watchers.add(watcher)
        try:
            yield watcher.events()
        finally:
            self._watchers.discard(watcher)

    def _unit_file_path(self, unit: str, fake: FakeUnit) -> str | None:
        name = self._capsule.name
        if fake.unit_file_state == TRANSIENT:
            return f"/run/capsules/{name}/systemd/transient/{unit}"  # $XDG_RUNTIME_DIR/systemd
        if fake.unit_file_state is None:
            return None
        return f"/var/lib/capsules/{name}/.config/systemd/user/{unit}"

    async def list_units(self) -> list[UnitInfo]:
        """Units of the capsule, sorted (a real manager lists its own built-in units too)."""
        return [
            UnitInfo(
                name,
                "",
                "loaded",
                u.active_state,
                u.sub_state,
                u.unit_file_state,
                self._unit_file_path(name, u),
            )
            for name, u in sorted(self._capsule.units.items())
        ]

    async def reload(self) -> None:
        """Counts reloads."""
        self.reloads += 1
        self._log.append((self._capsule.name, "reload", ""))

    def _unit(self, unit: str) -> FakeUnit:
        try:
            return self._capsule.units[unit]
        except KeyError:
            raise NoSuchUnit(unit) from None

    async def start_unit(self, unit: str) -> str:
        """NoSuchUnit / JobFailed / done."""
        self._log.append((self._capsule.name, "start_unit", unit))
        fake = self._unit(unit)
        if fake.fail_start:
            self._set(unit, fake, "failed", "failed")
            raise JobFailed("failed", "exit-code")
        self._set(unit, fake, "activating", "start")
        self._set(unit, fake, "active", "running")
        return "done"

    async def stop_unit(self, unit: str) -> str:
        """-> inactive; a transient unit is then garbage-collected."""
        self._log.append((self._capsule.name, "stop_unit", unit))
        fake = self._unit(unit)
        if fake.active_state != "inactive":
            self._set(unit, fake, "deactivating", "stop-sigterm")
            self._set(unit, fake, "inactive", "dead")
        if fake.unit_file_state == TRANSIENT:
            del self._capsule.units[unit]
        return "done"

    async def restart_unit(self, unit: str) -> str:
        """stop + start."""
        self._log.append((self._capsule.name, "restart_unit", unit))
        await self.stop_unit(unit)
        return await self.start_unit(unit)

    async def reset_failed_unit(self, unit: str) -> None:
        """failed -> inactive."""
        self._log.append((self._capsule.name, "reset_failed_unit", unit))
        fake = self._capsule.units.get(unit)
        if fake is not None and fake.active_state == "failed":
            fake.active_state, fake.sub_state = "inactive", "dead"

    async def start_transient(
        self,
        unit: str,
        argv: Sequence[str],
        environment: Sequence[str] = (),
        working_directory: str | None = None,
        keep: bool = False,
        stdio: Stdio | None = None,
    ) -> str:
        """Runs until wait_exit() or stop_unit(); see the module docstring for how it ends."""
        if unit in self._capsule.units:
            raise UnitBusy(unit)
        # The capsule sees the host's /usr: a binary missing here fails exec there (Type=exec).
        if not os.access(argv[0], os.X_OK):
            raise JobFailed("failed", "exit-code")
        failed = os.path.basename(argv[0]).endswith("false")
        self._capsule.units[unit] = FakeUnit(
            active_state="active",
            sub_state="running",
            unit_file_state=TRANSIENT,
            exit=ExitStatus(unit, "exit-code" if failed else "success", "exited", int(failed)),
        )
        if stdio is not None:
            fds = (stdio.stdin, stdio.stdout, stdio.stderr)
            inodes = tuple(os.fstat(fd).st_ino for fd in fds)
            self._capsule.units[unit].stdio_inodes = (inodes[0], inodes[1], inodes[2])
            self._capsule.units[unit].tty_path = stdio.tty_path
        self._capsule.started.append(self._capsule.units[unit])
        return unit

    async def wait_exit(self, unit: str, timeout_s: float | None = None) -> ExitStatus:
        """The transient unit ends now, as start_transient decided; it is then collected."""
        fake = self._unit(unit)
        if fake.exit is None:
            raise NoSuchUnit(unit)
        del self._capsule.units[unit]
        return fake.exit
