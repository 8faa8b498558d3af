"""What the host's filesystem says about capsules: state directories, autostart links, the
capsule's unit files, a process's uid. Paths above a capsule's own directory are root-owned and
trusted; below it, everything is reached through O_NOFOLLOW directory fds (invariant 2).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from .values import capsule_from_unit, capsule_unit

STATE_ROOT: Final = "/var/lib/private/capsules"  # DynamicUser= StateDirectory= lives here
LEGACY_STATE_ROOT: Final = "/var/lib/capsules"  # symlinks into private/ (or real dirs, <256?)
SYSTEM_CONFIG_DIR: Final = "/etc/systemd/system"
RUNTIME_CONFIG_DIR: Final = "/run/systemd/system"
# Where SetUnitProperties(runtime=false) writes: unit_write_setting() puts "50-<Property>.conf"
# into system.control/UNIT.d/. capsuled.service may write here (ReadWritePaths=), to undo
# exactly what it set.
SYSTEM_CONTROL_DIR: Final = "/etc/systemd/system.control"
# The drop-ins of the properties capsuled sets (SetLimits, and Create's quota ceilings): with
# the autostart link, everything capsuled writes for a capsule outside its home.
OWN_DROPINS: Final = ("50-MemoryMax.conf", "50-TasksMax.conf", "50-CPUWeight.conf")
# Entries read from one drop-in directory an administrator made.
MAX_LISTED_DROPINS: Final = 64
AUTOSTART_TARGET: Final = "multi-user.target"
# Where capsule units live inside a capsule's home (relative to the state dir).
USER_UNIT_DIR: Final = (".config", "systemd", "user")
UNIT_SUFFIXES: Final = (
    ".service", ".socket", ".target", ".timer", ".path", ".slice", ".mount",
    ".automount", ".swap", ".scope", ".device",
)  # fmt: skip
MAX_SCANNED_ENTRIES: Final = 10000  # directory entries read when counting a capsule's units


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def has_state_dir(name: str) -> bool:
    """/var/lib/private/capsules/NAME (or a real /var/lib/capsules/NAME) is a directory."""
    return _is_real_dir(os.path.join(STATE_ROOT, name)) or _is_real_dir(
        os.path.join(LEGACY_STATE_ROOT, name)
    )


def autostart_link(name: str) -> str:
    """The wants symlink AddDependencyUnitFiles creates for a capsule."""
    return os.path.join(SYSTEM_CONFIG_DIR, f"{AUTOSTART_TARGET}.wants", capsule_unit(name))


def autostart_enabled(name: str) -> bool:
    """The autostart link exists (as a symlink; a file planted there would not be ours)."""
    try:
        return stat.S_ISLNK(os.lstat(autostart_link(name)).st_mode)
    except OSError:
        return False


def real_state_dirs() -> dict[str, os.stat_result | None]:
    """The names `has_state_dir` is true for, from the listings alone: one under STATE_ROOT
    with its lstat (`UnitFileCounts.count` checks a kept count against it, so a List row
    costs that one stat), one found only under LEGACY_STATE_ROOT with None (its directory
    entry's type said it is a real directory; DirEntry.is_dir falls back to an lstat where
    the file system does not fill in d_type)."""
    found: dict[str, os.stat_result | None] = {}
    # STATE_ROOT is root's: listed through an fd, each entry's lstat is an fstatat relative to
    # it (AT_SYMLINK_NOFOLLOW), not a walk of the whole path again (a quarter of its cost on
    # the testbed's overlay root). The lookup is the capsule's name in STATE_ROOT, not followed:
    # the same one the lstat by path made.
    with contextlib.suppress(OSError):  # no STATE_ROOT, or it cannot be listed: none there
        fd = os.open(STATE_ROOT, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with os.scandir(fd) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    # try, not contextlib.suppress: that is three calls more at every List row.
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:  # gone since the listing
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        found[e.name] = st
        finally:
            os.close(fd)
    with contextlib.suppress(OSError), os.scandir(LEGACY_STATE_ROOT) as it:
        for e in it:
            if e.name.startswith(".") or e.name in found:
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    found[e.name] = None
            except OSError:  # gone before the lstat is_dir falls back to
                continue
    return found


def autostart_names() -> set[str]:
    """Capsules with an autostart link."""
    wants = os.path.join(SYSTEM_CONFIG_DIR, f"{AUTOSTART_TARGET}.wants")
    names: set[str] = set()
    with contextlib.suppress(OSError), os.scandir(wants) as it:
        for entry in it:
            name = capsule_from_unit(entry.name)
            if name is not None:
                names.add(name)
    return names


def count_unit_files(name: str) -> int:
    """Unit files in the capsule's ~/.config/systemd/user (templates "x@.service" excluded:
    they are not units until instantiated), reached without following symlinks.

    The capsule owns every component below STATE_ROOT (invariant 2): each is opened with
    O_NOFOLLOW relative to its parent's fd, and a symlinked component just counts as nothing.
    Entries themselves are counted by name (lstat-free: a symlink to a unit is a valid unit).
    """
    return _walk_and_count(name)[1]


# (st_dev, st_ino, st_ctime_ns) of one directory on the way to the unit directory.
DirStamp = tuple[int, int, int]
# A directory changed this recently may change again within the same timestamp tick: as
# records.py's RACY_NS (git's "racy" rule), its count is not kept until it is older.
RACY_NS: Final = 3_000_000_000


_DEFINITE: Final = frozenset({errno.ENOENT, errno.ELOOP, errno.ENOTDIR})


def _dir_stamp(st: os.stat_result) -> DirStamp:
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _walk_and_count(name: str) -> tuple[tuple[DirStamp, ...], int]:
    """count_unit_files, with the stamp of every directory it opened on the way, each taken
    (fstat of the fd it walked through) before anything below it was read."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(os.path.join(STATE_ROOT, name), flags)
    except OSError:
        return (), 0
    try:
        stamps = [_dir_stamp(os.fstat(fd))]
        for component in USER_UNIT_DIR:
            try:
                child = os.open(component, flags, dir_fd=fd)
            except OSError as exc:
                # Missing, a symlink, not a directory: that lasts while the parent is
                # unchanged. Anything else (EMFILE, EIO) says nothing that may be kept.
                return (tuple(stamps) if exc.errno in _DEFINITE else ()), 0
            os.close(fd)
            fd = child
            stamps.append(_dir_stamp(os.fstat(fd)))
        count = 0
        with os.scandir(fd) as entries:
            # Bounded: the capsule controls this directory and may fill it with junk.
            for scanned, entry in enumerate(entries):
                if scanned >= MAX_SCANNED_ENTRIES:
                    break
                if entry.name.endswith(UNIT_SUFFIXES) and "@." not in entry.name:
                    count += 1
        return tuple(stamps), count
    finally:
        os.close(fd)


