"""Loading /etc/capsuled: drop-in order, schema, and refusal of unsafe or malformed files.

The ownership checks need files owned by root and by someone else, so these tests run as root
(as CI does); elsewhere the ones that chown are skipped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from capsuled.policy import actions
from capsuled.policy.config import apply_layer, load_config, read_config_files
from capsuled.policy.engine import (
    DEFAULT_CONFIG,
    DENY_ALL,
    Decision,
    Identity,
    OwnerGrants,
    PolicyConfig,
    Quota,
    Request,
    decide,
)

REPO = Path(__file__).resolve().parents[2]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown test files")

WENDY = Identity(1004, "wendy", frozenset({"wendy", "webteam"}))
MALLORY = Identity(1002, "mallory", frozenset({"mallory"}))


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """An empty, safe /etc/capsuled look-alike."""
    d = tmp_path / "capsuled"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)  # whatever the umask
    return d


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(mode=0o755, exist_ok=True)
    os.chmod(path.parent, 0o755)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_no_directory_means_the_compiled_in_default(tmp_path: Path) -> None:
    assert load_config(tmp_path / "missing") == DEFAULT_CONFIG


@as_root
def test_empty_directory_means_the_default(etc: Path) -> None:
    assert load_config(etc) == DEFAULT_CONFIG


def test_shipped_config_spells_out_the_default() -> None:
    # Applied to a config with nothing granted, the shipped file must give back the default
    # exactly: the file documents the compiled-in behaviour and is no second source of truth.
    empty = PolicyConfig(
        backend="builtin",
        owner=OwnerGrants(frozenset(), None),
        create_groups=frozenset(),
        defaults={a: Decision.NO for a in actions.ALL},
        quota=Quota(0, 0, 0, 0),
    )
    text = (REPO / "config" / "capsuled.toml").read_text()
    assert apply_layer(empty, "capsuled.toml", text) == DEFAULT_CONFIG


@as_root
def test_shipped_config_loads_as_installed(etc: Path) -> None:
    write(etc / "capsuled.toml", (REPO / "config" / "capsuled.toml").read_text())
    assert load_config(etc) == DEFAULT_CONFIG


@as_root
def test_dropins_apply_in_lexical_order_after_the_main_file(etc: Path) -> None:
    write(etc / "capsuled.toml", '[quota]\nmax_capsules = 3\n[policy]\nbackend = "polkit"\n')
    d = etc / "capsuled.toml.d"
    write(d / "20-b.toml", "[quota]\nmax_capsules = 20\n")
    write(d / "10-a.toml", "[quota]\nmax_capsules = 10\nmax_tasks = 7\n")
    write(d / "30-c.toml.disabled", "[quota]\nmax_capsules = 99\n")
    write(d / ".hidden.toml", "[quota]\nmax_capsules = 98\n")
    names = [Path(p).name for p, _ in read_config_files(etc)]
    assert names == ["capsuled.toml", "10-a.toml", "20-b.toml"]
    config = load_config(etc)
    assert config.quota == Quota(20, None, 7, None)
    assert config.backend == "polkit"


@as_root
def test_rules_from_all_files_are_concatenated_in_order(etc: Path) -> None:
    d = etc / "capsuled.toml.d"
    write(
        d / "10-deny.toml",
        '[[rule]]\nusers = ["wendy"]\ncapsules = ["web-secret"]\nresult = "no"\n',
    )
    write(
        d / "50-web.toml",
        '[[rule]]\ngroups = ["webteam"]\ncapsules = ["web-*"]\nactions = ["manage", "read"]\n'
        'result = "yes"\n',
    )
    config = load_config(etc)
    assert [r.origin.rsplit("/", 1)[1] for r in config.rules] == [
        "10-deny.toml: rule #1",
        "50-web.toml: rule #1",
    ]
    assert decide(WENDY, Request(actions.MANAGE, "web-secret", None), config) is Decision.NO
    assert decide(WENDY, Request(actions.MANAGE, "web-shop", None), config) is Decision.YES
    assert decide(WENDY, Request(actions.RUN, "web-shop", None), config) is Decision.AUTH_ADMIN


def test_full_schema() -> None:
    text = """
