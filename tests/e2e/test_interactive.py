"""Interactive use of a capsule, end to end with real ptys and pipes in the testbed: shell,
run --pty and --pipe, systemctl; who is refused; what the helper keeps of the fds (nothing)."""

from __future__ import annotations

import json

import pytest

from e2e.test_inside import capsule_systemctl
from e2e.vcall import ok
from testbed import Testbed

pytestmark = pytest.mark.e2e

TIMEOUT_S = 120.0
MIB = 1024 * 1024


def on_pty(
    bed: Testbed, user: str, typed: str | dict[str, object], *argv: str
) -> dict[str, object]:
    """capsulectl ARGV as USER on a fresh pty in the bed, INPUT typed once it has started."""
    r = bed.run_module(
        user, "e2e.inbed.interactive", "pty", json.dumps(typed), *argv, timeout=TIMEOUT_S
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert isinstance(result, dict)
    return result


def with_pipes(bed: Testbed, user: str, size: int, *argv: str) -> dict[str, object]:
    r = bed.run_module(user, "e2e.inbed.interactive", "pipe", str(size), *argv, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert isinstance(result, dict)
    return result


@pytest.fixture
def running(bed: Testbed, capsule_name: str) -> str:
    ok(bed, "alice", "Create", name=capsule_name, start=True)
    return capsule_name


def test_shell_is_a_login_shell_as_the_capsules_user_on_its_own_terminal(
    bed: Testbed, running: str
) -> None:
    name = running
    typed = 'id -un; tty; echo "home=$HOME rt=$XDG_RUNTIME_DIR term=$TERM"; exit 7\r'
    result = on_pty(bed, "alice", typed, "shell", name)
    output = str(result["output"])
    assert result["status"] == 7, output  # typed input reached the shell; its status came back
    assert f"c-{name}" in output
    assert "/dev/pts/" in output
    assert f"home=/var/lib/capsules/{name} rt=/run/capsules/{name} term=xterm-256color" in output


def test_shell_with_a_command(bed: Testbed, running: str) -> None:
    result = on_pty(bed, "alice", "", "shell", running, "id", "-un")
    assert result["status"] == 0
    assert f"c-{running}" in str(result["output"])


def test_run_pty_gives_the_command_a_terminal_not_the_callers(bed: Testbed, running: str) -> None:
    check = "test -t 0 && test -t 1 && test -t 2 && tty && stat -c %U $(tty); exit 5"
    result = on_pty(bed, "alice", "", "run", running, "--pty", "--", "/bin/sh", "-c", check)
    output = str(result["output"])
    assert result["status"] == 5, output
    assert "/dev/pts/" in output
    assert f"c-{running}" in output  # the peer is the capsule user's (fchown_to_capsule)


def test_ctrl_c_reaches_the_command_and_the_terminal_is_restored(
    bed: Testbed, running: str
) -> None:
    script = 'trap "echo got-int; exit 42" INT; echo ready; while :; do sleep 1; done'
    result = on_pty(bed, "alice", "\x03", "run", running, "--pty", "--", "/bin/sh", "-c", script)
    assert result["status"] == 42, result["output"]
    assert "got-int" in str(result["output"])
    assert result["restored"] is True  # raw mode undone when capsulectl left


def test_window_size_and_its_changes_reach_the_command(bed: Testbed, running: str) -> None:
    script = 'trap "stty size; exit 3" WINCH; stty size; while :; do sleep 1; done'
    spec: dict[str, object] = {"typed": "", "resize": [33, 101]}
    result = on_pty(bed, "alice", spec, "run", running, "--pty", "--", "/bin/sh", "-c", script)
    output = str(result["output"])
    assert result["status"] == 3, output
    assert "33 101" in output, output
    assert output.index("24 80") < output.index("33 101")


def test_run_pipe_round_trips_a_mebibyte_byte_for_byte(bed: Testbed, running: str) -> None:
    argv = ("run", running, "--pipe", "--", "/bin/sh", "-c", "cat; exit 3")
    result = with_pipes(bed, "alice", MIB, *argv)
    assert result["status"] == 3, result["stderr"]
    assert result["size"] == MIB
    assert result["identical"] is True


def test_systemctl_verbs_work_for_the_owner(bed: Testbed, running: str) -> None:
    state = with_pipes(bed, "alice", 0, "systemctl", running, "--", "is-system-running")
    assert state["status"] == 0, state
    assert state["output"] == "running\n"
    units = with_pipes(bed, "alice", 0, "systemctl", running, "--", "list-units", "--all")
    assert units["status"] == 0, units["stderr"]
    assert "loaded units listed" in str(units["output"])


def test_systemctl_on_a_terminal(bed: Testbed, running: str) -> None:
    result = on_pty(bed, "alice", "", "systemctl", running, "--", "is-system-running")
    assert result["status"] == 0, result["output"]
    assert "running" in str(result["output"])


@pytest.mark.parametrize("user", ["bob", "mallory"], ids=["other-member", "non-member"])
def test_others_are_refused_and_nothing_runs(bed: Testbed, running: str, user: str) -> None:
    name = running
    marker = "/bin/sh -c 'touch $HOME/ran-by-someone'"
    attempts = [
        on_pty(bed, user, "", "shell", name, "/bin/sh", "-c", "touch $HOME/ran-by-someone"),
        on_pty(bed, user, "", "run", name, "--pty", "--", *marker.split(" ", 2)),
        with_pipes(bed, user, 16, "run", name, "--pipe", "--", "/bin/touch", "/tmp/x"),
        with_pipes(bed, user, 0, "systemctl", name, "--", "is-system-running"),
    ]
    for result in attempts:
        assert result["status"] in (4, 5), result
    home = f"/var/lib/private/capsules/{name}"
    assert bed.as_root("test", "-e", f"{home}/ran-by-someone").returncode == 1
    units = capsule_systemctl(bed, name, "list-units", "--all", "--plain", "--no-legend", "run-u*")
    assert units.stdout.strip() == ""


def test_the_helper_keeps_none_of_the_passed_fds(bed: Testbed, running: str) -> None:
    r = bed.run_module("root", "e2e.inbed.interactive", "held", "alice", running, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["output"] == "got-x\n"
    assert result["status"] == 0
    assert result["during"] == []  # closed once the manager had them, while the command ran
    assert result["after"] == []


# No sshd in the testbed: the stand-in notes ssh's -t/-T, drops "-t|-T -- HOST" and lets a
# shell run the rest, as sshd hands the (quoted) remote command to the user's shell.
FAKE_SSH = 'sh -c \'echo "$1" >> /tmp/ssh-flags-$(id -un); shift 3; eval "exec $*"\' ssh'


def ssh_flags(bed: Testbed, user: str) -> list[str]:
    return bed.as_root("cat", f"/tmp/ssh-flags-{user}").stdout.split()


def test_over_ssh_pipe_runs_capsulectl_remotely_binary_safe(bed: Testbed, running: str) -> None:
    bed.as_root("rm", "-f", "/tmp/ssh-flags-alice")
    argv = ("-H", "alice@localhost", "run", running, "--pipe", "--", "/bin/sh", "-c", "cat; exit 3")
    r = bed.run_module(
        "alice",
        "e2e.inbed.interactive",
        "pipe",
        f"--ssh={FAKE_SSH}",
        str(MIB),
        *argv,
        timeout=TIMEOUT_S,
    )
    result = json.loads(r.stdout)
    assert result["status"] == 3, result["stderr"]
    assert result["identical"] is True
    assert ssh_flags(bed, "alice") == ["-T"]  # no remote pty: the bytes pass untouched


def test_over_ssh_shell_runs_on_a_remote_terminal(bed: Testbed, running: str) -> None:
    bed.as_root("rm", "-f", "/tmp/ssh-flags-alice")
    argv = ("-H", "alice@localhost", "shell", running, "/bin/sh", "-c", "id -un; exit 6")
    r = bed.run_module(
        "alice",
        "e2e.inbed.interactive",
        "pty",
        f"--ssh={FAKE_SSH}",
        '""',
        *argv,
        timeout=TIMEOUT_S,
    )
    result = json.loads(r.stdout)
    assert result["status"] == 6, result
    assert f"c-{running}" in str(result["output"])
    assert ssh_flags(bed, "alice") == ["-t"]


def test_audit_names_the_unit_and_executable_never_arguments_or_environment(
    bed: Testbed, running: str
) -> None:
    name = running
    argv = ("run", name, "--pty", "-E", "TOKEN=s3cret-env", "--", "/bin/echo", "s3cret-arg")
    assert on_pty(bed, "alice", "", *argv)["status"] == 0
    bed.as_root("journalctl", "--sync").check()
    out = bed.as_root(
        "journalctl", "-o", "json", "--no-pager",
        "_SYSTEMD_UNIT=capsuled.service", "_UID=0", "_TRANSPORT=journal",
        f"CAPSULE={name}", "CAPSULED_ACTION=run",
    ).check().stdout  # fmt: skip
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    started = [r for r in records if r.get("CAPSULED_RESULT") == "started"]
    assert len(started) == 1, records
    assert started[0]["CAPSULED_COMMAND"] == "/bin/echo"
    assert started[0]["CAPSULED_STDIO"] == "pty"
    assert started[0]["CAPSULED_UNIT"].startswith("run-u")
    assert "s3cret" not in out
