"""Pin and connect to a capsule manager's private socket without trusting the capsule.

``/run/capsules/NAME`` belongs to the capsule's dynamic user: anything in the capsule may replace
``systemd/private`` with a symlink to a root-only socket, or bind its own socket there. We do what
systemd's pin_capsule_socket() (src/libsystemd/sd-bus/sd-bus.c, chase() with
CHASE_SAFE|CHASE_PROHIBIT_SYMLINKS, then "refuse system uid owners") does, and a little more:

- walk ``/run/capsules`` -> NAME -> ``systemd`` -> ``private`` one component at a time with
  O_PATH|O_NOFOLLOW from directory fds, so no component can be a symlink;
- require every component below /run/capsules to be owned by the capsule's uid, and the last to
  be a socket;
- require that uid to be a *dynamic* one (DYNAMIC_UID_MIN..DYNAMIC_UID_MAX), which is stricter
  than systemd (see ``is_dynamic_uid``);
- connect through ``/proc/self/fd/N`` of the pinned inode, so a rename between check and connect
  cannot redirect us;
- after connecting, require SO_PEERCRED's uid to be the capsule's uid too.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from typing import Final

from ..safefs import DYNAMIC_UID_MAX, DYNAMIC_UID_MIN

RUN_CAPSULES: Final = "/run/capsules"


def is_dynamic_uid(uid: int) -> bool:
    """True for uids systemd allocates to DynamicUser= services (61184..65519).

    Deliberately stricter than systemd's pin_capsule_socket() (src/shared/bus-util.c, 257),
    which only refuses uid_is_system()/gid_is_system() owners. With DynamicUser=, systemd
    reuses a *static* user that already exists under the service's User= name (c-NAME) instead
    of allocating a dynamic one (src/core/dynamic-user.c, dynamic_user_realize(): "Let's see if
    a proper, static user or group by this name exists"), so a capsule may run as a real
    account (uid >= 1000) with a home, a login and files elsewhere. capsuled acts as root for
    other users: a "capsule" whose manager runs as such an account is not one we drive (its
    socket could be any login session's). This also excludes nobody (65534), above
    DYNAMIC_UID_MAX.
    """
    return DYNAMIC_UID_MIN <= uid <= DYNAMIC_UID_MAX


class UnsafeSocket(Exception):
    """The socket path is missing, a symlink, or owned by the wrong user (reason in str())."""


def _open_component(dir_fd: int, name: str, owner: int, want: int) -> int:
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise UnsafeSocket(f"{name} does not exist") from exc
    except OSError as exc:
        raise UnsafeSocket(f"cannot open {name}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeSocket(f"{name} is a symlink")
        if stat.S_IFMT(st.st_mode) != want:
            raise UnsafeSocket(f"{name} has the wrong file type")
        if st.st_uid != owner:
            raise UnsafeSocket(f"{name} is owned by uid {st.st_uid}, not {owner}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def pin_capsule_socket(
    name: str, suffix: tuple[str, ...] = ("systemd", "private")
) -> tuple[int, int]:
    """Open an O_PATH fd on /run/capsules/NAME/<suffix...>; return (fd, owner uid).

    Raises:
        UnsafeSocket: missing, a symlink on the way, an owner outside the dynamic uid range,
            or mixed owners.
    """
    if not name or "/" in name or name in (".", ".."):
        raise UnsafeSocket("invalid capsule name")
    root_fd = os.open(RUN_CAPSULES, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fds = [root_fd]
    try:
        root_st = os.fstat(root_fd)
        if root_st.st_uid != 0:
            raise UnsafeSocket(f"{RUN_CAPSULES} is not owned by root")
        try:
            top = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        except FileNotFoundError as exc:
            raise UnsafeSocket(f"{RUN_CAPSULES}/{name} does not exist") from exc
        fds.append(top)
        st = os.fstat(top)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeSocket(f"{RUN_CAPSULES}/{name} is not a directory")
        owner = st.st_uid
        if not is_dynamic_uid(owner):
            raise UnsafeSocket(
                f"{RUN_CAPSULES}/{name} is owned by uid {owner}, not a dynamic user "
                f"({DYNAMIC_UID_MIN}..{DYNAMIC_UID_MAX})"
            )
        for component in suffix[:-1]:
            fds.append(_open_component(fds[-1], component, owner, stat.S_IFDIR))
        sock_fd = _open_component(fds[-1], suffix[-1], owner, stat.S_IFSOCK)
    finally:
        for fd in fds:
            os.close(fd)
    return sock_fd, owner


def peer_uid(sock: socket.socket) -> int:
    """SO_PEERCRED uid of a connected Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def connect_pinned(sock_fd: int, owner: int) -> socket.socket:
    """Connect (non-blocking) to a pinned socket inode and check the peer's uid.

    A Unix stream connect() either completes at once or fails with EAGAIN when the listener's
    backlog is full; non-blocking, a capsule that never accepts cannot stall the event loop.

    Raises:
        UnsafeSocket: connection refused, or the listener is not the pinned owner.
    """
    sock = socket.socket(
        socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    )
    try:
        # connect() follows the /proc magic link to exactly the inode we checked.
        sock.connect(f"/proc/self/fd/{sock_fd}")
        uid = peer_uid(sock)
        if uid != owner:
            raise UnsafeSocket(f"socket peer is uid {uid}, not {owner}")
    except OSError as exc:
        sock.close()
        raise UnsafeSocket(f"cannot connect: {exc.strerror}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def connect_capsule_manager(name: str, expected_uid: int | None = None) -> socket.socket:
    """Pin /run/capsules/NAME/systemd/private and connect to it.

    ``expected_uid``: the capsule's dynamic uid when known (from its main PID); the socket's
    owner must then equal it.

    Raises:
        UnsafeSocket: see pin_capsule_socket / connect_pinned.
    """
    fd, owner = pin_capsule_socket(name)
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, fd)
        if expected_uid is not None and owner != expected_uid:
            raise UnsafeSocket(f"socket owner {owner} is not the capsule's uid {expected_uid}")
        return connect_pinned(fd, owner)
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions
