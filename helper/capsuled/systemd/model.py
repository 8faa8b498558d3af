"""The live capsule model: what PID 1 says about every capsule@NAME.service, kept current from
its signals, so that reads (Describe, List, Watch) need no round trip to PID 1.

Once per system bus connection the model subscribes to PID 1 (Manager.Subscribe; AddMatch for
UnitNew, UnitRemoved, Reloading, the PropertiesChanged of units, and NameOwnerChanged of
org.freedesktop.systemd1), then takes its snapshot: ListUnitsByPatterns(capsule@*.service) for
the loaded units, and one Get per property it keeps for each. Signals and replies are applied
where they arrive among the messages (capsuled.dbus, "Order"), so a reply never overwrites a
later signal, nor a signal a later reply: the model is PID 1's state as of the last message.

Never stale in a way a caller can see:
- After a call returns, the next read reflects it: a job's JobRemoved comes after the unit's
  PropertiesChanged (bus_job_send_removed_signal() flushes the unit's pending change first), a
  reply to Reload after Reloading(false) (manager_dispatch_dbus_queue()); what PID 1 does not
  signal is fetched before the call returns (SetLimits: `refresh_config`).
- A change behind capsuled's back shows as soon as PID 1 signals it (`systemctl start` as root,
  a capsule that crashes, a daemon-reload).
- A fetch a signal sets off (the cgroup of a capsule that started, PID 1's last CPU figure of
  one that stopped) holds back every read of that capsule until it is answered.
- From Reloading(true) until the model has looked again, every read waits; PID 1 answers that
  look after its reload, like any call. During a reload PID 1 drops and re-creates every unit
  (UnitRemoved, UnitNew) without changing any; those are left to the new look. PID 1
  re-executing (daemon-reexec) says Reloading(true), takes a new unique name
  (NameOwnerChanged, old to new) and re-announces its units: the same, under the new name.
- When the bus connection is lost, the next read connects again and takes a new snapshot;
  Watch streams end (SystemdUnavailable), as they did before the model.

What PID 1 does not signal:
- MemoryMax, TasksMax, CPUWeight and the accounting switches (CGroupContext properties have no
  EMITS_CHANGE flag, and SetUnitProperties queues no change signal). They are configuration:
  the model reads them when it first needs a capsule's, after capsuled's own SetLimits, and
  after a reload or re-execution of PID 1 for each capsule whose configuration files changed
  (`hostfs.config_signatures`) or that PID 1 had loaded from older files (NeedDaemonReload). A
  capsule with no files of its own (no capsule@NAME.service or capsule@NAME.service.d in PID 1's
  unit path) is configured like every other such capsule: one unit load serves all of them
  that PID 1 has not loaded. A file changed on disk counts once PID 1 is told (daemon-reload),
  which is also when it takes effect for a loaded capsule; a limit root sets behind capsuled's
  back (`systemctl set-property`) shows after the next reload of PID 1.
- MemoryCurrent, TasksCurrent, CPUUsageNSec: read at each read from the running capsule's
  cgroup, the files PID 1 reads them from (memory.current, pids.current, cpu.stat usage_usec:
  unit_get_memory_accounting(), unit_get_tasks_current(), unit_get_cpu_usage_raw()). PID 1
  subtracts the CPU time the cgroup had when the unit's first process started, learnt once per
  run. A stopped capsule has no cgroup: memory and tasks are null, CPU is PID 1's last figure
  while the unit stays loaded (a failed capsule), else null. Which of the two PID 1 says once
  its GC has run (a Ping, or the UnitRemoved): a Get before would load the unit again.

Memory: one `_Unit` per capsule unit PID 1 has loaded or a read asked about (a dozen slots,
about 0.6 KiB with its strings and Event); one cached `UnitConfig` (~0.3 KiB) per capsule with
files of its own or loaded, and one shared by all the others. Entries of unloaded units in
their initial state are dropped when they outnumber the rest, so the table stays bounded by
the capsules that exist (state directories, autostart links, records) and the units PID 1 has
loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Final

from jeepney import HeaderFields, MatchRule, Message, MessageType

from .. import dbus
from . import hostfs
from . import messages as m
from .bus import Link
from .errors import BackendError, BadReply, SystemdUnavailable, WatchOverflow
from .values import (
    FINISHED_STATES,
    MAX_WATCH_SIGNALS_QUEUED,
    UINT64_MAX,
    CapsuleEvent,
    capsule_from_unit,
    capsule_unit,
)

log = logging.getLogger(__name__)

__all__ = ["INITIAL", "CapsuleModel", "UnitConfig", "UnitView"]

CAPSULE_PATTERN: Final = "capsule@*.service"
# Gets the model keeps in flight at once. The system bus connection allows 120 calls in flight
# (dbus.SYSTEM_BUS_LIMITS); polkit and the methods' own calls keep their share of it.
MAX_FETCHES_IN_FLIGHT: Final = 32
# How long a read waits for a fetch the model has in flight before it answers
# SystemdUnavailable: sd-bus's default call timeout, as for a call of its own.
SETTLE_TIMEOUT_S: Final = 25.0
# Looks at PID 1 in a row when each one was overtaken by another reload.
MAX_SYNC_ROUNDS: Final = 5
# A re-executing PID 1 leaves the system bus and comes back under a new unique name, some time
# after `systemctl daemon-reexec` (which talks to it on its private socket) has returned. A
# read in that gap waits this long for it rather than answer SystemdUnavailable at once: as
# long as a systemctl call waits for a re-executing PID 1 (sd-bus's default call timeout).
# The re-exec runs the generators and loads every unit again: with 5 s here the e2e re-exec
# test (tests/e2e/test_model.py) answered SystemdUnavailable three times on a 2-core machine
# at load 6-14, never when run alone.
PID1_RETURN_S: Final = 25.0
# PID 1's CPU figure is the cgroup's usage minus what it had used when the unit's first process
# started (cpu_usage_base): zero for a new cgroup. The model takes the difference of the two at
# one instant; what the capsule ran between PID 1's answer and our read of cpu.stat shows up in
# it too, so a difference this small is that, not a base.
CPU_BASE_NOISE_NS: Final = 10_000_000
# Names of unloaded units in their initial state kept beyond the others, before dropping them.
SPARE_UNIT_ENTRIES: Final = 64

_CAPSULE_PATH_PREFIX: Final = m.unit_path("capsule@")  # ".../unit/capsule_40"
_ALREADY_SUBSCRIBED: Final = "org.freedesktop.systemd1.AlreadySubscribed"


@dataclass(frozen=True, slots=True)
class UnitConfig:
    """A capsule's configuration as PID 1 reported it (not signalled; see the module doc)."""

    memory_max: int | None  # None: infinity
    tasks_max: int | None  # None: infinity
    cpu_weight: int | None  # None: unset (the default)
    memory_accounting: bool
    tasks_accounting: bool
    cpu_accounting: bool


