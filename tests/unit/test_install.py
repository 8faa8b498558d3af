"""`capsuled install --root DIR` / `uninstall --root DIR` against a temporary tree (no systemd)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

import pytest

from capsuled import install

PREFIX = "/usr/local"
UNIT_DIR = "usr/local/lib/systemd/system"


def run_install(root: Path, *extra: str) -> int:
    return install.main_install(["--root", str(root), "--bindir", "/opt/cap/bin", *extra])


def test_install_stages_every_host_file(tmp_path: Path) -> None:
    assert run_install(tmp_path) == 0
    for rel in (
        f"{UNIT_DIR}/capsuled.socket",
        f"{UNIT_DIR}/capsuled.service",
        "usr/local/lib/sysusers.d/capsuled.conf",
        "usr/local/lib/tmpfiles.d/capsuled.conf",
        "usr/share/polkit-1/actions/org.capsuled.policy",
        "etc/capsuled/capsuled.toml",
        "usr/share/doc/capsuled/examples/capsuled.toml",
    ):
        assert (tmp_path / rel).is_file(), rel
    assert (tmp_path / "etc/capsuled/capsuled.toml.d").is_dir()
    # polkit(8): a mechanism ships no active rules; ours are examples only.
    assert not (tmp_path / "etc/polkit-1").exists()
    assert not (tmp_path / "usr/share/polkit-1/rules.d").exists()
    examples = os.listdir(tmp_path / "usr/share/doc/capsuled/examples")
    assert any("rules" in name for name in examples), examples


def test_service_execstart_points_at_the_installed_script(tmp_path: Path) -> None:
    run_install(tmp_path)
    unit = (tmp_path / UNIT_DIR / "capsuled.service").read_text()
    assert "ExecStart=/opt/cap/bin/capsuled\n" in unit
    assert install.BINDIR_PLACEHOLDER not in unit


def test_socket_unit_matches_the_contract(tmp_path: Path) -> None:
    run_install(tmp_path)
    socket = (tmp_path / UNIT_DIR / "capsuled.socket").read_text()
    for line in (
        "ListenStream=/run/capsuled/org.capsuled.Manager",
        "FileDescriptorName=varlink",
        "SocketMode=0666",
        "Symlinks=/run/varlink/registry/org.capsuled.Manager",
    ):
        assert f"\n{line}\n" in socket, line


def test_written_files_are_world_readable_and_not_writable_by_others(tmp_path: Path) -> None:
    run_install(tmp_path)
    for path in tmp_path.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & stat.S_IWGRP == 0, path
        assert mode & stat.S_IWOTH == 0, path
        assert mode & stat.S_IROTH, path
        if os.geteuid() == 0:
            assert path.lstat().st_uid == 0, path
    assert not list(tmp_path.rglob(".*")), "temporary files left behind"


def test_existing_admin_config_is_never_overwritten(tmp_path: Path) -> None:
    config = tmp_path / "etc/capsuled/capsuled.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# mine\n")
    assert run_install(tmp_path) == 0
    assert config.read_text() == "# mine\n"


def test_uninstall_removes_what_install_wrote(tmp_path: Path) -> None:
    run_install(tmp_path)
    assert install.main_uninstall(["--root", str(tmp_path)]) == 0
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == []
    assert not (tmp_path / "etc/capsuled").exists()


def test_uninstall_keeps_modified_config_and_drop_ins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_install(tmp_path)
    config = tmp_path / "etc/capsuled/capsuled.toml"
    config.write_text(config.read_text() + "# tuned by the admin\n")
    dropin = tmp_path / "etc/capsuled/capsuled.toml.d/10-site.toml"
    dropin.write_text("# site\n")
    capsys.readouterr()
    assert install.main_uninstall(["--root", str(tmp_path)]) == 0
    assert config.is_file()
    assert dropin.is_file()
    assert not (tmp_path / UNIT_DIR / "capsuled.socket").exists()
    out = capsys.readouterr().out
    assert "kept /etc/capsuled/capsuled.toml: modified by an admin" in out
    assert "/var/lib/capsuled" in out  # says what it leaves in place


def test_uninstall_without_install_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert install.main_uninstall(["--root", str(tmp_path)]) == 1
    assert "no usable install manifest" in capsys.readouterr().err


def test_prefix_moves_units_for_distribution_packages(tmp_path: Path) -> None:
    assert run_install(tmp_path, "--prefix", "/usr") == 0
    assert (tmp_path / "usr/lib/systemd/system/capsuled.socket").is_file()
    manifest = json.loads((tmp_path / "usr/share/capsuled/install-manifest.json").read_text())
    assert "/usr/lib/systemd/system/capsuled.service" in {f["path"] for f in manifest["files"]}
    assert install.main_uninstall(["--root", str(tmp_path), "--prefix", "/usr"]) == 0
    assert not (tmp_path / "usr/lib/systemd/system/capsuled.socket").exists()


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("systemd 257 (257.13-1~deb13u1)\n+PAM +AUDIT\n", 257),
        ("systemd 252 (252.39-1~deb12u2)\n", 252),
        ("systemd 256.1\n", 256),
        ("", None),
        ("not systemd\n", None),
    ],
)
def test_parse_systemd_version(text: str, version: int | None) -> None:
    assert install.parse_systemd_version(text) == version


def test_install_is_refused_on_old_or_absent_systemd() -> None:
    too_old = install.host_problem(252, booted=True)
    assert too_old
    assert "systemd 252 is too old" in too_old
    assert "256" in too_old
    not_running = install.host_problem(257, booted=False)
    assert not_running
    assert "not running as PID 1" in not_running
    assert install.host_problem(None, booted=True)
    assert install.host_problem(256, booted=True) is None
    assert install.host_problem(257, booted=True) is None


def test_live_install_refuses_with_one_line_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(install, "_systemd_version", lambda: 252)
    monkeypatch.setattr(install, "_booted", lambda: True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    written: list[object] = []
    monkeypatch.setattr(install, "install_files", lambda *a: written.append(a))
    assert install.main_install([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("capsuled install: systemd 252 is too old")
    assert err.count("\n") == 1
    assert written == []


def test_plan_reads_the_checkout_when_not_installed() -> None:
    planned = {str(f.dest) for f in install.plan(PurePosixPath(PREFIX), PurePosixPath("/b"))}
    assert f"{PREFIX}/lib/systemd/system/capsuled.socket" in planned
    assert "/usr/share/polkit-1/actions/org.capsuled.policy" in planned


def test_root_is_created_if_missing(tmp_path: Path) -> None:
    destdir = tmp_path / "debian" / "capsuled"
    assert run_install(destdir, "--prefix", "/usr") == 0
    assert (destdir / "usr/lib/systemd/system/capsuled.service").is_file()


def test_reinstall_then_uninstall_removes_an_unmodified_default_config(tmp_path: Path) -> None:
    run_install(tmp_path)
    assert run_install(tmp_path) == 0  # an upgrade: the default config is kept as it is
    assert install.main_uninstall(["--root", str(tmp_path)]) == 0
    assert not (tmp_path / "etc/capsuled/capsuled.toml").exists()


COMPLETION = "usr/local/share/bash-completion/completions/capsulectl"
COMPLETION_IN_CHECKOUT = Path(__file__).resolve().parents[2] / "client/capsulectl/completion"


def test_bash_completion_is_installed_under_the_prefix_and_in_the_manifest(
    tmp_path: Path,
) -> None:
    assert run_install(tmp_path) == 0
    staged = tmp_path / COMPLETION
    # bash-completion loads completions/NAME for command NAME: the file is named after it.
    assert staged.read_bytes() == (COMPLETION_IN_CHECKOUT / "capsulectl.bash").read_bytes()
    assert stat.S_IMODE(staged.stat().st_mode) == 0o644
    manifest = json.loads((tmp_path / "usr/local/share/capsuled/install-manifest.json").read_text())
    assert f"/{COMPLETION}" in {f["path"] for f in manifest["files"]}


def test_bash_completion_follows_prefix_and_uninstall_removes_it(tmp_path: Path) -> None:
    assert run_install(tmp_path, "--prefix", "/usr") == 0
    staged = tmp_path / "usr/share/bash-completion/completions/capsulectl"
    assert staged.is_file()
    assert not (tmp_path / COMPLETION).exists()
    assert install.main_uninstall(["--root", str(tmp_path), "--prefix", "/usr"]) == 0
    assert not staged.exists()


def test_manual_pages_are_installed_under_the_prefix_and_in_the_manifest(tmp_path: Path) -> None:
    assert run_install(tmp_path) == 0
    pages = {
        "usr/local/share/man/man1/capsulectl.1",
        "usr/local/share/man/man5/capsuled.toml.5",
        "usr/local/share/man/man8/capsuled.8",
    }
    for rel in pages:
        text = (tmp_path / rel).read_text()
        assert text.startswith('.\\" Man page generated from reStructuredText'), rel
        assert ".TH " in text
    manifest = json.loads((tmp_path / "usr/local/share/capsuled/install-manifest.json").read_text())
    assert {f"/{rel}" for rel in pages} <= {f["path"] for f in manifest["files"]}
    assert install.main_uninstall(["--root", str(tmp_path)]) == 0
    assert not any((tmp_path / rel).exists() for rel in pages)


def test_no_manifest_stages_a_package_without_one(tmp_path: Path) -> None:
    assert run_install(tmp_path, "--prefix", "/usr", "--no-manifest") == 0
    assert (tmp_path / "usr/lib/systemd/system/capsuled.socket").is_file()
    assert (tmp_path / "usr/share/man/man8/capsuled.8").is_file()
    assert not (tmp_path / "usr/share/capsuled").exists()
    # Nothing for uninstall to act on: the package manager owns those files.
    assert install.main_uninstall(["--root", str(tmp_path), "--prefix", "/usr"]) == 1


def test_no_manifest_is_only_for_staging(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        install.main_install(["--no-manifest"])
    assert exc.value.code == 2
    assert "--no-manifest" in capsys.readouterr().err


def test_a_distribution_package_is_told_apart_from_our_own_install(tmp_path: Path) -> None:
    assert install.packaged_problem(tmp_path) is None  # nothing installed
    # Our own `install --prefix /usr` may be repeated (an upgrade).
    assert run_install(tmp_path, "--prefix", "/usr") == 0
    assert install.packaged_problem(tmp_path) is None
    # A package's units, with no manifest of ours naming them.
    packaged = tmp_path / "pkg"
    assert run_install(packaged, "--prefix", "/usr", "--no-manifest") == 0
    problem = install.packaged_problem(packaged)
    assert problem
    assert "distribution package" in problem


def test_live_install_refuses_over_a_distribution_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(install, "_systemd_version", lambda: 257)
    monkeypatch.setattr(install, "_booted", lambda: True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(install, "packaged_problem", lambda root: "a package owns it")
    written: list[object] = []
    monkeypatch.setattr(install, "install_files", lambda *a, **k: written.append(a))
    assert install.main_install([]) == 1
    assert capsys.readouterr().err == "capsuled install: a package owns it\n"
    assert written == []


def test_a_live_install_makes_the_audit_key_once_and_a_staged_one_never(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import stat

    from capsuled import trail

    key = tmp_path / "state" / "audit-signing.key"
    monkeypatch.setattr(trail, "AUDIT_KEY", key)
    # Staging for a package: the same key on every host would be no secret at all.
    assert install.main_install(["--root", str(tmp_path / "root"), "--bindir", "/b"]) == 0
    assert not key.exists()
    out: list[str] = []
    install._audit_key(out)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "created the audit signing key" in out[0]
    first = key.read_bytes()
    install._audit_key(out)  # a reinstall or upgrade keeps it
    assert key.read_bytes() == first
    assert "kept" in out[1]
