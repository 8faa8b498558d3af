"""The bash completion script: verbs and options from the script, names asked from capsulectl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from capsulectl.verbs import verb_table

SCRIPT = (
    Path(__file__).resolve().parents[2] / "client" / "capsulectl" / "completion" / "capsulectl.bash"
)

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# A stand-in capsulectl (a shell function wins over the command): logs how it was asked and
# answers `list -q` and `units web -q` the way the real one does.
HARNESS = r"""
source "$SCRIPT"
capsulectl() {
    echo "$*" >> "$LOG"
    case "$*" in
        *" list -q") printf 'web\nwebb\ndb\n' ;;
        *" units web -q") printf 'app.service\napi.service\n' ;;
    esac
}
COMP_WORDS=("$@")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE="$*"
_capsulectl
printf '%s\n' "${COMPREPLY[@]}"
"""


def complete(tmp_path: Path, *words: str) -> tuple[list[str], list[str]]:
    """Completions for the command line WORDS (the last one is being typed), and the queries."""
    log = tmp_path / "queries"
    log.write_text("")
    done = subprocess.run(
        ["bash", "-c", HARNESS, "harness", "capsulectl", *words],
        env={"SCRIPT": str(SCRIPT), "LOG": str(log), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return [w for w in done.stdout.splitlines() if w], log.read_text().splitlines()


def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_completes_every_verb(tmp_path: Path) -> None:
    got, queries = complete(tmp_path, "")
    assert sorted(got) == sorted(v.name for v in verb_table())
    assert queries == []  # verbs need no round trip to capsuled


def test_completes_verb_prefix(tmp_path: Path) -> None:
    assert sorted(complete(tmp_path, "st")[0]) == [
        "start",
        "start-unit",
        "status",
        "stop",
        "stop-unit",
    ]


def test_completes_capsule_names_from_capsuled(tmp_path: Path) -> None:
    got, queries = complete(tmp_path, "status", "we")
    assert got == ["web", "webb"]
    assert queries == ["--no-ask-password --timeout 2 list -q"]


def test_names_are_asked_where_the_command_line_points(tmp_path: Path) -> None:
    got, queries = complete(tmp_path, "-H", "alice@server", "stop", "")
    assert got == ["web", "webb", "db"]
    assert queries == ["-H alice@server --no-ask-password --timeout 2 list -q"]


def test_completes_units_of_the_named_capsule(tmp_path: Path) -> None:
    got, queries = complete(tmp_path, "start-unit", "web", "a")
    assert got == ["app.service", "api.service"]
    assert queries == ["--no-ask-password --timeout 2 units web -q"]
    assert complete(tmp_path, "logs", "web", "-u", "")[0] == ["app.service", "api.service"]


def test_only_one_capsule_for_single_name_verbs(tmp_path: Path) -> None:
    assert complete(tmp_path, "set-limits", "web", "")[0] == []
    assert complete(tmp_path, "create", "")[0] == []


def test_completes_options_of_the_verb(tmp_path: Path) -> None:
    got, _ = complete(tmp_path, "logs", "web", "--f")
    assert got == ["--follow"]
    assert "--json" in complete(tmp_path, "status", "--")[0]


def test_completes_can_i_actions(tmp_path: Path) -> None:
    got, _ = complete(tmp_path, "can-i", "ma")
    assert got == ["manage", "manage-units"]
    assert complete(tmp_path, "can-i", "stop", "d")[0] == ["db"]
