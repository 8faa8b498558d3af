"""Capsule and unit name validation, mirroring systemd's own checks (invariant 3).

A name systemd would refuse must never reach systemd, and a name systemd accepts should not be
refused here without a documented reason. Each check cites the systemd function it mirrors; the
reason strings are for humans (they end up in ``InvalidName(name, reason)`` replies).
"""

from __future__ import annotations

import re
import string

# user-util.c valid_user_group_name() in strict mode (flags=0, as capsule_name_is_valid() calls
# it) requires the user name to fit the utmp field: length <= UT_NAMESIZE - 1 = 31.  The user
# name is "c-" + NAME, so NAME has at most 29 characters.  (The other two caps in that function,
# sysconf(_SC_LOGIN_NAME_MAX) = 256 on glibc and NAME_MAX = 255, are looser.)
_UT_NAMESIZE = 32
CAPSULE_USER_PREFIX = "c-"
CAPSULE_NAME_MAX = _UT_NAMESIZE - 1 - len(CAPSULE_USER_PREFIX)  # 29

# path-util.c filename_part_is_valid(): NAME_MAX, counted without the trailing NUL.
_NAME_MAX = 255

# unit-name.h: UNIT_NAME_MAX 256, and unit_name_is_valid() refuses strlen(n) >= UNIT_NAME_MAX.
UNIT_NAME_MAX = 256

# unit-def.c unit_type_table: the suffixes unit_type_from_string() knows.
UNIT_TYPES: frozenset[str] = frozenset(
    {
        "service",
        "socket",
        "target",
        "device",
        "mount",
        "automount",
        "swap",
        "timer",
        "path",
        "slice",
        "scope",
    }
)

# unit-file.c unit_type_may_template(): only these types have templates and instances; PID 1
# refuses "x@y.mount" (manager_load_unit_prepare() -> EINVAL) although unit_name_is_valid() holds.
TEMPLATABLE_UNIT_TYPES: frozenset[str] = frozenset({"service", "socket", "target", "timer", "path"})

# Unit files that do something in a capsule's (unprivileged, per-user) service manager.  Not a
# systemd rule: scopes are transient only, devices come from udev, and mount/automount/swap need
# privileges a user manager lacks.  For callers that write unit files (InstallUnit).
INSTALLABLE_UNIT_TYPES: frozenset[str] = frozenset(
    {"service", "socket", "target", "timer", "path", "slice"}
)

_ASCII_ALPHA = frozenset(string.ascii_letters)
_ASCII_DIGITS = frozenset(string.digits)
# user-util.c valid_user_group_name(), strict branch: the first character is ascii_isalpha() or
# '_'; the rest ascii_isalpha(), ascii_isdigit(), '_' or '-'.
_USER_NAME_CHARS = _ASCII_ALPHA | _ASCII_DIGITS | {"_", "-"}
# unit-name.c VALID_CHARS = DIGITS LETTERS ":-_.\\"; '@' is handled separately.
_UNIT_NAME_CHARS = _ASCII_ALPHA | _ASCII_DIGITS | set(":-_.\\")


def _describe(char: str) -> str:
    """Show a character in an error message without letting control characters through."""
    return repr(char) if char.isprintable() else f"U+{ord(char):04X}"


def _filename_problem(name: str) -> str | None:
    """Mirror path-util.c filename_is_valid()."""
    if name == "":
        return "empty"
    if name in (".", ".."):
        return f"{name!r} is not a file name"
    if "/" in name:
        return "contains '/'"
    if "\0" in name:
        # A C string would end here; a str can carry the NUL, so refuse it outright.
        return "contains a NUL character"
    if len(name.encode("utf-8", "surrogatepass")) > _NAME_MAX:
        return f"longer than {_NAME_MAX} bytes"
    return None


def _strict_user_name_problem(user: str) -> str | None:
    """Mirror user-util.c valid_user_group_name(user, 0), the strict mode.

    The numeric-UID branch (parse_uid) never applies here because the user name always starts
    with "c-"; neither does the empty check.  The character checks come before the length checks
    in systemd, and so they do here.
    """
    if user == "":
        return "empty"
    if user[0] not in _ASCII_ALPHA and user[0] != "_":
        return f"starts with {_describe(user[0])}"
    for char in user[1:]:
        if char not in _USER_NAME_CHARS:
            return f"contains {_describe(char)}; only A-Z, a-z, 0-9, '_' and '-' are allowed"
    if len(user) > _UT_NAMESIZE - 1:
        return f"longer than {_UT_NAMESIZE - 1 - len(CAPSULE_USER_PREFIX)} characters"
    return None


