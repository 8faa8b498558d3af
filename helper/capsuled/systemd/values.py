"""Values the systemd backend hands out, and the constants that shape them (no I/O, and no
jeepney: `capsuled install` may read MIN_SYSTEMD_VERSION without paying for D-Bus)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

# systemd encodes "unset" / "infinity" of a uint64 property as UINT64_MAX (CGROUP_LIMIT_MAX,
# CGROUP_WEIGHT_INVALID, NSEC_INFINITY ...).
UINT64_MAX: Final = 2**64 - 1
# capsule@.service was introduced in systemd 256 (NEWS for v256): the one place this is said.
MIN_SYSTEMD_VERSION: Final = 256
# systemd's capsule@.service has TimeoutStopSec=120s; give a job that much and a margin.
JOB_TIMEOUT_S: Final = 150.0
CLEAN_TIMEOUT_S: Final = 120.0
# Signals queued for one watcher of state changes (Watch on PID 1 or on a capsule's manager)
# before it counts as fallen behind (WatchOverflow): a daemon-reload re-announces every loaded
# unit at once.
MAX_WATCH_SIGNALS_QUEUED: Final = 1024
# Units whose last state a watcher remembers to drop repeats; past this it forgets them all.
MAX_KNOWN_UNIT_STATES: Final = 1024
MAX_TRACKED_EXITS: Final = 64  # transient units per manager connection awaiting wait_exit
# Value to pass to set_limits to reset a limit to systemd's default ("infinity" for MemoryMax and
# TasksMax, "unset" i.e. 100 for CPUWeight): systemd's UINT64_MAX.
LIMIT_DEFAULT: Final = UINT64_MAX
# What PID 1 (257) accepts, else InvalidArgument: MemoryMax and TasksMax >= 1; CPUWeight 0
# ("idle") or 1..10000 (CGROUP_WEIGHT_MAX).
CPU_WEIGHT_MAX: Final = 10000
FINISHED_STATES: Final = frozenset({"inactive", "failed"})


def capsule_unit(name: str) -> str:
    """capsule@NAME.service."""
    return f"capsule@{name}.service"


def capsule_from_unit(unit: str) -> str | None:
    """NAME from capsule@NAME.service, else None."""
    if unit.startswith("capsule@") and unit.endswith(".service"):
        name = unit[len("capsule@") : -len(".service")]
        return name or None
    return None


# A NamedTuple, not a frozen dataclass as the other values here: as immutable, and a List makes
# one per row, where a frozen dataclass's __init__ (one object.__setattr__ per field) cost
# 1.4 us against 0.3 (Python 3.13, the testbed).
class CapsuleInfo(NamedTuple):
    """What systemd knows about one capsule (None fields: unknown, unset or not running)."""

    name: str
    state: str  # ActiveState: active, inactive, failed, activating, deactivating, maintenance...
    sub_state: str  # SubState: running, dead, failed, start, cleaning...
    uid: int | None  # the dynamic uid while running
    since_usec: int | None  # StateChangeTimestamp (CLOCK_REALTIME, µs)
    has_state_dir: bool
    autostart: bool  # multi-user.target.wants/capsule@NAME.service exists
    memory_current: int | None
    tasks_current: int | None
    cpu_usage_nsec: int | None
    memory_max: int | None  # None: infinity
    tasks_max: int | None  # None: infinity
    cpu_weight: int | None  # None: unset (the default, 100)
    result: str  # unit Result: success, exit-code, signal, timeout, ...
    units_count: int  # unit files (not templates) in ~/.config/systemd/user; 0 without state dir


@dataclass(frozen=True, slots=True)
class CapsuleEvent:
    """A capsule's state changed (from PID 1's PropertiesChanged signal)."""

    name: str
    state: str
    sub_state: str
    since_usec: int | None


@dataclass(frozen=True, slots=True)
class UnitEvent:
    """A unit inside a capsule changed state (from its manager's PropertiesChanged)."""

    unit: str
    state: str
    sub_state: str
    since_usec: int


@dataclass(frozen=True, slots=True)
class UnitInfo:
    """A unit inside a capsule's manager."""

    name: str
    description: str
    load_state: str  # loaded, not-found, masked, ... ("not-loaded" for a file no one loaded)
    active_state: str
    sub_state: str
    unit_file_state: str | None  # enabled, disabled, static, linked, ... (None: no unit file)
    unit_file_path: str | None  # as the capsule sees it (HOME=/var/lib/capsules/NAME)


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a (transient) service ended."""

    unit: str
    result: str  # success, exit-code, signal, core-dump, timeout, ...
    code: str  # exited, killed, dumped ("" if it never ran)
    status: int  # exit status, or signal number when killed/dumped


@dataclass(frozen=True, slots=True)
class Stdio:
    """What a transient service's stdin, stdout and stderr are (StandardInputFileDescriptor=
    and friends, as systemd-run --pipe/--pty pass them), and its TTYPath= for a pty.

    The fds are borrowed: D-Bus sends duplicates; whoever made this value closes them."""

    stdin: int
    stdout: int
    stderr: int
    tty_path: str | None = None
