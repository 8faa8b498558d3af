"""Checking a unit file's text before it is written into a capsule (InstallUnit).

The lexical rules mirror systemd's config parser (src/shared/conf-parser.c: config_parse() and
parse_line(), systemd 252..257):

- physical lines end at "\\n", "\\r\\n" or "\\r" (fileio.c read_line());
- a UTF-8 byte order mark at the very start is skipped;
- a line whose first non-whitespace character is '#' or ';' is a comment, and is skipped even in
  the middle of a continuation;
- a line ending in an unescaped backslash continues on the next line; the backslash becomes a
  space;
- a logical line is stripped of " \\t\\n\\r"; empty lines are skipped;
- "[Name]" opens a section; the name may hold no control characters, quotes or backslash
  (string_is_safe());  a header not ending in ']' is an error;
- everything else is "key=value", both sides stripped.

Deliberately stricter than systemd, which merely warns and ignores in these cases; we refuse
them, with the line number, because a unit that silently loses lines is a worse outcome for a
user than a clear error at install time:

- an assignment before any section ("Assignment outside of section. Ignoring.");
- a line without '=' ("Missing '=', ignoring line.") or with an empty key;
- a key that is not made of ASCII letters, digits, '-', '_' and '.' (every systemd directive and
  customary "X-" extension key is);
- control characters other than TAB anywhere (they cannot be meant, and end up in logs);
- with ``unit_name`` given: a section other than [Unit], [Install], the type's own section
  ([Service], [Socket], ...) or an "X-" section ("Unknown section '%s'. Ignoring." in systemd);
- a file without any of [Unit], [Install] or a type section.

Size: UNIT_FILE_MAX_BYTES = 64 KiB for the whole file.  systemd only caps a line at
LONG_LINE_MAX (1 MiB); the largest unit files systemd ships are a few KiB, so 64 KiB is ample
while keeping a 16 MiB Varlink message from turning into a 16 MiB file in a capsule's home that
the helper reads back on every ListUnits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNIT_FILE_MAX_BYTES = 64 * 1024

_UTF8_BOM = "\ufeff"
_WHITESPACE = " \t\n\r"  # systemd's WHITESPACE
_COMMENTS = "#;"  # systemd's COMMENTS
_QUOTES = "\"'"
_LINE_END = re.compile(r"\r\n|\r|\n")
_KEY = re.compile(r"[A-Za-z0-9_.-]+")
_BAD_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# unit-def.c / each UnitVTable's .sections: "Unit", the type's own section, "Install".
TYPE_SECTIONS: dict[str, str] = {
    "service": "Service",
    "socket": "Socket",
    "target": "Target",
    "device": "Device",
    "mount": "Mount",
    "automount": "Automount",
    "swap": "Swap",
    "timer": "Timer",
    "path": "Path",
    "slice": "Slice",
    "scope": "Scope",
}
_COMMON_SECTIONS = frozenset({"Unit", "Install"})
_ALL_KNOWN_SECTIONS = _COMMON_SECTIONS | frozenset(TYPE_SECTIONS.values())


class InvalidUnitFile(ValueError):
    """The content is not a unit file we are willing to install; ``line`` is 1-based or None."""

    def __init__(self, line: int | None, reason: str) -> None:
        super().__init__(reason if line is None else f"line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Assignment:
    """One ``key=value``; ``line`` is where its logical line starts."""

    key: str
    value: str
    line: int


@dataclass(frozen=True, slots=True)
class Section:
    """A ``[Name]`` section with its assignments in file order."""

    name: str
    line: int
    assignments: tuple[Assignment, ...]


@dataclass(frozen=True, slots=True)
class InstallInfo:
    """The [Install] lists, with systemd's rule that an empty assignment resets the list."""

    wanted_by: tuple[str, ...]
    required_by: tuple[str, ...]
    upheld_by: tuple[str, ...]
    also: tuple[str, ...]
    alias: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnitFile:
    """A checked unit file: its sections in order (a name may repeat, as systemd allows)."""

    sections: tuple[Section, ...]

    def values(self, section: str, key: str) -> list[str]:
        """Every value assigned to ``key`` in every ``[section]``, in file order."""
        return [
            a.value
            for s in self.sections
            if s.name == section
            for a in s.assignments
            if a.key == key
        ]

    def install_info(self) -> InstallInfo:
        """The [Install] section's WantedBy=, RequiredBy=, UpheldBy=, Also=, Alias= lists."""

        def word_list(key: str) -> tuple[str, ...]:
            result: list[str] = []
            for value in self.values("Install", key):
                if value == "":
                    result.clear()  # an empty assignment resets the list, as in systemd
                else:
                    result.extend(value.split())
            return tuple(result)

        return InstallInfo(
            wanted_by=word_list("WantedBy"),
            required_by=word_list("RequiredBy"),
            upheld_by=word_list("UpheldBy"),
            also=word_list("Also"),
            alias=word_list("Alias"),
        )


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Mirror config_parse()'s loop: (first physical line number, joined text) per logical line."""
    result: list[tuple[int, str]] = []
    continuation: str | None = None
    start = 0
    for number, physical in enumerate(_LINE_END.split(text), start=1):
        stripped = physical.lstrip(_WHITESPACE)
        if stripped and stripped[0] in _COMMENTS:
            continue  # comments vanish even inside a continuation
        if number == 1 and physical.startswith(_UTF8_BOM):
            physical = physical[1:]
        if continuation is None:
            start = number
            joined = physical
        else:
            joined = continuation + physical
        escaped = False
        for char in joined:
            escaped = not escaped if char == "\\" else False
        if escaped:
            continuation = joined[:-1] + " "
            continue
        continuation = None
        result.append((start, joined))
    if continuation is not None:
        result.append((start, continuation))
    return result


