"""The contract of capsuled.systemd's SystemdBackend and CapsuleManager: one suite, two worlds.

Each check is an async function of a `Harness` and asserts what any implementation must do.
tests/contract/test_backend_fake.py runs every check against FakeBackend (tests/doubles), in a
few milliseconds; tests/e2e/test_backend.py runs every check against DBusSystemdBackend and real
systemd 257 in the testbed, as root, through e2e/inbed/backend_contract.py. A check that passes
on one side and fails on the other is the fake drifting from systemd (or the backend from its
Protocol): fix the side that is wrong, never the check.

What differs between the worlds is only what the harness does *outside* the backend: starting a
capsule with systemctl, breaking its unit with a drop-in, writing a unit file into its home.
What only systemd can answer (systemctl's own view, files on disk) a check records with
`show()`, `exists()` and `owner()`: the fake answers None, and the e2e test holds the real answers
against what it expects of systemd. Checks return those observations as a JSON-able dict.

Runs inside the testbed too: import nothing but the standard library and capsuled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from capsuled.systemd.backend import SystemdBackend
from capsuled.systemd.errors import (
    InvalidArgument,
    JobFailed,
    ManagerUnavailable,
    NoSuchUnit,
    UnitBusy,
)
from capsuled.systemd.values import (
    LIMIT_DEFAULT,
    MIN_SYSTEMD_VERSION,
    CapsuleInfo,
    UnitInfo,
)

STEP_S = 30.0  # the longest any single wait in a check may take (a start job, a signal)
CHECK_S = 120.0  # the longest a whole check may take
MIB = 1024 * 1024

Observations = dict[str, object]
Check = Callable[["Harness"], Awaitable[Observations]]
E = TypeVar("E", bound=BaseException)
T = TypeVar("T")


class Harness(Protocol):
    """One world the checks run in: a backend, a fresh capsule name, and the outside world."""

    backend: SystemdBackend
    name: str  # a valid capsule name nothing has used yet

    def driver(self) -> SystemdBackend:
        """Another client of the same systemd (for changes a watcher did not make itself)."""
        ...

    async def start_outside(self) -> None:
        """Start the capsule without the backend (`systemctl start capsule@NAME.service`)."""
        ...

    async def break_start(self) -> None:
        """Make the capsule's manager exit 1 at start (an ExecStart= drop-in), until the end."""
        ...

    async def write_unit_file(self, unit: str, text: str) -> None:
        """Put a unit file into the capsule's ~/.config/systemd/user/ (as its owner would)."""
        ...

    async def show(self, *properties: str) -> dict[str, str] | None:
        """systemctl show's view of capsule@NAME.service (None: no systemd to ask)."""
        ...

    def exists(self, path: str) -> bool | None:
        """Whether path exists (None: no file system to look at)."""
        ...

    def owner(self, path: str) -> int | None:
        """The uid owning path (None: no file system to look at)."""
        ...


CHECKS: dict[str, Check] = {}


def check(fn: Check) -> Check:
    """Register fn as a check of the contract, under its name."""
    CHECKS[fn.__name__] = fn
    return fn


async def run(name: str, harness: Harness) -> Observations:
    """Run one check, every wait in it bounded."""
    async with asyncio.timeout(CHECK_S):
        return await CHECKS[name](harness)


async def raises(kind: type[E], aw: Awaitable[object]) -> E:
    """The exception of type kind that aw raised; AssertionError if it raised nothing."""
    try:
        result = await aw
    except kind as exc:
        return exc
    raise AssertionError(f"expected {kind.__name__}, got {result!r}")


async def info(h: Harness) -> CapsuleInfo:
    found = await h.backend.capsule_info(h.name)
    assert found is not None, f"capsule {h.name} is unknown"
    return found


async def listed(h: Harness) -> dict[str, CapsuleInfo]:
    return {c.name: c for c in await h.backend.list_capsules()}


async def first(events: AsyncIterator[T], done: Callable[[T], bool]) -> list[T]:
    """Events up to and including the first for which done() is true."""
    seen = []
    async with asyncio.timeout(STEP_S):
        async for event in events:
            seen.append(event)
            if done(event):
                return seen
    raise AssertionError(f"the stream ended after {seen}")


# --- PID 1: capsules ----------------------------------------------------------------------------


@check
async def version_is_pid1s(h: Harness) -> Observations:
    version = await h.backend.version()
    assert await h.backend.check_version() == version
    assert version >= MIN_SYSTEMD_VERSION
    return {"version": version}


