"""Accounts from the user database, kept for a short and stated time.

Every decision needs the caller's groups (the shipped owner grant has ``require_group =
"capsule"``), and one ``getgrouplist`` costs ~0.6 ms with nss-systemd: more than the rest of a
Describe. So the helper keeps what it read, per uid, under two rules that bound how stale an
answer can be:

- the files and directories the user database is read from (SOURCES) are stat'ed at every
  lookup; when one of them changed (inode or ctime: every write, rename or chmod moves ctime),
  everything kept is dropped. ``gpasswd -d alice capsule``, ``useradd``, a new userdb drop-in
  in an existing directory (each replaces or adds a file): the next call sees them. An
  in-place edit within the same timestamp tick as the read may go unseen here; the next rule
  covers it;
- an entry is kept at most ACCOUNT_TTL_S, for what no file says: a systemd-homed or
  DynamicUser= account, LDAP through NSS, a userdb directory that did not exist at the last
  look, an edit the file system's timestamps cannot tell apart.

The cache is bounded (MAX_ACCOUNTS, least recently used first out) and is built anew with
each policy (a reload drops it too). Streams re-check their grant every STREAM_RECHECK_S
(methods/streams.py), so a follower of a capsule ends at most STREAM_RECHECK_S after a change
of the files, STREAM_RECHECK_S + ACCOUNT_TTL_S after any other.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from capsuled.policy.engine import Identity
from capsuled.policy.identity import lookup_identity, user_name

# One second: the longest a removal from a group that no file shows (see above) may go
# unseen. Long enough that the lookups it saves are nearly all of them (at 5,000 calls/s from
# one account, one getgrouplist a second instead of 5,000), short enough to stay well under a
# stream's own re-check period (5 s), which it adds to.
ACCOUNT_TTL_S: Final = 1.0
# Accounts kept at once; one Identity is a few hundred bytes. Beyond it the least recently
# used goes: a caller cycling through uids costs lookups, never memory.
MAX_ACCOUNTS: Final = 1024

# What glibc's NSS (files, systemd) and systemd-userdbd read for a user's name and groups: the
# classic files, the userdb drop-in directories (systemd's USERDB_DROPIN_DIR_NULSTR: *.user,
# *.group, *.membership) and the directory of the services' sockets (/run/systemd/userdb:
# homed, DynamicUser, machined). Not /etc/shadow or /etc/gshadow: getpwuid, getgrouplist and
# getgrgid never read them (every tool that changes a membership, gpasswd and usermod
# included, rewrites /etc/group), and each path here is a stat at every lookup.
SOURCES: Final[tuple[str, ...]] = (
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/userdb",
    "/run/userdb",
    "/run/host/userdb",
    "/usr/local/lib/userdb",
    "/usr/lib/userdb",
    "/run/systemd/userdb",
)

Stamp = tuple[int, int]  # (st_ino, st_ctime_ns)
T = TypeVar("T")


def _stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_ctime_ns)


class AccountCache:
    """`identity(uid)` and `user_name(uid)` as lookup_identity and user_name answer them, kept
    within the bounds in the module's docstring."""

    def __init__(
        self,
        *,
        ttl_s: float = ACCOUNT_TTL_S,
        max_entries: int = MAX_ACCOUNTS,
        sources: Sequence[str] = SOURCES,
        clock: Callable[[], float] = time.monotonic,
        stamp: Callable[[str], Stamp | None] = _stamp,
        lookup: Callable[[int], Identity] = lookup_identity,
        name_of: Callable[[int], str | None] = user_name,
    ) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._sources = tuple(sources)
        self._clock = clock
        self._stamp = stamp
        self._lookup = lookup
        self._name_of = name_of
        # Per uid: (when read, what was read). Names alone are kept apart: an owner's name
        # needs no getgrouplist.
        self._identities: OrderedDict[int, tuple[float, Identity]] = OrderedDict()
        self._names: OrderedDict[int, tuple[float, str | None]] = OrderedDict()
        # Every source's stamp at the last full look (None: absent), and the ones present
        # then: only those are stat'ed at each lookup (a missing path costs an exception each
        # time; one that appears is seen at the next full look, within the TTL).
        self._stamps: tuple[Stamp | None, ...] | None = None
        self._present: tuple[tuple[str, Stamp], ...] = ()

    def identity(self, uid: int) -> Identity:
        """The account `uid` is (user name, groups), at most ACCOUNT_TTL_S old."""
        return self._kept_or_read(self._identities, uid, self._lookup)

    def user_name(self, uid: int) -> str | None:
        """The user name of `uid` (None: no passwd entry), at most ACCOUNT_TTL_S old."""
        return self._kept_or_read(self._names, uid, self._name_of)

    def _kept_or_read(
        self, table: OrderedDict[int, tuple[float, T]], uid: int, read: Callable[[int], T]
    ) -> T:
        now = self._revalidate()
        kept = table.get(uid)
        if kept is not None and now - kept[0] < self._ttl_s:
            table.move_to_end(uid)
            return kept[1]
        self._look_at_sources()
        found = read(uid)
        table[uid] = (now, found)
        table.move_to_end(uid)
        if len(table) > self._max:
            table.popitem(last=False)  # the least recently used
        return found

    def clear(self) -> None:
        """Forget every account (the next lookups read the database)."""
        self._identities.clear()
        self._names.clear()

    def __len__(self) -> int:
        return len(self._identities) + len(self._names)

    def _revalidate(self) -> float:
        """Drop everything if a source present at the last full look changed; returns the
        time of the look. The clock is read first, so an entry is never younger than it says."""
        now = self._clock()
        stamp = self._stamp
        for path, seen in self._present:
            if stamp(path) != seen:
                self.clear()
                break
        return now

    def _look_at_sources(self) -> None:
        """Before each read from the database, stamp every source (a change after this look,
        even one the read already saw, drops what the read returns at the next lookup); if
        any differs from the last full look, nothing kept from before can be trusted."""
        stamps = tuple(self._stamp(path) for path in self._sources)
        if stamps != self._stamps:
            self.clear()
            self._stamps = stamps
            self._present = tuple(
                (path, s) for path, s in zip(self._sources, stamps, strict=True) if s is not None
            )
