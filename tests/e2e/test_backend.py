"""capsuled.systemd against real systemd (257, and the newest): PID 1 over the system bus, a
capsule's manager over its private socket, as root inside the testbed with the installed wheel.

Every check of the backend contract (tests/contract/backend.py) runs here against
DBusSystemdBackend, as it runs against FakeBackend in tests/contract: the fake cannot drift from
what this suite sees systemd do. Where a check recorded systemd's own view (systemctl show, the
file system), SYSTEMD_VIEW below holds it to what systemd must say. The tests after it need what
the fake cannot model at all (real exits and signals, symlinks planted by the capsule, forged
signals, a reboot); their programs are e2e/inbed/backend_systemd.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from contract.backend import CHECKS
from testbed import Testbed

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
Observed = dict[str, object]


def in_bed(bed: Testbed, module: str, *args: str) -> Observed:
    """Run e2e.inbed.MODULE ARGS as root; its JSON document."""
    res = bed.run_module("root", f"e2e.inbed.{module}", *args, timeout=180).check()
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert isinstance(out, dict)
    return out


def show(bed: Testbed, name: str, *props: str) -> dict[str, str]:
    res = bed.as_root("systemctl", "show", "-p", ",".join(props), f"capsule@{name}.service")
    return dict(line.split("=", 1) for line in res.check().stdout.splitlines())


def gone(bed: Testbed, path: str) -> bool:
    return bed.as_root("test", "-e", path).returncode == 1


# --- the contract, against PID 1 ----------------------------------------------------------------


def version_is_pid1s(bed: Testbed, name: str, seen: Observed) -> None:
    assert seen["version"] == bed.systemd_version  # D-Bus to PID 1 vs. systemctl --version


def start_restart_stop_and_list(bed: Testbed, name: str, seen: Observed) -> None:
    assert seen["uid"] == seen["run_owner"]  # the dynamic uid owns /run/capsules/NAME
    assert seen["after_stop"] == {"ActiveState": "inactive"}
    assert show(bed, name, "ActiveState")["ActiveState"] == "inactive"


def clean_refuses_a_running_capsule_then_deletes_its_state(
    bed: Testbed, name: str, seen: Observed
) -> None:
    assert seen["dirs_while_running"] == [True, True]
    assert seen["dirs_after"] == [False, False]
    for path in (f"/var/lib/private/capsules/{name}", f"/var/lib/capsules/{name}"):
        assert gone(bed, path), path


def limits_are_set_refused_out_of_range_reset_and_forgotten(
    bed: Testbed, name: str, seen: Observed
) -> None:
    assert seen["set"] == {"MemoryMax": str(256 * MIB), "TasksMax": "77", "CPUWeight": "300"}
    assert seen["dropin"] is True  # persistent, in /etc/systemd/system.control, not /run
    assert seen["reset"] == {
        "MemoryMax": str(256 * MIB),  # None: left unchanged
        "TasksMax": "infinity",
        "CPUWeight": "[not set]",
    }
    assert seen["forgotten"] == {
        "MemoryMax": "infinity",
        "TasksMax": "infinity",
        "CPUWeight": "[not set]",
    }
    assert seen["dropins_after_forget"] is False
    assert gone(bed, f"/etc/systemd/system.control/capsule@{name}.service.d")
    assert show(bed, name, "MemoryMax")["MemoryMax"] == "infinity"


def an_autostart_link_alone_makes_a_capsule(bed: Testbed, name: str, seen: Observed) -> None:
    assert seen["link"] is True
    assert seen["wanted_by"] == {"WantedBy": "multi-user.target"}
    assert seen["link_after"] is False


# What systemd itself says after a check, for the checks that recorded something of it.
SYSTEMD_VIEW: dict[str, Callable[[Testbed, str, Observed], None]] = {
    f.__name__: f
    for f in (
        version_is_pid1s,
        start_restart_stop_and_list,
        clean_refuses_a_running_capsule_then_deletes_its_state,
        limits_are_set_refused_out_of_range_reset_and_forgotten,
        an_autostart_link_alone_makes_a_capsule,
    )
}


def test_every_systemd_view_belongs_to_a_check() -> None:
    assert set(SYSTEMD_VIEW) <= set(CHECKS)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_systemd_keeps_the_contract(bed: Testbed, capsule_name: str, check: str) -> None:
    seen = in_bed(bed, "backend_contract", check, capsule_name)
    view = SYSTEMD_VIEW.get(check)
    if view is not None:
        view(bed, capsule_name, seen)


# --- what the fake cannot model ------------------------------------------------------------------


def test_autostart_is_a_wants_link_and_survives_reboot(bed: Testbed, capsule_name: str) -> None:
    unit = f"capsule@{capsule_name}.service"
    link = f"/etc/systemd/system/multi-user.target.wants/{unit}"
    in_bed(bed, "backend_systemd", "set-autostart", capsule_name, "on")
    target = bed.as_root("readlink", link).check().stdout.strip()
    assert target == "/usr/lib/systemd/system/capsule@.service"
    assert bed.as_root("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
    bed.reboot()
    assert bed.as_root("systemctl", "is-active", unit).stdout.strip() == "active"
    in_bed(bed, "backend_systemd", "set-autostart", capsule_name, "off")
    assert bed.as_root("test", "-L", link).returncode == 1
    assert bed.as_root("systemctl", "show", "-p", "WantedBy", unit).stdout.strip() == "WantedBy="


def test_transient_runs_report_real_exits_signals_environment(
    bed: Testbed, capsule_name: str
) -> None:
    bed.as_root("systemctl", "start", f"capsule@{capsule_name}.service").check()
    assert in_bed(bed, "backend_systemd", "transient-exits", capsule_name) == {
        "r-seven.service": ["exit-code", "exited", 7],
        "r-kill.service": ["signal", "killed", 9],
        "r-env.service": ["success", "exited", 0],  # FOO=bar, in /tmp
    }


def test_manager_socket_reached_through_symlink_is_refused(bed: Testbed, capsule_name: str) -> None:
    bed.as_root("systemctl", "start", f"capsule@{capsule_name}.service").check()
    out = in_bed(bed, "backend_systemd", "socket-symlinks", capsule_name)
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
    try:
        out = in_bed(bed, "backend_systemd", "forged-job-removed", capsule_name)
    finally:
        bed.as_root("rm", "-rf", dropin).check()
        bed.as_root("systemctl", "daemon-reload").check()
    assert str(out["job"]).isdigit()
    assert out["forged_rc"] == 0  # the bus let mallory broadcast it
    assert (out["error"], out["result"]) == ("JobFailed", "failed")


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
