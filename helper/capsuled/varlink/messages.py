"""Varlink messages as small immutable values, and their JSON encoding (UAPI.20).

Values are checked on construction (h11's events do the same), so an ill-formed message cannot
exist: building one raises `LocalProtocolError`; parsing the peer's bytes relabels that as
`RemoteProtocolError`.

Parsing is strict, as systemd's sd-varlink is: the bytes must be UTF-8 holding one JSON object with
only the keys the spec defines, flags must be booleans and at most one of oneway/more/upgrade may be
set. Beyond sd-varlink we also refuse duplicate keys, NaN/Infinity and lone UTF-16 surrogates, none
of which is JSON (RFC 8259) and each of which would let two parsers disagree about one message.
"""

from __future__ import annotations

import _json  # json's own C scanner and encoder (below: why not the json package)

from capsuled.varlink.errors import LocalProtocolError, RemoteProtocolError

# Not typing's: capsulectl's start-up loads no typing, ~5 ms of it (mypy: true all the same).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self, dataclass_transform
else:

    def dataclass_transform(**_: object) -> object:
        """typing's marker for type checkers; at run time it only sets an attribute."""
        return lambda cls: cls


__all__ = [
    "Call",
    "ErrorReply",
    "Reply",
    "compact_json",
    "encode",
    "is_valid_interface_name",
    "is_valid_method_name",
    "parse_call",
    "parse_reply",
]

# UAPI.20 grammar: interface  [A-Za-z]([-]*[A-Za-z0-9])*([.][A-Za-z0-9]([-]*[A-Za-z0-9])*)+
#                  member     [A-Z][A-Za-z0-9]*
_INTERFACE = r"[A-Za-z](?:-*[A-Za-z0-9])*(?:\.[A-Za-z0-9](?:-*[A-Za-z0-9])*)+"
# Every Call and ErrorReply checks its name, so that check is written out below instead of with
# re: re (and the enum it imports) cost capsulectl's start-up ~4 ms. tests/unit/
# test_varlink_messages.py holds it equal to the grammar's pattern. The IDL parser's bare
# interface names still use re, imported on first use.
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LETTERS = _UPPER | frozenset("abcdefghijklmnopqrstuvwxyz")
_ALNUM = _LETTERS | frozenset("0123456789")
_ALNUM_DASH = _ALNUM | {"-"}


def is_valid_interface_name(name: str) -> bool:
    """True if `name` is a Varlink interface name such as org.varlink.service."""
    import re

    return re.fullmatch(_INTERFACE, name, re.ASCII) is not None


def _is_label(part: str, first: bool) -> bool:
    """One dot-separated part of an interface name: [A-Za-z0-9] (the first: a letter), then
    letters, digits and dashes, not ending in a dash."""
    return (
        part != ""
        and part[0] in (_LETTERS if first else _ALNUM)
        and part[-1] in _ALNUM
        and _ALNUM_DASH.issuperset(part)
    )


def is_valid_method_name(name: str) -> bool:
    """True if `name` is an interface-qualified member name such as org.varlink.service.GetInfo."""
    *interface, member = name.split(".")
    return (
        len(interface) >= 2
        and member != ""
        and member[0] in _UPPER
        and _ALNUM.issuperset(member)
        and _is_label(interface[0], True)
        and all(_is_label(part, False) for part in interface[1:])
    )


# Names is_valid_method_name accepted, so that a method called again (every Describe names the
# same one) is not checked character by character again: ~4 us of the ~12 a Call's
# construction took. Bounded in number and length; when full it starts again (a peer sending
# many different valid names makes it forget, never remember wrongly: only accepted names go in).
_VALID_NAMES: set[str] = set()
_MAX_VALID_NAMES = 256
_MAX_REMEMBERED_NAME = 256  # characters


def _is_valid_name(name: object) -> bool:
    """isinstance(name, str) and is_valid_method_name(name), remembering accepted names."""
    if type(name) is not str:
        return isinstance(name, str) and is_valid_method_name(name)
    if name in _VALID_NAMES:
        return True
    if not is_valid_method_name(name):
        return False
    if len(name) <= _MAX_REMEMBERED_NAME:
        if len(_VALID_NAMES) >= _MAX_VALID_NAMES:
            _VALID_NAMES.clear()
        _VALID_NAMES.add(name)
    return True


# How the message classes set their fields at construction (their __setattr__ refuses): the
# slot descriptors themselves, with no method call of ours in between (a Call is built for
# every call a server reads).
_set_field = object.__setattr__


