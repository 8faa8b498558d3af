"""The plain command lines, parsed without argparse, from the declarations argparse is built from.

Importing argparse (with re, enum and gettext) and building one verb's parser cost a capsulectl
command ~15 ms in the testbed, more than half of its own start-up (issue 12). Most command lines
are plain: `status web`, `--json list`, `stop a b`. For those, `parse()` replays each verb's
arguments() and the global options into a recorder (`Declared`, which takes the same
add_argument() calls) and reads the command line against what was recorded, giving the Namespace
argparse would give.

It is sure of very little, and hands everything else to argparse (returns None), so that help,
every usage error and every refused value stay argparse's, byte for byte: any word starting with
"-" that is not exactly a declared option string (abbreviations, -h/--help, `--`, combined or
attached short options, negative numbers), `=` after a flag, an option whose value would start
with "-", a value its type= function refuses, choices, nargs other than one or "+", positionals
split by options, too few or too many of them, and no verb at all. A value the type= function
accepts (`logs web -n 100`, `--timeout 5`) is converted here by that same function, as argparse
calls it (it refuses by raising ArgumentTypeError, TypeError or ValueError, which send the
command line to argparse for its message). tests/unit/test_cli_fastargs.py compares its
Namespace with argparse's over generated command lines of every verb.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs every command ~5 ms (mypy: true)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from capsulectl.verbs import Verb

__all__ = ["SUPPRESS", "Declared", "Namespace", "parse"]

# argparse.SUPPRESS's value (tests/unit/test_cli_fastargs.py holds them equal): a default that
# leaves the attribute unset.
SUPPRESS = "==SUPPRESS=="

# What the recorder understands; any other keyword makes the declaration unsupported.
_KEYWORDS = frozenset({"action", "help", "metavar", "dest", "default", "nargs", "type"})


class Namespace:
    """What parse() returns: attributes, compared by their values (like argparse.Namespace)."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)

    def __eq__(self, other: object) -> bool:
        return vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, like argparse.Namespace

    if TYPE_CHECKING:
        # What typeshed says of argparse.Namespace: attributes are the parser's, not declared.
        def __getattr__(self, name: str) -> Any: ...

    def __repr__(self) -> str:
        return f"Namespace({', '.join(f'{k}={v!r}' for k, v in sorted(vars(self).items()))})"


class _Option:
    __slots__ = ("convert", "default", "dest", "flag")

    def __init__(
        self, dest: str, flag: bool, default: object, convert: Callable[[str], object] | None
    ) -> None:
        self.dest = dest
        self.flag = flag  # store_true: no value
        self.default = default
        self.convert = convert  # type=: what argparse would call on a value given


class Declared:
    """A recorder for add_argument() calls, as verbs and the global options make them.

    `supported` turns False on any declaration parse() cannot mirror exactly; the verb is then
    argparse's whole.
    """

    def __init__(self) -> None:
        self.options: dict[str, _Option] = {}
        self.positionals: list[tuple[str, str | None]] = []  # (dest, nargs)
        self.defaults: dict[str, object] = {}
        self.supported = True

    def add_argument_group(self, *args: object, **kwargs: object) -> Declared:
        return self

    def add_mutually_exclusive_group(self, *args: object, **kwargs: object) -> Declared:
        self.supported = False  # argparse checks the exclusion
        return self

    def set_defaults(self, **kwargs: object) -> None:
        self.defaults.update(kwargs)

    def add_argument(self, *names: str, **kw: object) -> None:
        action = kw.get("action", "store")
        if set(kw) - _KEYWORDS or action not in ("store", "store_true"):
            self.supported = False
            return
        if not names[0].startswith("-"):
            if action != "store" or kw.get("nargs") not in (None, "+") or "type" in kw:
                self.supported = False
            self.positionals.append((names[0], kw.get("nargs")))  # type: ignore[arg-type]
            return
        if kw.get("nargs") is not None:
            self.supported = False
            return
        long = [n for n in names if n.startswith("--")]
        dest = kw.get("dest") or (long[0] if long else names[0]).lstrip("-").replace("-", "_")
        flag = action == "store_true"
        default = kw.get("default", False if flag else None)
        convert = kw.get("type")
        if convert is not None and not callable(convert):
            self.supported = False  # argparse's error to give
            return
        if isinstance(default, str) and default != SUPPRESS and convert is not None:
            self.supported = False  # argparse would convert a string default
        option = _Option(str(dest), flag, default, convert)
        for name in names:
            self.options[name] = option

    def initial(self) -> dict[str, object]:
        """The attributes argparse sets before reading the words: defaults not SUPPRESS."""
        values: dict[str, object] = {}
        for option in self.options.values():
            if option.default != SUPPRESS:
                values[option.dest] = option.default
        values.update(self.defaults)
        return values


