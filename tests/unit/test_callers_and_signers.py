"""Services as callers (the caller's unit from its cgroup) and signers (trusted keys): how they
are read, how the builtin rules and polkit's details use them, and the config keys for them."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from capsuled import bundle as fmt
from capsuled.peer import Peer, parse_cgroup_file, peer_credentials, read_unit, unit_of_cgroup
from capsuled.policy import actions
from capsuled.policy.authorizer import Authorizer
from capsuled.policy.builtin import BuiltinBackend
from capsuled.policy.config import apply_layer
from capsuled.policy.engine import DEFAULT_CONFIG, Decision, Identity, PolicyConfig, Request, Rule
from capsuled.policy.polkit import polkit_details
from capsuled.policy.signers import load_trusted_keys

# -- the caller's unit ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "unit"),
    [
        ("/system.slice/deploy-bot.service", "deploy-bot.service"),
        ("/system.slice/deploy-bot.service/worker", "deploy-bot.service"),  # Delegate=yes
        ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        # A user's own services: the user names the cgroups below user@UID.service.
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice/deploy-bot.service",
            "user@1000.service",
        ),
        ("/init.scope", "init.scope"),
        ("/", None),
        ("", None),
        ("/system.slice", None),
        ("/system.slice/_cgroup.procs.service", "cgroup.procs.service"),  # cg_escape'd
        ("/system.slice/not a unit", None),
        ("/system.slice/x@.service", None),  # a template is no running unit
    ],
)
def test_the_unit_is_the_first_below_the_slices(path: str, unit: str | None) -> None:
    assert unit_of_cgroup(path) == unit


def test_the_unified_line_wins_over_the_legacy_one() -> None:
    text = "12:cpu:/x\n1:name=systemd:/legacy.slice/a.service\n0::/system.slice/b.service\n"
    assert parse_cgroup_file(text) == "/system.slice/b.service"
    assert parse_cgroup_file("1:name=systemd:/system.slice/a.service\n") == (
        "/system.slice/a.service"
    )
    assert parse_cgroup_file("5:cpu,cpuacct:/x\n") is None


def test_read_unit_of_a_process(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text("0::/system.slice/deploy-bot.service\n")
    assert read_unit(42, str(tmp_path)) == "deploy-bot.service"
    assert read_unit(43, str(tmp_path)) is None  # gone


def test_peer_credentials_read_the_unit_of_the_connecting_process() -> None:
    import socket

    a, b = socket.socketpair()
    with a, b:
        peer = peer_credentials(a)
        if peer.pidfd is not None:
            os.close(peer.pidfd)
    assert peer.unit == read_unit(os.getpid())


# -- rules -------------------------------------------------------------------------------------

BOT = Identity(64000, None, frozenset(), unit="deploy-bot.service")
SHELL = Identity(1000, "alice", frozenset({"alice"}), unit="session-3.scope")
NOWHERE = Identity(1000, "alice", frozenset({"alice"}), unit=None)
DEPLOY_RULE = Rule(
    Decision.YES,
    actions=frozenset({actions.DEPLOY}),
    caller_units=("deploy-bot.service",),
    signers=frozenset({"release"}),
    verbs=frozenset({"deploy"}),
)


def deploy(signer: str | None = "release", verb: str = "deploy") -> Request:
    return Request(actions.DEPLOY, "web", 0, verb, signer=signer)


@pytest.mark.parametrize(
    ("who", "request_", "matches"),
    [
        (BOT, deploy(), True),
        (BOT, deploy(signer="test"), False),
        (BOT, deploy(signer=None), False),
        (BOT, deploy(verb="downgrade"), False),
        (SHELL, deploy(), False),
        (NOWHERE, deploy(), False),  # outside any unit: no caller_units rule matches
        (BOT, Request(actions.RUN, "web", 0), False),
    ],
)
def test_caller_units_and_signers_in_rules(who: Identity, request_: Request, matches: bool) -> None:
    assert DEPLOY_RULE.matches(who, request_) is matches


def test_the_authorizer_takes_the_unit_from_the_socket_peer() -> None:
    config = PolicyConfig(backend="builtin", rules=(DEPLOY_RULE,))
    seen: list[Identity] = []

    def lookup(uid: int) -> Identity:
        identity = Identity(uid, None, frozenset())
        seen.append(identity)
        return identity

    auth = Authorizer(config, BuiltinBackend(config), lookup=lookup, is_alive=lambda _p: True)
    bot = Peer(uid=64000, gid=64000, pid=1, pidfd=None, start_time=1, unit="deploy-bot.service")
    other = dataclasses.replace(bot, unit="other.service")
    assert asyncio.run(auth.decide(bot, deploy())).decision is Decision.YES
    assert asyncio.run(auth.decide(other, deploy())).decision is Decision.AUTH_ADMIN
    assert seen  # the user database was asked, the unit came from the peer


def test_config_reads_caller_units_and_signers() -> None:
    text = (
        '[[rule]]\ncaller_units = ["deploy-bot.service"]\nsigners = ["release"]\n'
        'actions = ["deploy"]\nresult = "yes"\n'
    )
    (rule,) = apply_layer(DEFAULT_CONFIG, "t.toml", text).rules
    assert rule.caller_units == ("deploy-bot.service",)
    assert rule.signers == frozenset({"release"})
    assert rule.actions == frozenset({actions.DEPLOY})


def test_polkit_sees_signer_and_caller_unit() -> None:
    details = polkit_details(deploy(), None, caller_unit="deploy-bot.service")
    assert details["signer"] == "release"
    assert details["caller_unit"] == "deploy-bot.service"
    assert details["verb"] == "deploy"
    assert "caller_unit" not in polkit_details(deploy(), None)


def test_deploy_is_an_owner_grant_by_default() -> None:
    assert actions.DEPLOY in DEFAULT_CONFIG.owner.actions


# -- trusted keys ------------------------------------------------------------------------------


def pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "trusted-keys.d"
    directory.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    return directory


def test_the_file_name_is_the_signer(keys_dir: Path) -> None:
    release, test = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (keys_dir / "release.pub").write_bytes(pem(release))
    (keys_dir / "test.pub").write_bytes(pem(test))
    (keys_dir / "README").write_text("not a key")
    (keys_dir / ".hidden.pub").write_bytes(pem(test))
    ring = load_trusted_keys(keys_dir.parent)
    assert ring.refused is None
    assert sorted(ring.pems) == ["release", "test"]
    assert ring.signer_of(fmt.key_id(release.public_key())) == "release"
    assert set(ring.verifying_keys()) == {
        fmt.key_id(release.public_key()),
        fmt.key_id(test.public_key()),
    }


def test_no_directory_no_keys(tmp_path: Path) -> None:
    ring = load_trusted_keys(tmp_path)
    assert ring.refused is None
    assert ring.verifying_keys() == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize("unsafe", ["file-writable", "dir-writable", "file-owner", "bad-name"])
def test_one_unsafe_entry_refuses_the_whole_ring(keys_dir: Path, unsafe: str) -> None:
    good = keys_dir / "release.pub"
    good.write_bytes(pem(Ed25519PrivateKey.generate()))
    other = keys_dir / "other.pub"
    other.write_bytes(pem(Ed25519PrivateKey.generate()))
    if unsafe == "file-writable":
        os.chmod(other, 0o666)
    elif unsafe == "dir-writable":
        os.chmod(keys_dir, 0o777)
    elif unsafe == "file-owner":
        os.chown(other, 1000, 1000)
    else:
        other.rename(keys_dir / "-bad.pub")
    ring = load_trusted_keys(keys_dir.parent)
    assert ring.refused is not None
    assert ring.verifying_keys() == {}


def test_a_key_that_is_not_ed25519_is_left_out(keys_dir: Path) -> None:
    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    (keys_dir / "rsa.pub").write_bytes(
        rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (keys_dir / "junk.pub").write_text("-----BEGIN PUBLIC KEY-----\nnope\n")
    good = Ed25519PrivateKey.generate()
    (keys_dir / "release.pub").write_bytes(pem(good))
    ring = load_trusted_keys(keys_dir.parent)
    assert ring.refused is None
    assert set(ring.verifying_keys()) == {fmt.key_id(good.public_key())}
