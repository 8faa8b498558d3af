"""capsulectl.Client against the scripted fake capsuled: exact calls out, typed replies in."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from capsulectl import Client
from capsulectl.transport import (
    ConnectionLost,
    InvalidAddress,
    NotRunning,
    Timeout,
    parse_address,
)
from capsuled import errors as e
from capsuled.varlink import errors as ve
from doubles.scripted_capsuled import (
    CLOSE,
    SILENT,
    FakeCapsuled,
    audit_record,
    capsule,
    cont,
    deployed,
    err,
    fake,
    log_entry,
    ok,
    raw,
    unit,
)

__all__ = ["fake"]  # the fixture, re-exported for pytest

M = "org.capsuled.Manager."


def client(fake: FakeCapsuled, **kwargs: object) -> Client:
    return Client(fake.address, timeout=5.0, **kwargs)  # type: ignore[arg-type] # test kwargs


def test_the_client_names_the_interface_capsuled_errors_does() -> None:
    # The client spells it out so that capsuled.errors loads only with an error reply.
    from capsulectl import client as client_module

    assert client_module.INTERFACE == e.INTERFACE


# --- every method sends exactly its call and returns the reply parameters -----------------------

CASES: list[
    tuple[str, str, tuple[object, ...], dict[str, object], dict[str, object], dict[str, object]]
] = [
    # (client method, IDL method, args, kwargs, expected call parameters, reply parameters)
    ("list", "List", (), {}, {}, {"capsules": [capsule()]}),
    ("describe", "Describe", ("web",), {}, {"name": "web"}, {"capsule": capsule()}),
    (
        "create",
        "Create",
        ("web",),
        {"start": True},
        {"name": "web", "start": True},
        {"capsule": capsule()},
    ),
    ("create", "Create", ("web",), {}, {"name": "web"}, {"capsule": capsule()}),
    ("start", "Start", ("web",), {}, {"name": "web"}, {"capsule": capsule(), "job": "done"}),
    ("stop", "Stop", ("web",), {}, {"name": "web"}, {"capsule": capsule(), "job": "done"}),
    ("restart", "Restart", ("web",), {}, {"name": "web"}, {"capsule": capsule(), "job": "done"}),
    ("remove", "Remove", ("web",), {"keep_data": True}, {"name": "web", "keepData": True}, {}),
    (
        "set_autostart",
        "SetAutostart",
        ("web", False),
        {},
        {"name": "web", "enabled": False},
        {"capsule": capsule()},
    ),
    (
        "set_limits",
        "SetLimits",
        ("web",),
        {"memory_max": 1024, "cpu_weight": -1},
        {"name": "web", "memoryMax": 1024, "cpuWeight": -1},
        {"capsule": capsule()},
    ),
    (
        "check_access",
        "CheckAccess",
        ("web", "manage"),
        {"verb": "stop"},
        {"name": "web", "action": "manage", "verb": "stop"},
        {"access": {"result": "yes", "reason": "owner"}},
    ),
    ("list_units", "ListUnits", ("web",), {}, {"name": "web"}, {"units": [unit()]}),
    (
        "install_unit",
        "InstallUnit",
        ("web", "a.service", "[Service]\n"),
        {"enable": True},
        {"name": "web", "unit": "a.service", "content": "[Service]\n", "enable": True},
        {"unit": unit("a.service")},
    ),
    (
        "remove_unit",
        "RemoveUnit",
        ("web", "a.service"),
        {},
        {"name": "web", "unit": "a.service"},
        {},
    ),
    (
        "start_unit",
        "StartUnit",
        ("web", "a.service"),
        {},
        {"name": "web", "unit": "a.service"},
        {"unit": unit("a.service"), "job": "done"},
    ),
    (
        "stop_unit",
        "StopUnit",
        ("web", "a.service"),
        {},
        {"name": "web", "unit": "a.service"},
        {"unit": unit("a.service"), "job": "done"},
    ),
    (
        "restart_unit",
        "RestartUnit",
        ("web", "a.service"),
        {},
        {"name": "web", "unit": "a.service"},
        {"unit": unit("a.service"), "job": "done"},
    ),
    (
        "enable_unit",
        "EnableUnit",
        ("web", "a.service"),
        {},
        {"name": "web", "unit": "a.service"},
        {"unit": unit("a.service")},
    ),
    (
        "disable_unit",
        "DisableUnit",
        ("web", "a.service"),
        {},
        {"name": "web", "unit": "a.service"},
        {"unit": unit("a.service")},
    ),
    (
        "run",
        "Run",
        ("web", ["/bin/true"]),
        {"environment": ["A=1"], "working_directory": "/tmp"},
        {
            "name": "web",
            "command": ["/bin/true"],
            "environment": ["A=1"],
            "workingDirectory": "/tmp",
        },
        {"unit": "run-u1.service", "exitStatus": None, "result": None},
    ),
    (
        "logs",
        "Logs",
        ("web",),
        {"unit": "a.service", "lines": 5},
        {"name": "web", "unit": "a.service", "lines": 5},
        {"entries": [log_entry()]},
    ),
    (
        "info",
        "Info",
        (),
        {},
        {},
        {"version": "0.1.0", "systemdVersion": 257, "policyBackend": "builtin", "callerUid": 1000},
    ),
    (
        "deploy",
        "Deploy",
        ("web", b"CPSLBNDL\x00"),
        {"allow_downgrade": True},
        {"name": "web", "bundle": "Q1BTTEJOREwA", "allowDowngrade": True},
        {"capsule": capsule(bundle=deployed()), "deployed": deployed(), "started": ["a.service"]},
    ),
    (
        "rollback",
        "Rollback",
        ("web",),
        {},
        {"name": "web"},
        {"capsule": capsule(bundle=deployed()), "deployed": deployed(), "started": []},
    ),
    (
        "audit",
        "Audit",
        ("web",),
        {"lines": 3},
        {"name": "web", "lines": 3},
        {"records": [audit_record()]},
    ),
    (
        "check_access",
        "CheckAccess",
        ("web", "deploy"),
        {"signer": "release"},
        {"name": "web", "action": "deploy", "signer": "release"},
        {"access": {"result": "no", "reason": "builtin"}},
    ),
]


@pytest.mark.parametrize(("attr", "method", "args", "kwargs", "sent", "reply"), CASES)
def test_method_sends_exact_call_and_returns_reply(
    fake: FakeCapsuled,
    attr: str,
    method: str,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    sent: dict[str, object],
    reply: dict[str, object],
) -> None:
    fake.on(method, ok(**reply))
    with client(fake) as c:
        result = getattr(c, attr)(*args, **kwargs)
    assert result == reply
    expected_call: dict[str, object] = {"method": M + method}
    if sent:
        expected_call["parameters"] = sent
    assert fake.calls == [expected_call]


def test_calls_share_one_connection(fake: FakeCapsuled) -> None:
    fake.on("Describe", ok(capsule=capsule()))
    with client(fake) as c:
        c.describe("web")
        c.describe("web")
    assert fake.connections == 1
    assert len(fake.calls) == 2


def test_get_info_calls_the_service_interface(fake: FakeCapsuled) -> None:
    info = {
        "vendor": "capsuled",
        "product": "capsuled",
        "version": "0.1.0",
        "url": "x",
        "interfaces": ["org.varlink.service", "org.capsuled.Manager"],
    }
    fake.on("org.varlink.service.GetInfo", ok(**info))
    with client(fake) as c:
        assert c.get_info() == info
    assert fake.calls == [{"method": "org.varlink.service.GetInfo"}]


# --- errors -------------------------------------------------------------------------------------


def test_error_reply_raises_its_class_with_parameters(fake: FakeCapsuled) -> None:
    fake.on("Describe", err("NoSuchCapsule", name="web"))
    with client(fake) as c, pytest.raises(e.NoSuchCapsule) as info:
        c.describe("web")
    assert info.value.parameters == {"name": "web"}


def test_service_error_raises_core_class(fake: FakeCapsuled) -> None:
    fake.on("Stop", err("org.varlink.service.PermissionDenied"))
    with client(fake) as c, pytest.raises(ve.PermissionDenied):
        c.stop("web")


def test_unknown_error_name_still_raises_a_varlink_error(fake: FakeCapsuled) -> None:
    fake.on("Stop", err("com.example.Weird", x=1))
    with client(fake) as c, pytest.raises(ve.VarlinkError) as info:
        c.stop("web")
    assert info.value.name == "com.example.Weird"
    assert info.value.parameters == {"x": 1}


def test_connection_survives_an_error_reply(fake: FakeCapsuled) -> None:
    fake.on("Describe", err("NoSuchCapsule", name="x"), ok(capsule=capsule()))
    with client(fake) as c:
        with pytest.raises(e.NoSuchCapsule):
            c.describe("x")
        assert c.describe("web")["capsule"]["name"] == "web"
    assert fake.connections == 1


# --- interactive authentication -----------------------------------------------------------------


def test_interactive_retry_once_with_allow_flag(fake: FakeCapsuled) -> None:
    fake.on("Stop", err("InteractiveAuthenticationRequired"), ok(capsule=capsule(), job="done"))
    prompted: list[bool] = []
    with client(fake, interactive=True, on_interactive=lambda: prompted.append(True)) as c:
        assert c.stop("web")["job"] == "done"
    assert fake.calls == [
        {"method": M + "Stop", "parameters": {"name": "web"}},
        {
            "method": M + "Stop",
            "parameters": {"name": "web", "allowInteractiveAuthentication": True},
        },
    ]
    assert prompted == [True]


def test_interactive_retry_happens_only_once(fake: FakeCapsuled) -> None:
    fake.on("Stop", err("InteractiveAuthenticationRequired"))
    with client(fake, interactive=True) as c, pytest.raises(e.InteractiveAuthenticationRequired):
        c.stop("web")
    assert len(fake.calls) == 2


def test_no_retry_without_interactive(fake: FakeCapsuled) -> None:
    fake.on("Stop", err("InteractiveAuthenticationRequired"))
    with client(fake) as c, pytest.raises(e.InteractiveAuthenticationRequired):
        c.stop("web")
    assert len(fake.calls) == 1


def test_methods_without_the_flag_are_not_retried(fake: FakeCapsuled) -> None:
    # List takes no allowInteractiveAuthentication (IDL): retrying would be InvalidParameter.
    fake.on("List", err("InteractiveAuthenticationRequired"))
    with client(fake, interactive=True) as c, pytest.raises(e.InteractiveAuthenticationRequired):
        c.list()
    assert len(fake.calls) == 1


# --- streams ------------------------------------------------------------------------------------


def test_follow_logs_streams_replies_with_more(fake: FakeCapsuled) -> None:
    fake.on(
        "Logs",
        [
            cont(entries=[log_entry("a")]),
            cont(entries=[log_entry("b")]),
            ok(entries=[log_entry("c")]),
        ],
    )
    with client(fake) as c:
        got = [r["entries"][0]["message"] for r in c.follow_logs("web", lines=2)]
    assert got == ["a", "b", "c"]
    assert fake.calls == [
        {
            "method": M + "Logs",
            "more": True,
            "parameters": {"name": "web", "lines": 2, "follow": True},
        }
    ]


def test_abandoned_stream_closes_connection_and_next_call_reconnects(fake: FakeCapsuled) -> None:
    fake.on("Watch", [cont(event={"kind": "capsule"}), cont(event={"kind": "capsule"})])
    fake.on("Info", ok(version="1", policyBackend="builtin", callerUid=0, systemdVersion=None))
    with client(fake) as c:
        stream = c.watch(["web"])
        next(stream)
        stream.close()  # the second reply is still in flight: it must not answer Info
        assert c.info()["version"] == "1"
    assert fake.connections == 2
    assert fake.calls[0] == {"method": M + "Watch", "more": True, "parameters": {"names": ["web"]}}


def test_run_and_wait_yields_started_then_finished(fake: FakeCapsuled) -> None:
    fake.on(
        "Run",
        [
            cont(unit="run-u1.service", exitStatus=None, result=None),
            ok(unit="run-u1.service", exitStatus=3, result="exit-code"),
        ],
    )
    with client(fake) as c:
        replies = list(c.run_and_wait("web", ["/bin/false"], unit="x"))
    assert [r["exitStatus"] for r in replies] == [None, 3]
    assert fake.calls[0]["more"] is True
    assert fake.calls[0]["parameters"] == {"name": "web", "command": ["/bin/false"], "unit": "x"}


def test_interactive_retry_works_for_streams(fake: FakeCapsuled) -> None:
    fake.on("Logs", err("InteractiveAuthenticationRequired"), [ok(entries=[])])
    with client(fake, interactive=True) as c:
        assert list(c.follow_logs("web")) == [{"entries": []}]
    assert fake.calls[1]["parameters"] == {
        "name": "web",
        "follow": True,
        "allowInteractiveAuthentication": True,
    }


# --- transport failures -------------------------------------------------------------------------


def test_missing_socket_is_not_running(tmp_path: Path) -> None:
    with pytest.raises(NotRunning):
        Client(f"unix:{tmp_path}/nothing", timeout=1).info()


def test_refused_socket_is_not_running(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "dead"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # bound but never listening: ECONNREFUSED, what a stopped capsuled.socket leaves
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with pytest.raises(NotRunning):
        Client(str(path), timeout=1).info()


def test_timeout_when_no_reply(fake: FakeCapsuled) -> None:
    fake.on("Info", SILENT)
    with Client(fake.address, timeout=0.2) as c, pytest.raises(Timeout):
        c.info()


def test_close_without_reply_is_connection_lost(fake: FakeCapsuled) -> None:
    fake.on("Info", [CLOSE])
    with client(fake) as c, pytest.raises(ConnectionLost):
        c.info()


def test_garbage_reply_is_connection_lost(fake: FakeCapsuled) -> None:
    fake.on("Info", [raw(b"not json\0")])
    with client(fake) as c, pytest.raises(ConnectionLost, match="invalid reply"):
        c.info()


def test_reply_split_in_pieces_is_reassembled(fake: FakeCapsuled) -> None:
    msg = b'{"parameters":{"capsule":{"name":"web"}}}\0'
    fake.on("Describe", [raw(msg[:7]), raw(msg[7:20]), raw(msg[20:])])
    with client(fake) as c:
        assert dict(c.describe("web")) == {"capsule": {"name": "web"}}


def test_reply_lacking_a_declared_field_is_refused(fake: FakeCapsuled) -> None:
    fake.on("Describe", ok(other=1))
    with client(fake) as c, pytest.raises(ConnectionLost, match="capsule"):
        c.describe("web")


def test_unsolicited_continues_is_refused(fake: FakeCapsuled) -> None:
    fake.on("Describe", [cont(capsule=capsule())])
    with client(fake) as c, pytest.raises(ConnectionLost):
        c.describe("web")


@pytest.mark.parametrize(
    ("address", "path"),
    [
        ("unix:/run/capsuled/org.capsuled.Manager", "/run/capsuled/org.capsuled.Manager"),
        ("unix:/tmp/s;mode=0666", "/tmp/s"),
        ("/tmp/s", "/tmp/s"),
        ("./rel", "./rel"),
        ("unix:@abstract", "\0abstract"),
    ],
)
def test_parse_address(address: str, path: str) -> None:
    assert parse_address(address) == path


@pytest.mark.parametrize("address", ["tcp:localhost:1", "unix:", "ssh:host", ""])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(InvalidAddress):
        parse_address(address)


# --- -H: ssh + capsulectl --bridge --------------------------------------------------------------


def fake_ssh(tmp_path: Path) -> tuple[Path, Path]:
    """An `ssh` stand-in that logs its argv and runs the remote command locally."""
    log = tmp_path / "ssh-argv"
    script = tmp_path / "ssh"
    helper = Path(__file__).resolve().parents[2]
    script.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" > {log}\n"
        # drop "-T -- HOST", then run the remote command (capsulectl --bridge) from the checkout
        "shift 3; shift 1\n"
        f'PYTHONPATH={helper}/helper:{helper}/client exec {sys.executable} -m capsulectl.cli "$@"\n'
    )
    script.chmod(0o755)
    return script, log


def test_host_runs_ssh_bridge(
    fake: FakeCapsuled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ssh, log = fake_ssh(tmp_path)
    monkeypatch.setenv("CAPSULECTL_SSH", str(ssh))
    monkeypatch.setenv("CAPSULECTL_ADDRESS", fake.address)  # what the "remote" bridge connects to
    fake.on("Describe", ok(capsule=capsule()))
    fake.on("Stop", ok(capsule=capsule(state="inactive"), job="done"))
    with Client(host="alice@server", timeout=10) as c:
        assert c.describe("web")["capsule"]["name"] == "web"
        assert c.stop("web")["job"] == "done"
    assert log.read_text().split("\n")[:-1] == [
        "-T",
        "--",
        "alice@server",
        "capsulectl",
        "--bridge",
    ]
    assert fake.methods() == ["Describe", "Stop"]


def test_host_bridge_reports_remote_not_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ssh, _ = fake_ssh(tmp_path)
    monkeypatch.setenv("CAPSULECTL_SSH", str(ssh))
    monkeypatch.setenv("CAPSULECTL_ADDRESS", f"unix:{tmp_path}/none")
    with Client(host="server", timeout=10) as c, pytest.raises(NotRunning):
        c.info()


def test_host_must_not_look_like_an_option() -> None:
    with pytest.raises(InvalidAddress):
        Client(host="-oProxyCommand=x").info()
