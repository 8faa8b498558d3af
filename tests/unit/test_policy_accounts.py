"""The account cache's staleness bound: a change of the database's files is seen at the next
lookup, anything else after at most the TTL; bounded size. A fake clock and fake stamps, no
sleeps."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from capsuled.peer import Peer
from capsuled.policy import actions
from capsuled.policy.accounts import ACCOUNT_TTL_S, SOURCES, AccountCache, Stamp, _stamp
from capsuled.policy.authorizer import Authorizer
from capsuled.policy.builtin import BuiltinBackend
from capsuled.policy.engine import DEFAULT_CONFIG, Decision, Identity, Request
from capsuled.policy.identity import lookup_identity

ALICE = 1000
GROUP = "/etc/group"
USERDB = "/etc/userdb"


class World:
    """A user database, its files' stamps and a clock, all edited by the test."""

    def __init__(self) -> None:
        self.now = 100.0
        self.groups = {ALICE: {"alice", "capsule"}}
        self.stamps: dict[str, Stamp | None] = {GROUP: (1, 1), USERDB: None}
        self.lookups: list[int] = []
        self.name_lookups: list[int] = []
        self.during_lookup: list[str] = []  # sources that change while a lookup runs

    def lookup(self, uid: int) -> Identity:
        self.lookups.append(uid)
        for path in self.during_lookup:
            self.touch(path)
        self.during_lookup = []
        return Identity(uid, f"u{uid}", frozenset(self.groups.get(uid, set())))

    def name_of(self, uid: int) -> str | None:
        self.name_lookups.append(uid)
        return f"u{uid}"

    def touch(self, path: str) -> None:
        """A write or rename: the ctime moves (a new file where there was none)."""
        old = self.stamps.get(path)
        self.stamps[path] = (1, 1) if old is None else (old[0], old[1] + 1)

    def cache(self, max_entries: int = 16) -> AccountCache:
        return AccountCache(
            ttl_s=ACCOUNT_TTL_S,
            max_entries=max_entries,
            sources=(GROUP, USERDB),
            clock=lambda: self.now,
            stamp=self.stamps.get,
            lookup=self.lookup,
            name_of=self.name_of,
        )


def test_an_account_is_read_once_within_the_ttl_and_again_after_it() -> None:
    world = World()
    cache = world.cache()
    assert "capsule" in cache.identity(ALICE).groups
    world.groups[ALICE] = {"alice"}  # gone in a database no file shows (homed, LDAP)
    world.now += ACCOUNT_TTL_S - 0.001
    assert "capsule" in cache.identity(ALICE).groups  # within the bound: kept
    assert world.lookups == [ALICE]
    world.now += 0.001
    assert "capsule" not in cache.identity(ALICE).groups  # at the bound: read again
    assert world.lookups == [ALICE, ALICE]


def test_a_change_of_a_source_file_is_seen_at_the_next_lookup() -> None:
    world = World()
    cache = world.cache()
    cache.identity(ALICE)
    cache.user_name(ALICE)
    world.groups[ALICE] = {"alice"}
    world.touch(GROUP)  # gpasswd -d alice capsule renames a new /etc/group into place
    assert "capsule" not in cache.identity(ALICE).groups  # no time passed at all
    assert world.lookups == [ALICE, ALICE]
    cache.user_name(ALICE)  # names went with it
    assert world.name_lookups == [ALICE, ALICE]


def test_a_change_during_a_lookup_drops_what_it_read() -> None:
    # The sources are stamped before the database is read: a change that lands while the
    # read runs may or may not be in its answer, so the answer is not kept past it.
    world = World()
    cache = world.cache()
    world.during_lookup = [GROUP]
    cache.identity(ALICE)
    cache.identity(ALICE)
    assert world.lookups == [ALICE, ALICE]
    cache.identity(ALICE)  # nothing changed since the second read
    assert world.lookups == [ALICE, ALICE]


