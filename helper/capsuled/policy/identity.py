"""The caller as the user database sees it *now*: user name and groups.

Read at call time on purpose: a user removed from a group loses what the group granted without a
helper restart. The Authorizer reads through policy/accounts.py, which keeps these answers
within a stated bound (a change of the database's files: the next call; anything else: 1 s).
(The socket peer itself, and whether it still lives, is capsuled.peer.)
"""

from __future__ import annotations

import grp
import os
import pwd

from capsuled.policy.engine import Identity


def lookup_identity(uid: int) -> Identity:
    """The uid's user name and group names from NSS, read now (policy/accounts.py keeps them)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        # No passwd entry (dynamic users without nss-systemd, a deleted account): only rules naming
        # the uid can match, group grants cannot.
        return Identity(uid=uid, user=None, groups=frozenset())
    # getgrouplist is what polkit's subject.isInGroup() consults too: the *database* membership,
    # not the supplementary groups the peer process happened to start with.
    groups: set[str] = set()
    for gid in os.getgrouplist(entry.pw_name, entry.pw_gid):
        try:
            groups.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue  # a gid without a name can match no rule (rules name groups)
    return Identity(uid=uid, user=entry.pw_name, groups=frozenset(groups))


def user_name(uid: int) -> str | None:
    """The user name of a uid, or None."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
