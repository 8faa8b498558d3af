"""Signed deploy bundles, the audit trail and services as callers, end to end (issue 14's
"End to end in the testbed"), on systemd 257 and the newest.

Alice makes a key and bundles with the bed's own capsulectl; root trusts the key. Unsigned,
untrusted-signer and corrupted bundles, a symlink planted by the capsule, a downgrade without
--allow-downgrade and bob are all refused and change nothing; an upgrade, a failed upgrade put
back, a downgrade allowed, a rollback. A DynamicUser=yes system service, allowed by a
caller_units rule, deploys into a capsule root created. `capsuled audit verify` passes on the
trail of all of it, and fails naming the record after a one-byte edit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from e2e.test_inside import capsule_systemctl, poll, unit_state
from e2e.vcall import fails, ok
from testbed import Result, Testbed

pytestmark = pytest.mark.e2e

KEYS_DIR = "/etc/capsuled/trusted-keys.d"
DROPIN = "/etc/capsuled/capsuled.toml.d/60-e2e-deploy.toml"
# Readable by the DynamicUser= service (which gets a private /tmp and /var/tmp).
WORK = "/srv/e2e-deploy"
TRAIL = "/var/log/capsuled/audit.jsonl"
APP = """\
[Unit]
Description=app {version}

[Service]
ExecStart=/bin/sh -c 'echo app-{version}-{marker}; exec sleep infinity'
"""
BROKEN = """\
[Unit]
Description=does not start

[Service]
Type=exec
ExecStart=/nonexistent/binary
"""
# The tree writer, run as alice inside the bed: JSON {path: text} under a directory.
WRITE_TREE = """
import json, os, sys
top, files = sys.argv[1], json.loads(sys.argv[2])
for rel, text in files.items():
    path = os.path.join(top, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
"""
FLIP_BYTE = """
import sys
path, offset = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 1]))
"""


def ctl(bed: Testbed, user: str, *argv: str) -> Result:
    return bed.as_user(user, "capsulectl", "--no-ask-password", *argv, timeout=120)


def must(result: Result) -> Result:
    assert result.returncode == 0, f"{result.argv}: {result.stdout}{result.stderr}"
    return result


def make_bundle(
    bed: Testbed,
    name: str,
    version: str,
    marker: str,
    *,
    extra: dict[str, str] | None = None,
    enable: tuple[str, ...] = ("app.service",),
) -> str:
    """alice builds WORK/NAME-VERSION.bundle (unsigned) from a tree in her home."""
    tree = f"/home/alice/trees/{name}-{version}"
    listed = ", ".join(json.dumps(u) for u in enable)
    files = {
        "bundle.toml": f'name = "{name}"\nversion = "{version}"\nenable = [{listed}]\n',
        "units/app.service": APP.format(version=version, marker=marker),
        "files/app/config": f"version {version}\n",
        **(extra or {}),
    }
    must(bed.as_user("alice", "python3", "-c", WRITE_TREE, tree, json.dumps(files)))
    out = f"{WORK}/{name}-{version}.bundle"
    must(ctl(bed, "alice", "bundle", "build", tree, "-o", out))
    return out


def sign(bed: Testbed, path: str, key: str = "/home/alice/release.key") -> str:
    must(ctl(bed, "alice", "bundle", "sign", path, "--key", key))
    return path


def home(name: str) -> str:
    return f"/var/lib/private/capsules/{name}"


def described(bed: Testbed, user: str, name: str) -> dict[str, object]:
    capsule = ok(bed, user, "Describe", name=name)["capsule"]
    assert isinstance(capsule, dict)
    return capsule


def home_tree(bed: Testbed, name: str) -> str:
    """Every entry of the capsule's home with its type, owner, mode, size and link target."""
    return must(bed.as_root("find", home(name), "-printf", "%P %y %u:%g %m %s %l\n")).stdout


def app_config(bed: Testbed, name: str) -> str:
    return must(bed.as_root("cat", f"{home(name)}/app/config")).stdout