def capsule_name_problem(name: str) -> str | None:
    """Return why ``name`` is not a valid capsule name, or None if it is valid.

    Mirrors capsule-util.c capsule_name_is_valid(): filename_is_valid(name) and
    valid_user_group_name("c-" + name, 0).  Consequences worth knowing: a leading '-' or digit
    is fine ("c--x", "c-123" are valid strict user names), so is an all-digit name; '.', '@',
    spaces and anything non-ASCII are not; at most 29 characters.
    """
    problem = _filename_problem(name)
    if problem is not None:
        return problem
    return _strict_user_name_problem(CAPSULE_USER_PREFIX + name)


# The names capsule_name_problem() finds nothing wrong with, as one pattern (the charset of a
# strict user name holds no '.', '/' or NUL, so the file-name checks add nothing): the test a
# List makes at every row, without the per-character loop. tests/unit/test_names.py keeps
# the two equal.
_VALID_CAPSULE_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{CAPSULE_NAME_MAX}}}")


def is_valid_capsule_name(name: str) -> bool:
    """True when systemd's capsule_name_is_valid() would accept ``name``."""
    return _VALID_CAPSULE_NAME.fullmatch(name) is not None


def unit_name_problem(
    name: str, *, allow_template: bool = False, types: frozenset[str] | None = None
) -> str | None:
    """Return why ``name`` is not an acceptable unit name inside a capsule, or None.

    Mirrors unit-name.c unit_name_is_valid() with UNIT_NAME_PLAIN|UNIT_NAME_INSTANCE (and
    UNIT_NAME_TEMPLATE when ``allow_template``), plus unit_type_may_template() as PID 1 applies it
    when loading a unit.  ``types`` restricts the suffix further (e.g. INSTALLABLE_UNIT_TYPES).
    Deliberate divergence, stricter than systemd:
    a name starting with '.' or containing ".." is refused.  systemd accepts "..service" and
    "a..b.service"; neither can traverse a path (no '/' is possible), but hidden files are
    skipped when systemd enumerates unit directories, and refusing ".." keeps every name
    obviously harmless wherever it is joined into a path or shown to a human.
    """
    if name == "":
        return "empty"
    if "/" in name:
        return "contains '/'"
    if len(name.encode("utf-8", "surrogatepass")) >= UNIT_NAME_MAX:
        return f"longer than {UNIT_NAME_MAX - 1} characters"
    dot = name.rfind(".")
    if dot == -1:
        return "has no unit type suffix (like '.service')"
    if dot == 0:
        return "has nothing before the unit type suffix"
    suffix = name[dot + 1 :]
    if suffix not in UNIT_TYPES:
        known = ", ".join(sorted(UNIT_TYPES))
        return f"unknown unit type suffix {suffix!r}; expected one of {known}"
    stem = name[:dot]
    at = stem.find("@")
    for char in stem:
        if char != "@" and char not in _UNIT_NAME_CHARS:
            return (
                f"contains {_describe(char)}; only A-Z, a-z, 0-9, ':', '-', '_', '.', '\\' "
                "and '@' are allowed"
            )
    if at == 0:
        return "starts with '@'"
    if at != -1 and at == len(stem) - 1 and not allow_template:
        return "is a template (ends in '@'); name an instance instead"
    if at != -1 and suffix not in TEMPLATABLE_UNIT_TYPES:
        return f"a .{suffix} unit cannot be a template or an instance (no '@' allowed)"
    if types is not None and suffix not in types:
        return f"a .{suffix} unit cannot be used here; expected one of {', '.join(sorted(types))}"
    # Our stricter rules, after systemd's so a name systemd refuses gets systemd's reason.
    if name.startswith("."):
        return "starts with '.'"
    if ".." in name:
        return "contains '..'"
    return None


def is_valid_unit_name(name: str, *, allow_template: bool = False) -> bool:
    """True when ``name`` passes unit_name_problem()."""
    return unit_name_problem(name, allow_template=allow_template) is None


def unit_type(name: str) -> str:
    """The type suffix of an already validated unit name ("service" for "a.service")."""
    return name.rsplit(".", 1)[1]
