"""The testbed's root filesystem cache and CI semantics, with debootstrap replaced by a stub."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed import rootfs
from testbed.ci import in_ci, unavailable
from testbed.errors import TestbedUnavailable


@pytest.fixture
def builds() -> list[Path]:
    """The targets the stub debootstrap was asked to fill."""
    return []


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builds: list[Path]) -> Path:
    monkeypatch.setenv("CAPSULED_TESTBED_CACHE", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    def fake_debootstrap(target: Path, spec: rootfs.RootSpec) -> None:
        builds.append(target)
        (target / "usr/lib/systemd").mkdir(parents=True)
        (target / "etc/systemd/system").mkdir(parents=True)

    monkeypatch.setattr(rootfs, "_debootstrap", fake_debootstrap)
    monkeypatch.setattr(rootfs, "_post_process", lambda root, spec: None)
    return tmp_path


def test_first_use_builds_and_stamps_then_reuses(cache: Path, builds: list[Path]) -> None:
    first = rootfs.ensure_root()
    first.release()
    assert first.built_now
    assert (cache / first.key / "ready").is_file()
    assert first.path == cache / first.key / "root"
    second = rootfs.ensure_root()
    second.release()
    assert not second.built_now
    assert len(builds) == 1


def test_a_half_built_entry_is_rebuilt(cache: Path) -> None:
    key = rootfs.cache_key()
    (cache / key / "root/usr/lib/systemd").mkdir(parents=True)  # no ready stamp
    (cache / key / "root/leftover").write_text("from a build that died")
    got = rootfs.ensure_root()
    got.release()
    assert got.built_now
    assert not (got.path / "leftover").exists()


def test_a_failed_build_leaves_no_staging_directory(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(target: Path, spec: rootfs.RootSpec) -> None:
        (target / "partial").write_text("x")
        raise TestbedUnavailable("debootstrap failed with status 1")

    monkeypatch.setattr(rootfs, "_debootstrap", broken)
    with pytest.raises(TestbedUnavailable):
        rootfs.ensure_root()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_the_key_follows_the_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    before = rootfs.cache_key()
    monkeypatch.setattr(rootfs, "PACKAGES", (*rootfs.PACKAGES, "strace"))
    assert rootfs.cache_key() != before
    monkeypatch.setattr(rootfs, "PACKAGES", tuple(reversed(rootfs.PACKAGES)))
    assert rootfs.cache_key() != before  # strace is still in
    monkeypatch.setattr(rootfs, "PACKAGES", tuple(p for p in rootfs.PACKAGES if p != "strace"))
    assert rootfs.cache_key() == before  # order does not matter


def test_stale_keys_are_pruned_unless_in_use(cache: Path) -> None:
    for stale in ("0123456789abcdef", "fedcba9876543210"):
        (cache / stale / "root").mkdir(parents=True)
        (cache / stale / "ready").write_text("{}")
    busy = os.open(cache / "fedcba9876543210.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(busy, fcntl.LOCK_SH)  # another run boots from it
    (cache / ".build-0123-999999999").mkdir()  # a builder that no longer exists
    try:
        got = rootfs.ensure_root()
        got.release()
    finally:
        os.close(busy)
    left = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert left == sorted([got.key, "fedcba9876543210"])


def test_each_suite_has_its_own_key_and_neither_prunes_the_other(
    cache: Path, builds: list[Path]
) -> None:
    trixie = rootfs.ensure_root()
    trixie.release()  # nobody holds it now: only its suite keeps it from being pruned
    bookworm = rootfs.ensure_root(rootfs.root_spec("bookworm"))
    bookworm.release()
    assert trixie.key != bookworm.key
    assert len(builds) == 2
    again = rootfs.ensure_root()
    again.release()
    assert not again.built_now
    assert (cache / bookworm.key / "ready").is_file()
    assert (cache / trixie.key / "ready").is_file()


def test_a_stale_tree_of_the_same_suite_is_still_pruned(cache: Path) -> None:
    stale = cache / "0123456789abcdef"
    (stale / "root").mkdir(parents=True)
    (stale / "ready").write_text('{"suite": "bookworm"}')
    got = rootfs.ensure_root(rootfs.root_spec("bookworm"))
    got.release()
    assert not stale.exists()


def test_an_unknown_suite_is_refused() -> None:
    with pytest.raises(ValueError, match="sid"):
        rootfs.root_spec("sid")


def test_not_root_is_a_missing_prerequisite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(TestbedUnavailable, match="root"):
        rootfs.ensure_root()


@pytest.mark.parametrize(("value", "ci"), [("true", True), ("1", True), ("", False), ("no", False)])
def test_ci_fails_where_elsewhere_skips(
    monkeypatch: pytest.MonkeyPatch, value: str, ci: bool
) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is ci
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="no nspawn"):
        unavailable("no nspawn")


def test_the_trixie_key_does_not_depend_on_flavours_existing() -> None:
    # Adding flavours must not rebuild everybody's cached trixie tree: its key is the digest of
    # the same inputs as before (no "flavour" field for a plain suite).
    spec = rootfs.root_spec("trixie")
    assert spec.name == "trixie"
    assert spec.flavour == ""
    plain = rootfs.RootSpec(spec.suite, spec.packages, spec.masked, spec.variant)
    assert rootfs.cache_key(spec) == rootfs.cache_key(plain)


def test_a_flavour_of_the_same_suite_has_its_own_key_and_neither_prunes_the_other(
    cache: Path, builds: list[Path]
) -> None:
    trixie = rootfs.ensure_root()
    trixie.release()
    deb = rootfs.ensure_root(rootfs.root_spec("trixie-deb"))
    deb.release()
    assert deb.key != trixie.key
    assert len(builds) == 2
    for key in (trixie.key, deb.key):
        assert (cache / key / "ready").is_file()
    again = rootfs.ensure_root(rootfs.root_spec("trixie-deb"))
    again.release()
    assert not again.built_now
    assert (cache / trixie.key / "ready").is_file()
    # Testbed code from before flavours prunes by the stamp's "suite": it must read trixie-deb.
    stamp = json.loads((cache / deb.key / "ready").read_text())
    assert (stamp["suite"], stamp["debootstrap_suite"]) == ("trixie-deb", "trixie")


def test_every_flavour_has_a_spec() -> None:
    names = {rootfs.root_spec(flavour).name for flavour in rootfs.FLAVOURS}
    assert names == set(rootfs.FLAVOURS)
    assert rootfs.root_spec("forky").suite == rootfs.NEWEST_SUITE
    # The build root has what dpkg-buildpackage implicitly needs (build-essential).
    assert rootfs.root_spec("trixie-deb").variant == "buildd"


def test_a_suite_the_host_debootstrap_does_not_know_uses_the_sid_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "sid").write_text("")
    (scripts / "trixie").symlink_to("sid")
    monkeypatch.setattr(rootfs, "DEBOOTSTRAP_SCRIPTS", scripts)
    argvs: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: object) -> object:
        argvs.append(argv)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/sbin/debootstrap")
    monkeypatch.setattr(subprocess, "run", fake_run)
    target = tmp_path / "build" / "root"
    target.mkdir(parents=True)
    rootfs._debootstrap(target, rootfs.root_spec("trixie"))
    rootfs._debootstrap(target, rootfs.root_spec("forky"))
    assert argvs[0][-1] == rootfs.MIRROR  # known: debootstrap picks the script itself
    assert argvs[1][-2:] == [rootfs.MIRROR, str(scripts / "sid")]
