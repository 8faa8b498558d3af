"""capsuled.systemd against real systemd 257: PID 1 over the system bus, a capsule's manager over
its private socket. Each test runs a short asyncio program inside the testbed as root (the
installed wheel's capsuled.systemd) and checks what it reports against systemd's own view
(`systemctl show`, the filesystem)."""

from __future__ import annotations

import json
import textwrap

import pytest

from testbed import Testbed

pytestmark = pytest.mark.e2e

PRELUDE = """
import asyncio, dataclasses, json, os, subprocess
from capsuled.systemd import errors
from capsuled.systemd.backend import DBusSystemdBackend, LIMIT_DEFAULT

def info_dict(info):
    return None if info is None else dataclasses.asdict(info)

async def expect_error(aw):
    try:
        await aw
    except errors.BackendError as exc:
        return {"error": type(exc).__name__, **{k: v for k, v in vars(exc).items()
                                                 if isinstance(v, (str, int, type(None)))}}
    return {"error": None}

async def _main():
    b = DBusSystemdBackend(job_timeout_s=60, clean_timeout_s=60)
    try:
        out = await main(b)
    finally:
        await b.close()
    print(json.dumps(out))

"""


def in_backend(bed: Testbed, body: str, timeout: float = 120.0) -> dict[str, object]:
    """Run `async def main(b)` (body) inside the testbed as root; return its JSON result."""
    code = PRELUDE + textwrap.dedent(body) + "\nasyncio.run(_main())\n"
    res = bed.python("root", code, timeout=timeout).check()
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert isinstance(out, dict)
    return out


def show(bed: Testbed, name: str, *props: str) -> dict[str, str]:
    res = bed.as_root("systemctl", "show", "-p", ",".join(props), f"capsule@{name}.service")
    return dict(line.split("=", 1) for line in res.check().stdout.splitlines())


def test_version_is_pid1s(bed: Testbed) -> None:
    out = in_backend(bed, "async def main(b): return {'v': await b.check_version()}")
    assert out["v"] == 257


def test_start_restart_stop_and_list(bed: Testbed, capsule_name: str) -> None:
    out = in_backend(
        bed,
        f"""
        async def main(b):
            n = {capsule_name!r}
            r = {{"before": info_dict(await b.capsule_info(n))}}
            r["start"] = await b.start(n)
            r["running"] = info_dict(await b.capsule_info(n))
            r["run_owner"] = os.stat(f"/run/capsules/{{n}}").st_uid
            r["restart"] = await b.restart(n)
            r["listed"] = [c.name for c in await b.list_capsules()]
            r["stop"] = await b.stop(n)
            r["stopped"] = info_dict(await b.capsule_info(n))
            return r
        """,
    )
    assert out["before"] is None
    assert (out["start"], out["restart"], out["stop"]) == ("done", "done", "done")
    running = out["running"]
    assert isinstance(running, dict)
    assert (running["state"], running["sub_state"], running["has_state_dir"]) == (
        "active",
        "running",
        True,
    )
    assert running["uid"] == out["run_owner"]  # the dynamic uid owns /run/capsules/NAME
    assert isinstance(out["listed"], list)
    assert capsule_name in out["listed"]
    stopped = out["stopped"]
    assert isinstance(stopped, dict)
    assert (stopped["state"], stopped["uid"], stopped["has_state_dir"]) == ("inactive", None, True)
    assert show(bed, capsule_name, "ActiveState")["ActiveState"] == "inactive"


def test_capsule_started_with_systemctl_is_listed(bed: Testbed, capsule_name: str) -> None:
    bed.as_root("systemctl", "start", f"capsule@{capsule_name}.service").check()
    out = in_backend(
        bed,
        """
        async def main(b):
            return {c.name: c.state for c in await b.list_capsules()}
        """,
    )
    assert out.get(capsule_name) == "active"


def test_failing_manager_raises_job_failed_with_unit_result(
    bed: Testbed, capsule_name: str
) -> None:
    dropin = f"/etc/systemd/system/capsule@{capsule_name}.service.d"
    bed.as_root("mkdir", "-p", dropin).check()
    bed.as_root(
        "sh", "-c", f"printf '[Service]\\nExecStart=\\nExecStart=/bin/false\\n' > {dropin}/x.conf"
    ).check()
    bed.as_root("systemctl", "daemon-reload").check()
    out = in_backend(
        bed,
        f"""
        async def main(b):
            r = await expect_error(b.start({capsule_name!r}))
            r["info"] = info_dict(await b.capsule_info({capsule_name!r}))
            await b.reset_failed({capsule_name!r})
            r["after_reset"] = (await b.capsule_info({capsule_name!r})).state
            return r
        """,
    )
    assert (out["error"], out["result"], out["unit_result"]) == ("JobFailed", "failed", "exit-code")
    info = out["info"]
    assert isinstance(info, dict)
    assert (info["state"], info["result"]) == ("failed", "exit-code")
    assert out["after_reset"] == "inactive"
    bed.as_root("rm", "-rf", dropin).check()
    bed.as_root("systemctl", "daemon-reload").check()