class UnitFileCounts:
    """count_unit_files per capsule, kept while no directory on the way changed.

    A directory's ctime moves whenever an entry in it is added, removed or renamed (and at
    any chmod or chown), and nobody can set it: so while the state dir, .config, systemd and
    user keep the inode and ctime the last walk saw, the unit directory holds the same names,
    and a component that was missing or not a directory still is (its parent is unchanged).
    Checking that is an fstat per directory the walk opened, each reached through its
    parent's O_PATH fd without following symlinks (no read fds, no listing); the last one
    by an fstatat, which for a home with no .config is one lstat of the state dir in root's
    STATE_ROOT (a List passes the one its listing made: real_state_dirs). Any difference:
    the safe walk again. A directory changed within RACY_NS of the walk is not kept
    (timestamps move in ticks). One entry per capsule with a state dir; gone ones are dropped
    by `forget`.
    """

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._kept: dict[str, tuple[tuple[DirStamp, ...], int]] = {}
        self._clock_ns = clock_ns

    def count(self, name: str, home: os.stat_result | None = None) -> int:
        """The capsule's unit files; `home`, if given, is the lstat of STATE_ROOT/NAME a listing
        just made (real_state_dirs): a kept count of a home with no .config is checked against
        it alone, with no stat of its own."""
        kept = self._kept.get(name)
        if kept is not None:
            stamps = kept[0]
            if home is not None and len(stamps) == 1:
                if stat.S_ISDIR(home.st_mode) and _dir_stamp(home) == stamps[0]:
                    return kept[1]
            elif self._unchanged(name, stamps):
                return kept[1]
        stamps, count = _walk_and_count(name)
        horizon = self._clock_ns() - RACY_NS
        if stamps and all(s[2] < horizon for s in stamps):
            self._kept[name] = (stamps, count)
        else:
            self._kept.pop(name, None)
        return count

    def forget(self, keep: Collection[str]) -> None:
        """Drop every capsule not in `keep` (a List's listing of the state dirs)."""
        for gone in self._kept.keys() - set(keep):
            del self._kept[gone]

    def __len__(self) -> int:
        return len(self._kept)

    @staticmethod
    def _unchanged(name: str, stamps: tuple[DirStamp, ...]) -> bool:
        # Each directory through its parent's O_PATH fd, never by a path through a component
        # the capsule controls: a symlink swapped in between two looks is then neither
        # followed (a lookup by path would let root's resolution wander wherever it points,
        # an automount or a hung network mount included) nor mistaken for the directory.
        # The last level needs no fd: one stat that does not follow it, relative to its
        # parent's fd (for the state dir itself, STATE_ROOT: root's, so by path). A home with
        # no .config (most of them) is then one lstat (Describe's; a List row's is the
        # listing's own, see count).
        home = f"{STATE_ROOT}/{name}"
        *through, last = (home, *USER_UNIT_DIR)[: len(stamps)]
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd: int | None = None
        try:
            for component, seen in zip(through, stamps, strict=False):
                child = os.open(component, flags, dir_fd=fd)
                if fd is not None:
                    os.close(fd)
                fd = child
                if _dir_stamp(os.fstat(fd)) != seen:
                    return False
            st = os.stat(last, dir_fd=fd, follow_symlinks=False)
            return stat.S_ISDIR(st.st_mode) and _dir_stamp(st) == stamps[-1]
        except OSError:
            return False
        finally:
            if fd is not None:
                os.close(fd)