def _read_option(
    words: Sequence[str], i: int, declared: Declared
) -> tuple[str, object, int] | None:
    """The option at words[i]: (dest, value, next index), or None if argparse must judge it."""
    word = words[i]
    name, eq, attached = word.partition("=") if word.startswith("--") else (word, "", "")
    option = declared.options.get(name)
    if option is None:
        return None
    if option.flag:
        return None if eq else (option.dest, True, i + 1)
    if eq:
        text, after = attached, i + 1
    elif i + 1 < len(words) and not words[i + 1].startswith("-"):
        text, after = words[i + 1], i + 2
    else:
        return None
    if option.convert is None:
        return option.dest, text, after
    try:
        return option.dest, option.convert(text), after
    # What argparse's _get_value catches to report a bad value; anything else propagates from
    # both. The tuple is evaluated only once something was raised.
    except (TypeError, ValueError, _argument_type_error()):
        return None  # argparse's to refuse, in its words


def _argument_type_error() -> type[Exception]:
    """argparse.ArgumentTypeError: imported only once a value was refused (capsulectl.argtypes
    loaded argparse to raise it)."""
    import argparse

    return argparse.ArgumentTypeError


def _place(words: list[str], positionals: list[tuple[str, str | None]]) -> dict[str, object] | None:
    """Positional words to their dests, if they fit the declared shape exactly."""
    singles = sum(1 for _, nargs in positionals if nargs is None)
    many = [dest for dest, nargs in positionals if nargs == "+"]
    if not many:
        if len(words) != singles:
            return None
        return {dest: word for (dest, _), word in zip(positionals, words, strict=True)}
    if len(many) != 1 or positionals[-1][1] != "+" or len(words) <= singles:
        return None
    values: dict[str, object] = {
        dest: word for (dest, _), word in zip(positionals, words, strict=False)
    }
    values[many[0]] = words[singles:]
    return values


def parse(
    words: Sequence[str],
    verbs: Sequence[Verb],
    add_globals: Callable[[Declared, bool], None],
) -> Namespace | None:
    """The Namespace argparse would make of words, or None where argparse must be asked.

    add_globals(declared, top) declares the global options as cli.build_parser() does.
    """
    top = Declared()
    top.add_argument("--bridge", action="store_true")
    add_globals(top, True)
    values = top.initial()
    values["verb"] = None
    i = 0
    while i < len(words) and words[i].startswith("-"):
        read = _read_option(words, i, top)
        if read is None:
            return None
        dest, value, i = read
        values[dest] = value
    if i == len(words):
        return None  # no verb: argparse (and then `list`) decides
    verb = next((v for v in verbs if v.name == words[i]), None)
    if verb is None:
        return None
    sub = Declared()
    verb.arguments(sub)  # type: ignore[arg-type]  # the add_argument subset verbs use
    add_globals(sub, False)
    sub.set_defaults(handler=verb.run)
    if not sub.supported:
        return None
    values["verb"] = verb.name
    values.update(sub.initial())
    given: dict[str, object] = {}
    positional: list[str] = []
    split = False  # an option came after the first positional word
    i += 1
    while i < len(words):
        if not words[i].startswith("-"):
            if split:
                return None  # argparse may take the words after the option for extras
            positional.append(words[i])
            i += 1
            continue
        read = _read_option(words, i, sub)
        if read is None:
            return None
        dest, value, i = read
        given[dest] = value
        split = bool(positional)
    placed = _place(positional, sub.positionals)
    if placed is None:
        return None
    values.update(placed)
    values.update(given)
    return Namespace(**values)
