"""Files under a capsule's home, touched without ever following the capsule's links (invariant 2).

A capsule's home (``/var/lib/private/capsules/NAME``) belongs to its dynamic user: any process in
the capsule can plant symlinks, hardlinks, FIFOs or swap directories at any moment.  Root must
never be tricked into writing, deleting or chowning outside it.  The rules, all enforced here:

- Every path is walked one component at a time from an open directory fd with
  ``O_NOFOLLOW|O_DIRECTORY`` (``openat``).  Components are validated single names (no '/', '.',
  '..'), so the walk can neither climb out nor follow a link: ``openat2(RESOLVE_BENEATH|
  RESOLVE_NO_SYMLINKS)`` would add nothing over this and needs a raw syscall, so it is not used.
- The walk from "/" to the home itself uses the same rule: none of var, lib, private, capsules,
  NAME may be a symlink (``/var/lib/capsules`` is a symlink, so we go through ``private``).
- Files are never opened for writing if they exist: a new file is created under a temporary name
  with ``O_CREAT|O_EXCL|O_NOFOLLOW``, fchmod'ed, fchown'ed, written, fsync'ed, then ``renameat``'ed
  over the target; rename replaces the directory *entry*, so a hardlink or symlink at the target
  is never written through.  The directory is fsync'ed afterwards.
- Ownership and mode are only ever changed through an fd: one we just created (``fchown``/
  ``fchmod``) or, for symlinks, an ``O_PATH|O_NOFOLLOW`` fd checked to be a singly linked symlink
  (``fchownat(fd, "", AT_EMPTY_PATH)``).  Never through a path or a name.
- Removal is ``unlinkat`` of the entry: it never touches what a link points to.

Ownership: new files and directories get the owner of the home directory itself, detected with
``fstat`` on its fd.  On systemd 257 a capsule's state directory is recursively chowned to 65534 on
disk (ID-mapped to the dynamic uid inside the capsule); on <= 255 to the dynamic uid itself.  A home
owned by anything else is refused, like systemd's ``pin_capsule_socket()`` (src/shared/bus-util.c)
refuses a capsule socket owned by a system uid.

Exception tree (OSError is translated once, here, always ``raise ... from exc``)::

    SafeFsError            any failure; .path (for humans), .reason
     ├── NotFound          a directory or file that must exist does not
     │    └── NoHome       the capsule's home directory does not exist (never started)
     ├── UnsafePath        a symlink, non-directory, non-regular file, hardlinked file or
     │                     foreign owner where we refuse to go on
     ├── FileTooLarge      read_file() or snapshot_entry() found more than max_bytes
     └── TooManyEntries    list_dir() found more than max_entries entries

All calls of CapsuleHome block (a few syscalls each, an fsync per write): the daemon reaches
them only through `CapsuleHomes.run`, which does a whole piece of work in a bounded pool of
worker threads, opening and closing the home's directory fd in that thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Self, TypeVar

from capsuled.names import capsule_name_problem

CAPSULES_ROOT = "/var/lib/private/capsules"

# user-util.h / meson: DYNAMIC_UID_MIN 0xEF00 .. DYNAMIC_UID_MAX 0xFFEF, UID_NOBODY 65534.
DYNAMIC_UID_MIN = 61184
DYNAMIC_UID_MAX = 65519
UID_NOBODY = 65534

FILE_MODE = 0o644
DIR_MODE = 0o755

# list_dir()'s default bound. The capsule fills its own directories at will (a million files in
# ~/.config/systemd/user stalled a listing for 30 s and 426 MiB); a user manager with thousands
# of unit files is already far beyond any real capsule, so past this we refuse rather than scan.
MAX_LIST_ENTRIES = 4096

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted by the capsule must not hang the helper in open(); the fstat check
# right after refuses it anyway.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_NAME_MAX_BYTES = 255
_TEMP_ATTEMPTS = 16


class SafeFsError(Exception):
    """Base of every error raised here; ``path`` names the place for a human, ``reason`` why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NotFound(SafeFsError):
    """A file or directory that must exist does not."""


