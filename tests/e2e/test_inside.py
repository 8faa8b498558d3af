"""Inside a capsule, end to end on systemd 257 and the newest: user units, Run, Logs, Watch,
and the capsule's home as hostile territory (invariant 2)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from e2e.rules import shared_read_rule
from e2e.vcall import call, fails, ok
from testbed import Result, Testbed

pytestmark = pytest.mark.e2e

NO_SUCH = "org.capsuled.Manager.NoSuchCapsule"
T = TypeVar("T")

SERVICE = """\
[Unit]
Description=marker service

[Service]
ExecStart=/bin/sh -c 'echo hello-{marker}; exec sleep infinity'
"""


def poll(predicate: Callable[[], T], timeout_s: float = 20.0, what: str = "condition") -> T:
    """Re-check a condition that systemd makes true asynchronously (journal flush, job end)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def capsule_systemctl(bed: Testbed, name: str, *argv: str) -> Result:
    """`systemctl --user` run as the capsule's own uid against its manager: what systemd
    itself says, without capsuled (`systemctl --capsule` needs a user bus in the capsule,
    which the testbed, like a server without dbus-user-session, does not have)."""
    uid = bed.as_root("stat", "-c", "%u", f"/run/capsules/{name}").check().stdout.strip()
    return bed.as_root(
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "env",
        f"XDG_RUNTIME_DIR=/run/capsules/{name}",
        "systemctl",
        "--user",
        *argv,
    )


def unit_state(bed: Testbed, name: str, unit: str) -> str:
    return capsule_systemctl(bed, name, "is-active", unit).stdout.strip()


