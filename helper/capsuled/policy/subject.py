"""Who is calling: the socket peer, its liveness and its identity in the user database *now*.

Everything here reads the system at call time on purpose: a user removed from a group loses what the
group granted at the next call, without a helper restart, and a peer that exited (or whose pid was
reused) between connecting and the check is refused.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
from dataclasses import dataclass
from typing import Protocol

from capsuled.policy.engine import Identity


class SubjectLike(Protocol):
    """Any object carrying the socket peer's credentials (capsuled.transport.Peer is one)."""

    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def pidfd(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Subject:
    """The caller's credentials from SO_PEERCRED / SO_PEERPIDFD; never from call parameters."""

    uid: int
    gid: int
    pid: int
    pidfd: int | None


def process_is_alive(subject: SubjectLike) -> bool:
    """False if the peer process is gone (a pidfd never refers to a recycled pid)."""
    if subject.pidfd is None:
        # Kernel without SO_PEERPIDFD (< 6.5): nothing reliable to check here; the polkit backend
        # falls back to pid + start-time, as polkit 122 does.
        return True
    try:
        # Signal 0 checks existence only; on a pidfd it cannot hit a recycled pid.
        signal.pidfd_send_signal(subject.pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Impossible as root, but existence is all we asked about: EPERM means it exists.
        return True
    return True


def lookup_identity(uid: int) -> Identity:
    """The uid's user name and group names from NSS, read at each call (no cache)."""
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


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), as polkit wants it.

    Raises:
        ProcessLookupError: the process is gone, or its stat line cannot be parsed.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except FileNotFoundError as exc:
        raise ProcessLookupError(pid) from exc
    # comm (field 2) may contain spaces and ')' itself: split after the *last* ')'. The fields
    # after it start at field 3 (state), so field 22 is index 19.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError) as exc:
        raise ProcessLookupError(pid) from exc
