"""Methods whose module is imported on first use (capsuled.methods.Deferred): a module that
cannot be imported fails its own methods with InternalError and a log line, and nothing else.

A fresh interpreter shows what a socket-activated start imports; in this process the module
is made unimportable with a None in sys.modules (what Python does for a failed import too).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from methods_fixtures import ALICE, World, make_world

from capsuled import errors, methods
from capsuled.methods import HANDLERS, Deferred

ROOT = Path(__file__).resolve().parents[2]
DEFERRED_MODULES = ("lifecycle", "inside", "streams", "deploy", "trail")


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    # Which failures were logged already is the process's; each test starts with none.
    monkeypatch.setattr(methods, "_UNAVAILABLE", set())
    return make_world(tmp_path).standard()


def test_a_method_whose_module_fails_to_import_answers_internal_error_and_logs_it(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "capsuled.methods.deploy", None)
    with caplog.at_level(logging.ERROR, logger="capsuled.methods"):
        err = world.error("Rollback", {"name": "alpha"})
    assert isinstance(err, errors.InternalError)
    assert any(
        "method Rollback is unavailable: importing capsuled.methods.deploy failed" in r.message
        for r in caplog.records
    )


def test_a_failing_import_is_logged_once_and_its_calls_are_not_audited(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Anyone may call Rollback on any name: were each failure logged and audited (a record
    # and an fsync), a loop of such calls would flood the journal and the trail.
    monkeypatch.setitem(sys.modules, "capsuled.methods.deploy", None)
    world.forget_history()
    with caplog.at_level(logging.ERROR, logger="capsuled.methods"):
        for name in ("alpha", "nosuch", "alpha", "other", "alpha"):
            assert isinstance(world.error("Rollback", {"name": name}), errors.InternalError)
    unavailable = [r for r in caplog.records if "method Rollback is unavailable" in r.message]
    assert len(unavailable) == 1
    assert world.audit_records == []
    # Once it imported again, a new failure is news again.
    monkeypatch.delitem(sys.modules, "capsuled.methods.deploy")
    assert isinstance(HANDLERS["Rollback"], Deferred)
    HANDLERS["Rollback"].resolve()
    monkeypatch.setitem(sys.modules, "capsuled.methods.deploy", None)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="capsuled.methods"):
        world.error("Rollback", {"name": "alpha"})
    assert sum("method Rollback is unavailable" in r.message for r in caplog.records) == 1


def test_only_the_failing_modules_methods_fail(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "capsuled.methods.deploy", None)
    assert isinstance(world.error("Deploy", {"name": "alpha", "bundle": ""}), errors.InternalError)
    # The rest of the helper answers as before: a read, a deferred module that does import,
    # and Info.
    assert world.run("Describe", {"name": "alpha"}).reply["capsule"]
    assert world.run("ListUnits", {"name": "alpha"}, uid=ALICE).reply["units"] is not None
    assert world.run("Info").reply["version"]


def test_the_method_works_again_once_its_module_imports(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "capsuled.methods.trail", None)
        assert isinstance(world.error("Audit", {"name": "alpha"}), errors.InternalError)
    # No failure is remembered: the next call imports the module.
    assert "records" in world.run("Audit", {"name": "alpha"}).reply


def test_every_deferred_entry_names_a_handler_of_its_module() -> None:
    deferred = [h for h in HANDLERS.values() if isinstance(h, Deferred)]
    assert {h.module for h in deferred} == set(DEFERRED_MODULES)
    for h in deferred:
        assert callable(h.resolve()), h


def modules_a_start_loads() -> set[str]:
    """What importing daemon and the method table loads, in a fresh interpreter (this process
    has every module already)."""
    code = (
        "import sys, json\n"
        "from capsuled import methods, daemon\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": f"{ROOT / 'helper'}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return set(json.loads(done.stdout))


def test_a_start_imports_none_of_the_deferred_modules() -> None:
    loaded = modules_a_start_loads()
    assert "capsuled.methods.info" in loaded  # the check sees the table's modules
    for module in DEFERRED_MODULES:
        assert f"capsuled.methods.{module}" not in loaded
    # Nor the wire types, nor the bundle code (read with a trusted key or a bundle only).
    for module in ("terminal", "unitfile", "verify", "wire", "bundle"):
        assert f"capsuled.{module}" not in loaded


def test_a_start_loads_no_libcrypto() -> None:
    # hashlib and hmac (which secrets imports) load OpenSSL's libcrypto, ~5 ms of a cold start;
    # only writing an audit record or reading a bundle needs SHA-256.
    loaded = modules_a_start_loads()
    for module in ("hashlib", "_hashlib", "hmac", "secrets"):
        assert module not in loaded
