"""capsulectl starts fast: importing the CLI, and running a verb, loads nothing heavy.

Checked in a fresh interpreter, since this test process has long since imported everything.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from doubles.scripted_capsuled import FakeCapsuled, capsule, err, fake, ok

__all__ = ["fake"]

ROOT = Path(__file__).resolve().parents[2]
# asyncio and jeepney are the server's; `varlink` costs 25 ms (design brief); systemd is
# python-systemd.
FORBIDDEN = ("asyncio", "jeepney", "varlink", "systemd", "capsuled.transport", "capsuled.dispatch")
# Not even the protocol core is needed before a call is made.
NOT_BEFORE_A_CALL = ("capsuled", "capsulectl.client", "json", "socket", "subprocess")


def modules_after(code: str) -> set[str]:
    """Modules that running code loads, beyond what the interpreter's start-up (site) loaded."""
    env = {"PYTHONPATH": f"{ROOT / 'helper'}:{ROOT / 'client'}", "PATH": "/usr/bin:/bin"}
    # The snapshot comes first so that json counts if our code loads it; it is imported for the
    # report only after the difference is taken.
    script = (
        f"import sys\n_before = set(sys.modules)\n{code}\n_new = set(sys.modules) - _before\n"
        "import json\nprint(json.dumps(sorted(_new)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def offenders(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_importing_the_cli_loads_nothing_heavy() -> None:
    modules = modules_after("import capsulectl.cli")
    assert offenders(modules, FORBIDDEN) == []
    assert offenders(modules, NOT_BEFORE_A_CALL) == []


def test_version_loads_nothing_heavy() -> None:
    modules = modules_after("from capsulectl.cli import main; main(['--version'])")
    assert offenders(modules, FORBIDDEN) == []
    assert offenders(modules, NOT_BEFORE_A_CALL) == []


def test_version_is_answered_before_the_verbs_load() -> None:
    modules = modules_after("from capsulectl.cli import main; main(['--version'])")
    assert "capsulectl.cli" in modules  # the check would see them
    assert offenders(modules, ("capsulectl.verbs", "capsulectl.context", "capsulectl.output")) == []


def test_a_real_call_loads_nothing_heavy(fake: FakeCapsuled) -> None:
    fake.on("Describe", ok(capsule=capsule()))
    modules = modules_after(
        "from capsulectl.cli import main\n"
        f"rc = main(['--address', {fake.address!r}, 'status', 'web'])\n"
        "assert rc == 0, rc"
    )
    assert fake.methods() == ["Describe"]  # the call really happened
    assert offenders(modules, FORBIDDEN) == []


def test_the_api_loads_nothing_heavy() -> None:
    modules = modules_after("from capsulectl import Client; Client")
    assert offenders(modules, FORBIDDEN) == []


@pytest.mark.parametrize("name", FORBIDDEN[:4])
def test_the_check_would_notice(name: str) -> None:
    # Guard against a check that cannot fail: a forbidden module imported on purpose is seen.
    if name == "systemd":
        pytest.importorskip("systemd")
    assert offenders(modules_after(f"import {name}"), FORBIDDEN) != []


# The client never parses IDL (interface, service) and needs no dataclasses: dataclasses pulls
# in inspect, and the two with the IDL parser were ~17 ms of a 42 ms `capsulectl status`.
NOT_IN_THE_CLIENT = (
    "dataclasses",
    "inspect",
    "capsuled.varlink.interface",
    "capsuled.varlink.service",
)


def test_building_a_call_loads_no_idl_parser_or_dataclasses() -> None:
    modules = modules_after(
        "import capsulectl.cli\n"
        "from capsuled.varlink.connection import ClientConnection\n"
        "from capsuled.varlink.messages import Call\n"
        "ClientConnection().send(Call('org.example.Test.Ping', {'x': 1}, more=True))"
    )
    assert "capsuled.varlink.messages" in modules  # the call really was built
    assert offenders(modules, NOT_IN_THE_CLIENT) == []


def test_a_real_call_loads_no_idl_parser_or_dataclasses(fake: FakeCapsuled) -> None:
    fake.on("Describe", ok(capsule=capsule()))
    modules = modules_after(
        "from capsulectl.cli import main\n"
        f"rc = main(['--address', {fake.address!r}, 'status', 'web'])\n"
        "assert rc == 0, rc"
    )
    assert fake.methods() == ["Describe"]
    assert offenders(modules, NOT_IN_THE_CLIENT) == []


@pytest.mark.parametrize("code", ["import dataclasses", "import capsuled.varlink.interface"])
def test_the_idl_check_would_notice(code: str) -> None:
    assert offenders(modules_after(code), NOT_IN_THE_CLIENT) != []


# What a command that succeeds never needs: paths (deploy and bundle read files), socket.py's
# wrapper (the transport uses the C socket type), contextlib, the error classes and the
# client's failure table (an error reply loads them), select (only -H waits on pipes).
# Together ~10 ms of a `capsulectl status` (python -X importtime).
NOT_WHEN_IT_WORKS = (
    "pathlib",
    "socket",
    "selectors",
    "contextlib",
    "capsuled.errors",
    "capsulectl.failures",
    "select",
)

# What a plain command line (capsulectl/fastargs.py) no longer loads: argparse with gettext and
# locale, typing, json with re and enum, functools and collections. Together ~25 ms of a 40 ms
# `capsulectl status` in the testbed (python -X importtime), most of its own start-up (issue 12).
NOT_FOR_A_PLAIN_COMMAND = (
    "argparse",
    "gettext",
    "locale",
    "typing",
    "json",
    "re",
    "enum",
    "functools",
    "collections",
)


@pytest.mark.parametrize(
    ("argv", "method", "reply"),
    [
        (["status", "web"], "Describe", ok(capsule=capsule())),
        (["list"], "List", ok(capsules=[capsule(), capsule("b")])),
        (["--json", "list"], "List", ok(capsules=[capsule()])),
        (["--no-legend"], "List", ok(capsules=[capsule()])),  # no verb lists
        (["stop", "web", "b"], "Stop", ok(capsule=capsule(), job="done")),
        (["start", "web"], "Start", ok(capsule=capsule(), job="done")),
        # Values converted by their type= function, without argparse.
        (["--timeout", "5", "status", "web"], "Describe", ok(capsule=capsule())),
        (["logs", "web", "-n", "100"], "Logs", ok(entries=[])),
    ],
    ids=" ".join,
)
def test_a_verb_that_succeeds_loads_no_paths_sockets_or_errors(
    fake: FakeCapsuled, argv: list[str], method: str, reply: object
) -> None:
    fake.on(method, reply)  # type: ignore[arg-type]  # the double's reply type
    modules = modules_without_site(
        "import io\n"
        "from capsulectl.cli import main\n"
        f"rc = main(['--address', {fake.address!r}, *{argv!r}], out=io.StringIO())\n"
        "assert rc in (0, 3), rc"
    )
    assert method in fake.methods()  # the call really happened
    assert offenders(modules, NOT_WHEN_IT_WORKS) == []
    # These are plain command lines (capsulectl/fastargs.py), so no parser either.
    assert offenders(modules, NOT_FOR_A_PLAIN_COMMAND) == []


def test_an_error_reply_still_raises_its_own_class(fake: FakeCapsuled) -> None:
    # The error classes load with the error: the CLI still says what the helper meant.
    fake.on("Describe", err("org.capsuled.Manager.NoSuchCapsule", name="web"))
    modules = modules_after(
        "import io\n"
        "from capsulectl.cli import main\n"
        "err = io.StringIO()\n"
        f"rc = main(['--address', {fake.address!r}, 'status', 'web'], err=err)\n"
        "assert rc == 4, (rc, err.getvalue())\n"
        "assert 'does not exist' in err.getvalue(), err.getvalue()"
    )
    assert "capsuled.errors" in modules
    assert "capsulectl.failures" in modules  # the check above would notice it


# What `capsulectl --version` may load beyond the interpreter's start-up: the package and its
# cli module (and __future__ for their annotations). argparse, typing, re and the failure table
# were ~15 ms of it, as much as the interpreter itself (issue 12).
VERSION_MODULES = {"__future__", "capsulectl", "capsulectl.cli"}
LAUNCHER = ROOT / "client" / "scripts" / "capsulectl"


def run_launcher(*argv: str) -> str:
    """The installed launcher's code, run as the script would be (its exit caught: os._exit,
    which cli.exit_with ends with, raises SystemExit here, so the report can follow)."""
    return (
        "import os\nos._exit = sys.exit\n"
        f"sys.argv = ['capsulectl', *{list(argv)!r}]\n"
        f"try:\n    exec(compile(open({str(LAUNCHER)!r}).read(), 'capsulectl', 'exec'), {{}})\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code"
    )


def test_version_loads_only_the_package_and_its_cli() -> None:
    assert modules_after("from capsulectl.cli import main; main(['--version'])") <= (
        VERSION_MODULES
    )


def test_the_launcher_adds_nothing_to_version() -> None:
    modules = modules_after(run_launcher("--version"))
    assert "capsulectl.cli" in modules  # it really ran
    assert modules <= VERSION_MODULES


def test_the_launcher_check_would_notice_an_import() -> None:
    # argparse pulls in re (unless site did): what pip's generated launcher paid for.
    modules = modules_after(run_launcher("--version") + "\nimport argparse")
    assert not modules <= VERSION_MODULES


def test_capsulectl_is_installed_from_the_launcher_not_a_console_script() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "capsulectl" not in meta["project"]["scripts"]
    assert meta["tool"]["setuptools"]["script-files"] == ["client/scripts/capsulectl"]
    assert LAUNCHER.stat().st_mode & 0o111
    assert LAUNCHER.read_text().startswith("#!/usr/bin/python3\n")  # pip/pybuild rewrite it


def modules_without_site(code: str) -> set[str]:
    """Every module loaded once code has run under `python3 -S` (this host's site may import
    shutil, typing or re itself), read before anything is imported for the report."""
    env = {"PYTHONPATH": f"{ROOT / 'helper'}:{ROOT / 'client'}", "PATH": "/usr/bin:/bin"}
    script = f"{code}\nimport sys\nprint(repr(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-S", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return set(ast.literal_eval(done.stdout.splitlines()[-1]))


def test_building_the_parser_imports_no_shutil() -> None:
    # argparse's HelpFormatter imports shutil (and with it bz2 and lzma) for the terminal
    # width unless given one, and add_argument makes a formatter for every option.
    modules = modules_without_site(
        "from capsulectl.cli import build_parser; build_parser('status')"
    )
    assert "argparse" in modules
    assert offenders(modules, ("shutil", "bz2", "lzma")) == []


def test_the_shutil_check_would_notice() -> None:
    assert "shutil" in modules_without_site("import argparse; argparse.HelpFormatter('x')")


def test_the_help_width_is_the_terminals_as_shutil_reports_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    from capsulectl.cli import terminal_columns

    for columns in ("57", "", "0", "x"):
        monkeypatch.setenv("COLUMNS", columns)
        assert terminal_columns() == shutil.get_terminal_size().columns


def test_a_status_call_imports_no_pathlib_or_shutil(fake: FakeCapsuled) -> None:
    # pathlib is for the verbs that take files (deploy, bundle); ~4 ms of every other command.
    fake.on("Describe", ok(capsule=capsule()))
    modules = modules_without_site(
        "from capsulectl.cli import main\n"
        f"rc = main(['--address', {fake.address!r}, 'status', 'web'])\n"
        "assert rc == 0, rc"
    )
    assert fake.methods() == ["Describe"]
    assert offenders(modules, ("pathlib", "shutil")) == []


def test_the_plain_command_check_would_notice(fake: FakeCapsuled) -> None:
    # An abbreviation (--jso for --json) is argparse's to parse, so it is loaded.
    fake.on("Describe", ok(capsule=capsule()))
    modules = modules_without_site(
        "import io\n"
        "from capsulectl.cli import main\n"
        f"main(['--address', {fake.address!r}, 'status', '--jso', 'web'], "
        "out=io.StringIO())"
    )
    assert "argparse" in offenders(modules, NOT_FOR_A_PLAIN_COMMAND)
