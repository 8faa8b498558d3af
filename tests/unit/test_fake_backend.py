"""FakeBackend's own model and knobs, so method tests written against it mean something.

What it shares with systemd 257 is held by the contract suite (tests/contract/backend.py), which
runs against this fake and, in the testbed, against PID 1; these tests pin the fake-only parts
(fail_start, gate, overlaps, unavailable, the uids it hands out) and the protocol's shape.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from capsuled.systemd import errors
from capsuled.systemd.backend import (
    LIMIT_DEFAULT,
    CapsuleEvent,
    CapsuleManager,
    DBusCapsuleManager,
    DBusSystemdBackend,
    SystemdBackend,
)
from doubles.backend import FIRST_DYNAMIC_UID, FakeBackend, FakeCapsuleManager

T = TypeVar("T")


def run(aw: Awaitable[T]) -> T:
    async def main() -> T:
        return await aw

    return asyncio.run(main())


def _public(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if not n.startswith("_") and callable(v)}


@pytest.mark.parametrize(
    ("protocol", "impls"),
    [
        (SystemdBackend, (FakeBackend, DBusSystemdBackend)),
        (CapsuleManager, (FakeCapsuleManager, DBusCapsuleManager)),
    ],
)
def test_implementations_cover_the_protocol_with_same_signatures(
    protocol: type, impls: tuple[type, ...]
) -> None:
    for impl in impls:
        assert _public(protocol) <= _public(impl), impl
        for name in _public(protocol):
            want = inspect.signature(getattr(protocol, name))
            got = inspect.signature(getattr(impl, name))
            assert list(want.parameters) == list(got.parameters), (impl, name)


def test_unknown_capsule_is_none_and_not_listed() -> None:
    fb = FakeBackend()
    assert run(fb.capsule_info("x")) is None
    assert run(fb.list_capsules()) == []


def test_start_creates_state_dir_and_dynamic_uid() -> None:
    fb = FakeBackend()
    assert run(fb.start("a")) == "done"
    info = run(fb.capsule_info("a"))
    assert info is not None
    assert (info.state, info.sub_state, info.has_state_dir) == ("active", "running", True)
    assert info.uid == FIRST_DYNAMIC_UID
    run(fb.stop("a"))
    stopped = run(fb.capsule_info("a"))
    assert stopped is not None
    assert (stopped.state, stopped.uid, stopped.has_state_dir) == ("inactive", None, True)
    assert [c.name for c in run(fb.list_capsules())] == ["a"]


def test_failed_start_raises_job_failed_and_leaves_failed_state() -> None:
    fb = FakeBackend()
    fb.fail_start.add("bad")
    with pytest.raises(errors.JobFailed) as exc:
        run(fb.start("bad"))
    assert (exc.value.result, exc.value.unit_result) == ("failed", "exit-code")
    info = run(fb.capsule_info("bad"))
    assert info is not None
    assert (info.state, info.result) == ("failed", "exit-code")
    run(fb.reset_failed("bad"))
    after = run(fb.capsule_info("bad"))
    assert after is not None
    assert after.state == "inactive"


def test_clean_refuses_running_and_removes_dir() -> None:
    fb = FakeBackend()
    run(fb.start("a"))
    with pytest.raises(errors.UnitBusy):
        run(fb.clean("a"))
    run(fb.stop("a"))
    run(fb.clean("a"))
    assert run(fb.capsule_info("a")) is None


def test_capsule_made_outside_is_listed() -> None:
    fb = FakeBackend()
    fb.add_capsule("ext", state="active")
    (info,) = run(fb.list_capsules())
    assert (info.name, info.state) == ("ext", "active")


def test_limits_none_unchanged_default_resets_forget_clears() -> None:
    fb = FakeBackend()
    fb.add_capsule("a")
    run(fb.set_limits("a", memory_max=1 << 30, tasks_max=50, cpu_weight=200))
    run(fb.set_limits("a", tasks_max=LIMIT_DEFAULT))
    info = run(fb.capsule_info("a"))
    assert info is not None
    assert (info.memory_max, info.tasks_max, info.cpu_weight) == (1 << 30, None, 200)
    run(fb.set_autostart("a", True))
    info = run(fb.capsule_info("a"))
    assert info is not None
    assert info.autostart
    run(fb.forget("a"))
    info = run(fb.capsule_info("a"))
    assert info is not None
    assert (info.memory_max, info.cpu_weight, info.autostart) == (None, None, False)


def test_autostart_alone_makes_a_capsule_exist() -> None:
    fb = FakeBackend()
    run(fb.set_autostart("boot", True))
    assert [c.name for c in run(fb.list_capsules())] == ["boot"]
    run(fb.forget("boot"))
    assert run(fb.capsule_info("boot")) is None


def test_version_and_unavailable() -> None:
    fb = FakeBackend(version_value=255)
    with pytest.raises(errors.SystemdTooOld) as exc:
        run(fb.check_version())
    assert exc.value.version == 255
    fb.unavailable = True
    with pytest.raises(errors.SystemdUnavailable):
        run(fb.list_capsules())


def test_overlapping_calls_on_one_capsule_are_recorded() -> None:
    """Unserialised callers show up in `overlaps`; serialised ones do not."""

    async def scenario(serialise: bool) -> list[str]:
        fb = FakeBackend()
        fb.gate = asyncio.Event()
        lock = asyncio.Lock()

        async def op(coro_fn: str) -> None:
            if serialise:
                async with lock:
                    await getattr(fb, coro_fn)("a")
            else:
                await getattr(fb, coro_fn)("a")

        tasks = [asyncio.create_task(op("start")), asyncio.create_task(op("stop"))]
        await asyncio.sleep(0)
        fb.gate.set()
        await asyncio.gather(*tasks)
        return fb.overlaps

    assert run(scenario(serialise=False)) == ["a"]
    assert run(scenario(serialise=True)) == []


def test_watch_delivers_start_and_stop_in_order() -> None:
    async def scenario() -> list[tuple[str, str]]:
        fb = FakeBackend()
        seen: list[tuple[str, str]] = []
        async with fb.watch() as events:
            await fb.start("a")
            await fb.stop("a")
            async for ev in events:
                assert isinstance(ev, CapsuleEvent)
                seen.append((ev.state, ev.sub_state))
                if ev.state == "inactive":
                    break
        return seen

    assert run(scenario()) == [
        ("activating", "start"),
        ("active", "running"),
        ("deactivating", "stop-sigterm"),
        ("inactive", "dead"),
    ]


def test_watch_overflow_is_reported_not_buffered() -> None:
    async def scenario() -> None:
        fb = FakeBackend()
        async with fb.watch() as events:
            for _ in range(1000):  # 4 events each, more than MAX_WATCH_SIGNALS_QUEUED
                await fb.start("a")
                await fb.stop("a")
            with pytest.raises(errors.WatchOverflow):
                async for _ev in events:
                    pass

    run(scenario())


def test_capsule_manager_needs_running_capsule() -> None:
    async def scenario() -> None:
        fb = FakeBackend()
        fb.add_unit("a", "web.service", enabled=True)
        fb.add_unit("a", "job.service")
        with pytest.raises(errors.ManagerUnavailable):
            async with fb.capsule_manager("a"):
                pass
        await fb.start("a")
        async with fb.capsule_manager("a") as mgr:
            units = {u.name: u for u in await mgr.list_units()}
            assert units["web.service"].active_state == "active"  # enabled: started with capsule
            assert units["job.service"].active_state == "inactive"
            assert units["job.service"].unit_file_path == (
                "/var/lib/capsules/a/.config/systemd/user/job.service"
            )
            assert await mgr.start_unit("job.service") == "done"
            with pytest.raises(errors.NoSuchUnit):
                await mgr.start_unit("nope.service")
            unit = await mgr.start_transient("run-1.service", ["/bin/false"], keep=True)
            status = await mgr.wait_exit(unit)
            assert (status.result, status.code, status.status) == ("exit-code", "exited", 1)
            # Ended, the unit is collected as systemd collects it: its name is free again.
            assert await mgr.start_transient("run-1.service", ["/bin/true"]) == "run-1.service"
            with pytest.raises(errors.UnitBusy):  # ... and busy while it runs
                await mgr.start_transient("run-1.service", ["/bin/true"])
            with pytest.raises(errors.JobFailed):
                await mgr.start_transient("run-2.service", ["/missing/binary"])
        await fb.stop("a")
        info = await fb.capsule_info("a")
        assert info is not None
        assert info.units_count == 2

    run(scenario())


def test_manager_watch_reports_unit_transitions() -> None:
    async def scenario() -> list[tuple[str, str, str]]:
        fb = FakeBackend()
        fb.add_unit("a", "web.service")
        await fb.start("a")
        async with fb.capsule_manager("a") as mgr, mgr.watch() as events:
            await mgr.start_unit("web.service")
            await mgr.stop_unit("web.service")
            seen = []
            async for ev in events:
                seen.append((ev.unit, ev.state, ev.sub_state))
                if ev.state == "inactive":
                    return seen
        raise AssertionError("unreachable")

    assert run(scenario()) == [
        ("web.service", "activating", "start"),
        ("web.service", "active", "running"),
        ("web.service", "deactivating", "stop-sigterm"),
        ("web.service", "inactive", "dead"),
    ]