@check
async def start_restart_stop_and_list(h: Harness) -> Observations:
    b, n = h.backend, h.name
    assert await b.capsule_info(n) is None
    assert n not in await listed(h)
    assert await b.start(n) == "done"
    running = await info(h)
    assert (running.state, running.sub_state, running.has_state_dir) == ("active", "running", True)
    assert running.uid is not None
    run_owner = h.owner(f"/run/capsules/{n}")  # the dynamic user's runtime directory
    assert await b.restart(n) == "done"
    assert (await listed(h))[n].state == "active"
    assert await b.stop(n) == "done"
    stopped = await info(h)
    assert (stopped.state, stopped.uid, stopped.has_state_dir) == ("inactive", None, True)
    assert n in await listed(h)
    return {"uid": running.uid, "run_owner": run_owner, "after_stop": await h.show("ActiveState")}


@check
async def a_capsule_started_outside_is_listed_running(h: Harness) -> Observations:
    await h.start_outside()
    capsule = (await listed(h))[h.name]
    assert (capsule.state, capsule.sub_state, capsule.has_state_dir) == ("active", "running", True)
    assert capsule.uid is not None
    return {}


@check
async def a_failing_manager_is_job_failed_until_reset(h: Harness) -> Observations:
    b, n = h.backend, h.name
    await h.break_start()
    failed = await raises(JobFailed, b.start(n))
    assert (failed.result, failed.unit_result) == ("failed", "exit-code")
    after = await info(h)
    assert (after.state, after.result, after.uid) == ("failed", "exit-code", None)
    await b.reset_failed(n)
    assert (await info(h)).state == "inactive"
    return {}


@check
async def clean_refuses_a_running_capsule_then_deletes_its_state(h: Harness) -> Observations:
    b, n = h.backend, h.name
    await b.start(n)
    await raises(UnitBusy, b.clean(n))
    assert (await info(h)).has_state_dir
    dirs = (f"/var/lib/private/capsules/{n}", f"/var/lib/capsules/{n}")
    while_running = [h.exists(d) for d in dirs]
    await b.stop(n)
    await b.clean(n)
    assert await b.capsule_info(n) is None
    assert n not in await listed(h)
    return {"dirs_while_running": while_running, "dirs_after": [h.exists(d) for d in dirs]}


@check
async def limits_are_set_refused_out_of_range_reset_and_forgotten(h: Harness) -> Observations:
    b, n = h.backend, h.name
    shown = ("MemoryMax", "TasksMax", "CPUWeight")
    dropin = f"/etc/systemd/system.control/capsule@{n}.service.d/50-MemoryMax.conf"
    await b.start(n)
    await b.set_limits(n, memory_max=256 * MIB, tasks_max=77, cpu_weight=300)
    i = await info(h)
    assert (i.memory_max, i.tasks_max, i.cpu_weight) == (256 * MIB, 77, 300)
    # PID 1's ranges (systemd 257): MemoryMax and TasksMax >= 1, CPUWeight 0..10000.
    for refused in (
        b.set_limits(n, cpu_weight=10001),
        b.set_limits(n, tasks_max=0),
        b.set_limits(n, memory_max=0),
    ):
        exc = await raises(InvalidArgument, refused)
        assert "out of range" in exc.text, exc.text
    i = await info(h)
    assert (i.memory_max, i.tasks_max, i.cpu_weight) == (256 * MIB, 77, 300)  # nothing changed
    observed: Observations = {"set": await h.show(*shown), "dropin": h.exists(dropin)}
    await b.set_limits(n, tasks_max=LIMIT_DEFAULT, cpu_weight=LIMIT_DEFAULT)  # memory: None
    i = await info(h)
    assert (i.memory_max, i.tasks_max, i.cpu_weight) == (256 * MIB, None, None)
    observed["reset"] = await h.show(*shown)
    await b.set_limits(n, cpu_weight=0)  # "idle", the lowest weight there is
    assert (await info(h)).cpu_weight == 0
    await b.forget(n)
    i = await info(h)
    assert (i.memory_max, i.tasks_max, i.cpu_weight, i.autostart) == (None, None, None, False)
    observed["forgotten"] = await h.show(*shown)
    observed["dropins_after_forget"] = h.exists(dropin.rpartition("/")[0])
    return observed


@check
async def an_autostart_link_alone_makes_a_capsule(h: Harness) -> Observations:
    b, n = h.backend, h.name
    await b.set_autostart(n, True)
    i = await info(h)
    assert (i.autostart, i.state, i.has_state_dir) == (True, "inactive", False)
    assert n in await listed(h)
    link = f"/etc/systemd/system/multi-user.target.wants/capsule@{n}.service"
    observed: Observations = {"link": h.exists(link), "wanted_by": await h.show("WantedBy")}
    await b.set_autostart(n, False)
    assert await b.capsule_info(n) is None
    observed["link_after"] = h.exists(link)
    return observed


@check
async def a_capsule_that_never_ran_stays_unknown(h: Harness) -> Observations:
    b, n = h.backend, h.name
    assert await b.stop(n) == "done"
    await b.reset_failed(n)
    await b.clean(n)
    await b.set_limits(n, memory_max=MIB)
    assert await b.capsule_info(n) is None
    assert n not in await listed(h)
    await raises(ManagerUnavailable, b.capsule_manager(n).__aenter__())
    await b.forget(n)
    assert await b.capsule_info(n) is None
    return {}


