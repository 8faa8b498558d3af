"""What capsulectl prints: aligned tables, a `systemctl status`-like view, journal lines, JSON.

Pure functions from wire values to text (the clock and the colour choice are parameters), so every
format is unit-tested without a terminal. Number and time formats follow systemd's format_bytes(),
format_timespan() and format_timestamp_relative(), so the numbers read like systemctl's.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False  # not typing's: a plain command loads no typing (capsulectl/fastargs.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import TextIO

    from capsuled import wire

__all__ = [
    "Style",
    "access_line",
    "audit_table",
    "bundle_summary",
    "capsule_table",
    "dump_json",
    "event_line",
    "format_bytes",
    "format_relative",
    "format_timespan_ns",
    "format_timestamp",
    "info_lines",
    "log_line",
    "printable",
    "should_colour",
    "status_view",
    "table",
    "unit_table",
]

_FALSE_WORDS = frozenset({"0", "no", "n", "false", "f", "off"})


# --- text from the helper, made safe for a terminal ---------------------------------------------

# systemd's cescape() names these; every other control character becomes \xNN.
_NAMED_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\v": "\\v",
    "\f": "\\f",
    "\r": "\\r",
}
# Characters that reorder or break lines on a terminal without being controls (Unicode bidi
# overrides and isolates, line and paragraph separators: "Trojan Source" text).
_LAYOUT_CHARS = (
    0x061C,
    0x200E,
    0x200F,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
    0x2028,
    0x2029,
)
_ESCAPES: dict[int, str] = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    **{ord(k): v for k, v in _NAMED_ESCAPES.items()},
    **{c: f"\\u{c:04x}" for c in _LAYOUT_CHARS},
}


def printable(text: str) -> str:
    """`text` with every control character escaped the way systemctl and journalctl's cescape()
    shows them ("\\x1b", "\\n"), so text a capsule controls (log messages, unit names and
    descriptions, error texts that echo them) cannot move the cursor, clear the screen, set the
    window title or the clipboard (OSC 52), or forge extra lines. Backslashes stay as they are,
    as journalctl prints them. --json output is never escaped: it is exact.
    """
    return text.translate(_ESCAPES)


def should_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal; never with NO_COLOR, SYSTEMD_COLORS=0 or TERM=dumb."""
    if environ.get("NO_COLOR"):
        return False
    if environ.get("SYSTEMD_COLORS", "").strip().lower() in _FALSE_WORDS:
        return False
    if environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


class Style:
    """ANSI highlighting (a no-op when colour is off); glyphs that fit the stream's encoding."""

    def __init__(self, colour: bool, encoding: str | None = "utf-8") -> None:
        self.colour = colour
        try:
            "\u25cf\u00d7".encode(encoding or "utf-8")  # in-memory streams have none
            self.dot, self.cross = "\u25cf", "\u00d7"  # systemd's bullet and cross mark
        except (UnicodeEncodeError, LookupError):
            self.dot, self.cross = "*", "x"  # systemd's fallbacks for non-UTF-8 terminals

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def green(self, text: str) -> str:
        """Bold green (systemd's ansi_highlight_green)."""
        return self._wrap("1;32", text)

    def red(self, text: str) -> str:
        """Bold red (systemd's ansi_highlight_red)."""
        return self._wrap("1;31", text)

    def yellow(self, text: str) -> str:
        """Bold yellow, for warnings."""
        return self._wrap("1;33", text)

    def bold(self, text: str) -> str:
        """Bold."""
        return self._wrap("1", text)

    def state(self, state: str, text: str) -> str:
        """Colour text the way systemctl colours an ActiveState."""
        if state in ("active", "reloading", "refreshing"):
            return self.green(text)
        if state == "failed":
            return self.red(text)
        return text


# --- numbers and times (systemd's formats) -------------------------------------------------------

_BYTE_SUFFIXES = ("E", "P", "T", "G", "M", "K")


def format_bytes(n: int) -> str:
    """Bytes the way systemctl prints them: 1024-based, one truncated decimal: 512B, 4.0K, 4.2M."""
    for i, suffix in enumerate(_BYTE_SUFFIXES):
        factor = 1024 ** (len(_BYTE_SUFFIXES) - i)
        if n >= factor:
            whole, rest = divmod(n, factor)
            return f"{whole}.{rest * 10 // factor}{suffix}"
    return f"{n}B"


