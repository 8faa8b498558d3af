"""Who is calling: the socket peer, from the kernel only (invariant 1), and whether it still lives.

One type for the caller, everywhere: the transport records a `Peer` when it accepts a connection,
the method context carries it, the policy decides about it and polkit is told about it.

What is read when, and why:
- at accept (`peer_credentials`): uid, gid and pid from SO_PEERCRED, a pidfd from SO_PEERPIDFD
  where the kernel has it (Linux >= 6.5), the process's start time (field 22 of
  /proc/PID/stat) and the system unit it runs in (from /proc/PID/cgroup). The start time is what
  "the same process" means without a pidfd, and what polkit < 124 identifies a subject by; read
  at check time instead, it could belong to a later process that reused the pid. Both /proc
  reads are confirmed afterwards through the pidfd (or the start time again), as systemd's
  pidref_verify() does, so they describe the peer and not a later owner of its pid.

Why the unit is trustworthy: a process's cgroup is set by PID 1 when it starts a unit, and only
whoever may write the target cgroup's cgroup.procs can move a process; the cgroups of system
units belong to root. A user can create and enter cgroups only below a subtree delegated to them
(user@UID.service, Delegate=yes), which is why the unit is the *first* unit below the slices
(systemd's cg_path_get_unit()): a user's own services all read as user@UID.service, and a
process in a login session as session-N.scope. A process in the root cgroup, or where the
cgroup cannot be read (no cgroup2, the peer already gone), has no unit (None).
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

from capsuled.names import unit_name_problem

__all__ = [
    "SO_PEERPIDFD",
    "Peer",
    "parse_start_time",
    "peer_credentials",
    "peer_uid",
    "process_is_alive",
    "read_start_time",
    "read_unit",
    "unit_of_cgroup",
]

# Linux >= 6.5 (include/uapi/asm-generic/socket.h); Python's socket module has no name for it yet.
SO_PEERPIDFD: Final = 77
PROC: Final = "/proc"
# Longer than any stat line: comm is at most 16 bytes, the other 51 fields are numbers.
_STAT_MAX_BYTES: Final = 4096
# /proc/PID/cgroup: one line per hierarchy; a path is at most PATH_MAX.
_CGROUP_MAX_BYTES: Final = 64 * 1024


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
    # The system unit the peer ran in at accept ("deploy-bot.service", "session-3.scope",
    # "user@1000.service"); None outside any unit (see the module docstring for why it holds).
    unit: str | None = None


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


def unit_of_cgroup(path: str) -> str | None:
    """The unit a cgroup path belongs to, as systemd's cg_path_get_unit() finds it: slices are
    skipped, the first other component (cg_unescape'd: a leading '_' dropped) is the unit if it
    is a valid, non-slice, non-template unit name; else None ("/", "/init.scope" is init.scope)."""
    for part in path.strip("/").split("/"):
        if not part:
            return None
        if part.endswith(".slice"):
            continue
        name = part[1:] if part.startswith("_") else part
        if unit_name_problem(name) is not None or "@." in name or name.endswith(".slice"):
            return None
        return name
    return None


def parse_cgroup_file(text: str) -> str | None:
    """The cgroup path in /proc/PID/cgroup: the unified hierarchy's ("0::PATH"), else the
    legacy name=systemd one ("N:name=systemd:PATH"), as systemd itself picks."""
    legacy: str | None = None
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            return path
        if controllers == "name=systemd":
            legacy = path
    return legacy


def read_unit(pid: int, proc: str = PROC) -> str | None:
    """The system unit process `pid` runs in now, or None (no unit, gone, unreadable)."""
    try:
        with open(f"{proc}/{pid}/cgroup", "rb") as f:
            raw = f.read(_CGROUP_MAX_BYTES)
    except OSError:
        return None
    path = parse_cgroup_file(raw.decode("utf-8", "replace"))
    return unit_of_cgroup(path) if path is not None else None


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
    unit = read_unit(pid) if start_time is not None else None
    if start_time is not None and pidfd is not None:
        # Read after the pidfd: if its process still lives, the pid was not reused in between,
        # so the start time and the cgroup are the peer's.
        try:
            signal.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            start_time = None
        except PermissionError:
            pass  # it exists (EPERM cannot happen as root)
    elif start_time is not None:
        # No pidfd: the same start time after the cgroup read means the same process.
        try:
            if read_start_time(pid) != start_time:
                start_time = None
        except ProcessLookupError:
            start_time = None
    if start_time is None:
        unit = None
    return Peer(uid=uid, gid=gid, pid=pid, pidfd=pidfd, start_time=start_time, unit=unit)


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