@check
async def watch_sees_start_and_stop_in_order(h: Harness) -> Observations:
    n = h.name
    driver = h.driver()

    async def drive() -> None:
        await driver.start(n)
        await driver.stop(n)

    async with h.backend.watch() as events:
        task = asyncio.create_task(drive())
        seen = await first(
            (e async for e in events if e.name == n), lambda e: e.state == "inactive"
        )
        await task
    assert [(e.state, e.sub_state) for e in seen] == [
        ("activating", "start"),
        ("active", "running"),
        ("deactivating", "stop-sigterm"),
        ("inactive", "dead"),
    ]
    return {}


# --- a capsule's manager ------------------------------------------------------------------------

HELLO = "[Service]\nExecStart=/bin/sleep infinity\n"  # no [Install]: a "static" unit


def unit_named(units: list[UnitInfo], name: str) -> UnitInfo:
    found = {u.name: u for u in units}
    assert name in found, sorted(found)
    return found[name]


@check
async def a_manager_runs_the_units_in_the_capsules_home(h: Harness) -> Observations:
    b, n = h.backend, h.name
    await raises(ManagerUnavailable, b.capsule_manager(n).__aenter__())
    await b.start(n)
    await h.write_unit_file("hello.service", HELLO)
    async with b.capsule_manager(n) as mgr:
        await mgr.reload()
        hello = unit_named(await mgr.list_units(), "hello.service")
        assert (hello.unit_file_path, hello.unit_file_state, hello.active_state) == (
            f"/var/lib/capsules/{n}/.config/systemd/user/hello.service",
            "static",
            "inactive",
        )
        async with mgr.watch() as events:
            assert await mgr.start_unit("hello.service") == "done"
            assert unit_named(await mgr.list_units(), "hello.service").active_state == "active"
            assert await mgr.stop_unit("hello.service") == "done"
            seen = await first(
                (e async for e in events if e.unit == "hello.service"),
                lambda e: e.state == "inactive",
            )
        # systemd may fold activating -> active of a Type=simple unit into one signal.
        assert [(e.state, e.sub_state) for e in seen if e.state != "activating"] == [
            ("active", "running"),
            ("deactivating", "stop-sigterm"),
            ("inactive", "dead"),
        ]
        for verb in (mgr.start_unit, mgr.stop_unit, mgr.restart_unit):
            await raises(NoSuchUnit, verb("nope.service"))
        await mgr.reset_failed_unit("nope.service")  # nothing loaded, nothing failed
    return {}


@check
async def transient_runs_report_how_they_ended(h: Harness) -> Observations:
    b, n = h.backend, h.name
    await b.start(n)
    async with b.capsule_manager(n) as mgr:
        ended = {}
        for unit, argv in (("r-false.service", ["/bin/false"]), ("r-true.service", ["/bin/true"])):
            assert await mgr.start_transient(unit, argv, keep=True) == unit
            s = await mgr.wait_exit(unit, timeout_s=STEP_S)
            ended[unit] = (s.unit, s.result, s.code, s.status)
        assert ended == {
            "r-false.service": ("r-false.service", "exit-code", "exited", 1),
            "r-true.service": ("r-true.service", "success", "exited", 0),
        }
        missing = await raises(JobFailed, mgr.start_transient("r-gone.service", ["/nonexistent/x"]))
        assert (missing.result, missing.unit_result) == ("failed", "exit-code")
    return {}


@check
async def a_transient_name_is_busy_while_it_runs_and_free_once_it_ended(
    h: Harness,
) -> Observations:
    b, n = h.backend, h.name
    await b.start(n)
    async with b.capsule_manager(n) as mgr:
        await mgr.start_transient("r-nap.service", ["/bin/sleep", "300"])
        nap = unit_named(await mgr.list_units(), "r-nap.service")
        assert (nap.active_state, nap.unit_file_state, nap.unit_file_path) == (
            "active",
            "transient",
            f"/run/capsules/{n}/systemd/transient/r-nap.service",
        )
        await raises(UnitBusy, mgr.start_transient("r-nap.service", ["/bin/true"]))
        assert await mgr.stop_unit("r-nap.service") == "done"
        # An ended transient unit is garbage-collected (CollectMode=inactive-or-failed): its
        # name is free again and the manager lists it no more.
        await mgr.start_transient("r-once.service", ["/bin/false"], keep=True)
        assert (await mgr.wait_exit("r-once.service", timeout_s=STEP_S)).status == 1
        names = {u.name for u in await mgr.list_units()}
        assert not names & {"r-nap.service", "r-once.service"}, names
        await mgr.start_transient("r-once.service", ["/bin/true"], keep=True)
        assert (await mgr.wait_exit("r-once.service", timeout_s=STEP_S)).status == 0
    return {}