@pytest.fixture
def signing(bed: Testbed) -> Iterator[None]:
    """alice's release key (trusted as "release") and a rogue one (not trusted); bundles in
    WORK; the daemon restarted so it reads the key ring (as a reload would)."""
    must(bed.as_root("install", "-d", "-m", "1777", WORK))
    must(
        bed.as_root(
            "rm",
            "-rf",
            "/home/alice/trees",
            "/home/alice/release.key",
            "/home/alice/release.key.pub",
            "/home/alice/rogue.key",
            "/home/alice/rogue.key.pub",
        )
    )
    must(ctl(bed, "alice", "bundle", "keygen", "/home/alice/release.key"))
    must(ctl(bed, "alice", "bundle", "keygen", "/home/alice/rogue.key"))
    ok(bed, "alice", "Info")  # the helper runs, with the key ring it read at start (none)
    must(bed.as_root("install", "-d", "-m", "0755", KEYS_DIR))
    must(
        bed.as_root(
            "install", "-m", "0644", "/home/alice/release.key.pub", f"{KEYS_DIR}/release.pub"
        )
    )
    # The trusted keys are re-read on reload, with the policy: no restart needed.
    must(bed.as_root("systemctl", "reload", "capsuled.service", timeout=60))
    try:
        yield
    finally:
        bed.as_root("rm", "-rf", KEYS_DIR, WORK, DROPIN)
        bed.as_root("systemctl", "stop", "capsuled.service")


def test_alice_deploys_upgrades_rolls_back_and_every_refusal_changes_nothing(
    bed: Testbed, capsule_name: str, signing: None
) -> None:
    name = capsule_name
    marker = name.replace("-", "")
    ok(bed, "alice", "Create", name=name, start=True)
    v1 = sign(bed, make_bundle(bed, "web", "1.0", marker))
    v2 = sign(bed, make_bundle(bed, "web", "2.0", marker))
    unsigned = make_bundle(bed, "web", "3.0", marker)
    rogue = sign(bed, make_bundle(bed, "web", "3.1", marker), "/home/alice/rogue.key")
    corrupted = f"{WORK}/corrupted.bundle"
    must(bed.as_user("alice", "cp", v2, corrupted))
    must(bed.as_user("alice", "python3", "-c", FLIP_BYTE, corrupted, "100"))
    truncated = f"{WORK}/truncated.bundle"
    must(bed.as_user("alice", "sh", "-c", f"head -c 150 {v2} > {truncated}"))

    # Refused before anything is deployed: nothing changes in the home or in Describe.
    before = home_tree(bed, name)
    for path, said in (
        (unsigned, "not signed"),
        (rogue, "does not trust"),
        (corrupted, "does not match"),
        (truncated, "truncated"),
    ):
        r = ctl(bed, "alice", "deploy", name, path)
        assert r.returncode == 1, r
        assert said in r.stderr, r.stderr
        assert home_tree(bed, name) == before
    assert described(bed, "alice", name)["bundle"] is None
    # Over the cap, sent by hand (capsulectl refuses such a file before sending it).
    error, params = fails(bed, "alice", "Deploy", name=name, bundle="A" * 700_000)
    assert error == "org.capsuled.Manager.InvalidBundle"
    assert "larger than" in params["reason"]
    assert home_tree(bed, name) == before

    # The first version, deployed: its unit runs, its file is in place, status says so.
    must(ctl(bed, "alice", "deploy", name, v1))
    assert unit_state(bed, name, "app.service") == "active"
    assert app_config(bed, name) == "version 1.0\n"
    bundle = described(bed, "alice", name)["bundle"]
    assert isinstance(bundle, dict)
    assert (bundle["name"], bundle["version"], bundle["signer"]) == ("web", "1.0", "release")
    status = ctl(bed, "alice", "status", name).stdout
    assert "Bundle: web 1.0 (signed by release" in " ".join(status.split())

    # An upgrade; a downgrade refused, then allowed; a rollback.
    must(ctl(bed, "alice", "deploy", name, v2))
    assert app_config(bed, name) == "version 2.0\n"
    assert (
        "app 2.0" in capsule_systemctl(bed, name, "show", "-p", "Description", "app.service").stdout
    )
    r = ctl(bed, "alice", "deploy", name, v1)
    assert r.returncode == 1
    assert "--allow-downgrade" in r.stderr
    assert app_config(bed, name) == "version 2.0\n"
    must(ctl(bed, "alice", "rollback", name))
    assert app_config(bed, name) == "version 1.0\n"
    bundle = described(bed, "alice", name)["bundle"]
    assert isinstance(bundle, dict)
    assert (bundle["version"], bundle["previousVersion"]) == ("1.0", "2.0")
    must(ctl(bed, "alice", "deploy", name, v2))  # forward again (2.0 >= 1.0)
    must(ctl(bed, "alice", "deploy", name, v1, "--allow-downgrade"))
    assert app_config(bed, name) == "version 1.0\n"

    # bob may not deploy into alice's capsule: refused as if it did not exist, nothing changed.
    before = home_tree(bed, name)
    r = ctl(bed, "bob", "deploy", name, v2)
    assert r.returncode == 4, r
    assert home_tree(bed, name) == before
    # Nor may mallory (not in the group); neither of them may roll it back or read its audit.
    r = ctl(bed, "mallory", "deploy", name, v2)
    assert r.returncode == 4, r
    for user in ("bob", "mallory"):
        for method in ("Rollback", "Audit"):
            error, _ = fails(bed, user, method, name=name)
            assert error == "org.capsuled.Manager.NoSuchCapsule", (user, method, error)
    assert home_tree(bed, name) == before
    bundle = described(bed, "alice", name)["bundle"]
    assert isinstance(bundle, dict)
    assert bundle["version"] == "1.0"

    # Everyone who may read the capsule sees who did what.
    records = ok(bed, "alice", "Audit", name=name)["records"]
    assert isinstance(records, list)
    deploys = [
        (r["action"], r["result"], r["details"].get("version"))
        for r in records
        if r["action"] in ("deploy", "rollback")
    ]
    assert ("deploy", "ok", "1.0") in deploys
    assert ("deploy", "org.capsuled.Manager.DowngradeRefused", "1.0") in deploys
    assert ("rollback", "ok", "1.0") in deploys
    assert ("deploy", "denied", None) in deploys  # bob's


