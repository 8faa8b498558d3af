"""What a failed capsulectl prints and exits with (capsulectl/failures.py): one line on stderr, a
stable exit status, for error replies and for a capsuled that cannot be reached."""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import pytest
from cli_fixtures import capsulectl_, plain_env

from capsulectl import cli, failures
from capsuled import errors
from capsuled.varlink import errors as varlink_errors
from capsuled.varlink.errors import VarlinkError, error_class, error_from_name
from capsuled.varlink.interface import Maybe, Primitive, VarlinkType, parse_interface
from doubles.scripted_capsuled import (
    SILENT,
    FakeCapsuled,
    capsule,
    err,
    fake,
    ok,
)

__all__ = ["fake", "plain_env"]  # fixtures, re-exported for pytest


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


# --- the table: every error capsuled can answer with has its own line --------------------------

IDL_PATH = Path(errors.__file__).parent / "org.capsuled.Manager.varlink"


def declared_error_classes() -> set[type[VarlinkError]]:
    """The wire error classes (those naming one) of capsuled.errors and capsuled.varlink.errors."""
    return {
        cls
        for module in (errors, varlink_errors)
        for cls in vars(module).values()
        if inspect.isclass(cls) and issubclass(cls, VarlinkError) and "name" in cls.__dict__
    }


def test_every_error_class_has_an_explanation() -> None:
    assert set(failures.explanations()) == declared_error_classes()


def test_the_check_sees_the_classes() -> None:
    # Guard against a comparison of two empty sets: the IDL's errors are among them.
    names = {cls.name for cls in declared_error_classes()}
    idl = parse_interface(IDL_PATH.read_text(encoding="utf-8"))
    assert {f"{errors.INTERFACE}.{short}" for short in idl.errors} <= names
    assert varlink_errors.PermissionDenied.name in names


def sample(t: VarlinkType, field: str) -> object:
    """A value of IDL type t that shows up recognisably in a message."""
    if isinstance(t, Maybe):
        return sample(t.inner, field)
    if isinstance(t, Primitive) and t.kind == "int":
        return 7
    return f"<{field}>"


IDL_ERRORS = parse_interface(IDL_PATH.read_text(encoding="utf-8")).errors


@pytest.mark.parametrize("short", sorted(IDL_ERRORS))
@pytest.mark.parametrize("optional", ["given", "null"])
def test_each_idl_error_gets_one_specific_line(short: str, optional: str) -> None:
    fields = IDL_ERRORS[short].parameters.fields
    params = {
        f: None if optional == "null" and isinstance(t, Maybe) else sample(t, f) for f, t in fields
    }
    cls = error_class(f"{errors.INTERFACE}.{short}")
    assert cls is not None
    line, code = failures.explain_error(cls(**params), "frob capsule 'web'", asked=False)
    assert "\n" not in line
    assert "?" not in line  # no parameter missing
    assert "None" not in line
    assert errors.INTERFACE not in line  # a sentence, not the generic "failed to ...: NAME"
    assert code in (1, 2, 3, 4, 5)


def test_busy_says_try_again() -> None:
    line, code = failures.explain_error(errors.Busy(), "watch capsules")
    assert (line, code) == (
        "cannot watch capsules now: capsuled is busy (too many calls or streams running, yours "
        "or everyone's, or another call on the same capsule); try again later",
        1,
    )


def test_an_unknown_error_is_named() -> None:
    exc = error_from_name("org.example.Future.NewError", {"x": 1})
    assert failures.explain_error(exc, "start capsule 'web'") == (
        "failed to start capsule 'web': org.example.Future.NewError",
        1,
    )