# dataclass_transform (PEP 681) tells type checkers what the runtime does: the subclasses are frozen
# value classes, so assigning to a field is a type error as it was with @dataclass(frozen=True).
@dataclass_transform(frozen_default=True)
class _Value:
    """Base of the message classes: immutable values with __slots__, equal field by field.

    Hand-written rather than `@dataclass(frozen=True, slots=True)`: `dataclasses` imports `inspect`,
    and the two cost the client ~10 ms per run (python -X importtime, `capsulectl status`), a
    quarter of its start-up. What this keeps of the dataclass behaviour: keyword or positional
    construction, equality only between instances of the same class, the field-by-field repr,
    `__match_args__`, hashing of the field tuple (which raises, as `parameters` is a dict), no
    assignment or deletion after construction, and copy/pickle by re-construction. Assignment
    raises AttributeError (dataclasses' FrozenInstanceError is a subclass of it), also for a name
    that is not a field, where the 3.11 slots dataclass raised a stray TypeError from super().
    """

    __slots__ = ()
    # Each subclass lists its fields in order (the order of its positional arguments) here;
    # equality, hash, repr and copying all read them from this one tuple.
    __match_args__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Value) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        items = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
        return f"{type(self).__qualname__}({items})"

    if not TYPE_CHECKING:
        # Hidden from type checkers, which would otherwise accept any `value.anything = x`;
        # dataclass_transform above already makes them refuse assignment to the fields.

        def __setattr__(self, name: str, value: object) -> None:
            raise AttributeError(f"cannot assign to field {name!r}")

        def __delattr__(self, name: str) -> None:
            raise AttributeError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[type[Self], tuple[object, ...]]:
        # copy, deepcopy and pickle rebuild through __init__, so a copy is validated too.
        return (type(self), self._fields())


# A marker for "no parameters given": each value then gets its own empty dict, as
# `field(default_factory=dict)` did. Compared by identity only; never handed out or mutated.
_NO_PARAMETERS: dict[str, object] = {}


def _own_parameters(parameters: dict[str, object]) -> dict[str, object]:
    return {} if parameters is _NO_PARAMETERS else parameters


def _checked_fds(fds: tuple[int, ...]) -> tuple[int, ...]:
    if type(fds) is tuple and not fds:  # nearly every message: nothing to check
        return fds
    if not isinstance(fds, tuple) or not all(type(fd) is int and fd >= 0 for fd in fds):
        raise LocalProtocolError("fds must be a tuple of non-negative ints")
    return fds


class Call(_Value):
    """A method call. At most one of oneway/more/upgrade may be set.

    `fds` are the file descriptors that ride with it (SCM_RIGHTS, as sd-varlink passes them):
    not part of the JSON; the I/O layer sends them with the call's bytes, or the connection
    hands them out with the call they arrived with. The numbers only: whoever holds the
    message decides when they are closed (capsuled.transport: when the call ends).
    """

    __slots__ = ("fds", "method", "more", "oneway", "parameters", "upgrade")
    __match_args__ = ("method", "parameters", "oneway", "more", "upgrade", "fds")

    method: str
    parameters: dict[str, object]
    oneway: bool
    more: bool
    upgrade: bool
    fds: tuple[int, ...]

    def __init__(
        self,
        method: str,
        parameters: dict[str, object] = _NO_PARAMETERS,
        oneway: bool = False,
        more: bool = False,
        upgrade: bool = False,
        fds: tuple[int, ...] = (),
    ) -> None:
        parameters = _own_parameters(parameters)
        if not _is_valid_name(method):
            raise LocalProtocolError(f"invalid method name {_short(method)}")
        if not isinstance(parameters, dict):
            raise LocalProtocolError("call parameters must be an object")
        if not (type(oneway) is bool and type(more) is bool and type(upgrade) is bool):
            raise LocalProtocolError("call flags must be booleans")
        if oneway + more + upgrade > 1:
            raise LocalProtocolError("at most one of oneway, more, upgrade may be set")
        _set_field(self, "method", method)
        _set_field(self, "parameters", parameters)
        _set_field(self, "oneway", oneway)
        _set_field(self, "more", more)
        _set_field(self, "upgrade", upgrade)
        _set_field(self, "fds", _checked_fds(fds))

    def with_fds(self, fds: tuple[int, ...]) -> Call:
        """This call with `fds` riding along."""
        return Call(self.method, self.parameters, self.oneway, self.more, self.upgrade, fds)

    @property
    def interface(self) -> str:
        """The interface part of the method name."""
        return self.method.rpartition(".")[0]

    @property
    def member(self) -> str:
        """The short method name (after the last dot)."""
        return self.method.rpartition(".")[2]