def _line_of(content: bytes, offset: int) -> int:
    """The 1-based line number of byte ``offset``, with the same line ends as the parser."""
    return len(_LINE_END.findall(content[:offset].decode("latin-1"))) + 1


def parse_unit_file(content: bytes, *, max_bytes: int = UNIT_FILE_MAX_BYTES) -> UnitFile:
    """Parse ``content`` with the rules in the module docstring (no section policy).

    Raises:
        InvalidUnitFile: too large, not UTF-8, NUL or control characters, or a syntax error.
    """
    sections: list[Section] = []
    current: tuple[str, int] | None = None
    assignments: list[Assignment] = []
    for number, raw in _logical_lines(_decoded(content, max_bytes)):
        line = raw.strip(_WHITESPACE)
        if not line:
            continue
        bad = _BAD_CONTROL.search(line)
        if bad is not None:
            raise InvalidUnitFile(number, f"contains control character U+{ord(bad.group()):04X}")
        if line.startswith("["):
            if current is not None:
                sections.append(Section(current[0], current[1], tuple(assignments)))
            current = (_section_name(line, number), number)
            assignments = []
        elif current is None:
            raise InvalidUnitFile(number, "assignment outside of any section")
        else:
            assignments.append(_assignment(line, number))
    if current is not None:
        sections.append(Section(current[0], current[1], tuple(assignments)))
    return UnitFile(tuple(sections))


def _decoded(content: bytes, max_bytes: int) -> str:
    """The file's text, refused if too large, with a NUL byte, or not UTF-8."""
    if len(content) > max_bytes:
        raise InvalidUnitFile(None, f"larger than {max_bytes} bytes")
    if b"\0" in content:
        nul_line = _line_of(content, content.index(b"\0"))
        raise InvalidUnitFile(nul_line, "contains a NUL byte")
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = _line_of(content, exc.start)
        raise InvalidUnitFile(bad_line, "not valid UTF-8") from exc


def _section_name(line: str, number: int) -> str:
    """The name in a "[Section]" header line."""
    if not line.endswith("]") or len(line) < 2:
        raise InvalidUnitFile(number, f"invalid section header {line!r}")
    name = line[1:-1]
    if name == "":
        raise InvalidUnitFile(number, "empty section name")
    if any(c in name for c in _QUOTES + "\\"):
        raise InvalidUnitFile(number, f"bad characters in section header {line!r}")
    return name


def _assignment(line: str, number: int) -> Assignment:
    """A "Key=value" line inside a section."""
    key, sep, value = line.partition("=")
    if not sep:
        raise InvalidUnitFile(number, "missing '='")
    key = key.strip(_WHITESPACE)
    if key == "":
        raise InvalidUnitFile(number, "missing key name before '='")
    if _KEY.fullmatch(key) is None:
        raise InvalidUnitFile(number, f"invalid key name {key!r}")
    return Assignment(key, value.strip(_WHITESPACE), number)


def check_unit_file(
    content: bytes, *, unit_name: str | None = None, max_bytes: int = UNIT_FILE_MAX_BYTES
) -> UnitFile:
    """Parse ``content`` and apply the section policy; return the parsed file.

    ``unit_name`` (already validated with names.unit_name_problem) restricts the sections to
    [Unit], [Install], its type's section and X- sections.

    Raises:
        InvalidUnitFile: see the module docstring; ``line`` says where.
    """
    parsed = parse_unit_file(content, max_bytes=max_bytes)
    if unit_name is not None:
        unit_type = unit_name.rsplit(".", 1)[-1]
        own = TYPE_SECTIONS.get(unit_type)
        allowed: frozenset[str] = _COMMON_SECTIONS | ({own} if own else frozenset())
        for section in parsed.sections:
            if section.name in allowed or section.name.startswith("X-"):
                continue
            expected = ", ".join(f"[{s}]" for s in sorted(allowed))
            raise InvalidUnitFile(
                section.line,
                f"section [{section.name}] does not belong in a .{unit_type} unit "
                f"(expected {expected} or [X-...])",
            )
    else:
        allowed = _ALL_KNOWN_SECTIONS
    if not any(s.name in allowed for s in parsed.sections):
        raise InvalidUnitFile(None, "no [Unit], [Install] or unit type section")
    return parsed
