"""A fresh pseudo-terminal for a command run in a capsule (Run with stdio "pty").

Allocated here, in the helper, as systemd-run --pty --capsule does (run.c: openpt_allocate, then
fchown_to_capsule on the peer): the peer goes to the command (stdin, stdout, stderr, TTYPath=)
owned by the capsule's uid with mode 0600, and the master goes back to the caller, who relays
it to their own terminal. Why here and not in the client:

- The capsule must own its terminal (job control, `tty`, programs reopening it by path), and
  only root can chown. A pty the caller allocated is owned by the caller; chowning an fd the
  caller sent would mean root chowning whatever the caller chose to send (a file it may read
  but not own, for one). A pty the helper opened itself is known to be a fresh pty.
- No process in the capsule holds anything of the caller's terminal: it holds the peer of a
  pty nobody else uses, so TIOCSTI there pushes input into its own pty, never the caller's.
  capsulectl keeps the caller's terminal and relays bytes.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import termios
from dataclasses import dataclass
from typing import Final

__all__ = ["Pty", "allocate_pty"]

# systemd's uid_is_system(): SYSTEM_UID_MAX. A capsule's uid is a dynamic one, far above it;
# anything at or below it means something is wrong, and root must not hand it a terminal.
SYSTEM_UID_MAX: Final = 999


@dataclass(frozen=True, slots=True)
class Pty:
    """An allocated pty: both fds are ours (O_CLOEXEC) until closed or handed on."""

    master: int
    peer: int
    path: str  # the peer's /dev/pts/N, for TTYPath=


def allocate_pty(uid: int, size: tuple[int, int] | None = None) -> Pty:
    """A fresh pty whose peer is owned by `uid` (and its group, a dynamic user's) mode 0600,
    of `size` (rows, columns) if given: set before the command starts, which reads it once.

    Raises:
        PermissionError: `uid` is a system uid (systemd's paranoid check, mirrored).
        OSError: no pty could be allocated or prepared.
    """
    if uid <= SYSTEM_UID_MAX:
        raise PermissionError(f"refusing to give a terminal to system uid {uid}")
    master, peer = os.openpty()  # the peer opened O_NOCTTY; both non-inheritable (PEP 446)
    try:
        if not stat.S_ISCHR(os.fstat(peer).st_mode):
            raise OSError("the pty peer is not a character device")
        path = os.ttyname(peer)
        os.fchmod(peer, 0o600)  # before the chown: still ours, no CAP_FOWNER needed
        os.fchown(peer, uid, uid)  # DynamicUser= accounts have gid == uid
        if size is not None:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    except BaseException:
        os.close(master)
        os.close(peer)
        raise
    return Pty(master, peer, path)