class Reply(_Value):
    """A successful reply; `continues` means more replies to the same call follow.

    `fds` ride with it as with a Call (an error reply carries none, as in sd-varlink)."""

    __slots__ = ("continues", "fds", "parameters")
    __match_args__ = ("parameters", "continues", "fds")

    parameters: dict[str, object]
    continues: bool
    fds: tuple[int, ...]

    def __init__(
        self,
        parameters: dict[str, object] = _NO_PARAMETERS,
        continues: bool = False,
        fds: tuple[int, ...] = (),
    ) -> None:
        parameters = _own_parameters(parameters)
        if not isinstance(parameters, dict):
            raise LocalProtocolError("reply parameters must be an object")
        if type(continues) is not bool:
            raise LocalProtocolError("continues must be a boolean")
        _set_field(self, "parameters", parameters)
        _set_field(self, "continues", continues)
        _set_field(self, "fds", _checked_fds(fds))

    def with_fds(self, fds: tuple[int, ...]) -> Reply:
        """This reply with `fds` riding along."""
        return Reply(self.parameters, self.continues, fds)


class ErrorReply(_Value):
    """An error reply; always final."""

    __slots__ = ("error", "parameters")
    __match_args__ = ("error", "parameters")

    error: str
    parameters: dict[str, object]

    def __init__(self, error: str, parameters: dict[str, object] = _NO_PARAMETERS) -> None:
        parameters = _own_parameters(parameters)
        if not _is_valid_name(error):
            raise LocalProtocolError(f"invalid error name {_short(error)}")
        if not isinstance(parameters, dict):
            raise LocalProtocolError("error parameters must be an object")
        _set_field(self, "error", error)
        _set_field(self, "parameters", parameters)


Message = Call | Reply | ErrorReply


def encode(msg: Message) -> bytes:
    """Serialise a message to its wire form: compact UTF-8 JSON followed by NUL.

    Raises:
        LocalProtocolError: the parameters hold something JSON cannot carry (NaN, sets, lone
            surrogates, ...) — that is our bug, never the peer's.
    """
    obj: dict[str, object]
    if isinstance(msg, Call):
        obj = {"method": msg.method}
        if msg.parameters:
            obj["parameters"] = msg.parameters
        if msg.oneway:
            obj["oneway"] = True
        if msg.more:
            obj["more"] = True
        if msg.upgrade:
            obj["upgrade"] = True
    elif isinstance(msg, Reply):
        obj = {"parameters": msg.parameters}
        if msg.continues:
            obj["continues"] = True
    elif isinstance(msg, ErrorReply):
        obj = {"error": msg.error, "parameters": msg.parameters}
    else:
        raise LocalProtocolError(f"not a Varlink message: {type(msg).__name__}")
    try:
        text = compact_json(obj)
        return text.encode("utf-8") + b"\0"
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise LocalProtocolError(f"cannot encode message: {exc}") from exc


# The json package imports re (and re enum): ~4 ms of capsulectl's start-up, a sixth of it. Its
# loads() and dumps() run _json's C scanner and encoder, built as below from the arguments they
# would pass; whatever these do not simply succeed at goes to json itself, so every error (and
# its text) is json's. tests/unit/test_varlink_messages.py compares both with json's.


def _not_serializable(value: object) -> object:
    raise TypeError("not JSON")  # only a signal to ask json.dumps, which says it properly


# json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")), but without
# json's circular-reference markers (a dict per call): a cycle ends in RecursionError here, and
# json.dumps then names it.
_encode_c = _json.make_encoder(
    None, _not_serializable, _json.encode_basestring, None, ":", ",", False, False, False
)


def compact_json(obj: object) -> str:
    """json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")), the same text
    and the same errors, without importing json (or re) unless obj cannot be written."""
    try:
        chunks = _encode_c(obj, 0)
    except (TypeError, ValueError, RecursionError):
        import json

        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return "".join(chunks)


