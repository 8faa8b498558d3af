"""Methods inside a capsule (ListUnits, InstallUnit, RemoveUnit, Start/Stop/RestartUnit,
Enable/DisableUnit, Run) through the Dispatcher, against FakeBackend and real capsule homes in a
temporary directory (owned by nobody, as systemd 257 leaves them).
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from methods_fixtures import (
    ALICE,
    BOB,
    GOOD_UNIT,
    MALLORY,
    MUTATING_BACKEND_CALLS,
    NOBODY,
    ROOT,
    World,
    config,
    items,
    make_world,
    params_for,
)

from capsuled import errors
from capsuled.audit import MESSAGE_IDS
from capsuled.policy import actions as act
from capsuled.policy.engine import Decision, Rule, Who
from capsuled.varlink.errors import PermissionDenied, VarlinkError

UNIT_METHODS = ("RemoveUnit", "StartUnit", "StopUnit", "RestartUnit", "EnableUnit", "DisableUnit")
INSIDE_METHODS = ("ListUnits", "InstallUnit", *UNIT_METHODS, "Run")
WANTS_TARGET = "/var/lib/capsules/alpha/.config/systemd/user/"
# `outside` stands for root's /etc only when root made it; chown to uid 0 needs root too.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="root-owned files need root")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path).standard()


def unit_of(reply: dict[str, object]) -> dict[str, object]:
    unit = reply["unit"]
    assert isinstance(unit, dict)
    return unit


def tree(path: Path) -> dict[str, bytes | str]:
    """Everything under a directory: file contents and symlink targets, by relative path."""
    found: dict[str, bytes | str] = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            found[str(p.relative_to(path))] = os.readlink(p)
        elif p.is_file():
            found[str(p.relative_to(path))] = p.read_bytes()
    return found


# --- success as the owner and as root -------------------------------------------------------


@pytest.mark.parametrize("uid", [ALICE, ROOT], ids=["owner", "root"])
def test_list_units_of_a_running_capsule(world: World, uid: int) -> None:
    world.backend.capsules["alpha"].units["web.service"].active_state = "active"
    world.backend.capsules["alpha"].units["web.service"].sub_state = "running"
    (unit,) = items(world.run("ListUnits", {"name": "alpha"}, uid=uid).reply, "units")
    assert unit["name"] == "web.service"
    assert unit["hasFile"] is True
    assert (unit["activeState"], unit["subState"], unit["enabled"]) == ("active", "running", False)


def test_list_units_of_a_stopped_capsule_comes_from_its_files(world: World) -> None:
    world.make_home("beta", {"a.service": GOOD_UNIT, "b.timer": "[Timer]\nOnCalendar=daily\n"})
    (world.home("beta") / ".config/systemd/user/.#capsuled.0123.tmp").write_text("junk")
    (world.home("beta") / ".config/systemd/user/not-a-unit").write_text("junk")
    units = items(world.run("ListUnits", {"name": "beta"}, uid=BOB).reply, "units")
    assert [(u["name"], u["activeState"], u["hasFile"]) for u in units] == [
        ("a.service", "inactive", True),
        ("b.timer", "inactive", True),
    ]
    assert "capsule_manager" in world.backend.seen  # asked, and told it is not running


def test_list_units_of_a_capsule_without_a_home_is_empty(world: World) -> None:
    world.own("bare", ALICE)
    world.backend.add_capsule("bare", state="active", has_state_dir=False)
    assert world.run("ListUnits", {"name": "bare"}).reply == {"units": []}


def test_list_units_shows_transient_units_from_run(world: World) -> None:
    # A user manager reports a running transient unit's file as
    # $XDG_RUNTIME_DIR/systemd/transient/UNIT (so does the fake), which is how ListUnits tells
    # it from the capsule's own units.
    world.run("Run", {"name": "alpha", "command": ["/bin/true"], "unit": "job"})
    units = items(world.run("ListUnits", {"name": "alpha"}).reply, "units")
    assert [(u["name"], u["hasFile"]) for u in units] == [
        ("job.service", False),
        ("web.service", True),
    ]


@pytest.mark.parametrize("uid", [ALICE, ROOT], ids=["owner", "root"])
def test_install_unit_writes_the_file_like_the_capsules_own(world: World, uid: int) -> None:
    reply = world.run("InstallUnit", params_for("InstallUnit", "alpha"), uid=uid).reply
    path = world.unit_file("alpha", "new.service")
    assert path.read_text() == GOOD_UNIT
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert unit_of(reply) == {
        "name": "new.service",
        "description": None,  # the fake manager has not loaded it
        "loadState": "loaded",
        "activeState": "inactive",
        "subState": "dead",
        "enabled": False,
        "hasFile": True,
    }
    assert not world.wants_link("alpha", "new.service").is_symlink()
    # No temporary file left behind.
    assert sorted(p.name for p in world.unit_file("alpha", "x").parent.iterdir()) == [
        "new.service",
        "web.service",
    ]


def test_install_unit_replaces_an_existing_file(world: World) -> None:
    text = "[Service]\nExecStart=/bin/true\n"
    world.run("InstallUnit", {"name": "alpha", "unit": "web.service", "content": text})
    assert world.unit_file("alpha", "web.service").read_text() == text


def test_install_unit_enable_links_it_from_capsule_target(world: World) -> None:
    params = {**params_for("InstallUnit", "alpha"), "enable": True}
    assert unit_of(world.run("InstallUnit", params).reply)["enabled"] is True
    link = world.wants_link("alpha", "new.service")
    assert os.readlink(link) == WANTS_TARGET + "new.service"
    assert (link.lstat().st_uid, link.lstat().st_gid) == (NOBODY, NOBODY)


def test_install_unit_start_starts_it(world: World) -> None:
    world.backend.add_unit("alpha", "new.service")  # what the manager's reload would load
    params = {**params_for("InstallUnit", "alpha"), "start": True}
    assert unit_of(world.run("InstallUnit", params).reply)["activeState"] == "active"
    assert world.backend.capsules["alpha"].units["new.service"].active_state == "active"


def test_install_unit_into_a_stopped_capsule(world: World) -> None:
    world.run("InstallUnit", params_for("InstallUnit", "beta"), uid=BOB)
    assert world.unit_file("beta", "new.service").read_text() == GOOD_UNIT


def test_install_unit_start_needs_a_running_capsule_and_changes_nothing(world: World) -> None:
    params = {**params_for("InstallUnit", "beta"), "start": True, "enable": True}
    exc = world.error("InstallUnit", params, uid=BOB)
    assert isinstance(exc, errors.CapsuleNotRunning)
    assert exc.parameters == {"name": "beta"}
    assert tree(world.home("beta")) == {}


@pytest.mark.parametrize("uid", [ALICE, ROOT], ids=["owner", "root"])
def test_remove_unit_stops_disables_and_deletes(world: World, uid: int) -> None:
    world.run("EnableUnit", params_for("EnableUnit", "alpha"))
    asyncio.run(world.backend.start("alpha"))
    web = world.backend.capsules["alpha"].units["web.service"]
    web.active_state = "active"
    assert world.run("RemoveUnit", params_for("RemoveUnit", "alpha"), uid=uid).reply == {}
    assert not world.unit_file("alpha", "web.service").exists()
    assert not world.wants_link("alpha", "web.service").is_symlink()
    assert web.active_state == "inactive"


def test_remove_unit_of_a_stopped_capsule_deletes_the_file(world: World) -> None:
    world.make_home("beta", {"a.service": GOOD_UNIT})
    world.run("RemoveUnit", {"name": "beta", "unit": "a.service"}, uid=BOB)
    assert tree(world.home("beta")) == {}


@pytest.mark.parametrize(
    ("method", "state"),
    [("StartUnit", "active"), ("StopUnit", "inactive"), ("RestartUnit", "active")],
)
@pytest.mark.parametrize("uid", [ALICE, ROOT], ids=["owner", "root"])
def test_unit_jobs(world: World, method: str, state: str, uid: int) -> None:
    if method == "StopUnit":
        world.run("StartUnit", params_for("StartUnit", "alpha"))
    reply = world.run(method, params_for(method, "alpha"), uid=uid).reply
    assert reply["job"] == "done"
    assert unit_of(reply)["activeState"] == state
    assert world.backend.capsules["alpha"].units["web.service"].active_state == state


@pytest.mark.parametrize("uid", [ALICE, ROOT], ids=["owner", "root"])
def test_enable_and_disable_unit(world: World, uid: int) -> None:
    reply = world.run("EnableUnit", params_for("EnableUnit", "alpha"), uid=uid).reply
    assert unit_of(reply)["enabled"] is True
    assert os.readlink(world.wants_link("alpha", "web.service")) == WANTS_TARGET + "web.service"
    # Enabling twice is fine (the link is replaced), disabling twice too.
    world.run("EnableUnit", params_for("EnableUnit", "alpha"), uid=uid)
    for _ in range(2):
        reply = world.run("DisableUnit", params_for("DisableUnit", "alpha"), uid=uid).reply
        assert unit_of(reply)["enabled"] is False
        assert not world.wants_link("alpha", "web.service").is_symlink()


def test_enable_unit_in_a_stopped_capsule(world: World) -> None:
    world.make_home("beta", {"a.service": GOOD_UNIT})
    world.run("EnableUnit", {"name": "beta", "unit": "a.service"}, uid=BOB)
    assert world.home("beta").joinpath(".config/systemd/user/capsule@.target.wants/a.service")


@pytest.mark.parametrize("uid", [ALICE, ROOT], ids=["owner", "root"])
def test_run_without_more_returns_once_started(world: World, uid: int) -> None:
    out = world.run("Run", {"name": "alpha", "command": ["/bin/true"]}, uid=uid)
    assert out.replies == []
    unit = out.reply["unit"]
    assert isinstance(unit, str)
    assert unit.startswith("run-u")
    assert unit.endswith(".service")
    assert (out.reply["exitStatus"], out.reply["result"]) == (None, None)


@pytest.mark.parametrize(
    ("command", "status", "result"),
    [(["/bin/true"], 0, "success"), (["/bin/false", "-x"], 1, "exit-code")],
)
def test_run_with_more_streams_the_exit_status(
    world: World, command: list[str], status: int, result: str
) -> None:
    out = world.run("Run", {"name": "alpha", "command": command, "unit": "job"}, more=True)
    assert out.replies == [{"unit": "job.service", "exitStatus": None, "result": None}]
    assert out.reply == {"unit": "job.service", "exitStatus": status, "result": result}


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", INSIDE_METHODS)
@pytest.mark.parametrize("uid", [MALLORY, BOB], ids=["non-member", "other-member"])
def test_a_caller_who_may_not_read_gets_the_same_reply_for_existing_and_absent(
    world: World, method: str, uid: int
) -> None:
    before = tree(world.home("alpha"))
    replies = []
    for name in ("alpha", "ghost"):
        exc = world.error(method, params_for(method, name), uid=uid)
        replies.append((type(exc), exc.parameters))
    assert replies == [
        (errors.NoSuchCapsule, {"name": "alpha"}),
        (errors.NoSuchCapsule, {"name": "ghost"}),
    ]
    assert world.backend.seen == []
    assert tree(world.home("alpha")) == before
    # Refused changes are audited (invariant 6), under the name asked for, existing or not.
    audited = [(r["CAPSULE"], r["CAPSULED_RESULT"]) for r in world.audit_records]
    if method == "ListUnits":
        assert audited == []
    else:
        assert audited == [("alpha", "denied"), ("ghost", "denied")]


@pytest.mark.parametrize("method", ["InstallUnit", *UNIT_METHODS, "Run"])
@pytest.mark.parametrize(
    ("default", "refusal"),
    [
        (Decision.NO, PermissionDenied),
        (Decision.AUTH_ADMIN, errors.InteractiveAuthenticationRequired),
    ],
)
def test_a_reader_who_may_not_act_inside_gets_the_policy_refusal(
    tmp_path: Path, method: str, default: Decision, refusal: type[VarlinkError]
) -> None:
    reader = Rule(Decision.YES, who=Who(users=frozenset({"bob"})), actions=frozenset({act.READ}))
    world = make_world(tmp_path, policy=config(default=default, rules=[reader])).standard()
    before = tree(world.home("alpha"))
    assert isinstance(world.error(method, params_for(method, "alpha"), uid=BOB), refusal)
    assert world.backend.seen == []
    assert tree(world.home("alpha")) == before
    world.run("ListUnits", {"name": "alpha"}, uid=BOB)  # reading is what the rule allows


def test_a_unit_rule_allows_only_the_units_it_names(tmp_path: Path) -> None:
    bob = Who(users=frozenset({"bob"}))
    rules = [
        Rule(Decision.YES, who=bob, actions=frozenset({act.READ})),
        Rule(Decision.YES, who=bob, actions=frozenset({act.MANAGE_UNITS}), units=("web.*",)),
    ]
    world = make_world(tmp_path, policy=config(rules=rules)).standard()
    world.run("StartUnit", {"name": "alpha", "unit": "web.service"}, uid=BOB)
    world.backend.add_unit("alpha", "db.service")
    exc = world.error("StartUnit", {"name": "alpha", "unit": "db.service"}, uid=BOB)
    assert isinstance(exc, PermissionDenied)


# --- InvalidName, InvalidUnit ---------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a.b", "x" * 30, "a/b", "..", "caf\u00e9"])
@pytest.mark.parametrize("method", INSIDE_METHODS)
@pytest.mark.parametrize("uid", [ROOT, MALLORY], ids=["root", "non-member"])
def test_invalid_names_never_reach_systemd(world: World, method: str, bad: str, uid: int) -> None:
    exc = world.error(method, params_for(method, bad), uid=uid)
    assert isinstance(exc, errors.InvalidName)
    assert exc.parameters["name"] == bad
    assert world.backend.seen == []


BAD_UNITS = [
    "",
    "web",
    "../web.service",
    "a/b.service",
    "web.exe",
    "web@.service",
    ".hidden.service",
    "a..b.service",
    "web service.service",
    "x" * 300 + ".service",
]


@pytest.mark.parametrize("bad", BAD_UNITS)
@pytest.mark.parametrize("method", ["InstallUnit", *UNIT_METHODS])
@pytest.mark.parametrize("uid", [ROOT, MALLORY], ids=["root", "non-member"])
def test_invalid_unit_names_are_refused_before_anything(
    world: World, method: str, bad: str, uid: int
) -> None:
    before = tree(world.home("alpha"))
    exc = world.error(method, {**params_for(method, "alpha"), "unit": bad}, uid=uid)
    assert isinstance(exc, errors.InvalidUnit)
    assert exc.parameters["unit"] == bad
    assert exc.parameters["line"] is None
    assert world.backend.seen == []
    assert tree(world.home("alpha")) == before


@pytest.mark.parametrize("unit", ["x.mount", "x.scope", "x.device", "x.swap", "x.automount"])
def test_install_unit_refuses_types_a_capsule_cannot_use(world: World, unit: str) -> None:
    exc = world.error("InstallUnit", {"name": "alpha", "unit": unit, "content": "[Unit]\n"})
    assert isinstance(exc, errors.InvalidUnit)
    assert exc.parameters["unit"] == unit


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("[Service]\nExecStart=/bin/true\nbogus\n", 3),
        ("ExecStart=/bin/true\n", 1),
        ("[Unit]\nDescription=x\n\n[Socket]\nListenStream=1\n", 4),
        ("[Service]\nExecStart=/bin/\x00true\n", 2),
        ("[Service]\nExecStart=/bin/true\n[Service\n", 3),
        ("[Service]\n=value\n", 2),
        ("# comment\n[Service]\nExec Start=/bin/true\n", 3),
        ("[Service]\nExecStart=/bin/true\n" + "#" * 65536 + "\n", None),
    ],
    ids=[
        "no-equals",
        "outside-section",
        "wrong-section",
        "nul",
        "header",
        "no-key",
        "bad-key",
        "too-big",
    ],
)
def test_install_unit_refuses_unparseable_content_with_its_line(
    world: World, content: str, line: int | None
) -> None:
    before = tree(world.home("alpha"))
    exc = world.error("InstallUnit", {"name": "alpha", "unit": "new.service", "content": content})
    assert isinstance(exc, errors.InvalidUnit)
    assert exc.parameters["unit"] == "new.service"
    assert exc.parameters["line"] == line
    assert isinstance(exc.parameters["reason"], str)
    assert exc.parameters["reason"]
    assert world.backend.seen == []
    assert tree(world.home("alpha")) == before


def test_install_unit_accepts_content_at_the_size_cap(world: World) -> None:
    head = "[Service]\nExecStart=/bin/true\n"
    content = head + "#" * (65536 - len(head) - 1) + "\n"
    assert len(content.encode()) == 65536
    world.run("InstallUnit", {"name": "alpha", "unit": "new.service", "content": content})


# --- CapsuleNotRunning, NoSuchUnit, JobFailed -------------------------------------------------


@pytest.mark.parametrize("method", ["StartUnit", "StopUnit", "RestartUnit", "Run"])
def test_acting_inside_a_stopped_capsule(world: World, method: str) -> None:
    world.make_home("beta", {"web.service": GOOD_UNIT})
    exc = world.error(method, params_for(method, "beta"), uid=BOB)
    assert isinstance(exc, errors.CapsuleNotRunning)
    assert exc.parameters == {"name": "beta"}


@pytest.mark.parametrize("method", UNIT_METHODS)
def test_no_such_unit(world: World, method: str) -> None:
    before = tree(world.home("alpha"))
    exc = world.error(method, {"name": "alpha", "unit": "nope.service"})
    assert isinstance(exc, errors.NoSuchUnit)
    assert exc.parameters == {"name": "alpha", "unit": "nope.service"}
    assert tree(world.home("alpha")) == before


@pytest.mark.parametrize("method", ["StartUnit", "RestartUnit"])
def test_a_failed_unit_job_is_job_failed(world: World, method: str) -> None:
    world.backend.capsules["alpha"].units["web.service"].fail_start = True
    exc = world.error(method, params_for(method, "alpha"))
    assert isinstance(exc, errors.JobFailed)
    assert exc.parameters == {"result": "failed", "unitResult": "exit-code"}
    (record,) = world.audit_records
    assert (record["CAPSULE"], record["CAPSULED_RESULT"]) == ("alpha", "failed")
    assert record["CAPSULED_UNIT"] == "web.service"


def test_run_of_a_missing_binary_is_job_failed(world: World) -> None:
    exc = world.error("Run", {"name": "alpha", "command": ["/usr/bin/missing"]})
    assert isinstance(exc, errors.JobFailed)
    assert exc.parameters == {"result": "failed", "unitResult": "exit-code"}
    (record,) = world.audit_records
    assert (record["CAPSULED_ACTION"], record["CAPSULED_RESULT"]) == ("run", "failed")


def test_unit_methods_on_an_absent_capsule_for_root(world: World) -> None:
    for method in INSIDE_METHODS:
        exc = world.error(method, params_for(method, "ghost"), uid=ROOT)
        assert isinstance(exc, errors.NoSuchCapsule), method
    assert not set(world.backend.seen) & MUTATING_BACKEND_CALLS
    assert not world.home("ghost").exists()


# --- Run's parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "parameter"),
    [
        ({"command": []}, "command"),
        ({"command": ["true"]}, "command"),
        ({"command": ["./true"]}, "command"),
        ({"command": ["/bin/echo", "a\x00b"]}, "command"),
        ({"command": ["/bin/true"] * 4097}, "command"),
        ({"environment": ["NOEQUALS"]}, "environment"),
        ({"environment": ["=value"]}, "environment"),
        ({"environment": ["1A=x"]}, "environment"),
        ({"environment": ["A-B=x"]}, "environment"),
        ({"environment": ["A B=x"]}, "environment"),
        ({"environment": [f"A{i}=x" for i in range(1025)]}, "environment"),
        ({"workingDirectory": "relative"}, "workingDirectory"),
        ({"workingDirectory": "/a\x00b"}, "workingDirectory"),
    ],
)
def test_run_invalid_values(world: World, extra: dict[str, object], parameter: str) -> None:
    exc = world.error("Run", {"name": "alpha", "command": ["/bin/true"], **extra})
    assert isinstance(exc, errors.InvalidValue)
    assert exc.parameters["parameter"] == parameter
    assert world.backend.seen == []


@pytest.mark.parametrize(
    "unit",
    [
        "x.socket",
        "a/b",
        "../x",
        "x@.service",
        "x y",
    ],
)
def test_run_invalid_unit(world: World, unit: str) -> None:
    exc = world.error("Run", {"name": "alpha", "command": ["/bin/true"], "unit": unit})
    assert isinstance(exc, errors.InvalidUnit)
    assert exc.parameters["line"] is None
    assert world.backend.seen == []


def test_run_accepts_valid_environment_and_directory(world: World) -> None:
    world.run(
        "Run",
        {
            "name": "alpha",
            "command": ["/bin/env"],
            "environment": ["A=1", "_B=x=y", "EMPTY="],
            "workingDirectory": "/var/lib/capsules/alpha",
        },
    )


SECRET = "s3cr3t-Token-Value"


def test_run_never_echoes_the_environment(world: World) -> None:
    exc = world.error(
        "Run", {"name": "alpha", "command": ["/bin/true"], "environment": [f"-{SECRET}"]}
    )
    assert SECRET not in repr(exc.parameters)


@pytest.mark.parametrize("more", [False, True])
def test_run_environment_never_reaches_the_audit_log(world: World, more: bool) -> None:
    world.run(
        "Run",
        {"name": "alpha", "command": ["/bin/true"], "environment": [f"TOKEN={SECRET}"]},
        more=more,
    )
    assert [r["CAPSULED_RESULT"] for r in world.audit_records] == (
        ["started", "exited"] if more else ["started"]
    )
    for record in world.audit_records:
        assert record["CAPSULE"] == "alpha"
        assert record["CAPSULED_ACTION"] == "run"
        assert record["CAPSULED_CALLER_UID"] == str(ALICE)
        for value in record.values():
            assert SECRET not in value
            assert "TOKEN" not in value


def test_run_with_a_unit_name_in_use_names_the_unit(world: World) -> None:
    exc = world.error("Run", {"name": "alpha", "command": ["/bin/true"], "unit": "web"})
    assert isinstance(exc, errors.InvalidUnit)
    assert exc.parameters["unit"] == "web.service"


def test_run_refuses_nul_in_the_environment(world: World) -> None:
    exc = world.error(
        "Run", {"name": "alpha", "command": ["/bin/true"], "environment": ["A=x\x00y"]}
    )
    assert isinstance(exc, errors.InvalidValue)
    assert exc.parameters["parameter"] == "environment"


@pytest.mark.parametrize("name", ["\u00c9T\u00c9", "A\u00b2", "X\u0663"])
def test_run_refuses_non_ascii_environment_names(world: World, name: str) -> None:
    exc = world.error(
        "Run", {"name": "alpha", "command": ["/bin/true"], "environment": [f"{name}=1"]}
    )
    assert isinstance(exc, errors.InvalidValue)
    assert exc.parameters["parameter"] == "environment"


# --- systemd too old ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["InstallUnit", "StartUnit", "Run"])
def test_systemd_too_old_refuses_acting_inside(tmp_path: Path, method: str) -> None:
    world = make_world(tmp_path, version=252).standard()
    exc = world.error(method, params_for(method, "alpha"))
    assert isinstance(exc, errors.SystemdTooOld)
    assert exc.parameters == {"version": 252}


def test_systemd_unavailable_inside(world: World) -> None:
    world.backend.unavailable = True
    for method in INSIDE_METHODS:
        exc = world.error(method, params_for(method, "alpha"))
        assert isinstance(exc, errors.SystemdUnavailable), method
    assert not world.unit_file("alpha", "new.service").exists()


# --- a capsule's home is the capsule's: planted links ------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A root-owned directory with a root-owned file, standing for /etc."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "passwd").write_text("root:x:0:0\n")
    (target / "web.service").write_text("root's\n")
    return target


def plant(link: Path, target: Path) -> None:
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        for p in sorted(link.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
        link.rmdir()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)


@needs_root
@pytest.mark.parametrize("where", [".config", ".config/systemd", ".config/systemd/user"])
@pytest.mark.parametrize("method", ["InstallUnit", "RemoveUnit", "EnableUnit", "ListUnits"])
def test_a_planted_directory_symlink_is_refused_and_nothing_outside_changes(
    world: World, outside: Path, where: str, method: str
) -> None:
    plant(world.home("alpha") / where, outside)
    before = tree(outside)
    exc = world.error(method, params_for(method, "alpha"))
    assert isinstance(exc, errors.UnsafeCapsuleHome)
    assert exc.parameters["name"] == "alpha"
    assert where.split("/")[-1] in str(exc.parameters["path"])
    assert tree(outside) == before
    assert all(p.stat().st_uid == 0 for p in outside.iterdir())


def test_a_planted_unit_symlink_is_refused(world: World, outside: Path) -> None:
    plant(world.unit_file("alpha", "web.service"), outside / "web.service")
    before = tree(outside)
    exc = world.error(
        "InstallUnit", {"name": "alpha", "unit": "web.service", "content": "[Unit]\n"}
    )
    assert isinstance(exc, errors.UnsafeCapsuleHome)
    assert tree(outside) == before
    # RemoveUnit does not take a symlink for a unit file, and never follows it.
    exc = world.error("RemoveUnit", {"name": "alpha", "unit": "web.service"})
    assert isinstance(exc, errors.NoSuchUnit)
    assert tree(outside) == before


@needs_root
def test_a_planted_hardlink_is_refused(world: World, outside: Path) -> None:
    unit = world.unit_file("alpha", "web.service")
    unit.unlink()
    os.link(outside / "passwd", unit)
    exc = world.error(
        "InstallUnit", {"name": "alpha", "unit": "web.service", "content": "[Unit]\n"}
    )
    assert isinstance(exc, errors.UnsafeCapsuleHome)
    assert (outside / "passwd").read_text() == "root:x:0:0\n"
    assert (outside / "passwd").stat().st_uid == 0


@needs_root
def test_a_home_with_a_foreign_owner_is_refused(world: World) -> None:
    os.chown(world.home("alpha"), 0, 0)
    exc = world.error("InstallUnit", params_for("InstallUnit", "alpha"))
    assert isinstance(exc, errors.UnsafeCapsuleHome)
    assert not world.unit_file("alpha", "new.service").exists()


def test_install_unit_enable_with_a_planted_wants_link_changes_nothing(
    world: World, outside: Path
) -> None:
    plant(world.home("alpha") / ".config/systemd/user/capsule@.target.wants", outside)
    params = {**params_for("InstallUnit", "alpha"), "enable": True}
    exc = world.error("InstallUnit", params)
    assert isinstance(exc, errors.UnsafeCapsuleHome)
    assert tree(outside) == {"passwd": b"root:x:0:0\n", "web.service": b"root's\n"}
    assert not world.unit_file("alpha", "new.service").exists()


# --- audit ----------------------------------------------------------------------------------

AUDITED = [
    ("InstallUnit", "install-unit"),
    ("RemoveUnit", "remove-unit"),
    ("StartUnit", "start-unit"),
    ("StopUnit", "stop-unit"),
    ("RestartUnit", "restart-unit"),
    ("EnableUnit", "enable-unit"),
    ("DisableUnit", "disable-unit"),
    ("Run", "run"),
]


@pytest.mark.parametrize("uid", [ALICE, ROOT])
@pytest.mark.parametrize(("method", "action"), AUDITED)
def test_every_mutating_call_writes_one_audit_record(
    world: World, method: str, action: str, uid: int
) -> None:
    world.run(method, params_for(method, "alpha"), uid=uid)
    (record,) = world.audit_records
    assert record["CAPSULE"] == "alpha"
    assert record["CAPSULED_ACTION"] == action
    assert record["CAPSULED_CALLER_UID"] == str(uid)
    assert record["CAPSULED_RESULT"] == ("started" if method == "Run" else "ok")
    assert record["MESSAGE_ID"] == MESSAGE_IDS[action]
    if method != "Run":
        assert record["CAPSULED_UNIT"] == params_for(method, "alpha")["unit"]


def test_list_units_is_not_audited(world: World) -> None:
    world.run("ListUnits", {"name": "alpha"})
    assert world.audit_records == []


def test_install_unit_whose_start_fails_is_audited(world: World) -> None:
    world.backend.add_unit("alpha", "new.service").fail_start = True
    params = {**params_for("InstallUnit", "alpha"), "start": True}
    assert isinstance(world.error("InstallUnit", params), errors.JobFailed)
    assert world.unit_file("alpha", "new.service").exists()  # the change that happened
    (record,) = world.audit_records
    assert record["CAPSULED_ACTION"] == "install-unit"
    assert record["CAPSULED_RESULT"] == "failed"
