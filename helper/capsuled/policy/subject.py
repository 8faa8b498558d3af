"""Who is calling: the socket peer, its liveness and its identity in the user database *now*.

Everything here reads the system at call time on purpose: a user removed from a group loses what the
group granted at the next call, without a helper restart, and a peer that exited (or whose pid was
reused) between connecting and the check is refused. The one thing read at connect time is the
peer's start time (capsuled.transport.peer_credentials): it is what "the same process" means when
the kernel gives no pidfd.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from capsuled.policy.engine import Identity
from capsuled.procstat import read_start_time


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
    @property
    def start_time(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Subject:
    """The caller's credentials from SO_PEERCRED / SO_PEERPIDFD; never from call parameters."""

    uid: int
    gid: int
    pid: int
    pidfd: int | None
    # /proc/PID/stat field 22 read when the connection was accepted; None: the peer was gone.
    start_time: int | None = None


def process_is_alive(
    subject: SubjectLike, start_time_of: Callable[[int], int] = read_start_time
) -> bool:
    """False if the peer process is gone or its pid now belongs to another process.

    With a pidfd the kernel answers (a pidfd never refers to a recycled pid). Without one (kernel
    < 6.5) the pid's current start time must equal the one recorded at connect: a process that
    reuses the pid starts later, so it cannot pass for the peer (polkit 122 does the same).
    `start_time_of` reads /proc; tests pass a fake.
    """
    if subject.pidfd is None:
        if subject.start_time is None:
            return False  # gone before we could record who it was: nothing to compare with
        try:
            return start_time_of(subject.pid) == subject.start_time
        except ProcessLookupError:
            return False
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
    """Field 22 of /proc/PID/stat now (see capsuled.procstat).

    Raises:
        ProcessLookupError: the process is gone, or its stat line cannot be parsed.
    """
    return read_start_time(pid)
