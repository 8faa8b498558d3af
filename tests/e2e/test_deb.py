"""The Debian package, from `make deb` to `dpkg --purge`, on a fresh trixie testbed.

The package is built as `make deb` builds it (tools/build-deb.sh, in the trixie-deb container on
this Debian 12 host), then installed with dpkg on a trixie bed that has never seen capsuled:
no wheel, no `capsuled install`. A member of group `capsule` then creates and starts a capsule
through the packaged helper, and `dpkg --purge` must leave no unit and no configuration.

The tests run in order on one bed (install, use, remove, purge), as an administrator would.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from testbed import Testbed, TestbedUnavailable, install_signal_handlers
from testbed.ci import unavailable
from testbed.deb import DebBuild, build_deb

pytestmark = pytest.mark.e2e

DEB_INSIDE = "/var/tmp"
UNITS = ("capsuled.socket", "capsuled.service")
WANTS = "/etc/systemd/system/sockets.target.wants/capsuled.socket"
SHIPPED = (
    "/usr/bin/capsuled",
    "/usr/bin/capsulectl",
    "/usr/lib/systemd/system/capsuled.socket",
    "/usr/lib/systemd/system/capsuled.service",
    "/usr/lib/sysusers.d/capsuled.conf",
    "/usr/lib/tmpfiles.d/capsuled.conf",
    "/usr/share/polkit-1/actions/org.capsuled.policy",
    "/usr/share/man/man1/capsulectl.1.gz",
    "/usr/share/man/man5/capsuled.toml.5.gz",
    "/usr/share/man/man8/capsuled.8.gz",
    "/usr/share/bash-completion/completions/capsulectl",
    "/usr/share/zsh/vendor-completions/_capsulectl",
    "/usr/share/fish/vendor_completions.d/capsulectl.fish",
    "/usr/share/doc/capsuled/examples/capsuled.toml",
    "/etc/capsuled/capsuled.toml",
)
# Prints every module of the package without its byte code for this interpreter.
NOT_COMPILED = """
import importlib.util, pathlib
for package in ("capsuled", "capsulectl"):
    for source in sorted(pathlib.Path("/usr/lib/python3/dist-packages", package).rglob("*.py")):
        if not pathlib.Path(importlib.util.cache_from_source(str(source))).is_file():
            print(source)
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> DebBuild:
    install_signal_handlers()
    try:
        return build_deb(tmp_path_factory.mktemp("deb"))
    except TestbedUnavailable as exc:
        unavailable(f"cannot build the Debian package: {exc}")


@pytest.fixture(scope="module")
def deb_bed(package: DebBuild) -> Iterator[Testbed]:
    """A trixie bed without capsuled, the package copied in (not installed)."""
    try:
        bed = Testbed.boot(install=False)
    except TestbedUnavailable as exc:
        unavailable(f"systemd testbed unavailable: {exc}")
    try:
        dest = bed.root_dir / DEB_INSIDE.lstrip("/") / package.deb.name
        dest.write_bytes(package.deb.read_bytes())
        yield bed
    finally:
        bed.close()


def deb_path(package: DebBuild) -> str:
    return f"{DEB_INSIDE}/{package.deb.name}"


def unit_state(bed: Testbed, verb: str, unit: str) -> str:
    return bed.as_root("systemctl", verb, unit).stdout.strip()


def capsuled_paths(bed: Testbed) -> list[str]:
    """Everything under /etc, /usr and /var named for capsuled or capsulectl (not the .deb)."""
    found = bed.as_root(
        "find", "/etc", "/usr", "/var", "-name", "*capsule[dc]*", "-not", "-path", DEB_INSIDE + "/*"
    )
    return sorted(found.stdout.split())


def test_the_package_is_named_for_its_version_and_lintian_clean(package: DebBuild) -> None:
    assert re.fullmatch(r"capsuled_[0-9][^_]*_all\.deb", package.deb.name), package.deb.name
    # build-deb.sh fails on lintian errors; warnings would need an override with a reason.
    assert not re.search(r"^[EW]: ", package.lintian, re.M), package.lintian


