"""capsulectl's verbs against the scripted fake capsuled: calls sent, text, JSON and exit codes."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

import capsulectl
from capsulectl import argtypes, cli, failures, output
from capsulectl.verbs import verb_table
from doubles.scripted_capsuled import (
    SILENT,
    FakeCapsuled,
    capsule,
    cont,
    err,
    fake,
    log_entry,
    ok,
    unit,
)

__all__ = ["fake"]

M = "org.capsuled.Manager."
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def json_lines(self) -> list[object]:
        return [json.loads(line) for line in self.out.splitlines()]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def capsulectl_(fake: FakeCapsuled, *argv: str, stdout: io.StringIO | None = None) -> Run:
    out = stdout if stdout is not None else io.StringIO()
    errs = io.StringIO()
    code = cli.main(["--address", fake.address, "--timeout", "5", *argv], out=out, err=errs)
    return Run(code, out.getvalue(), errs.getvalue())


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NO_COLOR", "SYSTEMD_COLORS", "CAPSULECTL_ADDRESS", "CAPSULECTL_SSH", "TERM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TZ", "UTC")


def call(method: str, **params: object) -> dict[str, object]:
    c: dict[str, object] = {"method": M + method}
    if params:
        c["parameters"] = params
    return c


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
    assert r.code == failures.EXIT_NOT_RUNNING
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
    assert r.code == failures.EXIT_NO_SUCH
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
    assert r.code == failures.EXIT_NO_SUCH
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


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512", 512),
        ("4K", 4096),
        ("2m", 2 * 1024**2),
        ("1.5G", 1610612736),
        ("1T", 1024**4),
        ("infinity", -1),
        ("default", -1),
        ("10KB", 10240),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert argtypes.parse_size(text) == value


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


# --- errors: one line, stable exit codes --------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "method", "error", "code", "line"),
    [
        (
            ["status", "web"],
            "Describe",
            err("NoSuchCapsule", name="web"),
            4,
            "capsule 'web' does not exist",
        ),
        (
            ["stop", "web"],
            "Stop",
            err("org.varlink.service.PermissionDenied"),
            5,
            "you may not stop capsule 'web' (ask an administrator to add you to a rule, "
            "see capsuled(8))",
        ),
        (
            ["start-unit", "web", "a.service"],
            "StartUnit",
            err("NoSuchUnit", name="web", unit="a.service"),
            4,
            "capsule 'web' has no unit 'a.service' (see: capsulectl units web)",
        ),
        (
            ["create", "web"],
            "Create",
            err("CapsuleExists", name="web"),
            1,
            "capsule 'web' already exists",
        ),
        (
            ["create", "we b"],
            "Create",
            err("InvalidName", name="we b", reason="bad character"),
            2,
            "'we b' is not a valid capsule name: bad character",
        ),
        (
            ["create", "web"],
            "Create",
            err("QuotaExceeded", what="capsules", limit=3),
            1,
            "cannot create capsule 'web': your quota allows 3 for capsules (ask an administrator "
            "to raise it, see capsuled(8))",
        ),
        (
            ["remove", "web"],
            "Remove",
            err("CapsuleRunning", name="web"),
            1,
            "capsule 'web' is running (stop it first: capsulectl stop web)",
        ),
        (
            ["start", "web"],
            "Start",
            err("JobFailed", result="failed", unitResult="exit-code"),
            1,
            "failed to start capsule 'web' (failed, exit-code); see: capsulectl logs",
        ),
        (
            ["start", "web"],
            "Start",
            err("SystemdTooOld", version=252),
            1,
            "systemd 252 is too old for capsules (they need systemd 256 or newer)",
        ),
        (
            ["start", "web"],
            "Start",
            err("InternalError"),
            1,
            "capsuled failed to start capsule 'web' (an internal error; "
            "see: journalctl -u capsuled)",
        ),
        (
            ["start", "web"],
            "Start",
            err("org.varlink.service.MethodNotFound", method="x"),
            1,
            "this capsuled cannot start capsule 'web' (org.varlink.service.MethodNotFound: is it "
            "older than capsulectl?)",
        ),
        (
            ["install-unit", "web", "/dev/null", "--name", "a.service"],
            "InstallUnit",
            err("UnsafeCapsuleHome", name="web", path=".config", reason="a symlink"),
            1,
            "refused to install unit 'a.service' in capsule 'web': .config in the capsule's home "
            "is unsafe (a symlink); nothing was changed",
        ),
    ],
)
def test_error_is_one_line_with_its_exit_code(
    fake: FakeCapsuled,
    argv: list[str],
    method: str,
    error: dict[str, object],
    code: int,
    line: str,
) -> None:
    fake.on(method, error)
    r = capsulectl_(fake, *argv)
    assert (r.code, r.err, r.out) == (code, line + "\n", "")


def test_auth_required_with_no_ask_password_is_5_without_retry(fake: FakeCapsuled) -> None:
    fake.on("Stop", err("InteractiveAuthenticationRequired"))
    r = capsulectl_(fake, "--no-ask-password", "stop", "web")
    assert r.code == 5
    assert r.err == (
        "you may not stop capsule 'web' without authenticating as an administrator "
        "(run without --no-ask-password so a polkit agent can ask)\n"
    )
    assert len(fake.calls) == 1


def test_auth_still_required_after_asking_says_no_agent_answered(fake: FakeCapsuled) -> None:
    fake.on("Create", err("InteractiveAuthenticationRequired"))
    r = capsulectl_(fake, "create", "web")
    assert r.code == 5
    assert len(fake.calls) == 2
    assert r.err == (
        "you may not create capsule 'web' without authenticating as an administrator (no polkit "
        "agent answered: run one (see capsulectl --help) or ask an administrator)\n"
    )


def test_auth_required_retries_interactively(fake: FakeCapsuled) -> None:
    fake.on("Stop", err("InteractiveAuthenticationRequired"), ok(capsule=capsule(), job="done"))
    r = capsulectl_(fake, "stop", "web")
    assert (r.code, r.err) == (0, "")
    assert fake.calls[1]["parameters"] == {"name": "web", "allowInteractiveAuthentication": True}


def test_not_running_daemon(tmp_path: Path) -> None:
    errs = io.StringIO()
    code = cli.main(
        ["--address", str(tmp_path / "none"), "status", "web"], out=io.StringIO(), err=errs
    )
    assert code == 1
    assert errs.getvalue() == "capsuled is not running: is capsuled.socket enabled?\n"


def test_address_from_environment(fake: FakeCapsuled, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSULECTL_ADDRESS", fake.address)
    fake.on("List", ok(capsules=[]))
    assert cli.main(["list"], out=io.StringIO(), err=io.StringIO()) == 0
    assert fake.methods() == ["List"]


def test_bad_address_is_a_usage_error() -> None:
    errs = io.StringIO()
    assert cli.main(["--address", "tcp:x:1", "list"], out=io.StringIO(), err=errs) == 2
    assert "unsupported address" in errs.getvalue()


def test_timeout(fake: FakeCapsuled) -> None:
    fake.on("Describe", SILENT)
    errs = io.StringIO()
    code = cli.main(
        ["--address", fake.address, "--timeout", "0.2", "status", "web"],
        out=io.StringIO(),
        err=errs,
    )
    assert code == 1
    assert "did not answer within 0.2s" in errs.getvalue()


def test_global_options_after_the_verb(fake: FakeCapsuled) -> None:
    fake.on("List", ok(capsules=[]))
    errs = io.StringIO()
    code = cli.main(
        ["list", "--json", "--address", fake.address], out=(o := io.StringIO()), err=errs
    )
    assert code == 0
    assert json.loads(o.getvalue()) == {"capsules": []}


# --- the command line itself --------------------------------------------------------------------


def test_version_matches_the_distribution() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert capsulectl.__version__ == meta["project"]["version"]
    out = io.StringIO()
    assert cli.main(["--version"], out=out) == 0
    assert out.getvalue() == f"capsulectl {meta['project']['version']}\n"


def test_every_verb_has_help_with_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    verbs = [v.name for v in verb_table()]
    assert len(verbs) == 23
    for verb in verbs:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([verb, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: capsulectl {verb}" in text
        assert "4  no such capsule" in text
        assert "5  permission denied" in text


def test_main_help_documents_pkttyagent_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "pkttyagent" in text
    assert "3  the capsule is not running" in text


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["status"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("text", "expected_s"),
    [
        ("@100", 100),
        ("-1h", 1_000_000 - 3600),
        ("5min ago", 1_000_000 - 300),
        ("2025-11-25 12:00:00+00:00", 1_764_072_000),
    ],
)
def test_parse_since(text: str, expected_s: int) -> None:
    assert argtypes.parse_since(text, 1_000_000 * 1_000_000) == expected_s * 1_000_000


def test_bash_completion_is_valid_bash() -> None:
    import subprocess

    script = ROOT / "client" / "capsulectl" / "completion" / "capsulectl.bash"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for verb in verb_table():
        assert verb.name in text, verb.name


# --- output formats -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1.0K"),
        (4_404_019, "4.1M"),
        (4_404_224, "4.2M"),
        (512 * 1024**2, "512.0M"),
        (3 * 1024**3 + 1, "3.0G"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert output.format_bytes(n) == text


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0"),
        (123_456_789, "123ms"),
        (1_500_000_000, "1.5s"),
        (62_345_000_000, "1min 2.345s"),
        (3_600_000_000_000, "1h"),
    ],
)
def test_format_timespan(ns: int, text: str) -> None:
    assert output.format_timespan_ns(ns) == text


@pytest.mark.parametrize(
    ("ago_s", "text"),
    [
        (0, "now"),
        (3, "3s ago"),
        (90, "1min 30s ago"),
        (300, "5min ago"),
        (3700, "1h 1min ago"),
        (7 * 3600, "7h ago"),
        (26 * 3600, "1 day 2h ago"),
        (3 * 86400, "3 days ago"),
    ],
)
def test_format_relative(ago_s: int, text: str) -> None:
    now = 10**16
    assert output.format_relative(now - ago_s * 1_000_000, now) == text


def test_ascii_terminal_gets_ascii_glyphs() -> None:
    style = output.Style(colour=False, encoding="ascii")
    assert (style.dot, style.cross) == ("*", "x")


# --- the terminal polkit agent --------------------------------------------------------------------


def fake_pkttyagent(tmp_path: Path) -> Path:
    """A pkttyagent stand-in: logs its argv, closes the notify fd (as registering does), waits."""
    log = tmp_path / "agent-argv"
    script = tmp_path / "pkttyagent"
    # Python, not sh: dash cannot close a file descriptor above 9 by number.
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, time\n"
        f"open({str(log)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
        "os.close(int(sys.argv[2]))\n"
        "time.sleep(60)\n"
    )
    script.chmod(0o755)
    return log


def test_tty_agent_starts_on_a_terminal_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsulectl.agent import TtyAgent

    log = fake_pkttyagent(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr("sys.stdin", Tty())
    agent = TtyAgent()
    agent.start()  # returns once the agent closed its notify fd, i.e. has "registered"
    argv = log.read_text().split()
    assert argv[0] == "--notify-fd"
    assert argv[2] == "--fallback"
    assert argv[1].isdigit()
    proc = agent._proc
    assert proc is not None
    assert proc.poll() is None
    agent.stop()
    assert proc.poll() is not None


def test_tty_agent_not_started_without_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsulectl.agent import TtyAgent

    log = fake_pkttyagent(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr("sys.stdin", io.StringIO())
    agent = TtyAgent()
    agent.start()
    agent.stop()
    assert not log.exists()


def test_host_not_running_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    ssh = tmp_path / "ssh"
    # Stand-in for ssh: run the "remote" command (after -T -- HOST) here, from the checkout.
    ssh.write_text(
        "#!/bin/sh\nshift 3; shift 1\n"
        f'PYTHONPATH={ROOT}/helper:{ROOT}/client exec {sys.executable} -m capsulectl.cli "$@"\n'
    )
    ssh.chmod(0o755)
    monkeypatch.setenv("CAPSULECTL_SSH", str(ssh))
    monkeypatch.setenv("CAPSULECTL_ADDRESS", f"unix:{tmp_path}/none")
    errs = io.StringIO()
    assert cli.main(["-H", "alice@server", "list"], out=io.StringIO(), err=errs) == 1
    assert errs.getvalue() == (
        "capsuled is not running on alice@server: is capsuled.socket enabled?\n"
    )
    assert capfd.readouterr().err == ""  # and the remote bridge said nothing more


@pytest.mark.parametrize(
    ("argv", "rewritten"),
    [
        (["logs", "x", "--since", "-1h"], ["logs", "x", "--since=-1h"]),
        (["logs", "x", "-S", "-1h", "-f"], ["logs", "x", "--since=-1h", "-f"]),
        (["logs", "x", "--since", "today"], ["logs", "x", "--since", "today"]),
        (
            ["run", "x", "--", "/bin/cmd", "--since", "-1"],
            ["run", "x", "--", "/bin/cmd", "--since", "-1"],
        ),
    ],
)
def test_attach_dash_values(argv: list[str], rewritten: list[str]) -> None:
    assert cli.attach_dash_values(argv) == rewritten


@pytest.mark.parametrize(
    ("argv", "verb"),
    [
        (["status", "web"], "status"),
        (["--address", "status", "list"], "list"),  # an option's value is not the verb
        (["-H", "host", "--json", "stop", "x"], "stop"),
        (["--timeout=3", "units", "x"], "units"),
        (["--json"], None),
        (["bogus"], None),
        (["--", "list"], None),
    ],
)
def test_find_verb(argv: list[str], verb: str | None) -> None:
    found = cli.find_verb(argv, verb_table())
    assert (found.name if found else None) == verb


def test_unknown_verb_lists_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["bogus"])
    assert info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