def _short(value: object, limit: int = 80) -> str:
    """repr() cut to `limit` characters: peer-chosen text goes into log lines."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Refused(Exception):
    """Raised from json hooks for input we refuse; caught in _load_object."""


def _refuse_constant(name: str) -> object:
    # json accepts NaN, Infinity and -Infinity by default; they are not JSON.
    raise _Refused(f"not JSON: {name}")


def _finite_float(text: str) -> float:
    # 1e400 parses to inf without going through parse_constant; it is no more JSON than Infinity.
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused("number out of range")
    return value


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Refused("duplicate key in object")
    return obj


def _has_surrogate(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class _Hooks:
    """What json.JSONDecoder hands its scanner: json.loads(parse_constant=_refuse_constant,
    parse_float=_finite_float, object_pairs_hook=_object_without_duplicates)."""

    strict = True
    object_hook = None
    object_pairs_hook = staticmethod(_object_without_duplicates)
    parse_float = staticmethod(_finite_float)
    parse_int = int
    parse_constant = staticmethod(_refuse_constant)


_scan_c = _json.make_scanner(_Hooks())  # type: ignore[arg-type]  # typeshed: a scanner; it reads these
_JSON_SPACE = " \t\n\r"  # json.decoder's WHITESPACE


def _loads(text: str) -> object:
    """json.loads(text) with the hooks above: the value of one JSON document."""
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        value, end = _scan_c(text, start)
    except StopIteration:
        value, end = None, -1  # "Expecting value": json's to say
    if end < 0 or text[end:].strip(_JSON_SPACE) or text.startswith("\ufeff"):
        import json

        return json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_object_without_duplicates,
        )
    return value


def _load_object(raw: bytes) -> dict[str, object]:
    try:
        # Decode explicitly: json.loads(bytes) would also guess UTF-16/32.
        text = raw.decode("utf-8")
        value = _loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError, _Refused) as exc:
        # ValueError covers JSONDecodeError and ints longer than sys.get_int_max_str_digits().
        raise RemoteProtocolError(f"malformed message: {exc}") from exc
    if not isinstance(value, dict):
        raise RemoteProtocolError("message is not a JSON object")
    # A lone surrogate can only come from a \uD8xx..\uDFxx escape; scan only when one may be there.
    if ("\\ud" in text or "\\uD" in text) and _has_surrogate(value):
        raise RemoteProtocolError("malformed message: lone UTF-16 surrogate")
    return value


_CALL_KEYS = frozenset({"method", "parameters", "oneway", "more", "upgrade"})
_REPLY_KEYS = frozenset({"parameters", "continues", "error"})


def _parameters(obj: dict[str, object]) -> dict[str, object]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise RemoteProtocolError("parameters is not an object")
    return params


def _flag(obj: dict[str, object], key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise RemoteProtocolError(f"{key} is not a boolean")
    return value


def parse_call(raw: bytes, *, max_depth: int | None = None, max_values: int | None = None) -> Call:
    """Parse one message (without its NUL) sent by a client.

    With `max_depth` and `max_values`, the text's shape is checked before any of it is built
    (capsuled.varlink.shape): a server facing untrusted peers passes both.

    Raises:
        RemoteProtocolError: the bytes are not a well-formed Varlink call, or break the limits.
    """
    if max_depth is not None or max_values is not None:
        # Imported here: only a server passes limits, and the client's start-up stays as it was.
        from capsuled.varlink.shape import check_shape

        check_shape(
            raw,
            max_depth=max_depth if max_depth is not None else len(raw),
            max_values=max_values if max_values is not None else len(raw) + 1,
        )
    obj = _load_object(raw)
    unknown = obj.keys() - _CALL_KEYS
    if unknown:
        raise RemoteProtocolError(f"unknown keys in call: {_short(sorted(unknown))}")
    method = obj.get("method")
    if not isinstance(method, str):
        raise RemoteProtocolError("method is missing or not a string")
    try:
        return Call(
            method=method,
            parameters=_parameters(obj),
            oneway=_flag(obj, "oneway"),
            more=_flag(obj, "more"),
            upgrade=_flag(obj, "upgrade"),
        )
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from exc


def parse_reply(raw: bytes) -> Reply | ErrorReply:
    """Parse one message (without its NUL) sent by a server.

    Raises:
        RemoteProtocolError: the bytes are not a well-formed Varlink reply.
    """
    obj = _load_object(raw)
    unknown = obj.keys() - _REPLY_KEYS
    if unknown:
        raise RemoteProtocolError(f"unknown keys in reply: {_short(sorted(unknown))}")
    params = _parameters(obj)
    continues = _flag(obj, "continues")
    try:
        if "error" in obj:
            error = obj["error"]
            if not isinstance(error, str):
                raise RemoteProtocolError("error is not a string")
            if continues:
                raise RemoteProtocolError("an error reply cannot continue")
            return ErrorReply(error=error, parameters=params)
        return Reply(parameters=params, continues=continues)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from exc
