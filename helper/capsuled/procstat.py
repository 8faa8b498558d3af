"""A process's start time from /proc/PID/stat, parsed safely; shared by transport and policy.

Its own module so that the transport (which records the start time at accept) and the policy
(which compares it at check time) read it the same way without importing each other, and the
protocol core (capsuled.varlink) stays free of /proc.
"""

from __future__ import annotations

from typing import Final

PROC: Final = "/proc"
# Longer than any stat line: comm is at most 16 bytes, the other 51 fields are numbers.
_STAT_MAX_BYTES: Final = 4096


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