def process_uid(pid: int) -> int | None:
    """Owner of /proc/PID (the process's effective uid), None if gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def admin_config(name: str) -> list[str]:
    """What an administrator configured for this one capsule's service: a unit file or drop-ins
    (*.conf) in /etc/systemd/system or /run/systemd/system for capsule@NAME.service. capsuled
    never writes there, and never removes them (Remove leaves them for the next capsule of the
    name; Create adopts them and says so in its audit record)."""
    unit = capsule_unit(name)
    found: list[str] = []
    for base in (SYSTEM_CONFIG_DIR, RUNTIME_CONFIG_DIR):
        path = os.path.join(base, unit)
        if os.path.lexists(path):
            found.append(path)
        dropins = path + ".d"
        with contextlib.suppress(OSError), os.scandir(dropins) as it:
            for scanned, entry in enumerate(it):
                if scanned >= MAX_LISTED_DROPINS:
                    break
                if entry.name.endswith(".conf"):
                    found.append(os.path.join(dropins, entry.name))
    return sorted(found)


def remove_own_dropins(name: str) -> list[str]:
    """Delete the drop-ins capsuled's limits wrote for the capsule (OWN_DROPINS in
    system.control) and their directory if that leaves it empty; nothing else. Returns the
    paths removed.

    Raises:
        OSError: one could not be removed (EROFS: system.control is not writable for us).
    """
    directory = os.path.join(SYSTEM_CONTROL_DIR, capsule_unit(name) + ".d")
    removed: list[str] = []
    for dropin in OWN_DROPINS:
        path = os.path.join(directory, dropin)
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    # Absent, or holds an administrator's own `systemctl set-property` of another property.
    with contextlib.suppress(OSError):
        os.rmdir(directory)
    return removed


# ---------------------------------------------------------------------------------------------
# What configures a capsule's unit, as files (capsuled.systemd.model keys its cache on this)

CAPSULE_TEMPLATE: Final = "capsule@.service"
# systemd.unit(5), "drop-in": a service's drop-ins are searched in NAME.service.d, for an
# instance also in the template's TEMPLATE.service.d, and in the top-level service.d/ of every
# directory of the unit path (unit_file_find_dropin_paths()). A "-" prefix of the unit name is
# searched too, but only in the part before "@" ("capsule": no dash), so there are no others.
_GLOBAL_ENTRIES: Final = frozenset({CAPSULE_TEMPLATE, CAPSULE_TEMPLATE + ".d", "service.d"})
# PID 1's own configuration, which sets defaults such as DefaultTasksMax= and the accounting
# switches (systemd-system.conf(5)); read again on daemon-reload.
SYSTEM_CONF_FILES: Final = ("/etc/systemd/system.conf",)
SYSTEM_CONF_DIRS: Final = (
    "/etc/systemd/system.conf.d",
    "/run/systemd/system.conf.d",
    "/usr/local/lib/systemd/system.conf.d",
    "/usr/lib/systemd/system.conf.d",
)
# A file's identity and version: path, device, inode, size, mtime (stat() follows symlinks,
# so re-pointing one counts as a change; a dangling one is (path,)).
FileStamp = tuple[str, ...] | tuple[str, int, int, int, int]
GlobalSignature = tuple[FileStamp, ...]


@dataclass(frozen=True, slots=True)
class ConfigSignature:
    """The files that configure one capsule@NAME.service and no other capsule's unit."""

    files: tuple[FileStamp, ...] = ()