def test_dpkg_installs_it_and_the_socket_is_enabled_and_listening(
    deb_bed: Testbed, package: DebBuild
) -> None:
    assert capsuled_paths(deb_bed) == []  # a bed that never saw capsuled
    deb_bed.as_root("dpkg", "-i", deb_path(package), timeout=120).check()
    assert unit_state(deb_bed, "is-enabled", "capsuled.socket") == "enabled"
    assert deb_bed.as_root("test", "-L", WANTS).ok
    assert unit_state(deb_bed, "is-active", "capsuled.socket") == "active"
    # Socket-activated: the package never starts the service itself.
    assert unit_state(deb_bed, "is-enabled", "capsuled.service") == "static"
    for path in SHIPPED:
        assert deb_bed.as_root("test", "-f", path).ok, path
    conffiles = deb_bed.as_root("dpkg-query", "-W", "-f=${Conffiles}", "capsuled").check()
    assert "/etc/capsuled/capsuled.toml " in conffiles.stdout
    assert deb_bed.as_root("getent", "group", "capsule").ok  # sysusers.d, via debhelper
    assert deb_bed.as_root("test", "-d", "/var/lib/private/capsules").ok  # tmpfiles.d
    # The deb needs no `capsuled install`: ExecStart= points at the packaged helper.
    unit = deb_bed.as_root("systemctl", "cat", "capsuled.service").check().stdout
    assert "\nExecStart=/usr/bin/capsuled\n" in unit
    assert "@BINDIR@" not in unit
    # Nothing of a pip install's layout, and no manifest for `capsuled uninstall` to act on.
    assert not deb_bed.as_root("test", "-e", "/usr/local/lib/systemd/system/capsuled.socket").ok
    assert not deb_bed.as_root("test", "-e", "/usr/share/capsuled").ok
    # Each file once: the package data `capsuled install` copies from is not shipped as well.
    for data in ("capsuled/data", "capsulectl/completion"):
        assert not deb_bed.as_root("test", "-e", f"/usr/lib/python3/dist-packages/{data}").ok
    # Byte-compiled by the package's postinst (dh_python3's py3compile): /usr is read-only for
    # the helper (ProtectSystem=strict), so a module without its .pyc would be compiled again
    # at every socket-activated start (issue 12).
    assert deb_bed.as_root("python3", "-c", NOT_COMPILED).check().stdout.split() == []
    # capsulectl's own launcher (client/scripts/capsulectl), not a generated console script
    # (which imports re), with its first line pointed at Debian's python3.
    launcher = deb_bed.as_root("cat", "/usr/bin/capsulectl").check().stdout
    assert launcher.split("\n", 1)[0] in ("#!/usr/bin/python3", "#! /usr/bin/python3"), launcher
    assert "import re" not in launcher


def test_capsuled_install_refuses_over_the_package(deb_bed: Testbed) -> None:
    res = deb_bed.as_root("capsuled", "install")
    assert res.returncode == 1
    assert "distribution package" in res.stderr
    assert not deb_bed.as_root("test", "-e", "/usr/local/lib/systemd/system").ok


def test_a_member_of_capsule_creates_and_starts_a_capsule(deb_bed: Testbed) -> None:
    deb_bed.add_users()
    name = f"d-{secrets.token_hex(4)}"
    deb_bed.as_user("alice", "capsulectl", "create", name, "--start", timeout=120).check()
    assert unit_state(deb_bed, "is-active", f"capsule@{name}.service") == "active"
    status = deb_bed.as_user("alice", "capsulectl", "status", name).check().stdout
    assert name in status
    listed = deb_bed.as_user("alice", "capsulectl", "list", "-q").check().stdout.split()
    assert listed == [name]
    # The helper that answered is the packaged one, started by the packaged socket.
    pid = deb_bed.as_root("systemctl", "show", "-P", "MainPID", "capsuled.service").stdout
    exe = deb_bed.as_root("cat", f"/proc/{pid.strip()}/cmdline").stdout.split("\0")
    assert "/usr/bin/capsuled" in exe, exe
    refused = deb_bed.as_user("mallory", "capsulectl", "--no-ask-password", "stop", name)
    assert refused.returncode != 0
    assert unit_state(deb_bed, "is-active", f"capsule@{name}.service") == "active"


def test_remove_stops_the_units_and_keeps_the_configuration(
    deb_bed: Testbed, package: DebBuild
) -> None:
    deb_bed.as_root("dpkg", "--remove", "capsuled", timeout=120).check()
    for unit in UNITS:
        assert unit_state(deb_bed, "is-active", unit) == "inactive", unit
    assert not deb_bed.as_root("test", "-e", "/run/capsuled/org.capsuled.Manager").ok
    assert deb_bed.as_root("test", "-f", "/etc/capsuled/capsuled.toml").ok  # a conffile


def test_purge_leaves_no_unit_and_no_configuration(deb_bed: Testbed) -> None:
    deb_bed.as_root("mkdir", "-p", "/etc/capsuled/capsuled.toml.d").check()
    deb_bed.as_root("sh", "-c", "echo '# mine' > /etc/capsuled/capsuled.toml.d/50-local.toml")
    deb_bed.as_root("dpkg", "--purge", "capsuled", timeout=120).check()
    assert capsuled_paths(deb_bed) == []
    units = deb_bed.as_root("systemctl", "list-unit-files", "--no-legend", "capsuled*")
    assert units.stdout.strip() == ""
    assert not deb_bed.as_root("test", "-L", WANTS).ok
    assert deb_bed.as_root("dpkg-query", "-W", "capsuled").returncode != 0
    # The capsule is systemd's, not the package's: it outlives capsuled, as after uninstall.
    running = deb_bed.as_root("systemctl", "list-units", "--no-legend", "--plain", "capsule@*")
    assert "capsule@d-" in running.stdout
