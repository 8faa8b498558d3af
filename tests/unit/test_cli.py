"""capsulectl's command line (capsulectl/cli.py): global options, the parser, help, version, and
where the verb is found."""

from __future__ import annotations

import argparse
import io
import json
import sys
import tomllib
from pathlib import Path

import pytest
from cli_fixtures import ROOT, plain_env

import capsulectl
import capsuled
from capsulectl import cli, verbs
from capsulectl.context import Context
from capsulectl.verbs import verb_table
from doubles.scripted_capsuled import (
    FakeCapsuled,
    fake,
    ok,
)

__all__ = ["fake", "plain_env"]  # fixtures, re-exported for pytest


def test_address_from_environment(fake: FakeCapsuled, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSULECTL_ADDRESS", fake.address)
    fake.on("List", ok(capsules=[]))
    assert cli.main(["list"], out=io.StringIO(), err=io.StringIO()) == 0
    assert fake.methods() == ["List"]


def test_bad_address_is_a_usage_error() -> None:
    errs = io.StringIO()
    assert cli.main(["--address", "tcp:x:1", "list"], out=io.StringIO(), err=errs) == 2
    assert "unsupported address" in errs.getvalue()


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
    assert capsuled.__version__ == meta["project"]["version"]  # the helper's GetInfo, --version
    out = io.StringIO()
    assert cli.main(["--version"], out=out) == 0
    assert out.getvalue() == f"capsulectl {meta['project']['version']}\n"


def test_every_verb_has_help_with_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    verbs = [v.name for v in verb_table()]
    assert len(verbs) == 29
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


def test_bash_completion_is_valid_bash() -> None:
    import subprocess

    script = ROOT / "client" / "capsulectl" / "completion" / "capsulectl.bash"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for verb in verb_table():
        assert verb.name in text, verb.name


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


# --- a verb is one declaration in verbs.py ------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def test_the_parser_has_the_declared_verbs_in_order() -> None:
    declared = [v.name for v in verb_table()]
    assert list(subcommands(cli.build_parser())) == declared
    assert len(set(declared)) == len(declared)
    for verb in verb_table():
        assert verb.summary
        assert verb.description
    # The shared shapes name no verb.
    assert not {type(v) for v in verb_table()} & {verbs.Verb, verbs.OnCapsules, verbs.OnUnit}


def test_declaring_a_verb_is_the_whole_edit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(verbs, "_VERBS", list(verbs._VERBS))  # the new verb leaves with the test

    class Greet(verbs.Verb):
        name = "greet"
        summary = "say hello"
        description = "Says hello to someone."

        def arguments(self, p: argparse.ArgumentParser) -> None:
            p.add_argument("--who", default="world")

        def run(self, ctx: Context) -> int:
            ctx.print(f"hello {ctx.args.who}")
            return 7

    assert [v.name for v in verb_table()][-1] == "greet"
    out = io.StringIO()
    assert cli.main(["greet", "--who", "alice", "--json"], out=out) == 7
    assert out.getvalue() == "hello alice\n"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "say hello" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["greet", "--help"])
    text = capsys.readouterr().out
    assert "Says hello to someone." in text
    assert "5  permission denied" in text


@pytest.mark.parametrize("shape", ["Verb", "OnCapsules", "OnUnit"])
def test_a_verb_missing_an_abstract_method_is_refused_when_declared(
    monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    # Verb is a plain class (ABCMeta slowed every start-up); its check stands in for ABC's.
    monkeypatch.setattr(verbs, "_VERBS", list(verbs._VERBS))
    base = getattr(verbs, shape)
    missing = {"Verb": "arguments, run", "OnCapsules": "act", "OnUnit": "call"}[shape]
    with pytest.raises(TypeError, match=f"verb Half does not define {missing}$"):
        type("Half", (base,), {"name": "half", "summary": "s", "description": "d"})
    assert "half" not in [v.name for v in verb_table()]


class _Execed(Exception):
    pass


@pytest.mark.parametrize(
    ("argv", "flag", "remote"),
    [
        (
            ["run", "web", "--pty", "-E", "A=b c", "--", "/bin/cmd", "a b"],
            "-t",
            ["run", "web", "--pty", "'--setenv=A=b c'", "--", "/bin/cmd", "'a b'"],
        ),
        (["run", "web", "-P", "--", "/bin/tar", "c", "."], "-T", None),
        (["shell", "web"], "-t", ["shell", "web", "--"]),
        (["systemctl", "web", "--", "cat", "x.service"], None, None),
    ],
)
def test_over_ssh_the_interactive_verbs_run_capsulectl_on_the_host(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], flag: str | None, remote: list[str] | None
) -> None:
    execed: list[list[str]] = []

    def execvp(path: str, args: list[str]) -> None:
        execed.append(args)
        raise _Execed

    monkeypatch.setattr("os.execvp", execvp)
    monkeypatch.setenv("CAPSULECTL_SSH", "myssh -o X=1")
    with pytest.raises(_Execed):
        cli.main(["-H", "alice@server", *argv], out=io.StringIO(), err=io.StringIO())
    (args,) = execed
    assert args[:2] == ["myssh", "-o"]
    assert args[3] in ("-t", "-T")
    if flag is not None:
        assert args[3] == flag
    assert args[4:7] == ["--", "alice@server", "capsulectl"]
    if remote is not None:
        assert args[7:] == remote