def test_a_failed_upgrade_and_a_planted_symlink_change_nothing(
    bed: Testbed, capsule_name: str, signing: None
) -> None:
    name = capsule_name
    marker = name.replace("-", "")
    ok(bed, "alice", "Create", name=name, start=True)
    must(ctl(bed, "alice", "deploy", name, sign(bed, make_bundle(bed, "web", "1.0", marker))))
    assert unit_state(bed, name, "app.service") == "active"

    # 2.0 brings a unit that cannot start: everything is put back, and the error says so.
    broken = make_bundle(
        bed,
        "web",
        "2.0",
        marker,
        extra={"units/broken.service": BROKEN},
        enable=("app.service", "broken.service"),
    )
    sign(bed, broken)
    before = home_tree(bed, name)
    r = ctl(bed, "alice", "deploy", name, broken)
    assert r.returncode == 1, r
    assert "broken.service" in r.stderr
    assert "put back to version 1.0" in r.stderr
    # Same entries, owners and modes (rewritten files keep their bytes).
    assert home_tree(bed, name) == before
    assert app_config(bed, name) == "version 1.0\n"
    assert unit_state(bed, name, "app.service") == "active"
    assert unit_state(bed, name, "broken.service") in ("inactive", "unknown", "")
    description = capsule_systemctl(bed, name, "show", "-p", "Description", "app.service")
    assert "app 1.0" in description.stdout  # restarted on its old file

    # The capsule plants a symlink where the bundle's directory goes: refused, nothing written
    # outside the home (or inside it).
    must(
        ok_run(
            bed,
            name,
            "/bin/sh",
            "-c",
            f"rm -rf /var/lib/capsules/{name}/app && ln -s /etc /var/lib/capsules/{name}/app",
        )
    )
    poll(
        lambda: bed.as_root("test", "-L", f"{home(name)}/app").returncode == 0,
        what="the planted symlink",
    )
    etc_before = must(bed.as_root("ls", "-la", "/etc")).stdout
    before = home_tree(bed, name)
    r = ctl(bed, "alice", "deploy", name, sign(bed, make_bundle(bed, "web", "3.0", marker)))
    assert r.returncode == 1, r
    assert "unsafe" in r.stderr
    assert home_tree(bed, name) == before
    assert must(bed.as_root("ls", "-la", "/etc")).stdout == etc_before
    assert not bed.as_root("test", "-e", "/etc/config").ok