NO_FILES: Final = ConfigSignature()


@dataclass(frozen=True, slots=True)
class Signatures:
    """What the capsule units' configuration is made of, at one instant."""

    global_: GlobalSignature  # the template, its drop-ins, service.d, PID 1's system.conf
    per_name: Mapping[str, ConfigSignature] = field(default_factory=dict)

    def of(self, name: str) -> ConfigSignature:
        """The files of capsule@NAME.service's own (none: it is configured like the template)."""
        return self.per_name.get(name, NO_FILES)


def _stamp(path: str) -> FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return (path,)
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _conf_files(directory: str) -> list[FileStamp]:
    """The *.conf files of a drop-in directory, stamped, in name order."""
    try:
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it if e.name.endswith(".conf"))
    except OSError:
        return []
    return [_stamp(os.path.join(directory, n)) for n in names[:MAX_LISTED_DROPINS]]


def _entry_stamps(directory: str, entry: str) -> list[FileStamp]:
    path = os.path.join(directory, entry)
    if entry.endswith(".d"):
        return [_stamp(path), *_conf_files(path)]
    return [_stamp(path)]


def config_signatures(unit_path: Sequence[str]) -> Signatures:
    """Stamp every file that configures a capsule unit, in PID 1's unit path (its UnitPath
    property), plus PID 1's system.conf: one directory listing per unit path directory."""
    global_files: list[FileStamp] = []
    own: dict[str, list[FileStamp]] = {}
    for directory in unit_path:
        try:
            with os.scandir(directory) as it:
                entries = sorted(e.name for e in it if e.name.startswith(("capsule@", "service.d")))
        except OSError:
            continue
        for entry in entries:
            if entry in _GLOBAL_ENTRIES:
                global_files += _entry_stamps(directory, entry)
                continue
            unit = entry.removesuffix(".d")
            name = capsule_from_unit(unit)
            if name is not None and unit.endswith(".service"):
                own.setdefault(name, []).extend(_entry_stamps(directory, entry))
    for path in SYSTEM_CONF_FILES:
        global_files.append(_stamp(path))
    for directory in SYSTEM_CONF_DIRS:
        global_files += _conf_files(directory)
    return Signatures(
        tuple(global_files), {name: ConfigSignature(tuple(files)) for name, files in own.items()}
    )


# ---------------------------------------------------------------------------------------------
# A running capsule's accounting, from its cgroup (where PID 1 reads it too)

CGROUP_ROOT: Final = "/sys/fs/cgroup"
_CGROUP_READ_BYTES: Final = 4096
# Cgroups whose accounting files stay open between reads, least recently read closed first: at
# most 3 fds each (memory.current, pids.current, cpu.stat), 192 in all, and the root's
# cgroup.controllers (capsuled.service's LimitNOFILE= counts them).
MAX_KEPT_CGROUPS: Final = 64
# The controller without which a cgroup has no such file (cpu.stat is in every cgroup).
_CONTROLLER_OF: Final = {"memory.current": "memory", "pids.current": "pids"}


