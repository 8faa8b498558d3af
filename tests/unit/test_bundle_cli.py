"""`capsulectl bundle keygen|build|sign|verify` (offline), and the deploy, rollback and audit
verbs against the scripted fake capsuled."""

from __future__ import annotations

import base64
import io
import os
import stat
from pathlib import Path

import pytest
from cli_fixtures import call, capsulectl_, plain_env

from capsulectl import cli
from capsuled import bundle as fmt
from doubles.scripted_capsuled import FakeCapsuled, audit_record, capsule, deployed, err, fake, ok

__all__ = ["fake", "plain_env"]

UNIT = "[Unit]\nDescription=app\n\n[Service]\nExecStart=/bin/sleep infinity\n"


def bundle_cmd(*argv: str) -> tuple[int, str, str]:
    out, errs = io.StringIO(), io.StringIO()
    code = cli.main(["bundle", *argv], out=out, err=errs)
    return code, out.getvalue(), errs.getvalue()


def tree(root: Path, *, version: str = "1.4.2") -> Path:
    top = root / "web"
    (top / "units").mkdir(parents=True)
    (top / "units" / "app.service").write_text(UNIT)
    (top / "files" / "bin").mkdir(parents=True)
    (top / "files" / "app.conf").write_text("port = 8080\n")
    run = top / "files" / "bin" / "run"
    run.write_text("#!/bin/sh\n")
    run.chmod(0o755)
    (top / "bundle.toml").write_text(
        f'name = "web"\nversion = "{version}"\nenable = ["app.service"]\n'
    )
    return top


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "release.key"
    code, out, errs = bundle_cmd("keygen", str(path))
    assert code == 0, errs
    assert "key id" in out
    return path


def test_keygen_writes_a_private_key_only_its_owner_reads(key: Path) -> None:
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{key}.pub").stat().st_mode) == 0o644
    assert b"PRIVATE KEY" in key.read_bytes()
    assert b"PUBLIC KEY" in Path(f"{key}.pub").read_bytes()


def test_keygen_never_overwrites_a_key(key: Path) -> None:
    before = key.read_bytes()
    code, _, errs = bundle_cmd("keygen", str(key))
    assert code == 1
    assert "exists already" in errs
    assert key.read_bytes() == before


def test_build_sign_verify(tmp_path: Path, key: Path) -> None:
    out = tmp_path / "web.bundle"
    assert bundle_cmd("build", str(tree(tmp_path)), "-o", str(out))[0] == 0
    code, _, errs = bundle_cmd("verify", str(out), "--pubkey", f"{key}.pub")
    assert (code, "not signed" in errs) == (1, True)
    assert bundle_cmd("sign", str(out), "--key", str(key))[0] == 0
    code, text, errs = bundle_cmd("verify", str(out), "--pubkey", f"{key}.pub")
    assert code == 0, errs
    assert "OK: web 1.4.2, 1 unit(s), 2 file(s), enables app.service" in text
    parsed = fmt.read_manifest(fmt.open_envelope(out.read_bytes()))
    assert {e.path: e.mode for e in parsed.files} == {
        "files/app.conf": 0o644,
        "files/bin/run": 0o755,
    }


def test_verify_names_why_a_bundle_is_refused(tmp_path: Path, key: Path) -> None:
    out = tmp_path / "web.bundle"
    bundle_cmd("build", str(tree(tmp_path)), "-o", str(out))
    bundle_cmd("sign", str(out), "--key", str(key))
    other = tmp_path / "other.key"
    bundle_cmd("keygen", str(other))
    code, _, errs = bundle_cmd("verify", str(out), "--pubkey", f"{other}.pub")
    assert (code, "untrusted key" in errs) == (1, True)
    data = bytearray(out.read_bytes())
    data[30] ^= 1
    out.write_bytes(bytes(data))
    code, _, errs = bundle_cmd("verify", str(out), "--pubkey", f"{key}.pub")
    assert (code, "does not match" in errs) == (1, True)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        ("symlink", "symlink"),
        ("bad unit", "not an acceptable unit file"),
        ("bad version", "version must be"),
        ("reserved", "reserved"),
        ("unknown key", "unknown key"),
    ],
)
def test_build_refuses_a_bad_tree(tmp_path: Path, spoil: str, message: str) -> None:
    top = tree(tmp_path)
    if spoil == "symlink":
        os.symlink("/etc/passwd", top / "files" / "passwd")
    elif spoil == "bad unit":
        (top / "units" / "app.service").write_text("no section\n")
    elif spoil == "bad version":
        (top / "bundle.toml").write_text('name = "web"\nversion = "one"\n')
    elif spoil == "reserved":
        (top / "files" / ".config" / "systemd").mkdir(parents=True)
        (top / "files" / ".config" / "systemd" / "x").write_text("x")
    else:
        (top / "bundle.toml").write_text('name = "web"\nversion = "1"\nowner = "me"\n')
    out = tmp_path / "out.bundle"
    code, _, errs = bundle_cmd("build", str(top), "-o", str(out))
    assert code == 1
    assert message in errs
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["build", "DIR"],  # no -o
        ["sign", "FILE"],  # no --key
        ["verify", "FILE"],  # no --pubkey
        ["keygen", "KEY", "--key", "x"],  # an option for another action
        ["frobnicate", "x"],
    ],
)
def test_bundle_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code: object = bundle_cmd(*argv)[0]
    except SystemExit as exc:  # argparse's own refusal (an unknown action)
        code = exc.code
    assert code == 2


