"""What only real systemd can show about DBusSystemdBackend, as root (test_backend.py).

    python3 -m e2e.inbed.backend_systemd set-autostart NAME on|off
    python3 -m e2e.inbed.backend_systemd transient-exits NAME      # NAME running
    python3 -m e2e.inbed.backend_systemd socket-symlinks NAME      # NAME running
    python3 -m e2e.inbed.backend_systemd forged-job-removed NAME   # NAME's start slow to fail

The contract suite (contract/backend.py) holds the fake to everything the fake can model; these
need what it cannot: processes that really exit or die, a capsule planting symlinks in its own
runtime directory, another bus client forging PID 1's signals. Each prints one JSON document of
what it saw.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable

from capsuled.systemd.backend import DBusSystemdBackend
from capsuled.systemd.errors import BackendError

TIMEOUT_S = 60.0
STEP_S = 30.0

Report = dict[str, object]


async def outcome(aw: Awaitable[object]) -> Report:
    """{"error": None} or the BackendError's class name and its simple attributes."""
    try:
        await aw
    except BackendError as exc:
        simple = {k: v for k, v in vars(exc).items() if isinstance(v, str | int | None)}
        return {"error": type(exc).__name__, **simple}
    return {"error": None}


async def set_autostart(b: DBusSystemdBackend, name: str, on: str) -> Report:
    await b.set_autostart(name, on == "on")
    return {}


async def transient_exits(b: DBusSystemdBackend, name: str) -> Report:
    """How real processes end: an exit status, a signal, the environment and directory given."""
    runs = {
        "r-seven.service": (["/bin/sh", "-c", "exit 7"], [], None),
        "r-kill.service": (["/bin/sh", "-c", "kill -s KILL $$"], [], None),
        "r-env.service": (
            ["/bin/sh", "-c", 'test "$FOO" = bar && test "$PWD" = /tmp'],
            ["FOO=bar"],
            "/tmp",
        ),
    }
    ended: Report = {}
    async with b.capsule_manager(name) as mgr:
        for unit, (argv, env, cwd) in runs.items():
            await mgr.start_transient(unit, argv, env, cwd, keep=True)
            s = await mgr.wait_exit(unit, timeout_s=STEP_S)
            ended[unit] = [s.result, s.code, s.status]
    return ended


async def socket_symlinks(b: DBusSystemdBackend, name: str) -> Report:
    """The capsule points its manager's socket (or its directory) at PID 1's private bus."""
    info = await b.capsule_info(name)
    uid = None if info is None else info.uid
    if uid is None:
        raise SystemExit(f"{name} is not running")

    def as_capsule(script: str) -> None:
        setpriv = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
        subprocess.run(
            [*setpriv, "/bin/sh", "-c", script],
            cwd=f"/run/capsules/{name}",
            check=True,
        )

    async def attempt() -> None:
        async with b.capsule_manager(name) as mgr:
            await mgr.list_units()

    seen: Report = {"plain": await outcome(attempt())}
    as_capsule("mv systemd/private systemd/p && ln -s /run/systemd/private systemd/private")
    seen["socket_link"] = await outcome(attempt())
    as_capsule(
        "rm systemd/private && mv systemd/p systemd/private"
        " && mv systemd sd && ln -s /run/systemd systemd"
    )
    seen["dir_link"] = await outcome(attempt())
    as_capsule("rm systemd && mv sd systemd")
    seen["restored"] = await outcome(attempt())
    return seen


async def forged_job_removed(b: DBusSystemdBackend, name: str) -> Report:
    """mallory broadcasts a JobRemoved "done" for the pending start job; start() must not care."""
    unit = f"capsule@{name}.service"
    async with b.watch() as events:
        start = asyncio.create_task(outcome(b.start(name)))
        async with asyncio.timeout(STEP_S):
            async for ev in events:
                if ev.name == name and ev.state == "activating":
                    break
        job = subprocess.run(
            ["systemctl", "show", "-p", "Job", "--value", unit],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        as_mallory = ["setpriv", "--reuid=mallory", "--regid=mallory", "--init-groups"]
        signal = ["/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager", "JobRemoved"]
        body = ["uoss", job, f"/org/freedesktop/systemd1/job/{job}", unit, "done"]
        forged = subprocess.run([*as_mallory, "busctl", "--system", "emit", *signal, *body])
        started = await start
    return {"job": job, "forged_rc": forged.returncode, **started}


SCENARIOS: dict[str, Callable[..., Awaitable[Report]]] = {
    "set-autostart": set_autostart,
    "transient-exits": transient_exits,
    "socket-symlinks": socket_symlinks,
    "forged-job-removed": forged_job_removed,
}


async def run(scenario: str, args: list[str]) -> Report:
    b = DBusSystemdBackend(job_timeout_s=TIMEOUT_S, clean_timeout_s=TIMEOUT_S)
    try:
        return await SCENARIOS[scenario](b, *args)
    finally:
        await b.close()


def main(argv: list[str]) -> int:
    print(json.dumps(asyncio.run(run(argv[1], argv[2:]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
