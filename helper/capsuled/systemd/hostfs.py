"""What the host's filesystem says about capsules: state directories, autostart links, the
capsule's unit files, a process's uid. Paths above a capsule's own directory are root-owned and
trusted; below it, everything is reached through O_NOFOLLOW directory fds (invariant 2).
"""

from __future__ import annotations

import contextlib
import os
import stat
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


def state_dir_names() -> set[str]:
    """Names of the capsule state directories on disk (unvalidated; the caller filters)."""
    names: set[str] = set()
    for root in (STATE_ROOT, LEGACY_STATE_ROOT):
        with contextlib.suppress(OSError), os.scandir(root) as it:
            names.update(e.name for e in it if not e.name.startswith("."))
    return names


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
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(os.path.join(STATE_ROOT, name), flags)
    except OSError:
        return 0
    try:
        for component in USER_UNIT_DIR:
            try:
                child = os.open(component, flags, dir_fd=fd)
            except OSError:
                return 0
            os.close(fd)
            fd = child
        count = 0
        with os.scandir(fd) as entries:
            # Bounded: the capsule controls this directory and may fill it with junk.
            for scanned, entry in enumerate(entries):
                if scanned >= MAX_SCANNED_ENTRIES:
                    break
                if entry.name.endswith(UNIT_SUFFIXES) and "@." not in entry.name:
                    count += 1
        return count
    finally:
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
