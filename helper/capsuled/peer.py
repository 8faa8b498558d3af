"""Who is calling: the socket peer, from the kernel only (invariant 1), and whether it still lives.

One type for the caller, everywhere: the transport records a `Peer` when it accepts a connection,
the method context carries it, the policy decides about it and polkit is told about it.

What is read when, and why:
- at accept (`peer_credentials`): uid, gid and pid from SO_PEERCRED, a pidfd from SO_PEERPIDFD
  where the kernel has it (Linux >= 6.5), and the process's start time (field 22 of
  /proc/PID/stat). The start time is what "the same process" means without a pidfd, and what
  polkit < 124 identifies a subject by; read at check time instead, it could belong to a later
  process that reused the pid.
- at check time (`process_is_alive`): whether the peer is still the process that connected.

Its own low module so that the transport, the methods and the policy share it without importing
one another, and the protocol core (capsuled.varlink) stays free of sockets and /proc.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "SO_PEERPIDFD",
    "Peer",
    "parse_start_time",
    "peer_credentials",
    "peer_uid",
    "process_is_alive",
    "read_start_time",
]

# Linux >= 6.5 (include/uapi/asm-generic/socket.h); Python's socket module has no name for it yet.
SO_PEERPIDFD: Final = 77
PROC: Final = "/proc"
# Longer than any stat line: comm is at most 16 bytes, the other 51 fields are numbers.
_STAT_MAX_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class Peer:
    """The caller's credentials from SO_PEERCRED / SO_PEERPIDFD; never from call parameters."""

    uid: int
    gid: int
    pid: int
    pidfd: int | None  # owned by the connection; closed when it ends
    # Field 22 of /proc/PID/stat, read at accept; None if the peer was already gone. Without a
    # pidfd (kernel < 6.5) it is what tells the peer from a later process reusing its pid, and it
    # is the start-time polkit (< 124) identifies the subject by.
    start_time: int | None = None


def parse_start_time(stat: bytes) -> int:
    """Field 22 of a /proc/PID/stat line (start time in clock ticks since boot).

    comm (field 2) is chosen by the process and may contain spaces and ')' itself, so the fields are
    split after the *last* ')'; what follows starts at field 3 (state), making field 22 index 19.

    Raises:
        ValueError: the line has no such field.
    """
    close = stat.rfind(b")")
    if close < 0:
        raise ValueError("no comm field in stat line")
    fields = stat[close + 1 :].split()
    try:
        value = int(fields[19])
    except IndexError:
        raise ValueError("stat line too short") from None
    if value < 0:
        raise ValueError("negative start time")
    return value


def read_start_time(pid: int, proc: str = PROC) -> int:
    """The start time of process `pid` now.

    Raises:
        ProcessLookupError: the process is gone, or its stat line cannot be parsed.
    """
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read(_STAT_MAX_BYTES)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessLookupError(pid) from exc
    try:
        return parse_start_time(stat)
    except ValueError as exc:
        raise ProcessLookupError(pid) from exc


_UCRED = "iII"  # struct ucred: pid_t pid; uid_t uid; gid_t gid


def peer_uid(sock: socket.socket) -> int:
    """The peer's uid alone (SO_PEERCRED): enough to admit or refuse a connection.

    Raises:
        OSError: SO_PEERCRED failed (not a Unix socket, or already gone).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_UCRED))
    return int(struct.unpack(_UCRED, raw)[1])


def peer_credentials(sock: socket.socket) -> Peer:
    """Read the peer's uid/gid/pid (SO_PEERCRED), where the kernel has it a pidfd, and the peer's
    start time (at accept, not at check time: by then the pid may belong to someone else).

    Raises:
        OSError: SO_PEERCRED failed (not a Unix socket, or already gone).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_UCRED))
    pid, uid, gid = struct.unpack(_UCRED, raw)
    pidfd: int | None = None
    try:
        fd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError:
        pass  # ENOPROTOOPT before Linux 6.5; polkit then falls back to pid + start time
    else:
        if fd >= 0:
            os.set_inheritable(fd, False)
            pidfd = fd
    try:
        start_time: int | None = read_start_time(pid)
    except ProcessLookupError:
        start_time = None  # gone already: every check for this peer is refused
    if start_time is not None and pidfd is not None:
        # Read after the pidfd: if its process still lives, the pid was not reused in between,
        # so the start time is the peer's.
        try:
            signal.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            start_time = None
        except PermissionError:
            pass  # it exists (EPERM cannot happen as root)
    return Peer(uid=uid, gid=gid, pid=pid, pidfd=pidfd, start_time=start_time)


def process_is_alive(peer: Peer, start_time_of: Callable[[int], int] = read_start_time) -> bool:
    """False if the peer process is gone or its pid now belongs to another process.

    With a pidfd the kernel answers (a pidfd never refers to a recycled pid). Without one (kernel
    < 6.5) the pid's current start time must equal the one recorded at connect: a process that
    reuses the pid starts later, so it cannot pass for the peer (polkit 122 does the same).
    `start_time_of` reads /proc; tests pass a fake.
    """
    if peer.pidfd is None:
        if peer.start_time is None:
            return False  # gone before we could record who it was: nothing to compare with
        try:
            return start_time_of(peer.pid) == peer.start_time
        except ProcessLookupError:
            return False
    try:
        # Signal 0 checks existence only; on a pidfd it cannot hit a recycled pid.
        signal.pidfd_send_signal(peer.pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Impossible as root, but existence is all we asked about: EPERM means it exists.
        return True
    return True
