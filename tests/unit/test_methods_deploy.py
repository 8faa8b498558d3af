"""Deploy, Rollback and Audit against FakeBackend and real capsule homes in a temp dir.

Every refusal the issue lists changes nothing: the home's tree (bytes, modes, owners, links),
the deployment state, and the backend are compared before and after.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from methods_fixtures import (
    ALICE,
    BOB,
    MALLORY,
    NOBODY,
    UNIT_DIR,
    WANTS_DIR,
    World,
    config,
    make_world,
)
from test_safefs import snapshot

from capsuled import bundle as fmt
from capsuled import errors
from capsuled.deployments import Deployed, Deployment
from capsuled.policy import actions as act
from capsuled.policy.engine import Decision, Rule
from capsuled.policy.signers import TrustedKeys
from capsuled.trail import read_records, trail_files

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
APP = "[Unit]\nDescription=app {v}\n\n[Service]\nExecStart=/bin/sleep infinity\n"
BOT_UID = 64123  # a DynamicUser= uid, no passwd entry
BOT_UNIT = "deploy-bot.service"


def ring() -> TrustedKeys:
    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return TrustedKeys({"release": pem.decode()})


def make_bundle(
    version: str = "1.0",
    *,
    files: dict[str, bytes] | None = None,
    units: dict[str, str] | None = None,
    enable: tuple[str, ...] = ("app.service",),
    key: Ed25519PrivateKey | None = KEY,
) -> bytes:
    unit_texts = units if units is not None else {"app.service": APP.format(v=version)}
    entries = [fmt.Entry(f"units/{u}", t.encode(), 0o644) for u, t in unit_texts.items()]
    for path, data in (files if files is not None else {"app/config": version.encode()}).items():
        entries.append(fmt.Entry(f"files/{path}", data, 0o644))
    data = fmt.encode("web", version, list(enable), entries)
    return fmt.sign(data, key) if key is not None else data


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def world(tmp_path: Path) -> World:
    world = make_world(tmp_path, trusted_keys=ring()).standard()
    # The units the bundles carry, as the capsule's manager would know them after a reload.
    for unit in ("app.service", "new.service"):
        world.backend.add_unit("alpha", unit)
        world.backend.add_unit("beta", unit)
    world.forget_history()
    return world


def deploy(world: World, data: bytes, name: str = "alpha", **params: object) -> dict[str, object]:
    return world.run("Deploy", {"name": name, "bundle": b64(data), **params}).reply


def home_file(world: World, *parts: str) -> Path:
    return world.home("alpha").joinpath(*parts)


def state(world: World, name: str = "alpha") -> Deployment:
    return world.services.deployments.get(name)


def unit_state(world: World, unit: str, name: str = "alpha") -> str:
    return world.backend.capsules[name].units[unit].active_state


# -- it works ---------------------------------------------------------------------------------


def test_a_first_deploy_puts_everything_in_place(world: World) -> None:
    reply = deploy(world, make_bundle("1.0"))
    unit = home_file(world, *UNIT_DIR, "app.service")
    assert unit.read_text() == APP.format(v="1.0")
    config_file = home_file(world, "app", "config")
    assert config_file.read_bytes() == b"1.0"
    # Owned like the capsule's own files (nobody on 257), never root's.
    assert (config_file.stat().st_uid, unit.stat().st_uid) == (NOBODY, NOBODY)
    link = home_file(world, *WANTS_DIR, "app.service")
    assert os.readlink(link) == "/var/lib/capsules/alpha/.config/systemd/user/app.service"
    assert ("alpha", "reload", "") in world.backend.manager_calls
    assert ("alpha", "restart_unit", "app.service") in world.backend.manager_calls
    assert unit_state(world, "app.service") == "active"
    deployed = reply["deployed"]
    assert isinstance(deployed, dict)
    assert (deployed["name"], deployed["version"], deployed["signer"]) == ("web", "1.0", "release")
    assert deployed["keyId"] == fmt.key_id(KEY.public_key()).hex()
    assert (deployed["previousVersion"], deployed["deployedBy"]) == (None, ALICE)
    assert reply["started"] == ["app.service"]
    described = world.run("Describe", {"name": "alpha"}).reply["capsule"]
    assert isinstance(described, dict)
    assert described["bundle"] == deployed


def test_each_enable_unit_gets_its_start_limit_cleared_before_its_restart(world: World) -> None:
    deploy(world, make_bundle("1.0"))
    calls = world.backend.manager_calls
    reset = calls.index(("alpha", "reset_failed_unit", "app.service"))
    assert reset < calls.index(("alpha", "restart_unit", "app.service"))


def test_the_deploy_is_audited_in_the_journal_and_the_trail_before_the_reply(
    world: World,
) -> None:
    deploy(world, make_bundle("1.0"))
    (record,) = world.audit_for("deploy")
    assert record["CAPSULED_RESULT"] == "ok"
    assert (record["CAPSULED_VERSION"], record["CAPSULED_SIGNER"]) == ("1.0", "release")
    assert record["CAPSULED_CALLER_PID"] == str(os.getpid())
    trail = world.services.audit._trail
    assert trail is not None
    assert trail.synced_seq == trail.written_seq  # on disk before the reply went out
    (line,) = read_records(trail_files(trail.directory), lambda r: True, 10, 1 << 20)
    assert (line["action"], line["capsule"], line["result"], line["uid"]) == (
        "deploy",
        "alpha",
        "ok",
        ALICE,
    )
    details = line["details"]
    assert isinstance(details, dict)
    assert details["verb"] == "deploy"


def test_an_upgrade_replaces_files_and_removes_what_it_lacks(world: World) -> None:
    deploy(world, make_bundle("1.0", files={"app/config": b"1", "app/old": b"x"}))
    reply = deploy(world, make_bundle("1.1", files={"app/config": b"2"}))
    assert home_file(world, "app", "config").read_bytes() == b"2"
    assert not home_file(world, "app", "old").exists()
    assert home_file(world, *UNIT_DIR, "app.service").read_text() == APP.format(v="1.1")
    deployed = reply["deployed"]
    assert isinstance(deployed, dict)
    assert (deployed["version"], deployed["previousVersion"]) == ("1.1", "1.0")


def test_a_unit_the_new_version_drops_is_stopped_unlinked_and_removed(world: World) -> None:
    units = {"app.service": APP.format(v="1"), "new.service": APP.format(v="n")}
    deploy(world, make_bundle("1.0", units=units, enable=("app.service", "new.service")))
    assert unit_state(world, "new.service") == "active"
    deploy(world, make_bundle("1.1"))
    assert unit_state(world, "new.service") == "inactive"
    assert not home_file(world, *UNIT_DIR, "new.service").exists()
    assert not home_file(world, *WANTS_DIR, "new.service").is_symlink()


def test_a_downgrade_needs_allow_downgrade(world: World) -> None:
    deploy(world, make_bundle("1.2"))
    deploy(world, make_bundle("1.10.0"))  # 1.10 > 1.2: numerically, not textually
    world.forget_history()
    before = (snapshot(world.capsules_root), state(world))
    refused = world.error("Deploy", {"name": "alpha", "bundle": b64(make_bundle("1.1"))})
    assert isinstance(refused, errors.DowngradeRefused)
    assert refused.parameters == {"current": "1.10.0", "version": "1.1"}
    assert (snapshot(world.capsules_root), state(world)) == before
    assert world.backend.manager_calls == []
    (record,) = world.audit_for("deploy")
    assert record["CAPSULED_RESULT"] == errors.DowngradeRefused.name
    reply = deploy(world, make_bundle("1.1"), allowDowngrade=True)
    deployed = reply["deployed"]
    assert isinstance(deployed, dict)
    assert deployed["version"] == "1.1"
    assert world.audit_for("deploy")[-1]["CAPSULED_VERB"] == "downgrade"


def test_rollback_returns_to_the_previous_version_and_back(world: World) -> None:
    deploy(world, make_bundle("1.0", files={"app/config": b"one"}))
    deploy(world, make_bundle("2.0", files={"app/config": b"two"}))
    reply = world.run("Rollback", {"name": "alpha"}).reply
    deployed = reply["deployed"]
    assert isinstance(deployed, dict)
    assert (deployed["version"], deployed["previousVersion"]) == ("1.0", "2.0")
    assert home_file(world, "app", "config").read_bytes() == b"one"
    assert world.audit_for("rollback")[-1]["CAPSULED_VERB"] == "rollback"
    again = world.run("Rollback", {"name": "alpha"}).reply["deployed"]
    assert isinstance(again, dict)
    assert again["version"] == "2.0"
    assert home_file(world, "app", "config").read_bytes() == b"two"


def test_rollback_without_a_kept_version(world: World) -> None:
    exc = world.error("Rollback", {"name": "alpha"})
    assert isinstance(exc, errors.NoPreviousBundle)
    deploy(world, make_bundle("1.0"))
    assert isinstance(world.error("Rollback", {"name": "alpha"}), errors.NoPreviousBundle)


def test_rollback_checks_the_kept_signature_against_the_keys_of_now(world: World) -> None:
    deploy(world, make_bundle("1.0"))
    deploy(world, make_bundle("2.0"))
    world.services.authorizer.trusted_keys = TrustedKeys({})  # the key was removed
    exc = world.error("Rollback", {"name": "alpha"})
    assert isinstance(exc, errors.UntrustedSigner)
    assert state(world).current.version == "2.0"  # type: ignore[union-attr] # deployed


def test_deploy_into_a_stopped_capsule_starts_it(world: World) -> None:
    reply = world.run("Deploy", {"name": "beta", "bundle": b64(make_bundle())}, uid=BOB).reply
    capsule = reply["capsule"]
    assert isinstance(capsule, dict)
    assert capsule["state"] == "active"
    assert world.backend.capsules["beta"].units["app.service"].active_state == "active"


def test_remove_forgets_the_deployment(world: World) -> None:
    deploy(world, make_bundle())
    world.run("Stop", {"name": "alpha"})
    world.run("Remove", {"name": "alpha"})
    assert state(world) == Deployment()


# -- refused, changing nothing ------------------------------------------------------------------


def signed_raw(manifest: dict[str, object], content: bytes = b"") -> bytes:
    import struct

    text = json.dumps(manifest).encode()
    header = struct.pack(">8sHHIQ", fmt.MAGIC, 1, 0, len(text), len(content))
    return fmt.sign(header + text + content, KEY)


def escaping_bundle() -> bytes:
    return signed_raw(
        {
            "format": 1,
            "name": "web",
            "version": "9",
            "enable": [],
            "entries": [{"path": "files/../../../etc/cron.d/x", "size": 1, "mode": "0644"}],
        },
        b"x",
    )


def invalid_unit_bundle() -> bytes:
    return signed_raw(
        {
            "format": 1,
            "name": "web",
            "version": "9",
            "enable": [],
            "entries": [{"path": "units/not a unit", "size": 0, "mode": "0644"}],
        }
    )


def flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


REFUSALS: dict[str, tuple[Callable[[], bytes], type[errors.ManagerError]]] = {
    "unsigned": (lambda: make_bundle("2.0", key=None), errors.UnsignedBundle),
    "untrusted signer": (lambda: make_bundle("2.0", key=OTHER), errors.UntrustedSigner),
    "bad signature": (lambda: flipped(make_bundle("2.0"), 40), errors.BadSignature),
    "corrupted": (lambda: b"XXXXXXXX" + make_bundle("2.0")[8:], errors.InvalidBundle),
    "truncated": (lambda: make_bundle("2.0")[:-200], errors.InvalidBundle),
    "path outside the home": (escaping_bundle, errors.InvalidBundle),
    "invalid unit name": (invalid_unit_bundle, errors.InvalidBundle),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_bundles_change_nothing(world: World, case: str) -> None:
    deploy(world, make_bundle("1.0"))
    world.forget_history()
    make, error = REFUSALS[case]
    before = (snapshot(world.capsules_root), state(world))
    exc = world.error("Deploy", {"name": "alpha", "bundle": b64(make())})
    assert isinstance(exc, error), exc
    assert (snapshot(world.capsules_root), state(world)) == before
    assert world.backend.calls == []
    assert world.backend.manager_calls == []
    assert world.audit_records == []  # input, checked before the policy: not audited


def test_a_bundle_over_the_cap_is_refused_before_decoding(world: World) -> None:
    text = "A" * (4 * ((fmt.MAX_BUNDLE_BYTES + 2) // 3) + 4)
    exc = world.error("Deploy", {"name": "alpha", "bundle": text})
    assert isinstance(exc, errors.InvalidBundle)
    assert "larger than" in str(exc.parameters["reason"])


def test_a_bundle_parameter_that_is_not_base64(world: World) -> None:
    exc = world.error("Deploy", {"name": "alpha", "bundle": "not*base64"})
    assert isinstance(exc, errors.InvalidBundle)


@pytest.mark.parametrize("planted", ["symlinked directory", "symlinked file", "hardlink"])
def test_something_planted_in_the_home_refuses_the_deploy_and_changes_nothing(
    world: World, tmp_path: Path, planted: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config").write_bytes(b"root's")
    app = world.home("alpha") / "app"
    if planted == "symlinked directory":
        os.symlink(outside, app)
    elif planted == "symlinked file":
        app.mkdir()
        os.symlink(outside / "config", app / "config")
    else:
        app.mkdir()
        os.link(outside / "config", app / "config")
    before = (snapshot(world.capsules_root), snapshot(outside), state(world))
    exc = world.error("Deploy", {"name": "alpha", "bundle": b64(make_bundle())})
    assert isinstance(exc, errors.UnsafeCapsuleHome), exc
    assert (snapshot(world.capsules_root), snapshot(outside), state(world)) == before
    assert world.backend.manager_calls == []
    (record,) = world.audit_for("deploy")
    assert record["CAPSULED_RESULT"] == errors.UnsafeCapsuleHome.name


def test_a_unit_that_fails_to_start_puts_the_previous_version_back(world: World) -> None:
    deploy(world, make_bundle("1.0", files={"app/config": b"one"}))
    before = snapshot(world.home("alpha"))
    world.backend.capsules["alpha"].units["new.service"].fail_start = True
    world.forget_history()
    units = {"app.service": APP.format(v="2"), "new.service": APP.format(v="n")}
    exc = world.error(
        "Deploy",
        {
            "name": "alpha",
            "bundle": b64(
                make_bundle(
                    "2.0",
                    units=units,
                    files={"app/config": b"two", "app/extra": b"x"},
                    enable=("app.service", "new.service"),
                )
            ),
        },
    )
    assert isinstance(exc, errors.DeployFailed), exc
    assert exc.parameters["unit"] == "new.service"
    assert exc.parameters["restoredVersion"] == "1.0"
    assert exc.parameters["rolledBack"] is True
    after = snapshot(world.home("alpha"))
    # Same entries, same bytes, owners and modes; only mtimes of rewritten files may differ.
    assert {k: v[:4] + v[5:] for k, v in after.items()} == {
        k: v[:4] + v[5:] for k, v in before.items()
    }
    assert unit_state(world, "app.service") == "active"  # ran before: restarted on 1.0
    assert unit_state(world, "new.service") == "inactive"  # did not: stopped again
    calls = world.backend.manager_calls
    failed_at = calls.index(("alpha", "restart_unit", "new.service"))
    # After the failure: new.service stopped, the manager reloaded, app.service restarted.
    assert ("alpha", "stop_unit", "new.service") in calls[failed_at + 2 :]
    restarts = [i for i, c in enumerate(calls) if c == ("alpha", "restart_unit", "app.service")]
    assert len(restarts) == 2
    assert restarts[-1] > calls.index(("alpha", "reload", ""), failed_at)
    current = state(world)
    assert current.current is not None
    assert (current.current.version, current.pending) == ("1.0", None)
    (record,) = world.audit_for("deploy")
    assert (record["CAPSULED_RESULT"], record["CAPSULED_UNIT"]) == ("failed", "new.service")


def test_a_failed_first_deploy_into_a_stopped_capsule_stops_it_again(world: World) -> None:
    world.backend.capsules["beta"].units["app.service"].fail_start = True
    exc = world.error("Deploy", {"name": "beta", "bundle": b64(make_bundle())}, uid=BOB)
    assert isinstance(exc, errors.DeployFailed)
    assert exc.parameters["restoredVersion"] is None
    assert world.backend.capsules["beta"].state == "inactive"
    assert not (world.home("beta") / "app").exists()
    assert not world.home("beta").joinpath(*UNIT_DIR, "app.service").exists()


def test_an_unfinished_deploy_shows_and_its_files_go_with_the_next(world: World) -> None:
    leftover = home_file(world, "half", "done")
    leftover.parent.mkdir()
    leftover.write_bytes(b"from the deploy that was cut short")
    half = Deployed("web", "0.9", "release", "00" * 32, "11" * 32, 1, ALICE, ("half/done",), ())
    world.services.deployments.put("alpha", Deployment(pending=half))
    capsule = world.run("Describe", {"name": "alpha"}).reply["capsule"]
    assert isinstance(capsule, dict)
    assert capsule["bundle"] is None  # nothing was ever completed
    deploy(world, make_bundle("1.0"))
    assert not leftover.exists()


def test_deploy_after_pending_shows_unfinished_in_describe(world: World) -> None:
    deploy(world, make_bundle("1.0"))
    current = state(world)
    half = Deployed("web", "1.1", "release", "00" * 32, "11" * 32, 1, ALICE, (), ())
    world.services.deployments.put("alpha", current.begin(half))
    capsule = world.run("Describe", {"name": "alpha"}).reply["capsule"]
    assert isinstance(capsule, dict)
    bundle = capsule["bundle"]
    assert isinstance(bundle, dict)
    assert (bundle["version"], bundle["unfinishedVersion"]) == ("1.0", "1.1")


# -- who may ------------------------------------------------------------------------------------


def test_bob_cannot_deploy_into_alices_capsule(world: World) -> None:
    before = snapshot(world.capsules_root)
    exc = world.error("Deploy", {"name": "alpha", "bundle": b64(make_bundle())}, uid=BOB)
    assert isinstance(exc, errors.NoSuchCapsule)  # bob may not even read it
    assert snapshot(world.capsules_root) == before
    (record,) = world.audit_for("deploy")
    assert record["CAPSULED_RESULT"] == "denied"
    assert isinstance(world.error("Rollback", {"name": "alpha"}, uid=MALLORY), errors.NoSuchCapsule)


def bot_world(tmp_path: Path) -> World:
    rule = Rule(
        Decision.YES,
        actions=frozenset({act.DEPLOY}),
        caller_units=(BOT_UNIT,),
        signers=frozenset({"release"}),
        verbs=frozenset({"deploy", "rollback"}),
        capsules=("alpha",),
    )
    world = make_world(tmp_path, policy=config(rules=[rule]), trusted_keys=ring()).standard()
    world.backend.add_unit("alpha", "app.service")
    world.forget_history()
    return world


def test_a_service_named_by_its_unit_may_deploy(tmp_path: Path) -> None:
    world = bot_world(tmp_path)
    params: dict[str, object] = {"name": "alpha", "bundle": b64(make_bundle("1.0"))}
    reply = world.run("Deploy", params, uid=BOT_UID, unit=BOT_UNIT).reply
    deployed = reply["deployed"]
    assert isinstance(deployed, dict)
    assert deployed["deployedBy"] == BOT_UID
    (record,) = world.audit_for("deploy")
    assert record["CAPSULED_CALLER_UNIT"] == BOT_UNIT


@pytest.mark.parametrize(
    ("unit", "key", "version", "downgrade"),
    [
        ("other.service", KEY, "2.0", False),  # not the bot
        (None, KEY, "2.0", False),  # outside any unit
        (BOT_UNIT, OTHER, "2.0", False),  # signer not trusted at all
        (BOT_UNIT, KEY, "0.5", True),  # a downgrade: the rule allows deploy and rollback only
    ],
)
def test_the_rule_needs_its_unit_signer_and_verb(
    tmp_path: Path,
    unit: str | None,
    key: Ed25519PrivateKey,
    version: str,
    downgrade: bool,
) -> None:
    world = bot_world(tmp_path)
    world.run("Deploy", {"name": "alpha", "bundle": b64(make_bundle("1.0"))})  # alice, owner
    before = snapshot(world.capsules_root)
    params: dict[str, object] = {"name": "alpha", "bundle": b64(make_bundle(version, key=key))}
    if downgrade:
        params["allowDowngrade"] = True
    exc = world.error("Deploy", params, uid=BOT_UID, unit=unit)
    assert isinstance(exc, errors.NoSuchCapsule | errors.UntrustedSigner), exc
    assert snapshot(world.capsules_root) == before


def test_check_access_with_signer_and_verb(tmp_path: Path) -> None:
    world = bot_world(tmp_path)

    def ask(**params: object) -> object:
        reply = world.run(
            "CheckAccess",
            {"name": "alpha", "action": "deploy", **params},
            uid=BOT_UID,
            unit=BOT_UNIT,
        ).reply
        access = reply["access"]
        assert isinstance(access, dict)
        return access["result"]

    assert ask(signer="release", verb="deploy") == "yes"
    assert ask(signer="release", verb="downgrade") == "no"
    assert ask(signer="test", verb="deploy") == "no"
    assert ask(verb="deploy") == "no"  # no signer: a signers rule cannot match
    bad = world.error("CheckAccess", {"name": "alpha", "action": "deploy", "signer": "../x"})
    assert isinstance(bad, errors.InvalidValue)


# -- Audit ----------------------------------------------------------------------------------------


def test_audit_lists_the_records_about_a_capsule_to_those_who_may_read_it(world: World) -> None:
    deploy(world, make_bundle("1.0"))
    world.run("Stop", {"name": "beta"}, uid=BOB)
    world.error("Start", {"name": "alpha"}, uid=MALLORY)  # refused: recorded too
    records = world.run("Audit", {"name": "alpha"}).reply["records"]
    assert isinstance(records, list)
    assert [(r["action"], r["result"], r["callerUid"]) for r in records] == [
        ("deploy", "ok", ALICE),
        ("start", "denied", MALLORY),
    ]
    assert records[0]["details"]["version"] == "1.0"
    assert records[0]["callerPid"] == os.getpid()
    newest = world.run("Audit", {"name": "alpha", "lines": 1}).reply["records"]
    assert isinstance(newest, list)
    assert [r["action"] for r in newest] == ["start"]
    assert isinstance(world.error("Audit", {"name": "alpha"}, uid=MALLORY), errors.NoSuchCapsule)
    assert isinstance(world.error("Audit", {"name": "alpha", "lines": -1}), errors.InvalidValue)


def test_audit_shows_the_summaries_of_refusals_that_name_the_capsule(world: World) -> None:
    from capsuled.audit import REFUSALS_RECORDED_PER_WINDOW

    for _ in range(REFUSALS_RECORDED_PER_WINDOW + 3):
        world.error("Start", {"name": "alpha"}, uid=MALLORY)
    world.services.audit.flush_refusals(everything=True)
    records = world.run("Audit", {"name": "alpha"}).reply["records"]
    assert isinstance(records, list)
    summary = records[-1]
    assert (summary["result"], summary["capsule"]) == ("refused", None)
    assert summary["details"]["refusals"] == "3"
    assert "alpha" in summary["details"]["capsules"].split(",")
    assert len(records) == REFUSALS_RECORDED_PER_WINDOW + 1


def test_the_largest_deploy_call_fits_the_transports_cap_on_a_call() -> None:
    import math

    from capsuled.transport import Limits
    from capsuled.varlink.connection import ClientConnection
    from capsuled.varlink.messages import Call

    bundle = "A" * (4 * math.ceil(fmt.MAX_BUNDLE_BYTES / 3))
    call = Call(
        "org.capsuled.Manager.Deploy",
        {
            "name": "x" * 29,
            "bundle": bundle,
            "allowDowngrade": True,
            "allowInteractiveAuthentication": True,
        },
    )
    assert len(ClientConnection().send(call)) <= Limits().max_message_bytes


def test_a_symlink_planted_after_the_snapshots_refuses_the_writes_and_all_goes_back(
    world: World, tmp_path: Path
) -> None:
    """The race: the capsule swaps a directory for a link between the check and the write."""
    from capsuled.methods.deploy import Plan
    from capsuled.safefs import CapsuleHome, SafeFsError

    outside = tmp_path / "outside"
    outside.mkdir()
    (world.home("alpha") / "zz").mkdir()
    parsed = fmt.read_manifest(
        fmt.open_envelope(make_bundle("1.0", files={"app/config": b"1", "zz/late": b"2"}))
    )
    plan = Plan.build("alpha", parsed, [])
    before = snapshot(world.capsules_root)
    with CapsuleHome.open("alpha", str(world.capsules_root)) as home:
        plan.take_snapshots(home)
        (world.home("alpha") / "zz").rmdir()
        os.symlink(outside, world.home("alpha") / "zz")
        with pytest.raises(SafeFsError):
            plan.apply(home)
    os.unlink(world.home("alpha") / "zz")
    (world.home("alpha") / "zz").mkdir()
    os.chown(world.home("alpha") / "zz", NOBODY, NOBODY)
    assert list(outside.iterdir()) == []  # nothing written through the link
    after = snapshot(world.capsules_root)
    assert {k: v[:4] for k, v in after.items() if k != "alpha/zz"} == {
        k: v[:4] for k, v in before.items() if k != "alpha/zz"
    }