def ok_run(bed: Testbed, name: str, *command: str) -> Result:
    """Run a command inside the capsule as alice (its owner) and wait for it."""
    return ctl(bed, "alice", "run", name, "--wait", "--", *command)


DEPLOY_BOT = """\
[Unit]
Description=e2e deploy bot (a DynamicUser= service, named by its unit in the policy)

[Service]
Type=oneshot
DynamicUser=yes
ExecStart=/usr/local/bin/capsulectl --no-ask-password deploy {capsule} {bundle}
"""


POLKIT_RULES = "/etc/polkit-1/rules.d/40-capsuled-e2e-deploy.rules"
POLKIT_RULE = """
polkit.addRule(function(action, subject) {
    if (action.id == "org.capsuled.deploy" &&
        action.lookup("caller_unit") == "e2e-deploy-bot.service" &&
        action.lookup("signer") == "release" &&
        action.lookup("capsule") == "%s")
        return polkit.Result.YES;
});
"""


def bot_may_deploy_as(bed: Testbed, name: str, unit: str) -> bool:
    """Ask, as a transient DynamicUser= service named UNIT, what the policy says."""
    asked = bed.as_root(
        "systemd-run",
        f"--unit={unit}",
        "--property=DynamicUser=yes",
        "--wait",
        "--pipe",
        "--quiet",
        "--collect",  # unloaded even when it fails: the bot's unit file must not be shadowed
        "/usr/local/bin/capsulectl",
        "--no-ask-password",
        "can-i",
        "deploy",
        name,
        "--signer",
        "release",
        timeout=60,
    )
    return "yes" in asked.stdout


@pytest.mark.parametrize("backend", ["builtin", "polkit"])
def test_a_dynamic_user_service_deploys_by_its_unit_name(
    bed: Testbed, capsule_name: str, signing: None, backend: str
) -> None:
    name = capsule_name
    marker = name.replace("-", "")
    # root creates the capsule; only the bot's unit is named in the policy.
    ok(bed, "root", "Create", name=name, start=True)
    bundle = sign(bed, make_bundle(bed, "web", "1.0", marker))
    if backend == "builtin":
        policy = (
            '[policy]\nbackend = "builtin"\n\n[[rule]]\n'
            'caller_units = ["e2e-deploy-bot.service"]\nactions = ["deploy"]\n'
            f'signers = ["release"]\ncapsules = ["{name}"]\nresult = "yes"\n'
        )
        must(bed.as_root("sh", "-c", f"cat > {DROPIN} && chmod 0644 {DROPIN}", input=policy))
        must(bed.as_root("systemctl", "stop", "capsuled.service"))  # the next call reads it
    else:
        rule = POLKIT_RULE % name
        must(bed.as_root("sh", "-c", f"cat > {POLKIT_RULES}", input=rule))
    try:
        # polkitd re-reads its rules when the directory changes: asking as a transient service
        # of the bot's name until the answer is yes waits for that (and proves the detail).
        poll(lambda: bot_may_deploy_as(bed, name, "e2e-deploy-bot"), what="the policy")
        assert not bot_may_deploy_as(bed, name, "e2e-other-bot")
        for unit in ("e2e-deploy-bot", "e2e-other-bot"):
            text = DEPLOY_BOT.format(capsule=name, bundle=bundle)
            must(bed.as_root("sh", "-c", f"cat > /etc/systemd/system/{unit}.service", input=text))
        must(bed.as_root("systemctl", "daemon-reload"))
        # A service the rule does not name is refused; nothing is deployed.
        other = bed.as_root("systemctl", "start", "e2e-other-bot.service", timeout=120)
        log = bed.as_root("journalctl", "--no-pager", "-u", "e2e-other-bot.service").stdout
        assert other.returncode != 0, log
        assert described(bed, "root", name)["bundle"] is None
        started = bed.as_root("systemctl", "start", "e2e-deploy-bot.service", timeout=120)
        log = bed.as_root("journalctl", "--no-pager", "-u", "e2e-deploy-bot.service").stdout
        assert started.returncode == 0, log
        bundle_info = described(bed, "root", name)["bundle"]
        assert isinstance(bundle_info, dict)
        assert bundle_info["version"] == "1.0"
        uid = bundle_info["deployedBy"]
        assert isinstance(uid, int)
        assert 61184 <= uid <= 65519  # a dynamic uid, which no rule could have named
        assert unit_state(bed, name, "app.service") == "active"
        records = ok(bed, "root", "Audit", name=name)["records"]
        assert isinstance(records, list)
        units = {(r["callerUnit"], r["result"]) for r in records if r["action"] == "deploy"}
        assert ("e2e-deploy-bot.service", "ok") in units
        assert ("e2e-other-bot.service", "denied") in units
    finally:
        for unit in ("e2e-deploy-bot", "e2e-other-bot"):
            bed.as_root("systemctl", "reset-failed", f"{unit}.service")
            bed.as_root("rm", "-f", f"/etc/systemd/system/{unit}.service")
        bed.as_root("rm", "-f", POLKIT_RULES, DROPIN)
        bed.as_root("systemctl", "daemon-reload")
        bed.as_root("systemctl", "stop", "capsuled.service")


