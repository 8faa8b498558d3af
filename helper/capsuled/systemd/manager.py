"""A capsule's own service manager, over its private peer-to-peer socket.

On a private link the manager sends JobRemoved and PropertiesChanged unconditionally
(bus_foreach_bus() in src/core/dbus.c: "Send to all direct buses, unconditionally"), so there is
neither AddMatch (no bus daemon) nor Subscribe, and signals carry no sender.

The manager runs as the capsule's user, so what it says is the capsule's word: a unit name
that is not one systemd would accept (unit_name_is_valid) is dropped here, never passed on to
a caller's terminal or to a journal match (issue 11, finding 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence

from ..dbus import SignalQueue
from ..names import is_valid_unit_name
from . import messages as m
from .bus import Link
from .errors import (
    BackendError,
    BackendTimeout,
    BadReply,
    JobFailed,
    NoSuchUnit,
    UnitBusy,
    WatchOverflow,
)
from .jobs import run_job, unit_state_changes, wait_state
from .values import (
    FINISHED_STATES,
    MAX_TRACKED_EXITS,
    MAX_WATCH_SIGNALS_QUEUED,
    ExitStatus,
    Stdio,
    UnitEvent,
    UnitInfo,
)


async def _unit_events(
    queue: SignalQueue, known: dict[str, tuple[str, str]]
) -> AsyncIterator[UnitEvent]:
    async for unit, state, sub, since in unit_state_changes(queue, m.UNIT_PATH_PREFIX, known):
        if is_valid_unit_name(unit):
            yield UnitEvent(unit, state, sub, since)


class DBusCapsuleManager:
    """CapsuleManager over the capsule's private socket (see the module docstring)."""

    def __init__(self, conn: Link, name: str, job_timeout_s: float, *, uid: int) -> None:
        self._conn = conn
        self.name = name
        self._uid = uid
        self._job_timeout_s = job_timeout_s
        self._exit_trackers: dict[str, tuple[contextlib.ExitStack, SignalQueue]] = {}

    @property
    def uid(self) -> int:
        """The capsule's dynamic uid."""
        return self._uid

    async def list_units(self) -> list[UnitInfo]:
        """ListUnits + ListUnitFiles, merged by unit name."""
        units_body, files_body = await asyncio.gather(
            self._conn.call(m.list_units()), self._conn.call(m.list_unit_files())
        )
        files = {
            os.path.basename(path): (path, state)
            for path, state in m.parse_unit_file_list(files_body)
            if is_valid_unit_name(os.path.basename(path), allow_template=True)
        }
        out: dict[str, UnitInfo] = {}
        for u in m.parse_unit_list(units_body):
            if not is_valid_unit_name(u.name):
                continue
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
        with self._conn.signals(
            rule, maxsize=MAX_WATCH_SIGNALS_QUEUED, overflow_error=overflow
        ) as queue:
            units = m.parse_unit_list(await self._conn.call(m.list_units()))
            yield _unit_events(queue, {u.name: (u.active_state, u.sub_state) for u in units})

    async def reload(self) -> None:
        """daemon-reload; the reply comes once the manager has reloaded."""
        await self._conn.call(m.reload())

    async def start_unit(self, unit: str) -> str:
        """StartUnit + wait."""
        return await run_job(self._conn, unit, m.start_unit(unit), self._job_timeout_s)

    async def stop_unit(self, unit: str) -> str:
        """StopUnit + wait."""
        return await run_job(self._conn, unit, m.stop_unit(unit), self._job_timeout_s)

    async def restart_unit(self, unit: str) -> str:
        """RestartUnit + wait."""
        return await run_job(self._conn, unit, m.restart_unit(unit), self._job_timeout_s)

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
        stdio: Stdio | None = None,
    ) -> str:
        """StartTransientUnit(mode=fail) + wait for the start job."""
        props = m.transient_service_properties(argv, environment, working_directory, stdio=stdio)
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
            await run_job(self._conn, unit, call, self._job_timeout_s)
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
            await wait_state(self._conn, queue, unit, FINISHED_STATES, 365 * 86400.0)
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
