"""On systemd 252 (Debian bookworm, older than capsules) capsuled refuses cleanly.

`capsuled install` refuses and installs nothing. The daemon itself, started by hand, answers
every mutating call with org.capsuled.Manager.SystemdTooOld before any effect, and Info tells
the version. Nothing here needs python3-varlink: bookworm has none, so the daemon answering at
all shows it does not import `varlink` at run time.

How the daemon runs here: a socket-activated transient unit (`systemd-run --socket-property=`),
i.e. the same activation path as capsuled.socket, under its own names so nothing looks like an
install. systemd-run returns once the socket listens, so no test waits for the daemon to come up.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from e2e.vcall import Replies, call
from testbed import Testbed

pytestmark = pytest.mark.e2e

OLD_VERSION = 252
TOO_OLD = "org.capsuled.Manager.SystemdTooOld"
UNIT = "capsuled-old"  # transient capsuled-old.socket + capsuled-old.service
SOCKET = "/run/capsuled-old.sock"
RECORDS = "/var/lib/capsuled"


def ask(bed: Testbed, user: str, method: str, **params: object) -> Replies:
    return call(bed, user, method, params, socket=SOCKET, timeout=30)


def capsule_units(bed: Testbed) -> str:
    """Every capsule@ unit systemd knows in any state, loaded or as a file ('' if none)."""
    loaded = bed.as_root(
        "systemctl", "list-units", "--all", "--no-legend", "--plain", "capsule@*"
    ).check()
    files = bed.as_root("systemctl", "list-unit-files", "--no-legend", "capsule@*")
    # list-unit-files exits 1 when nothing matches; 252 ships no capsule@.service at all.
    return (loaded.stdout + files.stdout).strip()


def records(bed: Testbed) -> list[str]:
    found = bed.as_root("find", RECORDS, "-mindepth", "1")
    return found.stdout.split() if found.ok else []  # absent directory: nothing recorded


@pytest.fixture(scope="module")
def old_daemon(old_bed: Testbed) -> Iterator[Testbed]:
    """capsuled serving on SOCKET in old_bed, socket-activated like the real unit."""
    old_bed.as_root(
        "systemd-run",
        f"--unit={UNIT}",
        f"--socket-property=ListenStream={SOCKET}",
        "--socket-property=SocketMode=0666",  # as capsuled.socket: policy is the daemon's job
        "--property=Environment=PYTHONUNBUFFERED=1",
        "capsuled",
    ).check()
    try:
        yield old_bed
    finally:
        old_bed.as_root("systemctl", "stop", f"{UNIT}.socket", f"{UNIT}.service")
        old_bed.as_root("systemctl", "reset-failed", f"{UNIT}.socket", f"{UNIT}.service")


def test_the_old_bed_runs_systemd_252_without_python_varlink(old_bed: Testbed) -> None:
    version = old_bed.as_root("systemctl", "--version").check().stdout.splitlines()[0]
    assert version.startswith(f"systemd {OLD_VERSION} "), version
    assert old_bed.as_root("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert "capsule" in old_bed.as_user("alice", "id", "-nG").check().stdout.split()
    # The daemon tests below would prove nothing about `varlink` if the module were there.
    assert not old_bed.python("root", "import varlink").ok
    assert old_bed.as_root("capsuled", "--version").check().stdout.startswith("capsuled ")


def test_install_refuses_naming_both_versions_and_installs_nothing(old_bed: Testbed) -> None:
    res = old_bed.as_root("capsuled", "install")
    assert res.returncode != 0
    assert str(OLD_VERSION) in res.stderr, res.stderr
    assert "256" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1, res.stderr  # one clear line, no traceback
    units = old_bed.as_root("find", "/usr/local/lib/systemd/system", "-name", "capsuled*")
    assert units.stdout.strip() == ""
    for path in (
        "/usr/local/share/capsuled/install-manifest.json",
        "/etc/capsuled/capsuled.toml",
        "/usr/share/polkit-1/actions/org.capsuled.policy",
        "/usr/local/share/bash-completion/completions/capsulectl",
        "/run/capsuled",
    ):
        assert not old_bed.as_root("test", "-e", path).ok, path
    known = old_bed.as_root("systemctl", "list-units", "--all", "--no-legend", "capsuled*")
    assert known.stdout.strip() == ""
    # Nothing listens anywhere under capsuled's name (/proc/net/unix lists bound paths).
    listening = old_bed.as_root("cat", "/proc/net/unix").check().stdout
    assert "capsuled" not in listening


def test_create_by_a_member_is_systemd_too_old_and_creates_nothing(old_daemon: Testbed) -> None:
    name = f"t-{secrets.token_hex(4)}"
    r = ask(old_daemon, "alice", "Create", name=name, start=True)
    assert (r.error, r.parameters) == (TOO_OLD, {"version": OLD_VERSION}), r.last
    assert records(old_daemon) == []
    assert capsule_units(old_daemon) == ""
    for path in (f"/var/lib/private/capsules/{name}", f"/var/lib/capsules/{name}"):
        assert not old_daemon.as_root("test", "-e", path).ok, path


def test_info_reports_systemd_252(old_daemon: Testbed) -> None:
    r = ask(old_daemon, "alice", "Info")
    assert r.error is None, r.last
    assert r.parameters["systemdVersion"] == OLD_VERSION
    assert r.parameters["callerUid"] == int(old_daemon.as_root("id", "-u", "alice").stdout)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("Start", {}),
        ("Stop", {}),
        ("Restart", {}),
        ("Remove", {}),
        ("SetLimits", {"tasksMax": 100}),
        ("SetAutostart", {"enabled": True}),
    ],
)
def test_mutating_calls_by_root_are_systemd_too_old_before_any_effect(
    old_daemon: Testbed, method: str, extra: dict[str, object]
) -> None:
    # Root passes every policy check, so the version check is what answers; a name that does
    # not exist would otherwise be NoSuchCapsule, so this also shows the version comes first.
    r = ask(old_daemon, "root", method, name=f"t-{secrets.token_hex(4)}", **extra)
    assert (r.error, r.parameters) == (TOO_OLD, {"version": OLD_VERSION}), r.last
    assert records(old_daemon) == []
    assert capsule_units(old_daemon) == ""
    wants = old_daemon.as_root("find", "/etc/systemd/system", "-name", "capsule@*")
    assert wants.stdout.strip() == ""  # no autostart link, no limits drop-in