def test_deploys_in_quick_succession_do_not_trip_the_start_limit(
    bed: Testbed, capsule_name: str, signing: None
) -> None:
    # systemd allows five starts of a unit in ten seconds (StartLimitBurst=); each deploy
    # restarts app.service, and a deliberate new version must not count as a crash loop.
    name = capsule_name
    marker = name.replace("-", "")
    ok(bed, "alice", "Create", name=name, start=True)
    bundles = [sign(bed, make_bundle(bed, "web", f"{v}.0", marker)) for v in range(1, 8)]
    for path in bundles:
        must(ctl(bed, "alice", "deploy", name, path))
    assert unit_state(bed, name, "app.service") == "active"
    must(ctl(bed, "alice", "rollback", name))
    assert app_config(bed, name) == "version 6.0\n"


def test_the_whole_trail_verifies_and_a_one_byte_edit_is_named(bed: Testbed) -> None:
    # Runs after the scenarios above (pytest keeps file order): their records are all there.
    # Stopping the helper signs a last checkpoint over what it wrote.
    must(bed.as_root("systemctl", "stop", "capsuled.service"))
    # The helper's signing key, made by `capsuled install`: root's alone.
    key = must(bed.as_root("stat", "-c", "%U %a", "/var/lib/capsuled/audit-signing.key"))
    assert key.stdout.split() == ["root", "600"]
    trail_mode = must(bed.as_root("stat", "-c", "%U %a", "/var/log/capsuled"))
    assert trail_mode.stdout.split() == ["root", "700"]
    ok_verify = bed.as_root("capsuled", "audit", "verify")
    assert ok_verify.returncode == 0, ok_verify.stderr
    assert "audit trail OK" in ok_verify.stdout
    lines = must(bed.as_root("cat", TRAIL)).stdout.splitlines()
    index = next(i for i, line in enumerate(lines) if '"action":"deploy"' in line)
    record = json.loads(lines[index])
    offset = sum(len(line.encode()) + 1 for line in lines[:index]) + lines[index].index('"ok"') + 1
    must(bed.as_root("python3", "-c", FLIP_BYTE, TRAIL, str(offset)))
    try:
        bad = bed.as_root("capsuled", "audit", "verify")
        assert bad.returncode == 1
        assert f"audit.jsonl:{index + 1}: record seq {record['seq']} was modified" in bad.stderr
    finally:
        must(bed.as_root("python3", "-c", FLIP_BYTE, TRAIL, str(offset)))  # put it back
    assert bed.as_root("capsuled", "audit", "verify").returncode == 0
