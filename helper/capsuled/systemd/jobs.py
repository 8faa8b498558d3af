"""Waiting for systemd: jobs (JobRemoved) and unit states (PropertiesChanged), shared by PID 1
and a capsule's manager. Every wait registers its signal queue before the call that causes the
signal, and is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from jeepney import HeaderFields, MatchRule, Message

from ..dbus import SignalQueue
from . import messages as m
from .bus import Link
from .errors import BackendError, BackendTimeout, BadReply, DBusCallFailed, JobFailed
from .values import MAX_KNOWN_UNIT_STATES


def job_rule(conn: Link, unit: str) -> MatchRule:
    """The local filter for JobRemoved of one unit from the connection's trusted sender."""
    # Local filter only (arg2 = unit); the bus-side match is the broad job_removed_rule().
    rule = m.job_removed_rule(sender=conn.signal_sender)
    rule.add_arg_condition(2, unit)
    return rule


# How long a job wait trusts the signal before it asks whether the job is still there.
JOB_RECHECK_S = 5.0


async def wait_job(conn: Link, queue: SignalQueue, job: str, unit: str, timeout_s: float) -> str:
    """The result of ``job`` from its JobRemoved. Raises BackendTimeout.

    A JobRemoved can be lost: PID 1 re-executing (daemon-reexec, an upgrade) reconnects to the
    bus and sends the signals of jobs finishing meanwhile before it owns its well-known name
    again, and the bus daemon routes none of those to our match rule (seen on systemd 262 in
    the fault proof). So every JOB_RECHECK_S without the signal, the job is looked for; once
    it is gone, the unit's state gives the answer ("failed" if the unit failed, else "done").
    """
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    async with asyncio.timeout(JOB_RECHECK_S):
                        msg = await queue.get()
                except TimeoutError:
                    if await _job_gone(conn, job):
                        return "failed" if await active_state(conn, unit) == "failed" else "done"
                    continue
                event = m.parse_job_removed(msg.body)
                if event.job == job:
                    return event.result
    except TimeoutError as exc:
        raise BackendTimeout(f"job {job} did not finish in {timeout_s:.0f}s") from exc


async def _job_gone(conn: Link, job: str) -> bool:
    """Whether PID 1 (or the manager) no longer knows the job; False if it cannot tell now."""
    try:
        await conn.call(m.get_property(job, m.JOB_IFACE, "State"))
    except DBusCallFailed as exc:
        # sd-bus answers for an object path nobody serves (systemd's job vtable finds no job).
        return exc.name in _NO_SUCH_JOB
    except BackendError:
        return False  # not answering right now (re-executing): ask again later
    return False


_NO_SUCH_JOB = frozenset(
    {"org.freedesktop.DBus.Error.UnknownObject", "org.freedesktop.systemd1.NoSuchJob"}
)


async def unit_result(conn: Link, unit: str) -> str | None:
    """The service's Result property, or None if it cannot be read."""
    with contextlib.suppress(BackendError):
        body = await conn.call(m.get_property(m.unit_path(unit), m.SERVICE_IFACE, "Result"))
        value = m.parse_get_property(body)
        return value if isinstance(value, str) else None
    return None


async def run_job(conn: Link, unit: str, call: Message, timeout_s: float) -> str:
    """Queue a job and wait for its JobRemoved; "done" or raise JobFailed."""
    # The queue exists before the call: JobRemoved may arrive right after (even before we
    # read) the reply, and nothing may slip between call and wait.
    with conn.signals(job_rule(conn, unit), maxsize=64) as queue:
        job = m.parse_object_path(await conn.call(call, unit=unit))
        result = await wait_job(conn, queue, job, unit, timeout_s)
    if result != "done":
        raise JobFailed(result, await unit_result(conn, unit))
    return result


async def active_state(conn: Link, unit: str) -> str:
    """The unit's ActiveState."""
    body = await conn.call(
        m.get_property(m.unit_path(unit), m.UNIT_IFACE, "ActiveState"), unit=unit
    )
    value = m.parse_get_property(body)
    if not isinstance(value, str):
        raise BadReply("ActiveState is not a string")
    return value


async def wait_state(
    conn: Link,
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
                state = await active_state(conn, unit)
                if state in done:
                    return state
                await queue.get()
                while queue.get_nowait() is not None:
                    pass
    except TimeoutError as exc:
        raise BackendTimeout(f"{unit} did not reach {sorted(done)} in {timeout_s:.0f}s") from exc


async def unit_state_changes(
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
        if len(last) > MAX_KNOWN_UNIT_STATES:  # bound the dedup table too
            last.clear()
        last[unit] = (state, sub)
        yield unit, state, sub, since