class NoHome(NotFound):
    """The capsule's home directory does not exist (the capsule never ran, or was cleaned)."""


class UnsafePath(SafeFsError):
    """Something planted or foreign where we refuse to go on (symlink, wrong type, owner, links)."""


class FileTooLarge(SafeFsError):
    """read_file() found more bytes than the caller allowed."""


class TooManyEntries(SafeFsError):
    """list_dir() found more entries than the caller allowed; ``max_entries`` is that bound."""

    def __init__(self, path: str, max_entries: int) -> None:
        super().__init__(path, f"holds more than {max_entries} entries")
        self.max_entries = max_entries


class EntryKind(StrEnum):
    """What a directory entry is, judged without following it (lstat semantics)."""

    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Owner:
    """Who the capsule's files belong to on disk."""

    uid: int
    gid: int


def _kind_of_mode(mode: int) -> EntryKind:
    if stat.S_ISREG(mode):
        return EntryKind.FILE
    if stat.S_ISDIR(mode):
        return EntryKind.DIRECTORY
    if stat.S_ISLNK(mode):
        return EntryKind.SYMLINK
    return EntryKind.OTHER


def _entry_kind(entry: os.DirEntry[str]) -> EntryKind:
    # DirEntry answers from getdents' d_type without a syscall on most file systems (lstat only
    # where d_type is DT_UNKNOWN); follow_symlinks=False everywhere, so nothing is followed.
    if entry.is_symlink():
        return EntryKind.SYMLINK
    if entry.is_file(follow_symlinks=False):
        return EntryKind.FILE
    if entry.is_dir(follow_symlinks=False):
        return EntryKind.DIRECTORY
    return EntryKind.OTHER


def owner_is_acceptable(uid: int, gid: int, *, allow_root: bool = False) -> bool:
    """True for the owners systemd gives a capsule's state directory (65534, or a dynamic id).

    ``allow_root``: a home made by root before the capsule's first start; systemd re-chowns
    StateDirectory= recursively on start when its owner does not match.
    """

    def ok(ident: int) -> bool:
        return ident == UID_NOBODY or DYNAMIC_UID_MIN <= ident <= DYNAMIC_UID_MAX

    if allow_root and uid == 0 and gid == 0:
        return True
    return ok(uid) and ok(gid)


def check_component(component: str, where: str) -> None:
    """Refuse anything that is not one plain directory entry name.

    Raises:
        UnsafePath: empty, '.', '..', containing '/' or NUL, or longer than NAME_MAX.
    """
    if (
        component in ("", ".", "..")
        or "/" in component
        or "\0" in component
        or len(os.fsencode(component)) > _NAME_MAX_BYTES
    ):
        raise UnsafePath(f"{where}/{component}", "not a single file name")


def _join(base: str, parts: Sequence[str]) -> str:
    return "/".join([base.rstrip("/") or "", *parts]) if parts else base