def test_clean_refuses_running_then_deletes_state(bed: Testbed, capsule_name: str) -> None:
    out = in_backend(
        bed,
        f"""
        async def main(b):
            n = {capsule_name!r}
            await b.start(n)
            r = {{"busy": await expect_error(b.clean(n))}}
            r["dir_while_running"] = os.path.isdir(f"/var/lib/private/capsules/{{n}}")
            await b.stop(n)
            await b.clean(n)
            r["after"] = info_dict(await b.capsule_info(n))
            return r
        """,
    )
    busy = out["busy"]
    assert isinstance(busy, dict)
    assert busy["error"] == "UnitBusy"
    assert out["dir_while_running"] is True
    assert out["after"] is None
    for path in (f"/var/lib/private/capsules/{capsule_name}", f"/var/lib/capsules/{capsule_name}"):
        assert bed.as_root("test", "-e", path).returncode == 1, path


def test_limits_persist_reset_and_forget(bed: Testbed, capsule_name: str) -> None:
    out = in_backend(
        bed,
        f"""
        async def main(b):
            n = {capsule_name!r}
            await b.start(n)
            await b.set_limits(n, memory_max=256 * 1024 * 1024, tasks_max=77, cpu_weight=300)
            i = await b.capsule_info(n)
            return {{"set": [i.memory_max, i.tasks_max, i.cpu_weight],
                     "too_big": await expect_error(b.set_limits(n, cpu_weight=20000)),
                     "zero_tasks": await expect_error(b.set_limits(n, tasks_max=0))}}
        """,
    )
    assert out["set"] == [268435456, 77, 300]
    for key in ("too_big", "zero_tasks"):
        refused = out[key]
        assert isinstance(refused, dict), key
        assert refused["error"] == "InvalidArgument", key
        assert "out of range" in str(refused["text"]), key
    assert show(bed, capsule_name, "MemoryMax", "TasksMax", "CPUWeight") == {
        "MemoryMax": "268435456",
        "TasksMax": "77",
        "CPUWeight": "300",
    }
    dropins = f"/etc/systemd/system.control/capsule@{capsule_name}.service.d"
    assert bed.as_root("test", "-f", f"{dropins}/50-MemoryMax.conf").ok  # persistent, not /run
    in_backend(
        bed,
        f"""
        async def main(b):
            await b.set_limits({capsule_name!r}, tasks_max=LIMIT_DEFAULT, cpu_weight=LIMIT_DEFAULT)
            return {{}}
        """,
    )
    assert show(bed, capsule_name, "MemoryMax", "TasksMax", "CPUWeight") == {
        "MemoryMax": "268435456",  # None: left unchanged
        "TasksMax": "infinity",
        "CPUWeight": "[not set]",
    }
    in_backend(bed, f"async def main(b): await b.forget({capsule_name!r}); return {{}}")
    assert bed.as_root("test", "-e", dropins).returncode == 1
    assert show(bed, capsule_name, "MemoryMax")["MemoryMax"] == "infinity"


