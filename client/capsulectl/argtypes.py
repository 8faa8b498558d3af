"""Values on the command line: sizes, counts, timeouts and journalctl-style times.

Each parser raises argparse.ArgumentTypeError, so argparse reports a bad value as a usage error
(exit status 2) naming the option.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's (mypy: true)
if TYPE_CHECKING:
    import argparse

__all__ = ["parse_count", "parse_since", "parse_size", "parse_timeout"]


def _invalid(message: str) -> argparse.ArgumentTypeError:
    """argparse's error for a bad value, argparse imported only then: a plain command line is
    parsed without it (capsulectl/fastargs.py), which calls these parsers too and leaves a
    value they refuse to argparse."""
    import argparse

    return argparse.ArgumentTypeError(message)


_SIZE_RE = r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)B?"  # compiled (and cached by re) on first use
_SIZE_FACTORS = {
    "": 1,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
    "P": 1024**5,
    "E": 1024**6,
}
_RESET_WORDS = frozenset({"infinity", "default"})  # -1 on the wire: back to systemd's default


def parse_size(text: str) -> int:
    """MemoryMax= syntax: bytes with an optional 1024-based K/M/G/T/P/E suffix, or infinity (-1)."""
    import re  # only a size to convert needs it; most command lines have none

    if text.strip().lower() in _RESET_WORDS:
        return -1
    m = re.fullmatch(_SIZE_RE, text.strip(), re.IGNORECASE)
    if m is None:
        raise _invalid(f"invalid size {text!r} (e.g. 512M, 2G, infinity)")
    number, suffix = m.groups()
    whole, _, frac = number.partition(".")
    factor = _SIZE_FACTORS[suffix.upper()]
    # Exact integer arithmetic: 1.5G must be 1610612736, not a float rounding of it.
    value = int(whole) * factor + (int(frac) * factor // 10 ** len(frac) if frac else 0)
    return value


def parse_count(text: str) -> int:
    """A non-negative integer, or infinity/default (-1)."""
    if text.strip().lower() in _RESET_WORDS:
        return -1
    try:
        value = int(text, 10)
    except ValueError:
        raise _invalid(f"invalid number {text!r}") from None
    if value < 0:
        raise _invalid(f"{text!r} is negative (use infinity to reset)")
    return value


def parse_timeout(text: str) -> float | None:
    """Seconds (a decimal), or 0/infinity for no timeout."""
    if text.strip().lower() == "infinity":
        return None
    try:
        value = float(text)
    except ValueError:
        raise _invalid(f"invalid timeout {text!r}") from None
    if value < 0 or value != value:
        raise _invalid(f"invalid timeout {text!r}")
    return None if value == 0 else value


_REL_RE = r"-?\s*(\d+)\s*(s|sec|m|min|h|d|w)\w*(\s+ago)?"
_REL_USEC = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now_usec: int) -> int:
    """journalctl-like --since: "2026-11-25 12:00", today, yesterday, -1h, "5min ago", @EPOCH."""
    import datetime
    import re

    t = text.strip()
    if t.startswith("@"):
        try:
            return int(float(t[1:]) * 1_000_000)
        except ValueError:
            raise _invalid(f"invalid time {text!r}") from None
    if t in ("now",):
        return now_usec
    if t in ("today", "yesterday"):
        day = datetime.datetime.fromtimestamp(now_usec / 1e6).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        if t == "yesterday":
            day -= datetime.timedelta(days=1)
        return int(day.timestamp() * 1_000_000)
    m = re.fullmatch(_REL_RE, t, re.IGNORECASE)
    if m is not None and (t.startswith("-") or m.group(3)):
        unit = m.group(2).lower()
        seconds = int(m.group(1)) * _REL_USEC.get(unit, _REL_USEC.get(unit[:1], 1))
        return now_usec - seconds * 1_000_000
    try:
        return int(datetime.datetime.fromisoformat(t).timestamp() * 1_000_000)
    except ValueError:
        raise _invalid(
            f"invalid time {text!r} (e.g. '2026-11-25 12:00', today, -1h, '5min ago')"
        ) from None
