"""capsuled.systemd.model against FakePID1 (tests/doubles/pid1.py) over a real D-Bus connection.

What the model promises (model.py): its snapshot, signals and replies applied in the order they
arrive, no belief in anybody's signals but PID 1's, reads held back while PID 1 reloads or a
fetch is in flight, one unit load for all the capsules configured alike, and a fresh start when
the connection is lost. The same promises against real systemd: tests/e2e/test_model.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from jeepney import Message

from capsuled import dbus
from capsuled.systemd import bus
from capsuled.systemd import messages as m
from capsuled.systemd.errors import SystemdUnavailable
from capsuled.systemd.model import INITIAL, CapsuleModel
from capsuled.systemd.values import CapsuleEvent
from doubles.pid1 import SERVICE_IFACE, UNIT_IFACE, FakePID1

T = TypeVar("T")
TIMEOUT_S = 5.0


class World:
    """A model and the fake it talks to; `connects` counts the connections it opened."""

    def __init__(self, settle_timeout_s: float = TIMEOUT_S, pid1_return_s: float = 2.0) -> None:
        self.fakes: list[FakePID1] = []
        self.connects = 0
        self.prepare: Callable[[FakePID1], object] = lambda fake: None
        self.model = CapsuleModel(
            self._connect, settle_timeout_s=settle_timeout_s, pid1_return_s=pid1_return_s
        )

    @property
    def fake(self) -> FakePID1:
        return self.fakes[-1]

    async def _connect(self) -> bus.Link:
        self.connects += 1
        fake, sock = await FakePID1.connected()
        self.prepare(fake)
        self.fakes.append(fake)
        return await bus.open_peer(sock, uid=0, limits=dbus.SYSTEM_BUS_LIMITS)

    async def close(self) -> None:
        await self.model.close()
        for fake in self.fakes:
            await fake.close()


def run(scenario: Callable[[World], Awaitable[T]], world: World | None = None) -> T:
    async def main() -> T:
        w = world or World()
        try:
            async with asyncio.timeout(TIMEOUT_S * 2):
                return await scenario(w)
        finally:
            await w.close()

    return asyncio.run(main())


async def settled(w: World) -> None:
    """Everything the fake sent so far has been read by the model (a Ping round trip)."""
    await w.fake.flush()
    await w.model.barrier()


async def state(w: World, name: str) -> tuple[str, str]:
    view = await w.model.view(name, with_config=False)
    return view.active_state, view.sub_state


async def next_events(events: AsyncIterator[CapsuleEvent], n: int) -> list[tuple[str, str]]:
    out = []
    async with asyncio.timeout(TIMEOUT_S):
        async for event in events:
            out.append((event.name, event.state))
            if len(out) == n:
                return out
    return out


# -- the snapshot ------------------------------------------------------------------------------


def test_the_snapshot_has_the_loaded_units_and_nothing_for_the_others() -> None:
    async def scenario(w: World) -> None:
        w.prepare = lambda fake: fake.load(
            "web",
            ActiveState=("s", "active"),
            SubState=("s", "running"),
            ExecMainPID=("u", 4242),
            Result=("s", "success"),
            StateChangeTimestamp=("t", 77),
            ControlGroup=("s", "/capsule.slice/capsule@web.service"),
        )
        web = await w.model.view("web", with_config=False)
        assert (web.loaded, web.active_state, web.sub_state, web.main_pid) == (
            True,
            "active",
            "running",
            4242,
        )
        assert (web.since_usec, web.control_group) == (77, "/capsule.slice/capsule@web.service")
        assert await w.model.view("nothing", with_config=False) == INITIAL
        assert w.model.loaded_names() == {"web"}
        assert w.model.version == "257.9-1"
        assert w.fake.subscribed

    run(scenario)


def test_a_read_asks_pid1_nothing_once_the_model_is_live() -> None:
    async def scenario(w: World) -> None:
        w.prepare = lambda fake: fake.load("web", ActiveState=("s", "active"))
        await w.model.view("web", with_config=True)
        calls = len(w.fake.calls)
        for _ in range(10):
            await w.model.view("web", with_config=True)
            await w.model.view("other", with_config=False)
        assert len(w.fake.calls) == calls

    run(scenario)


# -- signals and replies, in order -------------------------------------------------------------


def test_a_signal_changes_the_state_and_a_watcher_sees_it_once() -> None:
    async def scenario(w: World) -> None:
        async with w.model.watch() as events:
            w.fake.unit_new("web")
            w.fake.set_state("web", "activating", "start")
            w.fake.set_state("web", "activating", "start")  # PID 1 repeats itself
            w.fake.set_state("web", "active", "running")
            assert await next_events(events, 2) == [("web", "activating"), ("web", "active")]
        assert await state(w, "web") == ("active", "running")

    run(scenario)


def test_a_reply_that_arrives_after_a_signal_wins_and_one_before_it_loses() -> None:
    async def scenario(w: World) -> None:
        w.prepare = lambda fake: fake.load("web", ActiveState=("s", "active"))
        await w.model.ready()
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def hold(msg: Message) -> asyncio.Future[None] | None:
            return gate if msg.body == (SERVICE_IFACE, "ExecMainPID") else None

        w.fake.hooks["Get"] = hold
        # The fake answers the Get after this signal, with the newer value: the reply wins.
        w.fake.properties_changed("web", SERVICE_IFACE, ExecMainPID=("u", 1))
        w.fake.unit("web").props[SERVICE_IFACE]["ExecMainPID"] = ("u", 2)
        w.fake.set_state("web", "deactivating", "stop")
        w.fake.set_state("web", "active", "running")  # sets off a fetch of the cgroup
        fetch = asyncio.create_task(w.model.refresh_config("web"))
        await asyncio.sleep(0)
        gate.set_result(None)
        await fetch
        await settled(w)
        # A signal after the replies: it wins.
        w.fake.properties_changed("web", SERVICE_IFACE, ExecMainPID=("u", 3))
        await settled(w)
        assert (await w.model.view("web", with_config=False)).main_pid == 3

    run(scenario)


def test_a_state_change_holds_reads_back_until_its_fetch_is_answered() -> None:
    async def scenario(w: World) -> None:
        w.prepare = lambda fake: fake.load("web")
        await w.model.ready()
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asked = asyncio.Event()

        def hold(msg: Message) -> asyncio.Future[None] | None:
            if msg.body[1] != "ControlGroup":
                return None
            asked.set()
            return gate

        w.fake.hooks["Get"] = hold
        w.fake.unit("web").props[SERVICE_IFACE]["ControlGroup"] = ("s", "/capsule.slice/x")
        w.fake.set_state("web", "active", "running")
        await asked.wait()  # the model read the signal and asked for the cgroup
        read = asyncio.create_task(w.model.view("web", with_config=False))
        await asyncio.sleep(0.05)  # give the read every chance to answer early
        assert not read.done()
        gate.set_result(None)
        assert (await read).control_group == "/capsule.slice/x"

    run(scenario)


def test_signals_from_anybody_but_pid1_change_nothing() -> None:
    async def scenario(w: World) -> None:
        await w.model.ready()
        forged = {"ActiveState": ("s", "failed"), "SubState": ("s", "failed")}
        w.fake.properties_changed("web", UNIT_IFACE, sender=":1.99", **forged)
        w.fake._manager_signal("UnitRemoved", "web", sender=":1.99")
        w.fake.signal(m.MANAGER_PATH, m.MANAGER_IFACE, "Reloading", "b", (True,), ":1.99")
        # A forged NameOwnerChanged (not from the bus daemon) does not move our trust either.
        w.fake.signal(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameOwnerChanged",
            "sss",
            (m.SYSTEMD_BUS_NAME, ":1.6", ":1.99"),
            sender=":1.99",
        )
        await settled(w)
        assert await state(w, "web") == ("active", "running")
        w.fake.properties_changed("web", UNIT_IFACE, sender=":1.99", **forged)
        await settled(w)
        assert await state(w, "web") == ("active", "running")

    def prepare(fake: FakePID1) -> None:
        fake.load("web", ActiveState=("s", "active"), SubState=("s", "running"))

    world = World()
    world.prepare = prepare
    run(scenario, world)


# -- reloads and re-execution ------------------------------------------------------------------


def test_a_reload_drops_and_recreates_units_without_changing_them() -> None:
    async def scenario(w: World) -> None:
        async with w.model.watch() as events:
            w.fake.reloading(True)
            w.fake.unit_removed("web")  # what PID 1 does to every unit during a reload...
            w.fake.load("web", ActiveState=("s", "active"), SubState=("s", "running"))
            w.fake._manager_signal("UnitNew", "web")  # ...and back, state unchanged
            await w.fake.flush()
            read = asyncio.create_task(state(w, "web"))
            await asyncio.sleep(0.05)
            w.fake.reloading(False)
            assert await read == ("active", "running")
            # No event came of it: the first one a watcher sees is the next real change.
            w.fake.set_state("web", "deactivating", "stop-sigterm")
            assert await next_events(events, 1) == [("web", "deactivating")]

    def prepare(fake: FakePID1) -> None:
        fake.load("web", ActiveState=("s", "active"), SubState=("s", "running"))

    world = World()
    world.prepare = prepare
    run(scenario, world)


def test_a_reexecuted_pid1_is_believed_under_its_new_name_and_the_old_one_not() -> None:
    async def scenario(w: World) -> None:
        await w.model.ready()
        old = w.fake.owner
        w.fake.reloading(True)
        w.fake.new_owner(":1.8")
        w.fake.reloading(False)
        await settled(w)
        w.fake.set_state("web", "active", "running")  # from :1.8
        await settled(w)
        assert await state(w, "web") == ("active", "running")
        w.fake.properties_changed(
            "web", UNIT_IFACE, sender=old, ActiveState=("s", "failed"), SubState=("s", "failed")
        )
        await settled(w)
        assert await state(w, "web") == ("active", "running")
        assert w.fake.calls.count("Subscribe") == 2  # again, for a PID 1 that forgot us

    run(scenario)


def test_a_read_while_a_reexecuting_pid1_is_off_the_bus_waits_for_it() -> None:
    # systemctl daemon-reexec returns before PID 1 is back on the bus (real systemd 262 in
    # the bed: tests/e2e/test_model.py answered SystemdUnavailable in that gap).
    async def scenario(w: World) -> None:
        await w.model.ready()
        w.fake.set_state("web", "active", "running")
        w.fake.reloading(True)
        w.fake.leave_bus()
        await settled(w)
        read = asyncio.create_task(state(w, "web"))
        await asyncio.sleep(0.05)
        assert not read.done()
        w.fake.new_owner(":1.9")
        w.fake.reloading(False)
        assert await read == ("active", "running")

    run(scenario)


def test_a_pid1_that_does_not_come_back_is_unavailable_after_the_bound() -> None:
    async def scenario(w: World) -> None:
        await w.model.ready()
        w.fake.reloading(True)
        w.fake.leave_bus()
        await settled(w)
        with pytest.raises(SystemdUnavailable):
            await state(w, "web")

    run(scenario, World(pid1_return_s=0.2))


def test_while_pid1_reloads_a_read_waits_for_the_new_look() -> None:
    async def scenario(w: World) -> None:
        await w.model.ready()
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        w.fake.hooks["ListUnitsByPatterns"] = lambda msg: gate  # PID 1 busy reloading
        w.fake.reloading(True)
        await settled(w)
        read = asyncio.create_task(state(w, "web"))
        await asyncio.sleep(0.05)
        assert not read.done()
        w.fake.load("web", ActiveState=("s", "active"), SubState=("s", "running"))
        gate.set_result(None)
        w.fake.reloading(False)
        assert await read == ("active", "running")

    run(scenario)


# -- configuration -----------------------------------------------------------------------------


def test_one_unit_load_serves_every_capsule_without_files_of_its_own(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        names = [f"c{i}" for i in range(50)]
        views = await w.model.views(names, names)
        assert {v.config for v in views.values()} == {views["c0"].config}
        loaded = {name for name, _iface, prop in w.fake.gets if prop == "MemoryMax"}
        assert len(loaded) == 1
        # A capsule with a drop-in of its own is asked about by itself.
        dropin = tmp_path / "capsule@own.service.d"
        dropin.mkdir()
        (dropin / "50-MemoryMax.conf").write_text("[Service]\nMemoryMax=1000\n")
        w.fake.unit("own").props[SERVICE_IFACE]["MemoryMax"] = ("t", 1000)
        w.fake.reloading(True)
        w.fake.reloading(False)
        await settled(w)
        own = await w.model.view("own", with_config=True)
        assert own.config is not None
        assert own.config.memory_max == 1000
        assert (await w.model.view("c1", with_config=True)).config == views["c0"].config

    world = World()

    def prepare(fake: FakePID1) -> None:
        fake.unit_path = [str(tmp_path)]
        fake.gc_after_get = True

    world.prepare = prepare
    run(scenario, world)


def test_a_reload_reads_a_configuration_again_only_if_its_files_changed(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        dropin = tmp_path / "capsule@web.service.d"
        dropin.mkdir()
        conf = dropin / "50-MemoryMax.conf"
        conf.write_text("[Service]\nMemoryMax=1000\n")
        await w.model.ready()
        w.fake.unit("web").props[SERVICE_IFACE]["MemoryMax"] = ("t", 1000)
        first = await w.model.view("web", with_config=True)
        assert first.config is not None
        assert first.config.memory_max == 1000
        asked = len(w.fake.gets)
        w.fake.reloading(True)
        w.fake.reloading(False)
        await settled(w)
        await w.model.view("web", with_config=True)
        assert len(w.fake.gets) == asked  # same files: nothing asked
        conf.write_text("[Service]\nMemoryMax=2000\n")
        w.fake.unit("web").props[SERVICE_IFACE]["MemoryMax"] = ("t", 2000)
        w.fake.reloading(True)
        w.fake.reloading(False)
        await settled(w)
        after = await w.model.view("web", with_config=True)
        assert after.config is not None
        assert after.config.memory_max == 2000

    world = World()
    world.prepare = lambda fake: setattr(fake, "unit_path", [str(tmp_path)])
    run(scenario, world)


def test_refresh_config_reads_what_capsuled_just_set() -> None:
    async def scenario(w: World) -> None:
        before = await w.model.view("web", with_config=True)
        assert before.config is not None
        assert before.config.tasks_max is None
        w.fake.unit("web").props[SERVICE_IFACE]["TasksMax"] = ("t", 64)
        await w.model.refresh_config("web")
        after = await w.model.view("web", with_config=True)
        assert after.config is not None
        assert after.config.tasks_max == 64

    run(scenario)


# -- the connection ----------------------------------------------------------------------------


def test_a_lost_connection_ends_watches_and_the_next_read_looks_afresh() -> None:
    async def scenario(w: World) -> None:
        async with w.model.watch() as events:
            w.fake.hang_up()
            with pytest.raises(SystemdUnavailable):
                await next_events(events, 1)

        def prepare(fake: FakePID1) -> None:
            fake.load("web", ActiveState=("s", "failed"), SubState=("s", "failed"))

        w.prepare = prepare
        assert await state(w, "web") == ("failed", "failed")
        assert w.connects == 2

    run(scenario)


def test_units_pid1_loads_and_unloads_do_not_pile_up() -> None:
    async def scenario(w: World) -> None:
        await w.model.ready()
        for i in range(500):
            w.fake.unit_new(f"x{i}")
            w.fake.unit_removed(f"x{i}")
        await settled(w)
        await w.model.views([f"x{i}" for i in range(500)])
        assert len(w.model._units) <= 100  # the bound is the point

    run(scenario)


# -- a capsule that stops ---------------------------------------------------------------------


def test_a_capsule_unloaded_as_it_stops_is_not_loaded_again_nor_waited_for() -> None:
    # PID 1 unloads a capsule nobody holds right after its stop job (UnitRemoved with the
    # JobRemoved) and then goes on stopping its mounts before it reads its bus again. A Get
    # would load the unit again from its files, and held Stop's reply until PID 1 got to it.
    async def scenario(w: World) -> None:
        w.prepare = lambda fake: fake.load("web", ActiveState=("s", "active"))
        await w.model.ready()
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pinged = asyncio.Event()

        def busy(msg: Message) -> asyncio.Future[None] | None:
            if gate.done():
                return None
            pinged.set()
            return gate  # PID 1 answers nothing while it stops the mounts

        w.fake.hooks["Ping"] = busy
        w.fake.gets.clear()  # the snapshot's
        w.fake.set_state("web", "inactive", "dead")
        await pinged.wait()  # the model saw the stop and asked whether the unit stays
        w.fake.unit_removed("web")
        view = await w.model.view("web", with_config=False)  # answers while PID 1 is busy
        assert (view.loaded, view.active_state, view.cpu_usage_last) == (False, "inactive", None)
        gate.set_result(None)
        await settled(w)
        assert w.fake.gets == []  # nothing asked of the unit: PID 1 did not load it again

    run(scenario)


def test_a_capsule_still_loaded_after_it_stopped_shows_its_last_cpu_figure() -> None:
    # A failed capsule (or one something refers to) stays loaded: PID 1 keeps its last CPU
    # figure, and a read after the stop waits for it.
    async def scenario(w: World) -> None:
        w.prepare = lambda fake: fake.load("web", ActiveState=("s", "active"))
        await w.model.ready()
        asked = asyncio.Event()
        w.fake.hooks["Get"] = lambda msg: asked.set()
        w.fake.unit("web").props[SERVICE_IFACE]["CPUUsageNSec"] = ("t", 51_000_000)
        w.fake.set_state("web", "failed", "failed")
        await settled(w)  # the model has read the signal (its fetch began then)
        view = await w.model.view("web", with_config=False)
        assert asked.is_set()
        assert (view.loaded, view.active_state, view.cpu_usage_last) == (True, "failed", 51_000_000)

    run(scenario)