def test_autostart_is_a_wants_link_and_survives_reboot(bed: Testbed, capsule_name: str) -> None:
    unit = f"capsule@{capsule_name}.service"
    link = f"/etc/systemd/system/multi-user.target.wants/{unit}"
    out = in_backend(
        bed,
        f"""
        async def main(b):
            await b.set_autostart({capsule_name!r}, True)
            return {{"info": info_dict(await b.capsule_info({capsule_name!r}))}}
        """,
    )
    info = out["info"]
    assert isinstance(info, dict)
    assert info["autostart"] is True
    target = bed.as_root("readlink", link).check().stdout.strip()
    assert target == "/usr/lib/systemd/system/capsule@.service"
    assert bed.as_root("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
    bed.reboot()
    assert bed.as_root("systemctl", "is-active", unit).stdout.strip() == "active"
    in_backend(
        bed, f"async def main(b): await b.set_autostart({capsule_name!r}, False); return {{}}"
    )
    assert bed.as_root("test", "-L", link).returncode == 1
    assert bed.as_root("systemctl", "show", "-p", "WantedBy", unit).stdout.strip() == "WantedBy="


def test_watch_delivers_start_and_stop_in_order(bed: Testbed, capsule_name: str) -> None:
    out = in_backend(
        bed,
        f"""
        async def main(b):
            n = {capsule_name!r}
            driver = DBusSystemdBackend()
            seen = []
            async with b.watch() as events:
                async def drive():
                    await driver.start(n)
                    await driver.stop(n)
                task = asyncio.create_task(drive())
                async with asyncio.timeout(30):
                    async for ev in events:
                        if ev.name == n:
                            seen.append([ev.state, ev.sub_state])
                            if ev.state == "inactive":
                                break
                await task
            await driver.close()
            return {{"seen": seen}}
        """,
    )
    assert out["seen"] == [
        ["activating", "start"],
        ["active", "running"],
        ["deactivating", "stop-sigterm"],
        ["inactive", "dead"],
    ]


def test_capsule_manager_units_and_transient_runs(bed: Testbed, capsule_name: str) -> None:
    out = in_backend(
        bed,
        f"""
        async def main(b):
            n = {capsule_name!r}
            r = {{"stopped": await expect_error(b.capsule_manager(n).__aenter__())}}
            await b.start(n)
            d = f"/var/lib/capsules/{{n}}/.config/systemd/user"
            os.makedirs(d)
            with open(f"{{d}}/hello.service", "w") as f:
                f.write("[Service]\\nExecStart=/bin/sleep infinity\\n")
            async with b.capsule_manager(n) as mgr:
                await mgr.reload()
                units = {{u.name: u for u in await mgr.list_units()}}
                h = units["hello.service"]
                r["listed"] = [h.unit_file_path, h.unit_file_state, h.active_state]
                async with mgr.watch() as events:
                    r["start"] = await mgr.start_unit("hello.service")
                    units = {{u.name: u for u in await mgr.list_units()}}
                    r["running"] = units["hello.service"].active_state
                    r["stop"] = await mgr.stop_unit("hello.service")
                    r["events"] = []
                    async with asyncio.timeout(10):
                        async for ev in events:
                            if ev.unit == "hello.service":
                                r["events"].append([ev.state, ev.sub_state])
                                if ev.state == "inactive":
                                    break
                r["nounit"] = await expect_error(mgr.start_unit("nope.service"))
                runs = {{}}
                for unit, argv in [
                    ("r-false.service", ["/bin/false"]),
                    ("r-seven.service", ["/bin/sh", "-c", "exit 7"]),
                    ("r-kill.service", ["/bin/sh", "-c", "kill -s KILL $$"]),
                    ("r-true.service", ["/bin/true"]),
                ]:
                    await mgr.start_transient(unit, argv, keep=True)
                    s = await mgr.wait_exit(unit, timeout_s=30)
                    runs[unit] = [s.result, s.code, s.status]
                r["runs"] = runs
                r["missing"] = await expect_error(
                    mgr.start_transient("r-missing.service", ["/nonexistent/binary"]))
                await mgr.start_transient(
                    "r-env.service", ["/bin/sh", "-c", 'test "$FOO" = bar && test "$PWD" = /tmp'],
                    ["FOO=bar"], "/tmp", keep=True)
                r["env"] = (await mgr.wait_exit("r-env.service", timeout_s=30)).result
            return r
        """,
    )
    stopped = out["stopped"]
    assert isinstance(stopped, dict)
    assert stopped["error"] == "ManagerUnavailable"
    assert out["listed"] == [
        f"/var/lib/capsules/{capsule_name}/.config/systemd/user/hello.service",
        "static",
        "inactive",
    ]
    assert (out["start"], out["running"], out["stop"]) == ("done", "active", "done")
    # systemd may coalesce activating→active of a Type=simple unit into one signal.
    events = out["events"]
    assert isinstance(events, list)
    assert [e for e in events if e[0] != "activating"] == [
        ["active", "running"],
        ["deactivating", "stop-sigterm"],
        ["inactive", "dead"],
    ]
    nounit = out["nounit"]
    assert isinstance(nounit, dict)
    assert nounit["error"] == "NoSuchUnit"
    assert out["runs"] == {
        "r-false.service": ["exit-code", "exited", 1],
        "r-seven.service": ["exit-code", "exited", 7],
        "r-kill.service": ["signal", "killed", 9],
        "r-true.service": ["success", "exited", 0],
    }
    missing = out["missing"]
    assert isinstance(missing, dict)
    assert (missing["error"], missing["unit_result"]) == ("JobFailed", "exit-code")
    assert out["env"] == "success"


def test_manager_socket_reached_through_symlink_is_refused(bed: Testbed, capsule_name: str) -> None:
    out = in_backend(
        bed,
        f"""
        async def main(b):
            n = {capsule_name!r}
            await b.start(n)
            uid = str((await b.capsule_info(n)).uid)
            def as_capsule(script):
                subprocess.run(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups",
                                "/bin/sh", "-c", script], cwd=f"/run/capsules/{{n}}", check=True)
            async def attempt():
                async with b.capsule_manager(n) as mgr:
                    await mgr.list_units()
            r = {{"plain": await expect_error(attempt())}}
            # The capsule points its socket at PID 1's root-only private bus.
            as_capsule("mv systemd/private systemd/p && ln -s /run/systemd/private systemd/private")
            r["socket_link"] = await expect_error(attempt())
            as_capsule("rm systemd/private && mv systemd/p systemd/private"
                       " && mv systemd sd && ln -s /run/systemd systemd")
            r["dir_link"] = await expect_error(attempt())
            as_capsule("rm systemd && mv sd systemd")
            r["restored"] = await expect_error(attempt())
            return r
        """,
    )
    assert out["plain"] == {"error": None}
    for key, component in (("socket_link", "private"), ("dir_link", "systemd")):
        refused = out[key]
        assert isinstance(refused, dict), key
        assert refused["error"] == "ManagerUnavailable", key
        assert f"{component} is a symlink" in str(refused["reason"]), key
    assert out["restored"] == {"error": None}


def test_forged_job_removed_from_another_user_is_ignored(bed: Testbed, capsule_name: str) -> None:
    """Any bus client may broadcast a JobRemoved; only PID 1's own decides a job's result.

    Both the AddMatch (sender='org.freedesktop.systemd1') and the local filter (PID 1's unique
    name) check the sender; with both removed this test saw start() return "done".
    """
    unit = f"capsule@{capsule_name}.service"
    dropin = f"/etc/systemd/system/{unit}.d"
    bed.as_root("mkdir", "-p", dropin).check()
    # The start job stays pending for a while, then fails: a forged "done" is the only way
    # start() could report success.
    bed.as_root(
        "sh",
        "-c",
        f"printf '[Service]\\nExecStartPre=/bin/sh -c \"sleep 2; exit 1\"\\n' > {dropin}/slow.conf",
    ).check()
    bed.as_root("systemctl", "daemon-reload").check()
    out = in_backend(
        bed,
        f"""
        async def main(b):
            unit = {unit!r}
            async with b.watch() as events:
                task = asyncio.create_task(b.start({capsule_name!r}))
                async with asyncio.timeout(10):
                    async for ev in events:
                        if ev.name == {capsule_name!r} and ev.state == "activating":
                            break
                job = subprocess.run(["systemctl", "show", "-p", "Job", "--value", unit],
                                     capture_output=True, text=True, check=True).stdout.strip()
                forged = subprocess.run(
                    ["setpriv", "--reuid=mallory", "--regid=mallory", "--init-groups",
                     "busctl", "--system", "emit", "/org/freedesktop/systemd1",
                     "org.freedesktop.systemd1.Manager", "JobRemoved", "uoss", job,
                     f"/org/freedesktop/systemd1/job/{{job}}", unit, "done"])
                r = await expect_error(task)
            return {{"job": job, "forged_rc": forged.returncode, **r}}
        """,
    )
    assert str(out["job"]).isdigit()
    assert out["forged_rc"] == 0  # the bus let mallory broadcast it
    assert (out["error"], out["result"]) == ("JobFailed", "failed")
    bed.as_root("rm", "-rf", dropin).check()
    bed.as_root("systemctl", "daemon-reload").check()


def test_running_daemon_holds_only_the_capabilities_and_limits_it_needs(bed: Testbed) -> None:
    """The hardening of units/capsuled.service, as the kernel applies it to the live daemon."""
    bed.as_user("mallory", "varlinkctl", "info", "/run/capsuled/org.capsuled.Manager").check()
    pid = bed.as_root("systemctl", "show", "-p", "MainPID", "--value", "capsuled.service")
    status = bed.as_root("cat", f"/proc/{pid.check().stdout.strip()}/status").check().stdout
    caps = dict(line.split(":\t", 1) for line in status.splitlines() if line.startswith("Cap"))
    # CAP_CHOWN (0), CAP_DAC_OVERRIDE (1), CAP_FOWNER (3): no SETUID/SETGID, no DAC_READ_SEARCH.
    assert int(caps["CapBnd"], 16) == int(caps["CapEff"], 16) == 0b1011
    props = bed.as_root(
        "systemctl",
        "show",
        "capsuled.service",
        "-p",
        "MemoryMax,TasksMax,LimitNOFILE,PrivateIPC,SystemCallFilter",
    ).check()
    shown = dict(line.split("=", 1) for line in props.stdout.splitlines())
    assert shown["MemoryMax"] == str(512 * 1024 * 1024)
    assert shown["TasksMax"] == "64"
    assert shown["LimitNOFILE"] == "16384"
    assert shown["PrivateIPC"] == "yes"
    allowed = set(shown["SystemCallFilter"].split())  # an allow-list: ~@setuid removed these
    setuid_group = {"setuid", "setgid", "setreuid", "setresuid", "setresgid", "setgroups"}
    assert allowed
    assert not allowed & setuid_group
    assert "fchownat" in allowed  # safefs chowns a new symlink through fchownat(AT_EMPTY_PATH)