def _describe_entry(parent_fd: int, name: str) -> str:
    """Why ``name`` could not be opened as a directory, judged by lstat, for the error message."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        return "changed while being opened"
    kind = _kind_of_mode(st.st_mode)
    if kind is EntryKind.SYMLINK:
        return "is a symlink; refusing to follow it"
    if kind is EntryKind.DIRECTORY:
        return "changed while being opened"
    return f"is not a directory (it is a {kind.value} entry)"


def _open_dir_at(parent_fd: int, name: str, display: str) -> int:
    """openat(parent_fd, name, O_DIRECTORY|O_NOFOLLOW), errors translated.

    Raises:
        NotFound: no such entry.
        UnsafePath: a symlink or not a directory.
        SafeFsError: any other OSError.
    """
    try:
        # O_NOFOLLOW: the capsule owns this directory and may have planted a symlink (invariant 2).
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError as exc:
        raise NotFound(display, "does not exist") from exc
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(display, _describe_entry(parent_fd, name)) from exc
        raise SafeFsError(display, exc.strerror or str(exc)) from exc


def _make_dir_at(parent_fd: int, name: str) -> None:
    """mkdirat(); a seam so that tests can race the creation."""
    os.mkdir(name, 0o700, dir_fd=parent_fd)


def _temp_name(final: str) -> str:
    # Hidden and clearly ours; systemd's unit loader skips hidden files (hidden_or_backup_file()),
    # so a leftover after a crash is never loaded as a unit.  ``final`` is not embedded: a long
    # non-ASCII name could push the temporary name past NAME_MAX bytes.
    # os.urandom is what secrets.token_hex reads; secrets imports hmac, which loads libcrypto.
    return f".#capsuled.{os.urandom(8).hex()}.tmp"


def write_atomically_at(
    dir_fd: int,
    filename: str,
    data: bytes,
    owner: Owner,
    *,
    mode: int = FILE_MODE,
    display: str = "",
) -> None:
    """Atomically replace ``filename`` in ``dir_fd`` with ``data``, owned by ``owner``.

    The target entry, if any, must be a regular file with one link: rename over anything else
    would be safe too (rename replaces the entry and writes through nothing), but a symlink or
    hardlink there was planted by the capsule and deserves a clear refusal, not silent repair.
    A directory there cannot be renamed over.

    Raises:
        UnsafePath: the target is a symlink, a directory, a special file or hardlinked.
        SafeFsError: any OSError on the way; the temporary file is removed.
    """
    where = display or filename
    check_component(filename, display)
    # Never setuid/setgid/sticky, never group- or world-writable, whatever the caller asked.
    mode &= 0o755
    _refuse_unusual_target(dir_fd, filename, where)
    # Keep the fd from the O_EXCL open: re-opening the temporary name would let the capsule
    # swap a hardlink to a root-owned file in under it.
    temp, fd = _create_temp_file(dir_fd, filename, where)
    try:
        # Mode first, while root still owns the inode: chmod after the chown would need
        # CAP_FOWNER on top of CAP_CHOWN.
        os.fchmod(fd, mode)
        os.fchown(fd, owner.uid, owner.gid)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(dir_fd, temp)
        raise SafeFsError(where, f"cannot write: {exc.strerror}") from exc
    os.close(fd)
    _rename_into_place(dir_fd, temp, filename, where)


def _create_temp_file(dir_fd: int, final: str, where: str) -> tuple[str, int]:
    """Create a new file under a fresh temporary name; O_EXCL so nothing planted is reused."""
    for _ in range(_TEMP_ATTEMPTS):
        temp = _temp_name(final)
        try:
            fd = os.open(temp, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        except OSError as exc:
            raise SafeFsError(where, f"cannot create temporary file: {exc.strerror}") from exc
        return temp, fd
    raise SafeFsError(where, "cannot find a free temporary name")


def _refuse_unusual_target(dir_fd: int, filename: str, where: str) -> None:
    try:
        st = os.stat(filename, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SafeFsError(where, exc.strerror or str(exc)) from exc
    kind = _kind_of_mode(st.st_mode)
    if kind is EntryKind.SYMLINK:
        raise UnsafePath(where, "is a symlink; refusing to replace it")
    if kind is not EntryKind.FILE:
        raise UnsafePath(where, f"exists and is a {kind.value} entry, not a regular file")
    if st.st_nlink > 1:
        raise UnsafePath(where, f"is hardlinked ({st.st_nlink} links); refusing to replace it")


def _rename_into_place(dir_fd: int, temp: str, final: str, where: str) -> None:
    try:
        os.rename(temp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        _unlink_quietly(dir_fd, temp)
        if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise UnsafePath(where, "a directory is in the way") from exc
        raise SafeFsError(where, f"cannot rename into place: {exc.strerror}") from exc
    try:
        # The rename is durable only once the directory itself is on disk.
        os.fsync(dir_fd)
    except OSError as exc:
        raise SafeFsError(where, f"cannot sync directory: {exc.strerror}") from exc


# fcntl.h; Python's os module has no AT_EMPTY_PATH (3.11..3.13), and os.chown(fd) is fchown(),
# which fails with EBADF on an O_PATH fd.
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000


def _fchownat_empty_path(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", uid, gid, AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW): chown the inode ``fd``
    refers to, even a symlink opened with O_PATH|O_NOFOLLOW (Linux >= 2.6.39).

    Raises:
        OSError: from the syscall.
    """
    import ctypes  # here: only a write of a symlink into a home needs it (start-up cost)

    libc = ctypes.CDLL(None, use_errno=True)
    fchownat = libc.fchownat
    fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
    fchownat.restype = ctypes.c_int
    if fchownat(fd, b"", uid, gid, _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _chown_new_symlink(dir_fd: int, name: str, owner: Owner, display: str) -> None:
    """Give the symlink we just created as ``name`` to ``owner``, without trusting the name.

    The directory belongs to the capsule, which sees our temporary name appear (readdir,
    inotify: the random part is no secret) and may swap another entry in under it before we
    chown. ``lchownat`` by name would then chown whatever it put there, e.g. a hardlink to a
    root-owned file where fs.protected_hardlinks=0. So we pin the entry with O_PATH|O_NOFOLLOW,
    check it is still a symlink with one link (anything the capsule can swap in that passes is
    a symlink it could have made itself, and chowning a symlink never touches its target), and
    chown that inode through the fd.

    Raises:
        UnsafePath: the entry is no longer a singly linked symlink.
        SafeFsError: any OSError.
    """
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise SafeFsError(display, f"cannot open our new symlink: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISLNK(st.st_mode) or st.st_nlink != 1:
            raise UnsafePath(display, "our new symlink was replaced while being created")
        _fchownat_empty_path(fd, owner.uid, owner.gid)
    except OSError as exc:
        raise SafeFsError(display, f"cannot set owner: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _unlink_quietly(dir_fd: int, name: str) -> None:
    # Best-effort cleanup of our own temporary name while another error is already on its way.
    with suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


@dataclass(frozen=True, slots=True)
class EntrySnapshot:
    """One entry below a home as it was (CapsuleHome.snapshot_entry), to be put back exactly."""

    rel_dir: tuple[str, ...]
    name: str
    kind: EntryKind | None  # FILE, SYMLINK, or None: there was nothing
    data: bytes = b""  # FILE: its bytes
    mode: int = FILE_MODE  # FILE: its permission bits
    target: str = ""  # SYMLINK: its target text
    # Nothing there, and the directory rel_dir[:missing_dirs_from] did not exist either: it and
    # those below it are made by the change, and removed again (if empty) by a restore.
    missing_dirs_from: int | None = None


class CapsuleHome:
    """An open directory fd on one capsule's home; every operation is relative to it.

    Use as a context manager (``with CapsuleHome.open(name) as home: ...``); the fd is closed on
    exit.  ``rel_dir`` arguments are tuples of single names below the home, e.g.
    ``(".config", "systemd", "user")``.
    """

    def __init__(self, name: str, fd: int, owner: Owner, display: str) -> None:
        self.name = name
        self._fd = fd
        self.owner = owner
        self.display = display

    @classmethod
    def open(cls, name: str, root: str = CAPSULES_ROOT, *, allow_root_owned: bool = False) -> Self:
        """Open the home of capsule ``name`` under ``root`` (a parameter for tests).

        Raises:
            ValueError: ``name`` is not a valid capsule name (a caller bug: validate first).
            NoHome: the home does not exist.
            UnsafePath: a symlink on the way, or the home has an owner systemd would not give it.
        """
        problem = capsule_name_problem(name)
        if problem is not None:
            raise ValueError(f"invalid capsule name {name!r}: {problem}")
        if not root.startswith("/"):
            raise ValueError(f"root must be absolute: {root!r}")
        display = _join(root, [name])
        parts = [p for p in root.split("/") if p]
        fd = os.open("/", _DIR_FLAGS)
        walked = ""
        try:
            for part in [*parts, name]:
                check_component(part, walked)
                walked = f"{walked}/{part}"
                try:
                    next_fd = _open_dir_at(fd, part, walked)
                except NotFound as exc:
                    raise NoHome(display, "the capsule has no home directory") from exc
                os.close(fd)
                fd = next_fd
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not owner_is_acceptable(st.st_uid, st.st_gid, allow_root=allow_root_owned):
            os.close(fd)
            raise UnsafePath(
                display,
                f"owned by {st.st_uid}:{st.st_gid}, not by nobody (65534) or a dynamic user "
                f"({DYNAMIC_UID_MIN}..{DYNAMIC_UID_MAX}); refusing to touch it",
            )
        return cls(name, fd, Owner(st.st_uid, st.st_gid), display)

    @property
    def fd(self) -> int:
        """The home's directory fd (owned by this object)."""
        if self._fd < 0:
            raise ValueError("CapsuleHome is closed")
        return self._fd

    def close(self) -> None:
        """Close the home's fd; idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def path_of(self, rel: Sequence[str]) -> str:
        """A human-readable path for messages (never used to open anything)."""
        return _join(self.display, rel)

    def open_dir(self, rel: Sequence[str], *, create: bool) -> int:
        """Open the directory ``rel`` below the home; the caller closes the returned fd.

        With ``create``, missing components are made (mode 0755, the home's owner).  An
        existing component that is a symlink or not a directory is refused.

        Raises:
            NotFound: a component is missing and ``create`` is false.
            UnsafePath: a component is a symlink or not a directory.
            SafeFsError: any other OSError.
        """
        fd = os.dup(self.fd)
        done: list[str] = []
        try:
            for part in rel:
                check_component(part, self.path_of(done))
                done.append(part)
                display = self.path_of(done)
                try:
                    next_fd = _open_dir_at(fd, part, display)
                except NotFound:
                    if not create:
                        raise
                    next_fd = self._create_dir_at(fd, part, display)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _create_dir_at(self, parent_fd: int, name: str, display: str) -> int:
        try:
            _make_dir_at(parent_fd, name)
        except FileExistsError:
            pass  # Made meanwhile (by the capsule?): opened and checked below like any other.
        except OSError as exc:
            raise SafeFsError(display, f"cannot create directory: {exc.strerror}") from exc
        # Re-open with O_NOFOLLOW: whatever is there now (the capsule may have swapped our new
        # directory for a symlink) is judged like a pre-existing entry.
        fd = _open_dir_at(parent_fd, name, display)
        try:
            # Through the fd, never the path.  If the capsule swapped in a directory of its own,
            # we chown its directory to itself: harmless.
            os.fchmod(fd, DIR_MODE)  # before the chown, as in write_atomically_at()
            os.fchown(fd, self.owner.uid, self.owner.gid)
        except OSError as exc:
            os.close(fd)
            raise SafeFsError(display, f"cannot set owner/mode: {exc.strerror}") from exc
        return fd

    @contextmanager
    def _dir(self, rel: Sequence[str], *, create: bool) -> Iterator[int]:
        fd = self.open_dir(rel, create=create)
        try:
            yield fd
        finally:
            os.close(fd)

    def write_file_atomically(
        self, rel_dir: Sequence[str], filename: str, data: bytes, mode: int = FILE_MODE
    ) -> None:
        """Create or replace ``rel_dir/filename`` with ``data`` atomically (see module doc).

        Raises:
            UnsafePath: a symlink/non-directory on the way, or an unusual target entry.
            SafeFsError: any other failure.
        """
        with self._dir(rel_dir, create=True) as dir_fd:
            write_atomically_at(
                dir_fd,
                filename,
                data,
                self.owner,
                mode=mode,
                display=self.path_of([*rel_dir, filename]),
            )

    def read_file(self, rel_dir: Sequence[str], filename: str, max_bytes: int) -> bytes:
        """Read a regular file, refusing symlinks, special files and more than ``max_bytes``.

        Raises:
            NotFound: the directory or file does not exist.
            UnsafePath: a symlink or non-regular file on the way or at the end.
            FileTooLarge: the file holds more than ``max_bytes``.
        """
        display = self.path_of([*rel_dir, filename])
        check_component(filename, self.path_of(rel_dir))
        with self._dir(rel_dir, create=False) as dir_fd:
            try:
                fd = os.open(filename, _READ_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError as exc:
                raise NotFound(display, "does not exist") from exc
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO):
                    raise UnsafePath(display, _describe_entry(dir_fd, filename)) from exc
                raise SafeFsError(display, exc.strerror or str(exc)) from exc
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    kind = _kind_of_mode(st.st_mode).value
                    raise UnsafePath(display, f"is a {kind} entry, not a regular file")
                chunks: list[bytes] = []
                total = 0
                # Read to max_bytes + 1 rather than trusting st_size: the file may grow.
                while total <= max_bytes:
                    chunk = os.read(fd, min(1 << 16, max_bytes + 1 - total))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
            except OSError as exc:
                raise SafeFsError(display, exc.strerror or str(exc)) from exc
            finally:
                os.close(fd)
        if total > max_bytes:
            raise FileTooLarge(display, f"larger than {max_bytes} bytes")
        return b"".join(chunks)

    def list_dir(
        self, rel_dir: Sequence[str], *, max_entries: int = MAX_LIST_ENTRIES
    ) -> list[tuple[str, EntryKind]]:
        """Entries of ``rel_dir`` with their kinds (not followed), sorted by name.

        A missing directory is an empty list: "no units" and "no .config" are the same answer.
        Reads at most ``max_entries + 1`` entries: the capsule may have put millions there, and
        a partial listing would silently hide units, so more than ``max_entries`` is an error.
        To ask about one name, use ``entry_kind`` instead.

        Raises:
            UnsafePath: a symlink or non-directory on the way.
            TooManyEntries: the directory holds more than ``max_entries`` entries.
        """
        if max_entries < 0:
            raise ValueError("max_entries must not be negative")
        try:
            dir_fd = self.open_dir(rel_dir, create=False)
        except NotFound:
            return []
        try:
            entries: list[tuple[str, EntryKind]] = []
            with os.scandir(dir_fd) as it:
                for entry in it:
                    if len(entries) >= max_entries:
                        raise TooManyEntries(self.path_of(rel_dir), max_entries)
                    entries.append((entry.name, _entry_kind(entry)))
        except OSError as exc:
            raise SafeFsError(self.path_of(rel_dir), exc.strerror or str(exc)) from exc
        finally:
            os.close(dir_fd)
        entries.sort()
        return entries

    def entry_kind(self, rel_dir: Sequence[str], name: str) -> EntryKind | None:
        """What ``rel_dir/name`` is (lstat semantics), or None if it or its directory is missing.

        Raises:
            UnsafePath: a symlink or non-directory on the way.
        """
        check_component(name, self.path_of(rel_dir))
        try:
            dir_fd = self.open_dir(rel_dir, create=False)
        except NotFound:
            return None
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SafeFsError(self.path_of([*rel_dir, name]), exc.strerror or str(exc)) from exc
        finally:
            os.close(dir_fd)
        return _kind_of_mode(st.st_mode)

    def read_link(self, rel_dir: Sequence[str], linkname: str) -> str:
        """The target text of a symlink (readlinkat; nothing is followed).

        Raises:
            NotFound: no such entry.
            UnsafePath: the entry is not a symlink.
        """
        display = self.path_of([*rel_dir, linkname])
        check_component(linkname, self.path_of(rel_dir))
        with self._dir(rel_dir, create=False) as dir_fd:
            try:
                return os.readlink(linkname, dir_fd=dir_fd)
            except FileNotFoundError as exc:
                raise NotFound(display, "does not exist") from exc
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise UnsafePath(display, "is not a symlink") from exc
                raise SafeFsError(display, exc.strerror or str(exc)) from exc

    def remove_file(self, rel_dir: Sequence[str], filename: str) -> bool:
        """unlinkat() a file or symlink entry; False if it (or its directory) did not exist.

        Removing an entry never touches what a symlink points to, nor the other names of a
        hardlinked file, so symlinks and hardlinks are removed like any file.

        Raises:
            UnsafePath: a symlink or non-directory on the way, or the entry is a directory.
        """
        display = self.path_of([*rel_dir, filename])
        check_component(filename, self.path_of(rel_dir))
        try:
            dir_fd = self.open_dir(rel_dir, create=False)
        except NotFound:
            return False
        try:
            os.unlink(filename, dir_fd=dir_fd)
            os.fsync(dir_fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.EISDIR:
                raise UnsafePath(display, "is a directory; refusing to remove it") from exc
            raise SafeFsError(display, exc.strerror or str(exc)) from exc
        finally:
            os.close(dir_fd)
        return True

    def snapshot_entry(self, rel_dir: Sequence[str], name: str, max_bytes: int) -> EntrySnapshot:
        """What ``rel_dir/name`` is now, to be put back later with `restore_entry`.

        A missing entry (or directory) is a snapshot too: restoring it removes what was made
        there, and the directories made for it if they are empty. Only what can be put back
        exactly is accepted; anything else is refused before a change is made.

        Raises:
            UnsafePath: a symlink or non-directory on the way; a directory, special file or
                hardlinked file at the entry.
            FileTooLarge: a file over ``max_bytes``.
            SafeFsError: any other OSError.
        """
        check_component(name, self.path_of(rel_dir))
        display = self.path_of([*rel_dir, name])
        rel = tuple(rel_dir)
        for depth in range(len(rel) + 1):
            try:
                os.close(self.open_dir(rel[:depth], create=False))
            except NotFound:
                return EntrySnapshot(rel, name, None, missing_dirs_from=depth)
        with self._dir(rel, create=False) as dir_fd:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return EntrySnapshot(rel, name, None)
            except OSError as exc:
                raise SafeFsError(display, exc.strerror or str(exc)) from exc
            kind = _kind_of_mode(st.st_mode)
            if kind is EntryKind.SYMLINK:
                try:
                    target = os.readlink(name, dir_fd=dir_fd)
                except OSError as exc:
                    raise SafeFsError(display, exc.strerror or str(exc)) from exc
                return EntrySnapshot(rel, name, kind, target=target)
            if kind is not EntryKind.FILE:
                what = "a directory" if kind is EntryKind.DIRECTORY else "a special file"
                raise UnsafePath(display, f"is {what}; refusing to replace it")
        if st.st_nlink > 1:
            raise UnsafePath(
                display, f"is hardlinked ({st.st_nlink} links); refusing to replace it"
            )
        data = self.read_file(rel, name, max_bytes)
        return EntrySnapshot(rel, name, kind, data=data, mode=stat.S_IMODE(st.st_mode))

    def restore_entry(self, snapshot: EntrySnapshot) -> None:
        """Put ``snapshot``'s entry back as it was (see `snapshot_entry`).

        Raises:
            UnsafePath, SafeFsError: as the writes it makes.
        """
        rel, name = snapshot.rel_dir, snapshot.name
        if snapshot.kind is EntryKind.FILE:
            self.write_file_atomically(rel, name, snapshot.data, snapshot.mode)
        elif snapshot.kind is EntryKind.SYMLINK:
            self.symlink(rel, name, snapshot.target)
        else:
            self.remove_file(rel, name)
            if snapshot.missing_dirs_from is not None:
                # Deepest first; a directory someone filled meanwhile stays.
                for depth in range(len(rel), snapshot.missing_dirs_from - 1, -1):
                    if not self.remove_empty_dir(rel[:depth]):
                        break

    def remove_empty_dir(self, rel_dir: Sequence[str]) -> bool:
        """rmdir the last component of ``rel_dir`` if it is an empty directory; False if it is
        not there or not empty. rmdir never follows a link.

        Raises:
            UnsafePath: a symlink or non-directory on the way.
        """
        rel = tuple(rel_dir)
        if not rel:
            raise ValueError("refusing to remove the home itself")
        check_component(rel[-1], self.path_of(rel[:-1]))
        try:
            parent = self.open_dir(rel[:-1], create=False)
        except NotFound:
            return False
        try:
            os.rmdir(rel[-1], dir_fd=parent)
            os.fsync(parent)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                return False
            raise SafeFsError(self.path_of(rel), exc.strerror or str(exc)) from exc
        finally:
            os.close(parent)
        return True

    def symlink(self, rel_dir: Sequence[str], linkname: str, target: str) -> None:
        """Create or replace the symlink ``rel_dir/linkname -> target`` atomically.

        The link is made under a temporary name, chowned to the home's owner through an O_PATH
        fd (``_chown_new_symlink``), then renamed into place.  An existing symlink is replaced;
        any other existing entry is refused.

        Raises:
            UnsafePath: a symlink/non-directory on the way, or a non-symlink entry at linkname.
            SafeFsError: any other failure.
        """
        display = self.path_of([*rel_dir, linkname])
        check_component(linkname, self.path_of(rel_dir))
        if "\0" in target or target == "":
            raise ValueError(f"invalid symlink target {target!r}")
        with self._dir(rel_dir, create=True) as dir_fd:
            try:
                st = os.stat(linkname, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise SafeFsError(display, exc.strerror or str(exc)) from exc
            else:
                kind = _kind_of_mode(st.st_mode)
                if kind is not EntryKind.SYMLINK:
                    raise UnsafePath(display, f"exists and is a {kind.value} entry, not a symlink")
            temp = self._create_temp_symlink(dir_fd, linkname, target, display)
            try:
                _chown_new_symlink(dir_fd, temp, self.owner, display)
            except SafeFsError:
                _unlink_quietly(dir_fd, temp)
                raise
            _rename_into_place(dir_fd, temp, linkname, display)

    @staticmethod
    def _create_temp_symlink(dir_fd: int, final: str, target: str, display: str) -> str:
        for _ in range(_TEMP_ATTEMPTS):
            temp = _temp_name(final)
            try:
                # symlinkat() never follows and fails with EEXIST on any existing entry.
                os.symlink(target, temp, dir_fd=dir_fd)
            except FileExistsError:
                continue
            except OSError as exc:
                raise SafeFsError(display, f"cannot create symlink: {exc.strerror}") from exc
            return temp
        raise SafeFsError(display, "cannot find a free temporary name")


# How many threads work under capsule homes at once, for all callers: a burst of calls queues
# for them instead of spawning threads (each call is a few syscalls and at most a few fsyncs).
MAX_FS_THREADS = 4

_T = TypeVar("_T")


class CapsuleHomes:
    """The capsule homes under ``root`` as the asyncio daemon reaches them: the one adapter.

    Every call of this module blocks (a few syscalls each, an fsync per write), so `run` does
    one whole piece of work -- open the home, the operations, close it -- in a worker thread
    of a bounded pool: the event loop never waits on the disk, and no directory fd outlives
    the thread that used it.
    """

    def __init__(self, root: str = CAPSULES_ROOT, max_threads: int = MAX_FS_THREADS) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="capsuled-fs")

    async def run(self, name: str, work: Callable[[CapsuleHome], _T]) -> _T:
        """``work(home)`` on capsule ``name``'s home, opened and closed in a worker thread.

        A caller cancelled meanwhile (its client hung up) waits for the thread to finish
        before the cancellation goes on: the thread cannot be stopped, and the caller's hold
        on the capsule (its lock) must last as long as the work does.

        Raises:
            NoHome, UnsafePath, SafeFsError: from opening the home or from ``work``.
        """

        def job() -> _T:
            with CapsuleHome.open(name, self.root) as home:
                return work(home)

        future = asyncio.get_running_loop().run_in_executor(self._pool, job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with suppress(asyncio.CancelledError):
                    await asyncio.wait({future})
            if not future.cancelled():
                future.exception()  # retrieved: nobody is left to see what the work raised
            raise
