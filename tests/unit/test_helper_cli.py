"""`capsuled`'s command line (capsuled/cli.py): a socket-activated start (no arguments) skips
argparse and must serve exactly what the parser would have asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import capsuled
from capsuled import cli
from capsuled.daemon import Options

ROOT = Path(__file__).resolve().parents[2]


def test_no_arguments_are_the_parsers_defaults() -> None:
    assert cli.options_from(cli._parser().parse_args([])) == Options()


def test_the_parser_still_reads_each_option() -> None:
    args = cli._parser().parse_args(["--max-connections", "64", "--idle-exit-sec", "5"])
    options = cli.options_from(args)
    assert (options.limits.max_connections, options.idle_exit_s) == (64, 5.0)
    assert options != Options()  # the equality above can fail


def test_version_is_answered_without_the_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"capsuled {capsuled.__version__}\n"


def test_a_socket_activated_start_loads_no_argparse_ssl_or_metadata() -> None:
    # Without a socket the start stops at serving (exit 1), after the wiring was built.
    # What site loaded is left out (this host's site imports more than Debian's does).
    code = (
        "import sys\n_before = set(sys.modules)\n"
        "from capsuled.cli import main\n"
        "rc = main([])\n"
        "_new = {m for m in set(sys.modules) - _before if sys.modules[m] is not None}\n"
        "import json\nprint(json.dumps([rc, sorted(_new)]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(ROOT / "helper"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    rc, loaded = json.loads(done.stdout.splitlines()[-1])
    assert rc == 1
    assert "capsuled.methods.context" in loaded  # the wiring really was built
    for module in ("argparse", "ssl", "_ssl", "importlib.metadata", "email"):
        assert module not in loaded, module