class CgroupFiles:
    """Accounting files of recently read cgroups, kept open and read with pread at offset 0.

    Every read is a read of now: a cgroup file is generated anew each time it is read from
    offset 0 (kernfs seq_file), so a kept fd gives what an open+read+close gave. What it saves
    is the path lookup, open and close (~10 of the ~14 us per file in the testbed): Describe
    reads three per running capsule, List three per running row. No figure is kept.

    An fd never outlives the cgroup it names: once that cgroup is removed (the capsule stopped,
    or was restarted and has a new cgroup at the same path), a read on an fd of the old one
    fails (ENODEV: kernfs_fop_read_iter on a deactivated node), and then every fd of that path
    is closed and the file opened again by path, as before. A file that does not exist (its
    controller is not enabled) is looked for again at every read, unless its controller is not
    even available at the root of the tree (the root's cgroup.controllers, read now through a
    kept fd of its own: a cgroup v1 "hybrid" host, where memory and pids are v1's, never has
    memory.current or pids.current below; one pread instead of a ~7 us failed lookup).
    Bounded: MAX_KEPT_CGROUPS cgroups; `forget` closes a cgroup's fds when the model sees its
    capsule stop.

    Used from the event loop's thread only (no lock).
    """

    def __init__(self, root: str = CGROUP_ROOT, max_kept: int = MAX_KEPT_CGROUPS) -> None:
        self._root = root
        self._max_kept = max_kept
        # control group -> {file name -> fd}; insertion order is least recently read first.
        self._kept: dict[str, dict[str, int]] = {}
        self._root_controllers = -1  # fd of the root's cgroup.controllers, once opened

    def read(self, control_group: str, name: str) -> bytes | None:
        """The file's contents now (None: it does not exist, or cannot be read)."""
        files = self._kept.pop(control_group, None)
        if files is not None:
            self._kept[control_group] = files  # the most recently read now
            fd = files.get(name)
            if fd is not None:
                try:
                    return os.pread(fd, _CGROUP_READ_BYTES, 0)
                except OSError:
                    # The cgroup these fds name is gone (ENODEV): the path may hold a new one.
                    del self._kept[control_group]
                    self._close(files)
                    files = None
        controller = _CONTROLLER_OF.get(name)
        if controller is not None and not self._available(controller):
            return None
        try:
            # The path is PID 1's (ControlGroup); cgroupfs has no symlinks, O_NOFOLLOW all the
            # same.
            fd = os.open(
                f"{self._root}{control_group}/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError:
            return None
        try:
            data = os.pread(fd, _CGROUP_READ_BYTES, 0)
        except OSError:
            os.close(fd)
            return None
        if files is None:
            files = self._kept[control_group] = {}
            while len(self._kept) > self._max_kept:
                self._close(self._kept.pop(next(iter(self._kept))))
        files[name] = fd
        return data

    def _available(self, controller: str) -> bool:
        """Whether the root of the tree offers `controller` now (True when it cannot tell)."""
        for _ in range(2):
            if self._root_controllers < 0:
                try:
                    self._root_controllers = os.open(
                        f"{self._root}/cgroup.controllers",
                        os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    )
                except OSError:
                    return True
            try:
                return controller in os.pread(self._root_controllers, 4096, 0).decode().split()
            except (OSError, UnicodeDecodeError):
                # Not expected of the root cgroup; open it again once, else look by path.
                os.close(self._root_controllers)
                self._root_controllers = -1
        return True

    def forget(self, control_group: str) -> None:
        """Close the fds of `control_group` (its capsule stopped)."""
        files = self._kept.pop(control_group, None)
        if files is not None:
            self._close(files)

    def close(self) -> None:
        """Close every kept fd."""
        for files in self._kept.values():
            self._close(files)
        self._kept.clear()
        if self._root_controllers >= 0:
            os.close(self._root_controllers)
            self._root_controllers = -1

    def kept_fds(self) -> int:
        """How many fds are open now (for tests and the bound)."""
        return sum(len(files) for files in self._kept.values())

    @staticmethod
    def _close(files: dict[str, int]) -> None:
        for fd in files.values():
            os.close(fd)
        files.clear()


# The helper's one table (a module's: the readers below are plain functions for their callers).
CGROUP_FILES: Final = CgroupFiles()


def _cgroup_file(control_group: str, name: str) -> bytes | None:
    return CGROUP_FILES.read(control_group, name)


def forget_cgroup(control_group: str) -> None:
    """The capsule of `control_group` stopped: close the fds kept for it (CgroupFiles)."""
    CGROUP_FILES.forget(control_group)


def _cgroup_number(control_group: str, name: str) -> int | None:
    raw = _cgroup_file(control_group, name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None  # "max", or not a number at all


def cgroup_memory_current(control_group: str) -> int | None:
    """memory.current, what PID 1 reports as MemoryCurrent (None: no memory controller)."""
    return _cgroup_number(control_group, "memory.current")


def cgroup_tasks_current(control_group: str) -> int | None:
    """pids.current, what PID 1 reports as TasksCurrent (None: no pids controller)."""
    return _cgroup_number(control_group, "pids.current")


def cgroup_cpu_usage_nsec(control_group: str) -> int | None:
    """cpu.stat usage_usec in ns, what PID 1 reads for CPUUsageNSec (cgroup v2)."""
    raw = _cgroup_file(control_group, "cpu.stat")
    if raw is None:
        return None
    for line in raw.splitlines():
        key, _, value = line.partition(b" ")
        if key == b"usage_usec":
            try:
                return int(value) * 1000
            except ValueError:
                return None
    return None


def own_config_signature(unit_path: Sequence[str], name: str) -> ConfigSignature:
    """`config_signatures(...).of(name)` for one capsule, without listing whole directories."""
    unit = capsule_unit(name)
    files: list[FileStamp] = []
    for directory in unit_path:
        for entry in (unit, unit + ".d"):
            if os.path.lexists(os.path.join(directory, entry)):
                files += _entry_stamps(directory, entry)
    return ConfigSignature(tuple(files))