# -- deploy, rollback, audit through capsuled ---------------------------------------------------


def test_deploy_sends_the_file(fake: FakeCapsuled, tmp_path: Path) -> None:
    data = b"CPSLBNDL" + bytes(40)
    (tmp_path / "b").write_bytes(data)
    reply = {"capsule": capsule(bundle=deployed()), "deployed": deployed(), "started": []}
    fake.on("Deploy", ok(**reply))
    r = capsulectl_(fake, "deploy", "web", str(tmp_path / "b"), "--allow-downgrade")
    assert (r.code, r.out) == (0, "")
    assert fake.calls == [
        call(
            "Deploy",
            name="web",
            bundle=base64.b64encode(data).decode(),
            allowDowngrade=True,
        )
    ]


def test_deploy_of_a_file_over_the_cap_is_refused_locally(
    fake: FakeCapsuled, tmp_path: Path
) -> None:
    (tmp_path / "b").write_bytes(bytes(fmt.MAX_BUNDLE_BYTES + 1))
    r = capsulectl_(fake, "deploy", "web", str(tmp_path / "b"))
    assert r.code == 1
    assert "larger than" in r.err
    assert fake.calls == []


@pytest.mark.parametrize(
    ("error", "params", "said"),
    [
        ("UnsignedBundle", {}, "not signed"),
        ("UntrustedSigner", {"keyId": "ab" * 32}, "does not trust"),
        ("BadSignature", {"keyId": "ab" * 32}, "does not match"),
        ("DowngradeRefused", {"current": "2.0", "version": "1.0"}, "--allow-downgrade"),
        ("InvalidBundle", {"reason": "truncated", "path": None}, "truncated"),
        (
            "DeployFailed",
            {
                "unit": "app.service",
                "result": "failed",
                "unitResult": "exit-code",
                "restoredVersion": "1.0",
                "rolledBack": True,
            },
            "put back to version 1.0",
        ),
    ],
)
def test_deploy_refusals_read_clearly(
    fake: FakeCapsuled, tmp_path: Path, error: str, params: dict[str, object], said: str
) -> None:
    (tmp_path / "b").write_bytes(b"x")
    fake.on("Deploy", err(f"org.capsuled.Manager.{error}", **params))
    r = capsulectl_(fake, "deploy", "web", str(tmp_path / "b"))
    assert r.code == 1
    assert said in r.err


def test_rollback(fake: FakeCapsuled) -> None:
    reply = {"capsule": capsule(bundle=deployed()), "deployed": deployed(), "started": []}
    fake.on("Rollback", ok(**reply))
    r = capsulectl_(fake, "rollback", "web")
    assert r.code == 0
    assert fake.calls == [call("Rollback", name="web")]
    fake.on("Rollback", err("org.capsuled.Manager.NoPreviousBundle", name="web"))
    r = capsulectl_(fake, "rollback", "web")
    assert (r.code, "no earlier bundle version" in r.err) == (1, True)


def test_audit_prints_a_table(fake: FakeCapsuled) -> None:
    fake.on("Audit", ok(records=[audit_record(), audit_record(8, result="denied")]))
    r = capsulectl_(fake, "audit", "web", "-n", "2")
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split() == ["TIME", "SEQ", "CALLER", "ACTION", "RESULT", "DETAILS"]
    assert "1000 (session-3.scope) deploy ok" in " ".join(lines[1].split())
    assert "signer=release version=1.2.0" in lines[1]
    assert lines[-1] == "2 records listed."
    assert fake.calls == [call("Audit", name="web", lines=2)]


def test_audit_escapes_what_callers_sent(fake: FakeCapsuled) -> None:
    record = audit_record(action="run", details={"command": "/tmp/\x1b]52;c;evil\x07"})
    fake.on("Audit", ok(records=[record]))
    r = capsulectl_(fake, "audit", "web")
    assert "\x1b" not in r.out
    assert "command=/tmp/\\x1b]52;c;evil\\a" in r.out  # as systemd's cescape() writes them


def test_status_shows_the_bundle(fake: FakeCapsuled) -> None:
    fake.on("Describe", ok(capsule=capsule(bundle=deployed())))
    r = capsulectl_(fake, "status", "web")
    bundle_line = next(line for line in r.out.splitlines() if "Bundle:" in line)
    assert "web 1.2.0 (signed by release, deployed " in bundle_line
    assert "previous 1.1.0" in bundle_line