_NSEC_PER_MSEC = 1_000_000
_SPANS_MS: tuple[tuple[str, int], ...] = (
    ("y", 31_557_600_000),
    ("month", 2_629_800_000),
    ("w", 604_800_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("min", 60_000),
)


def format_timespan_ns(ns: int) -> str:
    """A duration at millisecond accuracy, like format_timespan(..., USEC_PER_MSEC): 1min 2.5s."""
    ms = ns // _NSEC_PER_MSEC
    if ms <= 0:
        return "0"
    parts: list[str] = []
    for suffix, size in _SPANS_MS:
        if ms >= size:
            count, ms = divmod(ms, size)
            parts.append(f"{count}{suffix}")
    seconds, millis = divmod(ms, 1000)
    if seconds and millis:
        parts.append(f"{seconds}.{millis:03d}".rstrip("0") + "s")
    elif seconds:
        parts.append(f"{seconds}s")
    elif millis:
        parts.append(f"{millis}ms")
    return " ".join(parts)


_USEC_PER_SEC = 1_000_000
_USEC_PER_MIN = 60 * _USEC_PER_SEC
_USEC_PER_HOUR = 60 * _USEC_PER_MIN
_USEC_PER_DAY = 24 * _USEC_PER_HOUR
_USEC_PER_WEEK = 7 * _USEC_PER_DAY
_USEC_PER_MONTH = 2_629_800 * _USEC_PER_SEC
_USEC_PER_YEAR = 31_557_600 * _USEC_PER_SEC


def format_relative(usec: int, now_usec: int) -> str:
    """How long ago, with systemd's format_timestamp_relative() thresholds: "5min ago"."""
    d = now_usec - usec
    if d <= 0:
        return "now" if d == 0 else "in the future"
    if d >= _USEC_PER_YEAR:
        years, rest = divmod(d, _USEC_PER_YEAR)
        return f"{years} year{'s' if years > 1 else ''} {rest // _USEC_PER_MONTH} months ago"
    if d >= _USEC_PER_MONTH:
        months, rest = divmod(d, _USEC_PER_MONTH)
        return f"{months} month{'s' if months > 1 else ''} {rest // _USEC_PER_DAY} days ago"
    if d >= _USEC_PER_WEEK:
        weeks, rest = divmod(d, _USEC_PER_WEEK)
        return f"{weeks} week{'s' if weeks > 1 else ''} {rest // _USEC_PER_DAY} days ago"
    if d >= 2 * _USEC_PER_DAY:
        return f"{d // _USEC_PER_DAY} days ago"
    if d >= 25 * _USEC_PER_HOUR:
        return f"1 day {(d - _USEC_PER_DAY) // _USEC_PER_HOUR}h ago"
    if d >= 6 * _USEC_PER_HOUR:
        return f"{d // _USEC_PER_HOUR}h ago"
    if d >= _USEC_PER_HOUR:
        return f"{d // _USEC_PER_HOUR}h {d % _USEC_PER_HOUR // _USEC_PER_MIN}min ago"
    if d >= 5 * _USEC_PER_MIN:
        return f"{d // _USEC_PER_MIN}min ago"
    if d >= _USEC_PER_MIN:
        return f"{d // _USEC_PER_MIN}min {d % _USEC_PER_MIN // _USEC_PER_SEC}s ago"
    if d >= _USEC_PER_SEC:
        return f"{d // _USEC_PER_SEC}s ago"
    if d >= 1000:
        return f"{d // 1000}ms ago"
    return f"{d}us ago"


def format_timestamp(usec: int) -> str:
    """Local time like systemd's format_timestamp(): Wed 2026-11-25 12:05:22 UTC."""
    return time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(usec / _USEC_PER_SEC))


def now_usec() -> int:
    """CLOCK_REALTIME in microseconds, the unit of every timestamp on the wire."""
    return time.time_ns() // 1000


# --- JSON ---------------------------------------------------------------------------------------


def dump_json(value: object) -> str:
    """One compact JSON document on one line (a stream is one of these per line).

    The protocol core's writer, json.dumps without the json package (and its re): what comes
    in a reply was read as JSON, so it has no NaN or infinity for allow_nan=False to refuse.
    """
    from capsuled.varlink.messages import compact_json

    return compact_json(value)