def test_enabled_service_starts_with_the_capsule_and_logs(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    marker = name.replace("-", "")
    ok(bed, "alice", "Create", name=name)
    unit = ok(
        bed,
        "alice",
        "InstallUnit",
        name=name,
        unit="web.service",
        content=SERVICE.format(marker=marker),
        enable=True,
    )["unit"]
    assert unit == {
        "name": "web.service",
        "description": None,
        "loadState": "loaded",
        "activeState": "inactive",
        "subState": "dead",
        "enabled": True,
        "hasFile": True,
    }
    # Stopped capsule: ListUnits from the files.
    assert [u["name"] for u in ok(bed, "alice", "ListUnits", name=name)["units"]] == ["web.service"]
    home = f"/var/lib/private/capsules/{name}/.config/systemd/user"
    st = bed.as_root("stat", "-c", "%u:%g %a", f"{home}/web.service").check().stdout.split()
    home_owner = bed.as_root("stat", "-c", "%u:%g", f"/var/lib/private/capsules/{name}").stdout
    assert st == [home_owner.strip(), "644"]

    ok(bed, "alice", "Start", name=name)
    units = {u["name"]: u for u in ok(bed, "alice", "ListUnits", name=name)["units"]}
    assert units["web.service"]["activeState"] == "active"
    assert units["web.service"]["subState"] == "running"
    assert units["web.service"]["enabled"] is True
    # The same, as systemd itself says it.
    assert unit_state(bed, name, "web.service") == "active"

    def marker_logged() -> list[dict[str, Any]]:
        entries = ok(bed, "alice", "Logs", name=name, unit="web.service")["entries"]
        return [e for e in entries if f"hello-{marker}" in e["message"]]

    found = poll(marker_logged, what="the service's output in Logs")
    assert found[0]["unit"] == "web.service"
    # The capsule's whole log has it too; a refused user gets nothing.
    assert any(
        f"hello-{marker}" in e["message"] for e in ok(bed, "alice", "Logs", name=name)["entries"]
    )
    assert fails(bed, "mallory", "Logs", name=name)[0] == NO_SUCH
    assert fails(bed, "bob", "ListUnits", name=name)[0] == NO_SUCH


def test_unit_verbs_as_owner_and_refused(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name, start=True)
    ok(
        bed,
        "alice",
        "InstallUnit",
        name=name,
        unit="job.service",
        content=SERVICE.format(marker="job"),
        start=True,
    )
    assert unit_state(bed, name, "job.service") == ("active")
    stopped = ok(bed, "alice", "StopUnit", name=name, unit="job.service")
    assert stopped["job"] == "done"
    assert stopped["unit"]["activeState"] == "inactive"
    started = ok(bed, "alice", "StartUnit", name=name, unit="job.service")
    assert started["unit"]["activeState"] == "active"
    restarted = ok(bed, "alice", "RestartUnit", name=name, unit="job.service")
    assert restarted["job"] == "done"
    assert restarted["unit"]["activeState"] == "active"
    assert ok(bed, "alice", "EnableUnit", name=name, unit="job.service")["unit"]["enabled"]
    link = (
        f"/var/lib/private/capsules/{name}/.config/systemd/user/capsule@.target.wants/job.service"
    )
    assert bed.as_root("test", "-L", link).returncode == 0
    assert not ok(bed, "alice", "DisableUnit", name=name, unit="job.service")["unit"]["enabled"]
    assert bed.as_root("test", "-e", link).returncode == 1

    for user in ("bob", "mallory"):
        for method in (
            "StartUnit",
            "StopUnit",
            "RestartUnit",
            "EnableUnit",
            "DisableUnit",
            "RemoveUnit",
        ):
            assert fails(bed, user, method, name=name, unit="job.service")[0] == NO_SUCH
        assert (
            fails(bed, user, "InstallUnit", name=name, unit="x.service", content="[Service]\n")[0]
            == NO_SUCH
        )
    assert unit_state(bed, name, "job.service") == ("active")

    assert ok(bed, "alice", "RemoveUnit", name=name, unit="job.service") == {}
    assert (
        bed.as_root(
            "test", "-e", f"/var/lib/private/capsules/{name}/.config/systemd/user/job.service"
        ).returncode
        == 1
    )
    assert unit_state(bed, name, "job.service") != ("active")
    assert fails(bed, "alice", "RemoveUnit", name=name, unit="job.service") == (
        "org.capsuled.Manager.NoSuchUnit",
        {"name": name, "unit": "job.service"},
    )
    assert fails(bed, "alice", "StartUnit", name=name, unit="nothere.service")[0] == (
        "org.capsuled.Manager.NoSuchUnit"
    )


def test_bad_units_are_refused_and_change_nothing(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    err, params = fails(bed, "alice", "InstallUnit", name=name, unit="../x.service", content="")
    assert err == "org.capsuled.Manager.InvalidUnit"
    assert params["unit"] == "../x.service"
    err, params = fails(
        bed,
        "alice",
        "InstallUnit",
        name=name,
        unit="bad.service",
        content="[Service]\nExecStart=/bin/true\nthis is not a key\n",
    )
    assert err == "org.capsuled.Manager.InvalidUnit"
    assert params["line"] == 3
    err, _ = fails(
        bed,
        "alice",
        "InstallUnit",
        name=name,
        unit="big.service",
        content="[Service]\n" + "#" * (65 * 1024) + "\n",
    )
    assert err == "org.capsuled.Manager.InvalidUnit"
    err, _ = fails(
        bed,
        "alice",
        "InstallUnit",
        name=name,
        unit="now.service",
        content="[Service]\n",
        start=True,
    )
    assert err == "org.capsuled.Manager.CapsuleNotRunning"
    assert ok(bed, "alice", "ListUnits", name=name)["units"] == []
    assert fails(bed, "alice", "StartUnit", name=name, unit="x.service")[0] == (
        "org.capsuled.Manager.CapsuleNotRunning"
    )


def test_run_reports_exit_status_and_refuses_others(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    assert fails(bed, "alice", "Run", name=name, command=["/bin/true"])[0] == (
        "org.capsuled.Manager.CapsuleNotRunning"
    )
    ok(bed, "alice", "Start", name=name)
    r = call(bed, "alice", "Run", {"name": name, "command": ["/bin/false"]}, more=True)
    assert r.error is None
    assert r.last["parameters"]["exitStatus"] == 1
    assert r.last["parameters"]["result"] == "exit-code"
    r = call(
        bed, "alice", "Run", {"name": name, "command": ["/bin/true"], "unit": "ok-run"}, more=True
    )
    assert r.last["parameters"] == {"unit": "ok-run.service", "exitStatus": 0, "result": "success"}
    # Without "more": returns once started.
    started = ok(bed, "alice", "Run", name=name, command=["/bin/sleep", "30"], unit="napper")
    assert started["unit"] == "napper.service"
    assert unit_state(bed, name, "napper.service") == ("active")
    # It runs as the capsule's user, not as the caller or root.
    r = call(
        bed,
        "alice",
        "Run",
        {
            "name": name,
            "command": [
                "/bin/sh",
                "-c",
                'test "$(id -u)" = "$(stat -c %u /run/capsules/' + name + ')"',
            ],
        },
        more=True,
    )
    assert r.last["parameters"]["exitStatus"] == 0
    err, params = fails(bed, "alice", "Run", name=name, command=["relative"])
    assert err == "org.capsuled.Manager.InvalidValue"
    assert params["parameter"] == "command"
    for user in ("bob", "mallory"):
        assert fails(bed, user, "Run", name=name, command=["/bin/true"])[0] == NO_SUCH


def test_watch_delivers_start_and_stop_in_order(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    r = bed.run_module("alice", "e2e.inbed.watch", "start-stop", name, timeout=90)
    assert r.returncode == 0, r.stderr
    # A named capsule's units are followed too; this test is about the capsule itself.
    events = [e for e in json.loads(r.stdout) if e["kind"] == "capsule"]
    states = [e["state"] for e in events]
    assert all(e["capsule"] == name for e in events)
    assert states[0] == "inactive"
    active_at = states.index("active")
    assert "inactive" in states[active_at:]
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    # Watch needs "more"; a refused user sees nothing of the capsule.
    assert fails(bed, "alice", "Watch", names=[name])[0] == "org.varlink.service.ExpectedMore"


def test_watch_never_shows_a_capsule_the_caller_may_not_read(
    bed: Testbed, capsule_name: str
) -> None:
    private, shared = capsule_name, "shared-" + capsule_name
    ok(bed, "alice", "Create", name=private)
    ok(bed, "alice", "Create", name=shared)
    try:
        with shared_read_rule(
            bed, lambda: call(bed, "bob", "Describe", {"name": shared}).error is None
        ):
            proc = subprocess.Popen(
                bed.module_command("bob", "e2e.inbed.watch", "hidden", private, shared),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None
            assert proc.stdout is not None
            snapshot = json.loads(proc.stdout.readline())
            assert snapshot["capsule"] == shared
            # Both change state; bob's stream must carry only the one he may read.
            ok(bed, "alice", "Start", name=private)
            ok(bed, "alice", "Start", name=shared)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, _ = proc.communicate(timeout=60)
            events = json.loads(out)
            assert events
            assert {e["capsule"] for e in events} == {shared}
    finally:
        ok(bed, "root", "Remove", name=shared)


# --- invariant 2: the capsule's home is hostile ------------------------------------------


VICTIM_DIR = "/etc/victim"


def _plant(bed: Testbed, name: str, shell: str) -> None:
    """Run shell inside the running capsule, as its own user (the attacker's position)."""
    r = call(bed, "alice", "Run", {"name": name, "command": ["/bin/sh", "-c", shell]}, more=True)
    assert r.last["parameters"]["exitStatus"] == 0, r.last


def _victim_state(bed: Testbed) -> str:
    return bed.as_root(
        "sh",
        "-c",
        f"find {VICTIM_DIR} -printf '%p %u %m %s %T@\\n' | sort; "
        f"md5sum {VICTIM_DIR}/* 2>/dev/null | sort",
    ).stdout


@pytest.mark.parametrize(
    "plant",
    [
        "rm -rf .config && ln -s {victim} .config",
        "mkdir -p .config && rm -rf .config/systemd && ln -s {victim} .config/systemd",
        "mkdir -p .config/systemd && rm -rf .config/systemd/user "
        "&& ln -s {victim} .config/systemd/user",
        "mkdir -p .config/systemd/user && ln -sf {victim}/file .config/systemd/user/evil.service",
        "mkdir -p .config/systemd/user/capsule@.target.wants && ln -s {victim} "
        ".config/systemd/user/capsule@.target.wants/evil.service",
    ],
    ids=["config", "systemd", "user", "unit-path", "wants-link"],
)
def test_planted_symlinks_never_make_root_write_outside(
    bed: Testbed, capsule_name: str, plant: str
) -> None:
    name = capsule_name
    bed.as_root("sh", "-c", f"mkdir -p {VICTIM_DIR} && echo precious > {VICTIM_DIR}/file").check()
    ok(bed, "alice", "Create", name=name, start=True)
    home = f"/var/lib/capsules/{name}"
    _plant(bed, name, f"cd {home} && " + plant.format(victim=VICTIM_DIR))
    before = _victim_state(bed)
    r = call(
        bed,
        "alice",
        "InstallUnit",
        {
            "name": name,
            "unit": "evil.service",
            "content": "[Service]\nExecStart=/bin/true\n",
            "enable": True,
        },
    )
    if plant.startswith("mkdir -p .config/systemd/user/capsule@"):
        # A planted link where ours goes is replaced (rename swaps the entry; the old
        # target is never touched): the unit is installed and enabled, pointing home.
        assert r.error is None, r.last
        wants = f"/var/lib/private/capsules/{name}/.config/systemd/user/capsule@.target.wants"
        target = bed.as_root("readlink", f"{wants}/evil.service").stdout.strip()
        assert target == f"{home}/.config/systemd/user/evil.service"
    else:
        assert r.error == "org.capsuled.Manager.UnsafeCapsuleHome", r.last
        assert r.parameters["reason"]
    call(bed, "alice", "RemoveUnit", {"name": name, "unit": "evil.service"})
    call(bed, "alice", "EnableUnit", {"name": name, "unit": "evil.service"})
    assert _victim_state(bed) == before
    assert bed.as_root("test", "-e", f"{VICTIM_DIR}/evil.service").returncode == 1


def test_planted_hardlink_is_never_written_through(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    bed.as_root("sh", "-c", f"mkdir -p {VICTIM_DIR} && echo precious > {VICTIM_DIR}/hard").check()
    ok(bed, "alice", "Create", name=name)
    userdir = f"/var/lib/private/capsules/{name}/.config/systemd/user"
    # protected_hardlinks stops the capsule from linking root's file itself; plant it as root
    # to prove the helper would not write through one anyway.
    bed.as_root(
        "sh", "-c", f"mkdir -p {userdir} && ln {VICTIM_DIR}/hard {userdir}/hard.service"
    ).check()
    before = _victim_state(bed)
    err, params = fails(
        bed,
        "alice",
        "InstallUnit",
        name=name,
        unit="hard.service",
        content="[Service]\nExecStart=/bin/true\n",
    )
    assert err == "org.capsuled.Manager.UnsafeCapsuleHome"
    assert "hardlink" in params["reason"]
    assert _victim_state(bed) == before
    assert bed.as_root("cat", f"{VICTIM_DIR}/hard").stdout == "precious\n"


def test_watch_follows_the_units_of_a_named_capsule(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    ok(
        bed,
        "alice",
        "InstallUnit",
        name=name,
        unit="web.service",
        content=SERVICE.format(marker="w"),
        enable=True,
    )
    r = bed.run_module("alice", "e2e.inbed.watch", "units", name, timeout=90)
    assert r.returncode == 0, r.stderr
    events = json.loads(r.stdout)
    kinds = [(e["kind"], e["state"]) for e in events]
    assert ("capsule", "active") in kinds
    assert kinds.index(("capsule", "active")) < kinds.index(("unit", "active"))
    assert all(e["capsule"] == name for e in events)