def test_a_source_that_appears_is_seen_within_the_ttl_and_watched_after() -> None:
    world = World()
    cache = world.cache()
    cache.identity(ALICE)
    world.touch(USERDB)  # /etc/userdb did not exist at the last look: not stat'ed per lookup
    world.now += ACCOUNT_TTL_S / 2
    cache.identity(ALICE)
    assert world.lookups == [ALICE]  # within the bound
    world.now += ACCOUNT_TTL_S / 2
    cache.identity(ALICE)  # the TTL ran out: a full look, which now includes /etc/userdb
    assert world.lookups == [ALICE, ALICE]
    world.touch(USERDB)  # a new alice:capsule.membership drop-in in it
    cache.identity(ALICE)
    assert world.lookups == [ALICE, ALICE, ALICE]


def test_a_source_that_disappears_drops_everything() -> None:
    world = World()
    cache = world.cache()
    cache.identity(ALICE)
    world.stamps[GROUP] = None
    cache.identity(ALICE)
    assert world.lookups == [ALICE, ALICE]


def test_names_and_identities_are_kept_apart() -> None:
    world = World()
    cache = world.cache()
    assert cache.user_name(ALICE) == "u1000"
    assert cache.user_name(ALICE) == "u1000"
    assert world.name_lookups == [ALICE]
    assert world.lookups == []


def test_the_cache_is_bounded_least_recently_used_first_out() -> None:
    world = World()
    cache = world.cache(max_entries=2)
    cache.identity(1)
    cache.identity(2)
    cache.identity(1)  # 1 is now the more recently used
    cache.identity(3)  # 2 goes
    assert len(cache) == 2
    cache.identity(1)
    assert world.lookups == [1, 2, 3]
    cache.identity(2)
    assert world.lookups == [1, 2, 3, 2]


def test_real_stamps_see_a_rename_and_an_edit_in_place(tmp_path: Path) -> None:
    group = tmp_path / "group"
    group.write_text("capsule:x:999:alice\n")
    first = _stamp(str(group))
    assert first is not None
    new = tmp_path / "group+"
    new.write_text("capsule:x:999:\n")
    os.replace(new, group)  # what gpasswd and vigr do
    renamed = _stamp(str(group))
    assert renamed is not None
    assert renamed != first
    os.chmod(group, 0o600)  # even a chmod moves the ctime
    assert _stamp(str(group)) != renamed
    assert _stamp(str(tmp_path / "absent")) is None


def test_every_source_systemd_reads_is_watched() -> None:
    for path in ("/etc/group", "/etc/passwd", "/etc/nsswitch.conf", "/run/systemd/userdb"):
        assert path in SOURCES
    for root in ("/etc", "/run", "/run/host", "/usr/local/lib", "/usr/lib"):
        assert f"{root}/userdb" in SOURCES  # systemd's USERDB_DROPIN_DIR_NULSTR("userdb")


def test_the_owner_grant_follows_the_cache_bound() -> None:
    world = World()
    cache = world.cache()
    authorizer = Authorizer(
        DEFAULT_CONFIG,
        BuiltinBackend(DEFAULT_CONFIG),
        lookup=cache.identity,
        name_of=cache.user_name,
        is_alive=lambda peer: True,
    )
    peer = Peer(uid=ALICE, gid=ALICE, pid=os.getpid(), pidfd=None)
    request = Request(actions.READ, "a", ALICE)

    def decide() -> Decision:
        return asyncio.run(authorizer.decide(peer, request)).decision

    assert decide() is Decision.YES
    world.groups[ALICE] = {"alice"}
    world.touch(GROUP)
    assert decide() is not Decision.YES  # the next call after /etc/group changed


def test_the_authorizer_reads_the_user_database_through_a_cache() -> None:
    authorizer = Authorizer(DEFAULT_CONFIG, BuiltinBackend(DEFAULT_CONFIG))
    assert authorizer.accounts is not None
    uid = os.getuid()
    assert authorizer.identity(uid) == lookup_identity(uid)
    assert len(authorizer.accounts) == 1
    # A lookup of its own is used as given (tests, a fake user database).
    own = Authorizer(
        DEFAULT_CONFIG, BuiltinBackend(DEFAULT_CONFIG), lookup=lambda uid: lookup_identity(uid)
    )
    assert own.accounts is None