# --- tables -------------------------------------------------------------------------------------


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, legend: bool = True
) -> list[str]:
    """Left-aligned columns separated by one space; the last column is not padded (as systemctl)."""
    # Every cell may come from a capsule (unit names, descriptions): escaped here, once.
    shown = [[printable(cell) for cell in row] for row in rows]
    all_rows = [list(headers), *shown] if legend else shown
    if not all_rows:
        return []
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append(" ".join([*cells, row[-1]]).rstrip())
    return lines


def _opt(value: int | None, fmt: Callable[[int], str] = str) -> str:
    return "-" if value is None else fmt(value)


def capsule_table(capsules: Sequence[wire.Capsule], *, legend: bool = True) -> list[str]:
    """`capsulectl list`: one row per capsule, then "N capsules listed."."""
    rows = [
        (
            c["name"],
            c["state"],
            c["subState"],
            c["ownerName"] or _opt(c["owner"]),
            "yes" if c["autostart"] else "no",
            _opt(c["memoryCurrent"], format_bytes),
            _opt(c["tasksCurrent"]),
            str(c["units"]),
        )
        for c in capsules
    ]
    headers = ("NAME", "ACTIVE", "SUB", "OWNER", "AUTOSTART", "MEMORY", "TASKS", "UNITS")
    lines = table(headers, rows, legend=legend)
    if legend:
        lines += ["", f"{len(rows)} capsule{'' if len(rows) == 1 else 's'} listed."]
    return lines


def unit_table(units: Sequence[wire.Unit], *, legend: bool = True) -> list[str]:
    """`capsulectl units NAME`: like `systemctl list-units`, plus ENABLED."""
    rows = [
        (
            u["name"],
            u["loadState"],
            u["activeState"],
            u["subState"],
            "enabled" if u["enabled"] else ("disabled" if u["hasFile"] else "transient"),
            u["description"] or "",
        )
        for u in units
    ]
    lines = table(("UNIT", "LOAD", "ACTIVE", "SUB", "ENABLED", "DESCRIPTION"), rows, legend=legend)
    if legend:
        lines += ["", f"{len(rows)} unit{'' if len(rows) == 1 else 's'} listed."]
    return lines


# --- status -------------------------------------------------------------------------------------

LABEL_WIDTH = 11  # "  Autostart", the longest label; systemctl aligns its colons the same way


def _field(label: str, value: str) -> str:
    return f"{label.rjust(LABEL_WIDTH)}: {value}"


def _owner(c: wire.Capsule) -> str:
    if c["ownerName"]:
        return f"owner {printable(c['ownerName'])}"
    if c["owner"] is not None:
        return f"owner uid {c['owner']}"
    return "not created through capsuled"


def status_view(c: wire.Capsule, style: Style, now: int) -> list[str]:
    """The `systemctl status`-like block for one capsule."""
    state, name, sub = printable(c["state"]), printable(c["name"]), printable(c["subState"])
    glyph = style.cross if state == "failed" else style.dot
    lines = [f"{style.state(state, glyph)} {name} - capsule ({_owner(c)})"]
    data = f"data in /var/lib/capsules/{name}" if c["hasData"] else "no data yet"
    lines.append(_field("Loaded", f"capsule@{name}.service ({data})"))
    active = style.state(state, f"{state} ({sub})")
    if state == "failed" and c["result"] and c["result"] != "success":
        active += f" (Result: {printable(c['result'])})"
    if c["since"] is not None:
        active += f" since {format_timestamp(c['since'])}; {format_relative(c['since'], now)}"
    lines.append(_field("Active", active))
    if c["uid"] is not None:
        lines.append(_field("UID", f"{c['uid']} (c-{name})"))
    if c["tasksCurrent"] is not None or c["tasksMax"] is not None:
        tasks = _opt(c["tasksCurrent"])
        if c["tasksMax"] is not None:
            tasks += f" (limit: {c['tasksMax']})"
        lines.append(_field("Tasks", tasks))
    if c["memoryCurrent"] is not None or c["memoryMax"] is not None:
        memory = _opt(c["memoryCurrent"], format_bytes)
        if c["memoryMax"] is not None:
            memory += f" (max: {format_bytes(c['memoryMax'])})"
        lines.append(_field("Memory", memory))
    if c["cpuUsageNSec"] is not None or c["cpuWeight"] is not None:
        cpu = _opt(c["cpuUsageNSec"], format_timespan_ns)
        if c["cpuWeight"] is not None:
            cpu += f" (weight: {c['cpuWeight']})"
        lines.append(_field("CPU", cpu))
    lines.append(_field("Units", str(c["units"])))
    bundle = c["bundle"]
    if bundle is not None:
        lines.append(_field("Bundle", bundle_summary(bundle)))
    lines.append(_field("Autostart", "yes" if c["autostart"] else "no"))
    return lines


