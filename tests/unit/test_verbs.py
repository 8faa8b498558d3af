"""capsulectl's verbs (capsulectl/verbs.py) against the scripted fake capsuled: calls sent, text,
JSON and exit codes."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from cli_fixtures import M, Tty, call, capsulectl_, plain_env

from capsulectl import context
from doubles.scripted_capsuled import (
    FakeCapsuled,
    capsule,
    cont,
    err,
    fake,
    log_entry,
    ok,
    unit,
)

__all__ = ["fake", "plain_env"]  # fixtures, re-exported for pytest


# --- list / status ------------------------------------------------------------------------------


def test_list_prints_a_table_sorted_by_name(fake: FakeCapsuled) -> None:
    reply = {
        "capsules": [
            capsule("web"),
            capsule("db", state="inactive", subState="dead", memoryCurrent=None, tasksCurrent=None),
        ]
    }
    fake.on("List", ok(**reply))
    r = capsulectl_(fake, "list")
    assert r.code == 0
    assert r.err == ""
    assert r.out.splitlines() == [
        "NAME ACTIVE   SUB     OWNER AUTOSTART MEMORY TASKS UNITS",
        "db   inactive dead    alice yes       -      -     2",
        "web  active   running alice yes       4.2M   3     2",
        "",
        "2 capsules listed.",
    ]
    assert fake.calls == [call("List")]


def test_list_json_is_the_reply(fake: FakeCapsuled) -> None:
    reply = {"capsules": [capsule("web")]}
    fake.on("List", ok(**reply))
    r = capsulectl_(fake, "--json", "list")
    assert r.code == 0
    assert r.json_lines == [reply]


def test_list_quiet_and_no_legend(fake: FakeCapsuled) -> None:
    fake.on("List", ok(capsules=[capsule("b"), capsule("a")]))
    assert capsulectl_(fake, "list", "-q").out == "b\na\n"
    lines = capsulectl_(fake, "list", "--no-legend").out.splitlines()
    assert [line.split()[0] for line in lines] == ["a", "b"]


def test_no_verb_lists(fake: FakeCapsuled) -> None:
    fake.on("List", ok(capsules=[]))
    r = capsulectl_(fake)
    assert r.code == 0
    assert r.out.endswith("0 capsules listed.\n")


STATUS_RUNNING = [
    "● web - capsule (owner alice)",
    "     Loaded: capsule@web.service (data in /var/lib/capsules/web)",
    "     Active: active (running) since Tue 2025-11-25 12:00:00 UTC; {rel}",
    "        UID: 61234 (c-web)",
    "      Tasks: 3 (limit: 100)",
    "     Memory: 4.2M (max: 512.0M)",
    "        CPU: 123ms",
    "      Units: 2",
    "  Autostart: yes",
]


def test_status_of_running_capsule(fake: FakeCapsuled) -> None:
    fake.on("Describe", ok(capsule=capsule()))
    r = capsulectl_(fake, "status", "web")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert re.fullmatch(r".*; .+ ago", lines[2])
    rel = lines[2].split("; ", 1)[1]
    assert lines == [line.format(rel=rel) for line in STATUS_RUNNING]
    assert fake.calls == [call("Describe", name="web")]


def test_status_of_stopped_capsule_exits_3(fake: FakeCapsuled) -> None:
    stopped = capsule(
        state="inactive",
        subState="dead",
        uid=None,
        memoryCurrent=None,
        tasksCurrent=None,
        cpuUsageNSec=None,
        tasksMax=None,
        memoryMax=None,
        since=None,
        autostart=False,
    )
    fake.on("Describe", ok(capsule=stopped))
    r = capsulectl_(fake, "status", "web")
    assert r.code == context.EXIT_NOT_RUNNING
    assert r.out.splitlines() == [
        "● web - capsule (owner alice)",
        "     Loaded: capsule@web.service (data in /var/lib/capsules/web)",
        "     Active: inactive (dead)",
        "      Units: 2",
        "  Autostart: no",
    ]


def test_status_of_failed_capsule_shows_result(fake: FakeCapsuled) -> None:
    failed = capsule(state="failed", subState="failed", result="exit-code", since=None)
    fake.on("Describe", ok(capsule=failed))
    r = capsulectl_(fake, "status", "web")
    assert r.code == 3
    assert r.out.splitlines()[0] == "\u00d7 web - capsule (owner alice)"  # systemd's cross mark
    assert r.out.splitlines()[2] == "     Active: failed (failed) (Result: exit-code)"


def test_status_json_equals_reply_and_keeps_exit_code(fake: FakeCapsuled) -> None:
    reply = {"capsule": capsule(state="inactive", subState="dead")}
    fake.on("Describe", ok(**reply))
    r = capsulectl_(fake, "status", "web", "--json")
    assert r.code == 3
    assert r.json_lines == [reply]


def test_status_of_several_reports_missing_one(fake: FakeCapsuled) -> None:
    fake.on("Describe", ok(capsule=capsule("a")), err("NoSuchCapsule", name="b"))
    r = capsulectl_(fake, "status", "a", "b")
    assert r.code == context.EXIT_NO_SUCH
    assert r.err == "capsule 'b' does not exist\n"
    assert r.out.startswith("● a - capsule")


def test_status_colour_only_on_a_tty(fake: FakeCapsuled, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.on("Describe", ok(capsule=capsule()))
    assert "\x1b[" in capsulectl_(fake, "status", "web", stdout=Tty()).out
    assert "\x1b[" not in capsulectl_(fake, "status", "web").out
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in capsulectl_(fake, "status", "web", stdout=Tty()).out
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("SYSTEMD_COLORS", "0")
    assert "\x1b[" not in capsulectl_(fake, "status", "web", stdout=Tty()).out


# --- mutating verbs: silent, JSON is the reply --------------------------------------------------

SIMPLE = [
    # argv, method, sent params, reply
    (["create", "web"], "Create", {"name": "web"}, {"capsule": capsule()}),
    (
        ["create", "web", "--start"],
        "Create",
        {"name": "web", "start": True},
        {"capsule": capsule()},
    ),
    (["start", "web"], "Start", {"name": "web"}, {"capsule": capsule(), "job": "done"}),
    (["stop", "web"], "Stop", {"name": "web"}, {"capsule": capsule(), "job": "done"}),
    (["restart", "web"], "Restart", {"name": "web"}, {"capsule": capsule(), "job": "done"}),
    (["remove", "web"], "Remove", {"name": "web"}, {}),
    (["remove", "web", "--keep-data"], "Remove", {"name": "web", "keepData": True}, {}),
    (["enable", "web"], "SetAutostart", {"name": "web", "enabled": True}, {"capsule": capsule()}),
    (["disable", "web"], "SetAutostart", {"name": "web", "enabled": False}, {"capsule": capsule()}),
    (
        [
            "set-limits",
            "web",
            "--memory-max",
            "512M",
            "--tasks-max",
            "infinity",
            "--cpu-weight",
            "200",
        ],
        "SetLimits",
        {"name": "web", "memoryMax": 536870912, "tasksMax": -1, "cpuWeight": 200},
        {"capsule": capsule()},
    ),
    (
        ["set-limits", "web", "--memory-max", "1.5G"],
        "SetLimits",
        {"name": "web", "memoryMax": 1610612736},
        {"capsule": capsule()},
    ),
    (["remove-unit", "web", "a.service"], "RemoveUnit", {"name": "web", "unit": "a.service"}, {}),
    (
        ["start-unit", "web", "a.service"],
        "StartUnit",
        {"name": "web", "unit": "a.service"},
        {"unit": unit("a.service"), "job": "done"},
    ),
    (
        ["stop-unit", "web", "a.service"],
        "StopUnit",
        {"name": "web", "unit": "a.service"},
        {"unit": unit("a.service"), "job": "done"},
    ),
    (
        ["restart-unit", "web", "a.service"],
        "RestartUnit",
        {"name": "web", "unit": "a.service"},
        {"unit": unit("a.service"), "job": "done"},
    ),
    (
        ["enable-unit", "web", "a.service"],
        "EnableUnit",
        {"name": "web", "unit": "a.service"},
        {"unit": unit("a.service")},
    ),
    (
        ["disable-unit", "web", "a.service"],
        "DisableUnit",
        {"name": "web", "unit": "a.service"},
        {"unit": unit("a.service")},
    ),
]


@pytest.mark.parametrize(("argv", "method", "sent", "reply"), SIMPLE)
def test_mutating_verb_is_silent_and_json_is_the_reply(
    fake: FakeCapsuled,
    argv: list[str],
    method: str,
    sent: dict[str, object],
    reply: dict[str, object],
) -> None:
    fake.on(method, ok(**reply))
    r = capsulectl_(fake, *argv)
    assert (r.code, r.out, r.err) == (0, "", "")
    assert fake.calls == [call(method, **sent)]
    r = capsulectl_(fake, *argv, "--json")
    assert r.code == 0
    assert r.json_lines == [reply]


def test_lifecycle_verbs_take_several_names_and_go_on_after_an_error(fake: FakeCapsuled) -> None:
    fake.on("Stop", err("NoSuchCapsule", name="a"), ok(capsule=capsule("b"), job="done"))
    r = capsulectl_(fake, "stop", "a", "b")
    assert r.code == context.EXIT_NO_SUCH
    assert r.err == "capsule 'a' does not exist\n"
    assert [c["parameters"] for c in fake.calls] == [{"name": "a"}, {"name": "b"}]


def test_set_limits_needs_a_limit(fake: FakeCapsuled) -> None:
    r = capsulectl_(fake, "set-limits", "web")
    assert r.code == 2
    assert "at least one" in r.err
    assert fake.calls == []


@pytest.mark.parametrize("bad", ["12X", "-5", "lots", ""])
def test_set_limits_refuses_bad_sizes(fake: FakeCapsuled, bad: str) -> None:
    with pytest.raises(SystemExit) as info:
        capsulectl_(fake, "set-limits", "web", "--memory-max", bad)
    assert info.value.code == 2
    assert fake.calls == []


# --- units / install-unit -----------------------------------------------------------------------


def test_units_table(fake: FakeCapsuled) -> None:
    units = [
        unit("b.service"),
        unit("a.timer", activeState="inactive", subState="dead", enabled=False, description=None),
        unit("run-u1.service", hasFile=False, enabled=False),
    ]
    fake.on("ListUnits", ok(units=units))
    r = capsulectl_(fake, "units", "web")
    assert r.code == 0
    assert r.out.splitlines() == [
        "UNIT           LOAD   ACTIVE   SUB     ENABLED   DESCRIPTION",
        "a.timer        loaded inactive dead    disabled",
        "b.service      loaded active   running enabled   The app",
        "run-u1.service loaded active   running transient The app",
        "",
        "3 units listed.",
    ]
    assert capsulectl_(fake, "units", "web", "-q").out == "b.service\na.timer\nrun-u1.service\n"
    assert capsulectl_(fake, "units", "web", "--json").json_lines == [{"units": units}]


def test_install_unit_from_file(fake: FakeCapsuled, tmp_path: Path) -> None:
    f = tmp_path / "app.service"
    f.write_text("[Service]\nExecStart=/bin/sleep infinity\n")
    fake.on("InstallUnit", ok(unit=unit()))
    r = capsulectl_(fake, "install-unit", "web", str(f), "--enable", "--now")
    assert (r.code, r.out, r.err) == (0, "", "")
    assert fake.calls == [
        call(
            "InstallUnit",
            name="web",
            unit="app.service",
            content="[Service]\nExecStart=/bin/sleep infinity\n",
            enable=True,
            start=True,
        )
    ]


def test_install_unit_from_stdin_needs_a_name(
    fake: FakeCapsuled, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = capsulectl_(fake, "install-unit", "web", "-")
    assert r.code == 2
    assert "--name" in r.err
    assert fake.calls == []

    class Stdin:
        buffer = io.BytesIO(b"[Service]\n")

    monkeypatch.setattr("sys.stdin", Stdin)
    fake.on("InstallUnit", ok(unit=unit("x.service")))
    r = capsulectl_(fake, "install-unit", "web", "-", "--name", "x.service")
    assert r.code == 0
    assert fake.calls == [call("InstallUnit", name="web", unit="x.service", content="[Service]\n")]


def test_install_unit_missing_file(fake: FakeCapsuled, tmp_path: Path) -> None:
    r = capsulectl_(fake, "install-unit", "web", str(tmp_path / "nope.service"))
    assert r.code == 1
    assert r.err.startswith("cannot read ")
    assert fake.calls == []


def test_install_unit_reports_invalid_unit(fake: FakeCapsuled, tmp_path: Path) -> None:
    f = tmp_path / "app.service"
    f.write_text("garbage\n")
    fake.on("InstallUnit", err("InvalidUnit", unit="app.service", reason="not a section", line=1))
    r = capsulectl_(fake, "install-unit", "web", str(f))
    assert r.code == 2
    assert r.err == "unit 'app.service' is not acceptable: not a section (line 1)\n"


# --- run ----------------------------------------------------------------------------------------


def test_run_without_wait(fake: FakeCapsuled) -> None:
    reply = {"unit": "run-u7.service", "exitStatus": None, "result": None}
    fake.on("Run", ok(**reply))
    r = capsulectl_(
        fake,
        "run",
        "web",
        "-E",
        "A=1",
        "--setenv",
        "B=2",
        "--working-directory",
        "/tmp",
        "-u",
        "job",
        "--",
        "/bin/sh",
        "-c",
        "echo hi",
    )
    assert (r.code, r.out) == (0, "")
    assert r.err == "Running as unit: run-u7.service\n"
    assert fake.calls == [
        call(
            "Run",
            name="web",
            command=["/bin/sh", "-c", "echo hi"],
            unit="job",
            environment=["A=1", "B=2"],
            workingDirectory="/tmp",
        )
    ]
    assert capsulectl_(fake, "--json", "run", "web", "/bin/true").json_lines == [reply]


def test_run_wait_exits_with_the_command_status(fake: FakeCapsuled) -> None:
    replies: list[dict[str, object]] = [
        {"unit": "run-u1.service", "exitStatus": None, "result": None},
        {"unit": "run-u1.service", "exitStatus": 3, "result": "exit-code"},
    ]
    fake.on("Run", [cont(**replies[0]), ok(**replies[1])])
    r = capsulectl_(fake, "run", "web", "--wait", "--", "/bin/sh", "-c", "exit 3")
    assert r.code == 3
    assert "Running as unit: run-u1.service" in r.err
    assert "Finished with result: exit-code" in r.err
    assert fake.calls[0]["more"] is True
    r = capsulectl_(fake, "run", "web", "--wait", "--json", "--", "/bin/false")
    assert r.code == 3
    assert r.json_lines == replies


def test_run_wait_signal_without_status_fails(fake: FakeCapsuled) -> None:
    fake.on("Run", [ok(unit="u.service", exitStatus=None, result="signal")])
    assert capsulectl_(fake, "run", "web", "-W", "/bin/sleep", "1").code == 1


def test_run_on_stopped_capsule(fake: FakeCapsuled) -> None:
    fake.on("Run", err("CapsuleNotRunning", name="web"))
    r = capsulectl_(fake, "run", "web", "/bin/true")
    assert r.code == 3
    assert r.err == "capsule 'web' is not running (start it first: capsulectl start web)\n"


# --- logs / watch -------------------------------------------------------------------------------


def test_logs_plain(fake: FakeCapsuled) -> None:
    entries = [log_entry("one"), log_entry("two", pid=None, identifier=None)]
    fake.on("Logs", ok(entries=entries))
    r = capsulectl_(fake, "logs", "web", "-u", "app.service", "-n", "5", "--since", "@1764072000")
    assert r.code == 0
    assert r.out.splitlines() == [
        "Nov 25 12:00:00 app[42]: one",
        "Nov 25 12:00:00 app.service: two",
    ]
    assert fake.calls == [
        call("Logs", name="web", unit="app.service", lines=5, since=1_764_072_000_000_000)
    ]
    assert capsulectl_(fake, "logs", "web", "--json").json_lines == [{"entries": entries}]


def test_logs_since_accepts_journalctl_relative_times(fake: FakeCapsuled) -> None:
    fake.on("Logs", ok(entries=[]))
    assert capsulectl_(fake, "logs", "web", "--since", "-1h").code == 0
    assert capsulectl_(fake, "logs", "web", "-S", "-5min", "-n", "3").code == 0
    sent = [c["parameters"] for c in fake.calls]
    assert all(isinstance(p, dict) and isinstance(p["since"], int) for p in sent)
    assert sent[1]["lines"] == 3  # type: ignore[index] # checked to be a dict just above


def test_logs_follow_streams_one_json_per_line(fake: FakeCapsuled) -> None:
    replies = [{"entries": [log_entry("a")]}, {"entries": [log_entry("b")]}]
    fake.on("Logs", [cont(**replies[0]), ok(**replies[1])])
    r = capsulectl_(fake, "logs", "web", "-f", "--json")
    assert r.code == 0
    assert r.json_lines == replies
    assert fake.calls == [
        {"method": M + "Logs", "more": True, "parameters": {"name": "web", "follow": True}}
    ]


def test_watch(fake: FakeCapsuled) -> None:
    ev = {
        "kind": "unit",
        "capsule": "web",
        "unit": "app.service",
        "state": "active",
        "subState": "running",
        "timestamp": 1_764_072_000_000_000,
    }
    fake.on("Watch", [cont(event=ev), ok(event={**ev, "kind": "capsule", "unit": None})])
    r = capsulectl_(fake, "watch", "web")
    assert r.code == 0
    assert r.out.splitlines() == [
        "Tue 2025-11-25 12:00:00 UTC web/app.service: active (running)",
        "Tue 2025-11-25 12:00:00 UTC web: active (running)",
    ]
    assert fake.calls == [{"method": M + "Watch", "more": True, "parameters": {"names": ["web"]}}]
    fake.calls.clear()
    capsulectl_(fake, "watch")
    assert fake.calls == [{"method": M + "Watch", "more": True}]


# --- can-i / info -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "sent"),
    [
        (["can-i", "stop", "web"], {"name": "web", "action": "manage", "verb": "stop"}),
        (
            ["can-i", "manage", "web", "--verb", "restart"],
            {"name": "web", "action": "manage", "verb": "restart"},
        ),
        (
            ["can-i", "manage-units", "web", "--unit", "a.service"],
            {"name": "web", "action": "manage-units", "unit": "a.service"},
        ),
        (["can-i", "org.capsuled.run", "web"], {"name": "web", "action": "org.capsuled.run"}),
    ],
)
def test_can_i_sends_action_and_details(
    fake: FakeCapsuled, argv: list[str], sent: dict[str, object]
) -> None:
    fake.on("CheckAccess", ok(access={"result": "yes", "reason": "owner"}))
    r = capsulectl_(fake, *argv)
    assert (r.code, r.out) == (0, "yes (owner)\n")
    assert fake.calls == [call("CheckAccess", **sent)]


@pytest.mark.parametrize(("result", "code"), [("yes", 0), ("no", 1), ("auth_admin", 1)])
def test_can_i_exit_code(fake: FakeCapsuled, result: str, code: int) -> None:
    reply = {"access": {"result": result, "reason": None}}
    fake.on("CheckAccess", ok(**reply))
    r = capsulectl_(fake, "can-i", "start", "web")
    assert (r.code, r.out) == (code, result + "\n")
    r = capsulectl_(fake, "can-i", "start", "web", "--json")
    assert r.code == code
    assert r.json_lines == [reply]


def test_info(fake: FakeCapsuled) -> None:
    info = {
        "version": "0.1.0",
        "systemdVersion": 257,
        "policyBackend": "builtin",
        "callerUid": os.getuid(),
    }
    fake.on("Info", ok(**info))
    fake.on(
        "org.varlink.service.GetInfo",
        ok(
            vendor="v",
            product="p",
            version="1",
            url="u",
            interfaces=["org.varlink.service", M[:-1]],
        ),
    )
    r = capsulectl_(fake, "info")
    assert r.code == 0
    lines = r.out.splitlines()
    assert "Policy backend: builtin" in lines
    assert "       systemd: 257" in lines
    assert "    Interfaces: org.varlink.service, org.capsuled.Manager" in lines
    assert any(line.startswith("        Caller: " + str(os.getuid()) + " (") for line in lines)
    assert capsulectl_(fake, "info", "--json").json_lines == [info]