@dataclass(frozen=True, slots=True)
class UnitView:
    """One capsule's unit at one instant, as a read gets it."""

    loaded: bool
    active_state: str
    sub_state: str
    result: str
    main_pid: int  # ExecMainPID
    since_usec: int  # StateChangeTimestamp; 0: never changed
    control_group: str | None  # while it has a cgroup
    cpu_usage_last: int | None  # PID 1's last CPU figure (a stopped unit still loaded)
    cpu_usage_base: int  # to subtract from cpu.stat while running
    config: UnitConfig | None  # None: not asked for

    @property
    def running(self) -> bool:
        """Any state but inactive and failed: the unit has processes and a cgroup."""
        return self.active_state not in FINISHED_STATES


# What PID 1 reports for a unit it has just loaded, or would if it loaded it now.
INITIAL: Final = UnitView(False, "inactive", "dead", "success", 0, 0, None, None, 0, None)


@dataclass(slots=True)
class _Unit:
    """The model's entry for one capsule (mutable; reads get a UnitView)."""

    name: str
    loaded: bool = False
    active_state: str = "inactive"
    sub_state: str = "dead"
    result: str = "success"
    main_pid: int = 0
    since_usec: int = 0
    control_group: str | None = None
    cpu_usage_last: int | None = None
    cpu_usage_base: int = 0
    fetching: int = 0  # fetches in flight for this unit; reads wait until none is
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.settled.set()

    def reset(self) -> None:
        """What a fresh load of the unit reports."""
        self.active_state, self.sub_state, self.result = "inactive", "dead", "success"
        self.main_pid = self.since_usec = self.cpu_usage_base = 0
        self.control_group = self.cpu_usage_last = None

    def view(self, config: UnitConfig | None) -> UnitView:
        return UnitView(
            self.loaded,
            self.active_state,
            self.sub_state,
            self.result,
            self.main_pid,
            self.since_usec,
            self.control_group,
            self.cpu_usage_last,
            self.cpu_usage_base,
            config,
        )

    def begin_fetch(self) -> None:
        self.fetching += 1
        self.settled.clear()

    def end_fetch(self) -> None:
        self.fetching -= 1
        if self.fetching == 0:
            self.settled.set()


@dataclass(frozen=True, slots=True)
class _CachedConfig:
    config: UnitConfig
    signature: hostfs.ConfigSignature  # of its files when it was fetched
    stale_on_reload: bool  # NeedDaemonReload then: PID 1 had it from older files


class _Phase(Enum):
    DOWN = "down"  # no connection (or it was lost): the next read connects
    SYNCING = "syncing"  # taking a snapshot
    LIVE = "live"
    STALE = "stale"  # PID 1 reloaded or re-executed since: the next read looks again


class _Watcher:
    """One Watch stream's bounded queue of capsule events."""

    def __init__(self, maxsize: int) -> None:
        self._items: list[CapsuleEvent] = []
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._error: BackendError | None = None

    def push(self, event: CapsuleEvent) -> None:
        if self._error is not None:
            return
        if len(self._items) >= self._maxsize:
            self._error = WatchOverflow("capsule watch fell behind")
        else:
            self._items.append(event)
        self._wakeup.set()

    def fail(self, error: BackendError) -> None:
        if self._error is None:
            self._error = error
        self._wakeup.set()

    async def events(self) -> AsyncIterator[CapsuleEvent]:
        while True:
            if self._items:
                items, self._items = self._items, []
                for item in items:
                    yield item
                continue
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()