[policy]
backend = "builtin"
[owner]
actions = ["read", "org.capsuled.manage"]
require_group = ""
[create]
groups = ["devs", "capsule"]
[defaults]
"*" = "no"
read = "yes"
[quota]
max_capsules = 2
max_memory_bytes = "512M"
max_tasks = "infinity"
max_cpu_weight = 200
[[quota_rule]]
users = ["alice", 1001]
max_memory_bytes = "2G"
[[rule]]
users = ["wendy", 1004]
groups = ["webteam"]
actions = ["manage-units"]
capsules = ["web-*"]
verbs = ["start"]
units = ["*.service"]
result = "auth_admin"
"""
    c = apply_layer(DEFAULT_CONFIG, "t", text)
    assert c.backend == "builtin"
    assert c.owner == OwnerGrants(frozenset({actions.READ, actions.MANAGE}), None)
    assert c.create_groups == frozenset({"devs", "capsule"})
    assert c.defaults[actions.READ] is Decision.YES
    assert all(c.defaults[a] is Decision.NO for a in actions.ALL if a != actions.READ)
    assert c.quota == Quota(2, 512 << 20, None, 200)
    (qr,) = c.quota_rules
    assert qr.who.users == frozenset({"alice"})
    assert qr.who.uids == frozenset({1001})
    assert qr.limits == (("max_memory_bytes", 2 << 30),)
    (rule,) = c.rules
    assert rule.actions == frozenset({actions.MANAGE_UNITS})
    assert rule.who.uids == frozenset({1004})
    assert rule.who.groups == frozenset({"webteam"})
    assert rule.capsules == ("web-*",)
    assert rule.units == ("*.service",)
    assert rule.verbs == frozenset({"start"})
    assert rule.result is Decision.AUTH_ADMIN


MALFORMED = [
    pytest.param("[quota\n", id="not-toml"),
    pytest.param("typo = 1\n", id="unknown-top-key"),
    pytest.param("[owner]\nactions = ['read']\nrequire_groups = 'x'\n", id="unknown-owner-key"),
    pytest.param("[owner]\nactions = ['frobnicate']\n", id="unknown-action"),
    pytest.param("[owner]\nactions = 'read'\n", id="actions-not-array"),
    pytest.param("[policy]\nbackend = 'ldap'\n", id="unknown-backend"),
    pytest.param("[defaults]\nread = 'maybe'\n", id="unknown-result"),
    pytest.param("[defaults]\nread = true\n", id="result-not-string"),
    pytest.param("[defaults]\nfrob = 'yes'\n", id="defaults-unknown-action"),
    pytest.param("[quota]\nmax_capsules = -1\n", id="negative-quota"),
    pytest.param("[quota]\nmax_capsules = true\n", id="bool-quota"),
    pytest.param("[quota]\nmax_capsules = '8'\n", id="string-quota"),
    pytest.param("[quota]\nmax_tasks = '5K'\n", id="suffix-only-for-memory"),
    pytest.param("[quota]\nmax_memory_bytes = '5X'\n", id="bad-memory-suffix"),
    pytest.param("[quota]\nmax_pids = 5\n", id="unknown-quota-key"),
    pytest.param("[[rule]]\nactions = ['read']\n", id="rule-without-result"),
    pytest.param("[[rule]]\nresult = 'yes'\nuser = ['a']\n", id="rule-unknown-key"),
    pytest.param("[[rule]]\nresult = 'yes'\nusers = [true]\n", id="rule-bool-user"),
    pytest.param("[[rule]]\nresult = 'yes'\nusers = [-5]\n", id="rule-negative-uid"),
    pytest.param("[[rule]]\nresult = 'yes'\ncapsules = ['']\n", id="rule-empty-pattern"),
    pytest.param("[[rule]]\nresult = 'yes'\ngroups = 'webteam'\n", id="rule-groups-not-array"),
    pytest.param("rule = 5\n", id="rule-not-tables"),
    pytest.param("policy = 'builtin'\n", id="table-not-table"),
]


@as_root
@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_file_refuses_everything(
    etc: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    write(etc / "capsuled.toml.d" / "50-bad.toml", text)
    with caplog.at_level(logging.ERROR, logger="capsuled.policy"):
        assert load_config(etc) == DENY_ALL
    assert "50-bad.toml" in caplog.text
    assert "denying every request from non-root callers" in caplog.text


@as_root
def test_invalid_utf8_refuses(etc: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(etc / "capsuled.toml", "")
    path.write_bytes(b"[quota]\nmax_capsules = 3 # \xff\n")
    assert load_config(etc) == DENY_ALL
    assert "not valid UTF-8" in caplog.text


@as_root
@pytest.mark.parametrize(
    ("target", "uid", "mode", "reason"),
    [
        ("file", 1000, 0o644, "owned by uid 1000"),
        ("file", 0, 0o664, "writable by group or others (mode 0664)"),
        ("file", 0, 0o646, "writable by group or others (mode 0646)"),
        ("dropin", 1000, 0o644, "owned by uid 1000"),
        ("dropin", 0, 0o666, "writable by group or others"),
        ("dir", 1000, 0o755, "owned by uid 1000"),
        ("dir", 0, 0o775, "writable by group or others (mode 0775)"),
        ("dropindir", 0, 0o777, "writable by group or others"),
        ("dropindir", 1000, 0o755, "owned by uid 1000"),
    ],
)
def test_unsafe_ownership_or_mode_refuses_everything(
    etc: Path, target: str, uid: int, mode: int, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    main = write(etc / "capsuled.toml", "[quota]\nmax_capsules = 3\n")
    dropin = write(etc / "capsuled.toml.d" / "10-x.toml", "[quota]\nmax_tasks = 3\n")
    assert load_config(etc).quota == Quota(3, None, 3, None)  # safe as written
    path = {"file": main, "dropin": dropin, "dir": etc, "dropindir": dropin.parent}[target]
    os.chown(path, uid, 0)
    os.chmod(path, mode)
    with caplog.at_level(logging.ERROR, logger="capsuled.policy"):
        assert load_config(etc) == DENY_ALL
    assert reason in caplog.text
    assert str(path) in caplog.text


@as_root
def test_symlink_to_a_user_writable_file_refuses(etc: Path, tmp_path: Path) -> None:
    # The link itself lives in a root-owned directory, but what is read is what counts.
    target = write(tmp_path / "elsewhere.toml", "[quota]\nmax_capsules = 100\n")
    os.chown(target, 1000, 1000)
    (etc / "capsuled.toml").symlink_to(target)
    assert load_config(etc) == DENY_ALL


@as_root
def test_symlink_to_a_safe_file_is_followed(etc: Path, tmp_path: Path) -> None:
    target = write(tmp_path / "elsewhere.toml", "[quota]\nmax_capsules = 100\n")
    (etc / "capsuled.toml").symlink_to(target)
    assert load_config(etc).quota.max_capsules == 100


@as_root
def test_non_regular_files_refuse(etc: Path) -> None:
    os.mkfifo(etc / "capsuled.toml", 0o644)  # must not hang: opened O_NONBLOCK, then refused
    assert load_config(etc) == DENY_ALL


@as_root
def test_directory_in_place_of_the_main_file_refuses(etc: Path) -> None:
    (etc / "capsuled.toml").mkdir(mode=0o755)
    assert load_config(etc) == DENY_ALL


@as_root
def test_file_in_place_of_the_dropin_directory_refuses(etc: Path) -> None:
    write(etc / "capsuled.toml.d", "")
    assert load_config(etc) == DENY_ALL


@as_root
def test_oversized_file_refuses(etc: Path) -> None:
    write(etc / "capsuled.toml", "# " + "x" * (1024 * 1024) + "\n")
    assert load_config(etc) == DENY_ALL


@as_root
def test_one_bad_dropin_refuses_the_whole_configuration(etc: Path) -> None:
    d = etc / "capsuled.toml.d"
    write(d / "10-good.toml", '[[rule]]\nresult = "yes"\n')
    write(d / "90-bad.toml", "[[rule]]\n")
    config = load_config(etc)
    assert config == DENY_ALL
    assert decide(MALLORY, Request(actions.READ, "x", None), config) is Decision.NO