def bundle_summary(b: wire.DeployedBundle) -> str:
    """ "web 1.4.2 (signed by release, deployed Wed 2026-11-25 12:05:22 UTC; previous 1.4.1)"."""
    text = f"{b['name']} {b['version']} (signed by {b['signer']}, deployed "
    text += format_timestamp(b["deployed"])
    if b["previousVersion"] is not None:
        text += f"; previous {b['previousVersion']}"
    text += ")"
    if b["unfinishedVersion"] is not None:
        text += f"; unfinished deploy of {b['unfinishedVersion']}"
    return printable(text)  # the helper checked these names; escaped all the same


def audit_table(records: Sequence[wire.AuditRecord], *, legend: bool = True) -> list[str]:
    """The Audit records as a table: time, seq, caller, action, result, details."""
    rows = []
    for r in records:
        caller = str(r["callerUid"])
        if r["callerUnit"] is not None:
            caller += f" ({r['callerUnit']})"
        # Details echo what callers sent (a Run's executable, a unit's name): escaped.
        details = " ".join(f"{k}={v}" for k, v in sorted(r["details"].items()))
        cells = [caller, r["action"], r["result"], details]
        rows.append([format_timestamp(r["time"]), str(r["seq"]), *(printable(c) for c in cells)])
    lines = table(["TIME", "SEQ", "CALLER", "ACTION", "RESULT", "DETAILS"], rows, legend=legend)
    if legend:
        lines += ["", f"{len(rows)} record{'' if len(rows) == 1 else 's'} listed."]
    return lines


# --- journal, events, access, info --------------------------------------------------------------


def log_line(e: wire.LogEntry, style: Style) -> str:
    """journalctl's short format, without the host name: "Nov 25 12:05:22 web[42]: hello"."""
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime(e["timestamp"] / _USEC_PER_SEC))
    # The identifier and the message are whatever the capsule's processes logged.
    source = printable(e["identifier"] or e["unit"] or "capsule")
    if e["pid"] is not None:
        source += f"[{e['pid']}]"
    message = printable(e["message"])
    priority = e["priority"]
    if priority is not None and priority <= 3:
        message = style.red(message)
    elif priority == 4:
        message = style.yellow(message)
    return f"{stamp} {source}: {message}"


def event_line(ev: wire.Event, style: Style) -> str:
    """One Watch event: "<local time> web/app.service: active (running)"."""
    what = ev["capsule"] if ev["unit"] is None else f"{ev['capsule']}/{ev['unit']}"
    state = ev["state"] if ev["subState"] is None else f"{ev['state']} ({ev['subState']})"
    shown = f"{printable(what)}: {style.state(ev['state'], printable(state))}"
    return f"{format_timestamp(ev['timestamp'])} {shown}"


def access_line(access: wire.AccessResult) -> str:
    """can-i: the policy's answer, then why: "yes (owner)"."""
    line = access["result"] if not access["reason"] else f"{access['result']} ({access['reason']})"
    return printable(line)


def info_lines(
    info: wire.InfoReply,
    service: wire.ServiceInfo | None,
    *,
    address: str,
    client_version: str,
    user_name: str | None,
) -> list[str]:
    """`capsulectl info`: what the helper says about itself, and where capsulectl reached it."""
    width = len("Policy backend")
    caller = str(info["callerUid"]) + (f" ({user_name})" if user_name else "")
    rows = [
        ("Address", address),
        ("capsuled", info["version"]),
        ("capsulectl", client_version),
        ("systemd", _opt(info["systemdVersion"])),
        ("Policy backend", info["policyBackend"]),
        ("Caller", caller),
    ]
    if service is not None:
        rows.append(("Interfaces", ", ".join(service["interfaces"])))
    return [f"{label.rjust(width)}: {printable(value)}" for label, value in rows]


def user_name(uid: int) -> str | None:
    """The local name of a uid, if it resolves (only meaningful for a local helper)."""
    import pwd  # only `info` needs it

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