def _bus_rules() -> tuple[MatchRule, ...]:
    """The AddMatch rules of the model, for as long as the connection lasts (each names its
    sender, so the bus daemon routes only PID 1's and its own broadcasts under them)."""
    manager = MatchRule(
        type="signal", sender=m.SYSTEMD_BUS_NAME, interface=m.MANAGER_IFACE, path=m.MANAGER_PATH
    )
    owner = _owner_rule(sender=dbus.BUS_DAEMON.bus_name)
    return (m.unit_properties_changed_rule(), manager, owner)


def _owner_rule(sender: str | None) -> MatchRule:
    rule = MatchRule(
        type="signal",
        sender=sender,
        interface=dbus.BUS_DAEMON.interface,
        member="NameOwnerChanged",
        path=dbus.BUS_DAEMON.object_path,
    )
    rule.add_arg_condition(0, m.SYSTEMD_BUS_NAME)
    return rule


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class CapsuleModel:
    """PID 1's capsule units, current from its signals (see the module docstring).

    ``connect`` hands out PID 1's Link on the daemon's system bus connection: the one
    DBusSystemdBackend runs its jobs on, so that a job's signals and the model's arrive in one
    order.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Link]],
        *,
        max_fetches: int = MAX_FETCHES_IN_FLIGHT,
        settle_timeout_s: float = SETTLE_TIMEOUT_S,
        pid1_return_s: float = PID1_RETURN_S,
    ) -> None:
        self._connect = connect
        self._settle_timeout_s = settle_timeout_s
        self._pid1_return_s = pid1_return_s
        self._pid1_named = asyncio.Event()  # set whenever the bus daemon names a new owner
        self._fetch_slots = asyncio.Semaphore(max_fetches)
        self._phase = _Phase.DOWN
        self._link: Link | None = None
        self._handlers: contextlib.ExitStack | None = None
        self._sender: str | None = None  # PID 1's unique name now
        # From Reloading(true) (or a new owner) until our next ListUnitsByPatterns reply:
        # UnitNew/UnitRemoved are the reload's own and say nothing (module docstring).
        self._reloading = False
        self._units: dict[str, _Unit] = {}
        self._configs: dict[str, _CachedConfig] = {}
        self._template: dict[hostfs.GlobalSignature, UnitConfig] = {}
        self._template_fetch: dict[hostfs.GlobalSignature, asyncio.Future[UnitConfig]] = {}
        self._config_fetch: dict[str, asyncio.Future[UnitConfig]] = {}
        self._unit_path: tuple[str, ...] = ()
        self._signatures = hostfs.Signatures(())
        self.version: str | None = None  # Manager.Version of the PID 1 last looked at
        self._sync_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watchers: set[_Watcher] = set()
        # Capsules that stopped and whose last CPU figure waits to learn whether PID 1 unloads
        # them (`_fetch_cpu_after_stop`): set by their UnitRemoved.
        self._unloaded: dict[str, asyncio.Event] = {}

    # -- life cycle ------------------------------------------------------------------------

    async def close(self) -> None:
        """Forget everything; fetches in flight are cancelled, watchers told."""
        self._drop(SystemdUnavailable("the capsule model was closed"))
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _drop(self, error: BackendError) -> None:
        """The connection is gone: start from nothing at the next read."""
        if self._handlers is not None:
            self._handlers.close()
            self._handlers = None
        self._phase = _Phase.DOWN
        self._link = None
        self._sender = None
        self._reloading = False
        for unit in self._units.values():
            if unit.control_group is not None:
                hostfs.forget_cgroup(unit.control_group)
        self._units.clear()
        self._configs.clear()
        self._template.clear()
        self.version = None
        watchers, self._watchers = self._watchers, set()
        for watcher in watchers:
            watcher.fail(error)

    def current_version(self) -> str | None:
        """Manager.Version of PID 1 if the model is current, else None (no call made)."""
        link = self._link
        if self._phase is _Phase.LIVE and link is not None and not link.closed:
            return self.version
        return None

    async def ready(self) -> Link:
        """PID 1's Link, once the model is current (connecting and looking first if need be).

        Raises:
            SystemdUnavailable: no bus or no PID 1 (BackendError from a call of the snapshot).
        """
        link = self._link
        if link is not None and link.closed:
            self._drop(SystemdUnavailable("the system bus connection was lost"))
        if self._phase is not _Phase.LIVE:
            await self._sync()
        assert self._link is not None  # _sync either made the model live or raised
        return self._link

    async def _sync(self) -> None:
        """Connect if need be, subscribe, and look until a look was not overtaken by a reload."""
        async with self._sync_lock:
            if self._phase is _Phase.LIVE and self._link is not None and not self._link.closed:
                return
            link = self._link
            if link is None or link.closed:
                self._drop(SystemdUnavailable("the system bus connection was lost"))
                link = await self._open()
            try:
                for _ in range(MAX_SYNC_ROUNDS):
                    self._phase = _Phase.SYNCING
                    try:
                        await self._snapshot(link)
                    except SystemdUnavailable:
                        if link.closed or not await self._pid1_came_back(link):
                            raise
                        continue
                    if self._phase is _Phase.SYNCING:
                        self._phase = _Phase.LIVE
                        return
                raise SystemdUnavailable("PID 1 kept reloading while capsuled looked at it")
            except BaseException:
                if self._phase is not _Phase.LIVE:
                    self._phase = _Phase.STALE  # the next read looks again
                raise

    async def _pid1_came_back(self, link: Link) -> bool:
        """After a look failed for want of PID 1: True once PID 1 owns its name on the bus
        again under a unique name other than the one the look was for (it re-executed), within
        PID1_RETURN_S; False if it is still away, or was there all along (the failure was
        something else: no second try)."""
        before = self._sender
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._pid1_return_s
        while True:
            self._pid1_named.clear()  # before asking: a signal after the answer still counts
            try:
                owner = (await link.call(dbus.get_name_owner(m.SYSTEMD_BUS_NAME)))[0]
            except BackendError:  # NameHasNoOwner: away, re-executing
                owner = None
            if isinstance(owner, str) and owner:
                if owner == before:
                    return False
                self._sender = owner
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pid1_named.wait(), remaining)

    async def _open(self) -> Link:
        link = await self._connect()
        stack = contextlib.ExitStack()
        # Handlers before the AddMatch calls, so nothing the bus routes to us is missed. Their
        # rules name the senders as the AddMatch rules do: a well-known sender matches only
        # what the bus daemon routed to us under those (dbus.header_matches), never a unicast
        # signal from anybody; the handlers check PID 1's unique name too. A signal of theirs
        # over our cap is skipped unread: then the model looks at PID 1 again. PropertiesChanged
        # of units that are no capsule (mounts, slices, the capsule's user@ helpers: most of
        # what a Start or Stop brings) are skipped on their header, never parsed.
        handlers = (self._on_properties_changed, self._on_manager_signal, self._on_owner_changed)
        prefixes = (_CAPSULE_PATH_PREFIX, None, None)
        for rule, handler, prefix in zip(_bus_rules(), handlers, prefixes, strict=True):
            stack.enter_context(
                link.conn.handle_signals(rule, handler, on_lost=self._lost, path_prefix=prefix)
            )
        self._handlers, self._link = stack, link
        self._spawn(self._watch_connection(link))
        try:
            for rule in _bus_rules():
                await link.add_match(rule)
            owner = (await link.call(dbus.get_name_owner(m.SYSTEMD_BUS_NAME)))[0]
            self._sender = owner if isinstance(owner, str) else None
            await self._subscribe(link)
        except BaseException:
            self._drop(SystemdUnavailable("subscribing to PID 1 failed"))
            raise
        return link

    async def _watch_connection(self, link: Link) -> None:
        """Notice a lost connection at once (Watch streams end then, not at the next read)."""
        await link.conn.wait_closed()
        if self._link is link:
            self._drop(SystemdUnavailable("the system bus connection was lost"))

    async def _subscribe(self, link: Link) -> None:
        # PID 1 broadcasts unit signals only while somebody is subscribed. We stay subscribed
        # for the life of the connection; Subscribe is not counted (a second one from the same
        # client is AlreadySubscribed, one Unsubscribe ends it), so nothing else in capsuled
        # subscribes. A re-executed PID 1 restores its subscribers from its serialization.
        try:
            await link.call(m.subscribe())
        except BackendError as exc:
            if getattr(exc, "name", "") != _ALREADY_SUBSCRIBED:
                raise

    async def _snapshot(self, link: Link) -> None:
        """PID 1's version and unit path, its loaded capsule units, what the model keeps."""
        version = m.parse_get_property(await link.call(m.manager_version()))
        self.version = version if isinstance(version, str) else None
        unit_path = m.parse_get_property(
            await link.call(m.get_property(m.MANAGER_PATH, m.MANAGER_IFACE, "UnitPath"))
        )
        if not isinstance(unit_path, list) or not all(isinstance(p, str) for p in unit_path):
            raise BadReply("UnitPath is not a list of strings")
        self._unit_path = tuple(unit_path)
        self._expire_configs(hostfs.config_signatures(self._unit_path))
        changed: list[str] = []
        await link.call(
            m.list_units_by_patterns([], [CAPSULE_PATTERN]),
            on_reply=lambda reply: changed.extend(self._apply_unit_list(reply)),
        )
        for name in changed:
            self._spawn_fetch(self._units[name], self._fetch_state)
        loaded = [name for name, unit in self._units.items() if unit.loaded]
        await self._settle(loaded)
        await asyncio.gather(*(self._config(link, name) for name in loaded))

    def _expire_configs(self, now: hostfs.Signatures) -> None:
        """A new look at the files: drop every cached configuration PID 1 may have read anew
        (all of them if what every capsule shares changed)."""
        before, self._signatures = self._signatures, now
        if before.global_ != now.global_:
            self._configs.clear()
            self._template.clear()
            return
        # A configuration fetched while PID 1's copy matched its files (NeedDaemonReload no)
        # is what PID 1 reads from the same files again.
        for name, cached in list(self._configs.items()):
            if cached.stale_on_reload or cached.signature != now.of(name):
                del self._configs[name]

    def _apply_unit_list(self, reply: Message) -> list[str]:
        """ListUnitsByPatterns' answer, where it arrived; the names whose state to fetch."""
        if reply.header.message_type is not MessageType.method_return:
            return []
        try:
            entries = m.parse_unit_list(reply.body)
        except BadReply:
            return []
        self._reloading = False  # what the reload did is in this answer
        listed: set[str] = set()
        changed: list[str] = []
        for entry in entries:
            name = capsule_from_unit(entry.name)
            if name is None:
                continue
            listed.add(name)
            unit = self._units.get(name)
            if unit is None:
                unit = self._units[name] = _Unit(name)
            new = not unit.loaded or (unit.active_state, unit.sub_state) != (
                entry.active_state,
                entry.sub_state,
            )
            unit.loaded = True
            if new:
                changed.append(name)
                self._set_state(unit, entry.active_state, entry.sub_state, fetch=False)
        for name, unit in self._units.items():
            if unit.loaded and name not in listed:
                unit.loaded = False
                self._set_state(unit, "inactive", "dead", reset=True)
        return changed

    # -- signals ---------------------------------------------------------------------------

    def _from_pid1(self, msg: Message) -> bool:
        return self._sender is not None and msg.header.fields.get(HeaderFields.sender) == (
            self._sender
        )

    def _on_owner_changed(self, msg: Message) -> None:
        if msg.header.fields.get(HeaderFields.sender) != dbus.BUS_DAEMON.bus_name:
            return  # only the bus daemon says who owns a name
        body = msg.body
        if not (isinstance(body, tuple) and len(body) == 3 and isinstance(body[2], str)):
            return
        # PID 1 re-executed (or is gone): believe the new name, and look again.
        # (The backend's jobs believe PID 1 by its well-known name, so they need no telling.)
        self._sender = body[2] or None
        self._stale()
        if body[2]:
            self._pid1_named.set()
            self._spawn(self._after_owner_change())

    async def _after_owner_change(self) -> None:
        link = self._link
        if link is None:
            return
        with contextlib.suppress(BackendError):
            await self._subscribe(link)
        await self._look_again()

    def _on_manager_signal(self, msg: Message) -> None:
        if not self._from_pid1(msg):
            return
        member = msg.header.fields.get(HeaderFields.member)
        body = msg.body
        if member == "Reloading":
            if isinstance(body, tuple) and len(body) == 1 and isinstance(body[0], bool):
                self._stale()
                if not body[0]:
                    self._spawn(self._look_again())  # for Watch, and the next read
            return
        if member not in ("UnitNew", "UnitRemoved") or self._reloading:
            return
        if not (isinstance(body, tuple) and len(body) == 2 and isinstance(body[0], str)):
            return
        name = capsule_from_unit(body[0])
        if name is None:
            return
        unit = self._units.get(name)
        if unit is None:
            if member == "UnitRemoved":
                return
            unit = self._units[name] = _Unit(name)
        # A unit PID 1 has just loaded is in its initial state (its first change follows as
        # PropertiesChanged), and so is one it unloaded: no fetch, or our own Get of a unit
        # nobody holds would load it again and again.
        unit.loaded = member == "UnitNew"
        self._set_state(unit, "inactive", "dead", reset=True)
        if not unit.loaded and (gone := self._unloaded.get(name)) is not None:
            gone.set()

    def _on_properties_changed(self, msg: Message) -> None:
        if not self._from_pid1(msg):
            return
        path = msg.header.fields.get(HeaderFields.path)
        if not (isinstance(path, str) and path.startswith(_CAPSULE_PATH_PREFIX)):
            return
        unit_name = m.unit_from_path(path)
        name = capsule_from_unit(unit_name) if unit_name is not None else None
        if name is None:
            return
        try:
            change = m.parse_properties_changed(msg.body)
        except BadReply:
            return  # PID 1 would not send it
        props = change.changed
        unit = self._units.get(name)
        if unit is None:
            unit = self._units[name] = _Unit(name)
        unit.loaded = True
        if change.interface == m.SERVICE_IFACE:
            result, pid = props.get("Result"), _as_int(props.get("ExecMainPID"))
            if isinstance(result, str):
                unit.result = result
            if pid is not None:
                unit.main_pid = pid
        elif change.interface == m.UNIT_IFACE:
            state, sub = props.get("ActiveState"), props.get("SubState")
            since = _as_int(props.get("StateChangeTimestamp"))
            if since is not None:
                unit.since_usec = since
            if isinstance(state, str) or isinstance(sub, str):
                self._set_state(
                    unit,
                    state if isinstance(state, str) else unit.active_state,
                    sub if isinstance(sub, str) else unit.sub_state,
                )

    def _set_state(
        self, unit: _Unit, state: str, sub: str, *, reset: bool = False, fetch: bool = True
    ) -> None:
        """Change a unit's state, tell the watchers, and fetch what the change makes current."""
        before = (unit.active_state, unit.sub_state)
        was_running = unit.active_state not in FINISHED_STATES
        group = unit.control_group
        if reset:
            unit.reset()
        unit.active_state, unit.sub_state = state, sub
        running = state not in FINISHED_STATES
        if group is not None and (reset or (was_running and not running)):
            hostfs.forget_cgroup(group)  # its cgroup goes with it: the kept fds too
        if (state, sub) != before:
            event = CapsuleEvent(unit.name, state, sub, unit.since_usec or None)
            for watcher in self._watchers:
                watcher.push(event)
        if reset or not fetch:
            return
        if running and unit.control_group is None:
            self._spawn_fetch(unit, self._fetch_cgroup)
        elif was_running and not running:
            unit.control_group = None
            self._spawn_fetch(unit, self._fetch_cpu_after_stop)

    def _lost(self) -> None:
        """A signal of PID 1 (or the bus daemon) was too large to read: look again."""
        log.warning("capsule model: a signal from PID 1 was skipped; looking at PID 1 again")
        self._stale()
        self._spawn(self._look_again())

    def _stale(self) -> None:
        """PID 1 reloads or re-executes: reads wait for a new look."""
        self._reloading = True
        if self._phase in (_Phase.LIVE, _Phase.SYNCING):
            self._phase = _Phase.STALE

    async def _look_again(self) -> None:
        try:
            await self._sync()
        except BackendError as exc:
            log.warning("capsule model: looking at PID 1 again failed: %s", exc)

    # -- fetches ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="capsuled-model")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_fetch(self, unit: _Unit, fetch: Callable[[Link, _Unit], Awaitable[None]]) -> None:
        """Fetch for `unit` now, in the background; its reads wait until that is answered."""
        link = self._link
        if link is None or self._phase is _Phase.DOWN:
            return
        unit.begin_fetch()

        async def run() -> None:
            try:
                await fetch(link, unit)
            except BackendError as exc:
                log.debug("capsule model: a fetch for %s failed: %s", unit.name, exc)
            finally:
                unit.end_fetch()

        self._spawn(run())

    async def _get(
        self, link: Link, name: str, interface: str, prop: str, apply: Callable[[object], None]
    ) -> None:
        """One Properties.Get of capsule@NAME.service, applied where its reply arrives."""

        def on_reply(reply: Message) -> None:
            if reply.header.message_type is MessageType.method_return:
                with contextlib.suppress(BadReply):
                    apply(m.parse_get_property(reply.body))

        path = m.unit_path(capsule_unit(name))
        async with self._fetch_slots:
            await link.call(m.get_property(path, interface, prop), on_reply=on_reply)

    async def _fetch_state(self, link: Link, unit: _Unit) -> None:
        """What ListUnitsByPatterns does not say about a loaded unit."""

        def since(value: object) -> None:
            if (v := _as_int(value)) is not None:
                unit.since_usec = v

        def result(value: object) -> None:
            if isinstance(value, str):
                unit.result = value

        def pid(value: object) -> None:
            if (v := _as_int(value)) is not None:
                unit.main_pid = v

        await asyncio.gather(
            self._get(link, unit.name, m.UNIT_IFACE, "StateChangeTimestamp", since),
            self._get(link, unit.name, m.SERVICE_IFACE, "Result", result),
            self._get(link, unit.name, m.SERVICE_IFACE, "ExecMainPID", pid),
        )
        if unit.active_state not in FINISHED_STATES:
            await self._fetch_cgroup(link, unit)
        else:
            await self._fetch_last_cpu(link, unit)

    async def _fetch_cgroup(self, link: Link, unit: _Unit) -> None:
        """A running unit's cgroup, and the CPU figure PID 1 subtracts from its usage."""

        def cgroup(value: object) -> None:
            if isinstance(value, str) and value and unit.active_state not in FINISHED_STATES:
                unit.control_group = value

        def cpu(value: object) -> None:
            # Read where PID 1's figure arrives: the difference is its base (module docstring).
            figure = _as_int(value)
            if figure is None or figure == UINT64_MAX or unit.control_group is None:
                return
            raw = hostfs.cgroup_cpu_usage_nsec(unit.control_group)
            if raw is not None:
                base = raw - figure
                unit.cpu_usage_base = base if base > CPU_BASE_NOISE_NS else 0

        await self._get(link, unit.name, m.SERVICE_IFACE, "ControlGroup", cgroup)
        await self._get(link, unit.name, m.SERVICE_IFACE, "CPUUsageNSec", cpu)

    async def _fetch_cpu_after_stop(self, link: Link, unit: _Unit) -> None:
        """A capsule that stopped: its last CPU figure, if PID 1 keeps the unit loaded.

        Most capsules are unloaded as soon as they stop (nothing references them): PID 1
        collects the unit before it reads its next bus message (manager_loop() dispatches its
        GC and D-Bus queues before each event), so a Get sent now would load the unit again
        from its files, a few ms in which PID 1 answers nobody (Stop's reply waited for it),
        and report no figure (UINT64_MAX). A Ping's reply comes after that UnitRemoved: only a
        unit still loaded then has a figure to ask for. Its UnitRemoved, which PID 1 sends
        with the stop job's JobRemoved, settles it sooner: reads then wait for neither reply
        (PID 1 is still stopping the capsule's mounts meanwhile, 1.5-3 ms in the testbed).
        """
        gone = self._unloaded[unit.name] = asyncio.Event()
        try:
            async with self._fetch_slots:
                ping = asyncio.ensure_future(link.call(m.ping()))
                unloaded = asyncio.ensure_future(gone.wait())
                try:
                    await asyncio.wait((ping, unloaded), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    unloaded.cancel()
                    answered = ping.done()
                    if not answered:
                        ping.cancel()  # a late reply is skipped (dbus: abandoned serials)
                if answered:
                    ping.result()  # its BackendError is the fetch's
        finally:
            if self._unloaded.get(unit.name) is gone:
                del self._unloaded[unit.name]
        if unit.loaded and unit.active_state in FINISHED_STATES:
            await self._fetch_last_cpu(link, unit)

    async def _fetch_last_cpu(self, link: Link, unit: _Unit) -> None:
        """A stopped unit's last CPU figure (PID 1 keeps it while the unit stays loaded)."""

        def cpu(value: object) -> None:
            figure = _as_int(value)
            if figure is not None and unit.active_state in FINISHED_STATES:
                unit.cpu_usage_last = None if figure == UINT64_MAX else figure

        await self._get(link, unit.name, m.SERVICE_IFACE, "CPUUsageNSec", cpu)

    # -- configuration ---------------------------------------------------------------------

    def _known_config(self, name: str) -> UnitConfig | None:
        """The capsule's configuration if the model has it, without any call."""
        cached = self._configs.get(name)  # what known() looks at first: every Describe's case
        if cached is not None:
            return cached.config
        return self._known_configs()(name)

    def _known_configs(self) -> Callable[[str], UnitConfig | None]:
        """`_known_config` for many names at one instant (use it before the next await): what
        they share is looked up once, not per name (the template's key is a tuple of file
        stamps, hashed anew at every lookup: a List asked for it twice a row)."""
        configs, units, per_name = self._configs, self._units, self._signatures.per_name
        template = self._template.get(self._signatures.global_)

        def known(name: str) -> UnitConfig | None:
            cached = configs.get(name)
            if cached is not None:
                return cached.config
            unit = units.get(name)
            if unit is None or not unit.loaded:
                own = per_name.get(name)
                if own is None or not own.files:  # configured like the template
                    return template
            return None

        return known

    async def _config(self, link: Link, name: str) -> UnitConfig:
        """The capsule's configuration: known, or fetched (one fetch per name, and one for all
        the unloaded capsules that have no files of their own)."""
        known = self._known_config(name)
        if known is not None:
            return known
        signatures = self._signatures
        unit = self._units.get(name)
        shared = (unit is None or not unit.loaded) and not signatures.of(name).files
        flights = self._template_fetch if shared else self._config_fetch
        key: object = signatures.global_ if shared else name
        flight = flights.get(key)  # type: ignore[call-overload]  # the key fits its table
        if flight is not None:
            return await asyncio.shield(flight)
        future: asyncio.Future[UnitConfig] = asyncio.get_running_loop().create_future()
        flights[key] = future  # type: ignore[index]  # the key fits its table
        try:
            config, stale = await self._fetch_config(link, name)
            if self._signatures is signatures:  # no new look at the files meanwhile
                self._configs[name] = _CachedConfig(config, signatures.of(name), stale)
                if shared and not stale:
                    self._template[signatures.global_] = config
            future.set_result(config)
            return config
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del flights[key]  # type: ignore[arg-type]  # the key fits its table

    async def _fetch_config(self, link: Link, name: str) -> tuple[UnitConfig, bool]:
        """The configuration properties and NeedDaemonReload (loads an unloaded unit)."""
        values: dict[str, object] = {}

        def keep(prop: str) -> Callable[[object], None]:
            return lambda value: values.__setitem__(prop, value)

        props = (
            (m.SERVICE_IFACE, "MemoryMax"),
            (m.SERVICE_IFACE, "TasksMax"),
            (m.SERVICE_IFACE, "CPUWeight"),
            (m.SERVICE_IFACE, "MemoryAccounting"),
            (m.SERVICE_IFACE, "TasksAccounting"),
            (m.SERVICE_IFACE, "CPUAccounting"),
            (m.UNIT_IFACE, "NeedDaemonReload"),
        )
        await asyncio.gather(*(self._get(link, name, i, p, keep(p)) for i, p in props))
        config = UnitConfig(
            memory_max=m.prop_u64(values, "MemoryMax"),
            tasks_max=m.prop_u64(values, "TasksMax"),
            cpu_weight=m.prop_u64(values, "CPUWeight"),
            memory_accounting=values.get("MemoryAccounting") is True,
            tasks_accounting=values.get("TasksAccounting") is True,
            cpu_accounting=values.get("CPUAccounting") is True,
        )
        return config, values.get("NeedDaemonReload") is True

    async def refresh_config(self, name: str) -> None:
        """Read the capsule's configuration again now (capsuled changed it: SetLimits)."""
        link = await self.ready()
        unit = self._units.get(name)
        if unit is None:
            unit = self._units[name] = _Unit(name)
        unit.begin_fetch()
        try:
            # SetUnitProperties wrote its drop-in: the capsule has files of its own now.
            per_name = dict(self._signatures.per_name)
            per_name[name] = hostfs.own_config_signature(self._unit_path, name)
            self._signatures = hostfs.Signatures(self._signatures.global_, per_name)
            self._configs.pop(name, None)
            config, stale = await self._fetch_config(link, name)
            self._configs[name] = _CachedConfig(config, per_name[name], stale)
        finally:
            unit.end_fetch()

    async def barrier(self) -> None:
        """Return once every signal PID 1 queued before now has been applied: for a call whose
        reply PID 1 sends before the change signal it queues (ResetFailedUnit), so that the
        next read reflects it. A Ping is enough: manager_loop() dispatches its D-Bus queue
        before each event it handles, so the Ping's reply follows those signals."""
        link = await self.ready()
        await link.call(m.ping())

    # -- reads -----------------------------------------------------------------------------

    async def views(
        self, names: Collection[str], with_config: Collection[str] = ()
    ) -> dict[str, UnitView]:
        """Each named capsule's unit as of now; those in `with_config` with its configuration
        (fetched when not known: that loads an unloaded unit in PID 1).

        Raises:
            SystemdUnavailable, BackendError: as `ready`, or a fetch failed.
        """
        for _ in range(MAX_SYNC_ROUNDS):
            link = await self.ready()
            known = self._known_configs()
            missing = [n for n in with_config if known(n) is None]
            if missing:
                await self._fetch_missing(link, missing)
            await self._settle(names)
            if self._phase is _Phase.LIVE:
                break  # else PID 1 began to reload meanwhile: wait for the new look
        else:
            raise SystemdUnavailable("PID 1 kept reloading while capsuled looked at it")
        out: dict[str, UnitView] = {}
        initial: dict[UnitConfig | None, UnitView] = {}
        # A set for the lookups below: List passes a list, and `in` on it made this loop
        # quadratic (half a million comparisons for 1,000 capsules).
        wanted = with_config if isinstance(with_config, (set, frozenset)) else set(with_config)
        known, units = self._known_configs(), self._units
        # The unloaded capsules mostly share one configuration (the template's): the last
        # shared view is reused while the config is the same object, without hashing it.
        last_config: UnitConfig | None = None
        last_view = INITIAL
        for name in names:
            config = known(name) if name in wanted else None
            unit = units.get(name)
            if unit is not None:
                out[name] = unit.view(config)
            else:  # a capsule PID 1 has not loaded: shared by all such with this config
                if config is not last_config:
                    last_config = config
                    last_view = initial.get(config) or initial.setdefault(
                        config, replace(INITIAL, config=config)
                    )
                out[name] = last_view
        self._forget_unused()
        return out

    async def _fetch_missing(self, link: Link, names: list[str]) -> None:
        """The configurations of `names`: one fetch stands for all that share the template."""
        first, own = None, []
        for name in names:
            unit = self._units.get(name)
            if (unit is None or not unit.loaded) and not self._signatures.of(name).files:
                first = first or name
            else:
                own.append(name)
        if first is not None:
            own.append(first)
        await asyncio.gather(*(self._config(link, n) for n in own))

    async def view(self, name: str, *, with_config: bool) -> UnitView:
        """One capsule's unit (see `views`)."""
        link = self._link
        unit = self._units.get(name)
        if (
            self._phase is _Phase.LIVE
            and link is not None
            and not link.closed
            and unit is not None
            and not unit.fetching
        ):
            # What views() answers at once in this case (the model current, nothing to fetch
            # or wait for), without its lists, sets and awaits: every Describe comes here.
            config = self._known_config(name) if with_config else None
            if config is not None or not with_config:
                self._forget_unused()
                return unit.view(config)
        return (await self.views((name,), (name,) if with_config else ()))[name]

    async def _settle(self, names: Collection[str]) -> None:
        waiting = [u.settled.wait() for n in names if (u := self._units.get(n)) and u.fetching]
        if not waiting:
            return
        try:
            async with asyncio.timeout(self._settle_timeout_s):
                await asyncio.gather(*waiting)
        except TimeoutError as exc:
            raise SystemdUnavailable("PID 1 did not answer in time") from exc

    def loaded_names(self) -> set[str]:
        """The capsules whose unit PID 1 has loaded (as of the last `ready`)."""
        return {name for name, unit in self._units.items() if unit.loaded}

    def _forget_unused(self) -> None:
        """Bound the table (module docstring): an unloaded unit in its initial state says no
        more than a missing entry."""
        if len(self._units) <= len(self._configs) + SPARE_UNIT_ENTRIES:
            return
        for name, unit in list(self._units.items()):
            if not unit.loaded and not unit.fetching and unit.view(None) == INITIAL:
                del self._units[name]

    # -- watching ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[CapsuleEvent]]:
        """Capsule state changes from now on: a bounded queue (WatchOverflow when its reader
        falls behind; SystemdUnavailable when the connection is lost)."""
        await self.ready()
        watcher = _Watcher(MAX_WATCH_SIGNALS_QUEUED)
        self._watchers.add(watcher)
        try:
            yield watcher.events()
        finally:
            self._watchers.discard(watcher)
