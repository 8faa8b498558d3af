"""Our own parser of the Varlink interface definition language (UAPI.20), and strict validation.

Why not `varlink.Interface`: importing `varlink` pulls in `socket` and threads, and its type checks
are loose (it coerces and ignores unknown fields). This parser is cross-checked against
`varlink.Interface` in tests/unit/test_varlink_interface.py.

Validation rules (systemd's sd-varlink/sd-json dispatch is the model):
- unknown fields, missing non-optional fields and wrong types ->
  InvalidParameter(parameter=dotted.path);
- absent and null are the same for `?T` fields; validated structs hold every declared field, absent
  optional ones as None;
- no coercion: a bool is not an int, a float is not an int, a string is not a number; the one
  widening is Varlink's own: `float` accepts JSON integers (returned as float);
- `int` is bounded to what sd-json carries: [-2**63, 2**64 - 1];
- `object` accepts any JSON object (UAPI.20: "foreign" data we do not look into);
- enum values are strings naming one of the declared values;
- paths: struct fields and dict keys are joined with ".", array items use their index
  ("units.3.name").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from capsuled.varlink.errors import InvalidParameter, MethodNotFound
from capsuled.varlink.messages import is_valid_interface_name

__all__ = [
    "Array",
    "Dict",
    "Enum",
    "ErrorDef",
    "IdlSyntaxError",
    "Interface",
    "Maybe",
    "Method",
    "Named",
    "Primitive",
    "Struct",
    "ValidationError",
    "VarlinkType",
    "format_type",
    "parse_interface",
]

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1


class IdlSyntaxError(ValueError):
    """The interface definition text does not follow the Varlink IDL grammar."""


class ValidationError(ValueError):
    """A reply or error's parameters do not match the IDL; `path` names the offending field."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path or '<parameters>'}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Primitive:
    """bool, int, float, string or object."""

    kind: str


@dataclass(frozen=True, slots=True)
class Maybe:
    """?T: T or null (or absent, as a struct field)."""

    inner: VarlinkType


@dataclass(frozen=True, slots=True)
class Array:
    """[]T."""

    inner: VarlinkType


@dataclass(frozen=True, slots=True)
class Dict:
    """[string]T: a JSON object with arbitrary keys."""

    inner: VarlinkType


@dataclass(frozen=True, slots=True)
class Named:
    """A reference to a `type` declared in the interface."""

    name: str


@dataclass(frozen=True, slots=True)
class Struct:
    """(name: T, ...): an object with exactly these fields."""

    fields: tuple[tuple[str, VarlinkType], ...]


@dataclass(frozen=True, slots=True)
class Enum:
    """(a, b, c): one of these strings."""

    values: tuple[str, ...]


VarlinkType = Primitive | Maybe | Array | Dict | Named | Struct | Enum


@dataclass(frozen=True, slots=True)
class Method:
    """A method: its input and output structs."""

    name: str
    parameters: Struct
    returns: Struct


@dataclass(frozen=True, slots=True)
class ErrorDef:
    """An error: its parameter struct."""

    name: str
    parameters: Struct


def format_type(t: VarlinkType) -> str:
    """Render a type back into IDL syntax (canonical spacing)."""
    if isinstance(t, Primitive):
        return t.kind
    if isinstance(t, Maybe):
        return "?" + format_type(t.inner)
    if isinstance(t, Array):
        return "[]" + format_type(t.inner)
    if isinstance(t, Dict):
        return "[string]" + format_type(t.inner)
    if isinstance(t, Named):
        return t.name
    if isinstance(t, Struct):
        return "(" + ", ".join(f"{n}: {format_type(ft)}" for n, ft in t.fields) + ")"
    return "(" + ", ".join(t.values) + ")"


# -------------------------------------------------------------------------------------------------
# Lexer and parser

_TOKEN_RE = re.compile(
    r"""
      (?P<ws>(?:[ \t\r\n]|\#[^\n]*)+)
    | (?P<punct>->|\[\]|\[string\]|[():,?])
    | (?P<word>[A-Za-z0-9_](?:[A-Za-z0-9_.]|-+(?=[A-Za-z0-9]))*)
    """,
    re.VERBOSE | re.ASCII,
)
_MEMBER_RE = re.compile(r"[A-Z][A-Za-z0-9]*", re.ASCII)
_FIELD_RE = re.compile(r"[A-Za-z](?:_?[A-Za-z0-9])*", re.ASCII)
_PRIMITIVES = frozenset({"bool", "int", "float", "string", "object"})


def _tokenize(text: str) -> list[tuple[str, int]]:
    tokens: list[tuple[str, int]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            line = text.count("\n", 0, pos) + 1
            raise IdlSyntaxError(f"line {line}: unexpected character {text[pos]!r}")
        if m.lastgroup != "ws":
            tokens.append((m.group(), pos))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def _where(self) -> int:
        """Where the next token starts; `line` turns it into words, only for an error (counting
        the newlines before every token made parsing our IDL quadratic: ~12 ms of each start)."""
        return self.tokens[self.i][1] if self.i < len(self.tokens) else len(self.text)

    def line(self, pos: int) -> str:
        return f"line {self.text.count(chr(10), 0, pos) + 1}"

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise IdlSyntaxError("unexpected end of interface definition")
        self.i += 1
        return tok

    def expect(self, want: str) -> None:
        where = self._where()
        tok = self.take()
        if tok != want:
            raise IdlSyntaxError(f"{self.line(where)}: expected {want!r}, got {tok!r}")

    def name(self, pattern: re.Pattern[str], what: str) -> str:
        where = self._where()
        tok = self.take()
        if pattern.fullmatch(tok) is None:
            raise IdlSyntaxError(f"{self.line(where)}: {tok!r} is not a valid {what}")
        return tok

    def vtype(self, after_maybe: bool = False) -> VarlinkType:
        where = self._where()
        tok = self.take()
        if tok == "?":
            if after_maybe:
                raise IdlSyntaxError(f"{self.line(where)}: '??' is not a type")
            return Maybe(self.vtype(after_maybe=True))
        if tok == "[]":
            return Array(self.vtype())
        if tok == "[string]":
            return Dict(self.vtype())
        if tok in _PRIMITIVES:
            return Primitive(tok)
        if tok == "(":
            self.i -= 1
            return self.struct_or_enum()
        if _MEMBER_RE.fullmatch(tok):
            return Named(tok)
        raise IdlSyntaxError(f"{self.line(where)}: expected a type, got {tok!r}")

    def struct_or_enum(self) -> Struct | Enum:
        self.expect("(")
        if self.peek() == ")":
            self.take()
            return Struct(())
        first = self.name(_FIELD_RE, "field or enum value name")
        if self.peek() == ":":
            fields: list[tuple[str, VarlinkType]] = []
            name = first
            while True:
                self.expect(":")
                fields.append((name, self.vtype()))
                where = self._where()
                tok = self.take()
                if tok == ")":
                    break
                if tok != ",":
                    raise IdlSyntaxError(f"{self.line(where)}: expected ',' or ')', got {tok!r}")
                name = self.name(_FIELD_RE, "field name")
            _check_unique([n for n, _ in fields], "field")
            return Struct(tuple(fields))
        values = [first]
        while True:
            where = self._where()
            tok = self.take()
            if tok == ")":
                break
            if tok != ",":
                raise IdlSyntaxError(
                    f"{self.line(where)}: expected ',' or ')' in enum, got {tok!r}"
                )
            values.append(self.name(_FIELD_RE, "enum value"))
        _check_unique(values, "enum value")
        return Enum(tuple(values))

    def struct(self) -> Struct:
        where = self._where()
        t = self.struct_or_enum()
        if not isinstance(t, Struct):
            raise IdlSyntaxError(f"{self.line(where)}: expected a struct, got an enum")
        return t


def _check_unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise IdlSyntaxError(f"duplicate {what} {n!r}")
        seen.add(n)


def _named_refs(t: VarlinkType) -> list[str]:
    if isinstance(t, Named):
        return [t.name]
    if isinstance(t, Maybe | Array | Dict):
        return _named_refs(t.inner)
    if isinstance(t, Struct):
        return [r for _, ft in t.fields for r in _named_refs(ft)]
    return []


def parse_interface(text: str) -> Interface:
    """Parse an interface definition; `description` keeps the text verbatim, comments included.

    Raises:
        IdlSyntaxError: the text is not a valid interface definition.
    """
    p = _Parser(text)
    p.expect("interface")
    where = p._where()
    name = p.take()
    if not is_valid_interface_name(name):
        raise IdlSyntaxError(f"{p.line(where)}: {name!r} is not a valid interface name")
    types: dict[str, Struct | Enum] = {}
    methods: dict[str, Method] = {}
    errors: dict[str, ErrorDef] = {}
    members: set[str] = set()
    while p.peek() is not None:
        where = p._where()
        kind = p.take()
        member = p.name(_MEMBER_RE, "member name")
        if member in members:
            raise IdlSyntaxError(f"{p.line(where)}: {member!r} declared twice")
        members.add(member)
        if kind == "type":
            types[member] = p.struct_or_enum()
        elif kind == "method":
            params = p.struct()
            p.expect("->")
            methods[member] = Method(member, params, p.struct())
        elif kind == "error":
            errors[member] = ErrorDef(member, p.struct())
        else:
            raise IdlSyntaxError(
                f"{p.line(where)}: expected 'type', 'method' or 'error', got {kind!r}"
            )
    if not members:
        raise IdlSyntaxError("an interface declares at least one member")
    every: list[VarlinkType] = [*types.values()]
    every += [m.parameters for m in methods.values()] + [m.returns for m in methods.values()]
    every += [e.parameters for e in errors.values()]
    for declared in every:
        for ref in _named_refs(declared):
            if ref not in types:
                raise IdlSyntaxError(f"type {ref!r} is used but not declared")
    return Interface(name, text, types, methods, errors)


# -------------------------------------------------------------------------------------------------
# Validation


class _Invalid(Exception):
    """Raised at the offending value; each enclosing level adds its key on the way out, so
    the dotted path costs nothing unless validation fails."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.keys: list[str] = []  # innermost first

    @property
    def path(self) -> str:
        return ".".join(reversed(self.keys))


def _bulk_primitive(kind: str, items: list[object]) -> list[object] | None:
    """Fast path for arrays and maps of primitives straight from json.loads (exact types).

    Returns the checked values, or None to fall back to the item-by-item path, which is the
    authority (it also accepts subclasses, e.g. a StrEnum in a reply, and finds the bad item).
    """
    if not items:
        return items
    # Exact types on purpose (bool is a subclass of int); set(map(type, ...)), min and max run
    # in C, about 20x faster than a Python-level loop over millions of items.
    exact = {"int": int, "string": str, "bool": bool, "float": float}.get(kind)
    if exact is None or set(map(type, items)) != {exact}:
        return None
    if exact is int and not (min(items) >= INT_MIN and max(items) <= INT_MAX):  # type: ignore[type-var, operator]  # all ints here
        return None
    return items


class Interface:
    """A parsed interface: name, verbatim description, types, methods and errors."""

    __slots__ = ("description", "errors", "methods", "name", "types")

    def __init__(
        self,
        name: str,
        description: str,
        types: dict[str, Struct | Enum],
        methods: dict[str, Method],
        errors: dict[str, ErrorDef],
    ) -> None:
        self.name = name
        self.description = description
        self.types = types
        self.methods = methods
        self.errors = errors

    def __repr__(self) -> str:
        return f"Interface({self.name!r})"

    def validate_call(self, method: str, params: object) -> dict[str, object]:
        """Check a call's parameters; return them with absent optional fields as None.

        Raises:
            MethodNotFound: the interface declares no such method.
            InvalidParameter: `parameter` is the dotted path of the first offending field.
        """
        m = self.methods.get(method)
        if m is None:
            raise MethodNotFound(method=f"{self.name}.{method}")
        try:
            return self._struct(m.parameters, params)
        except _Invalid as exc:
            raise InvalidParameter(parameter=exc.path) from None
        except RecursionError:
            # Only reachable through a recursive `type`; the nesting itself is the problem.
            raise InvalidParameter(parameter="parameters") from None

    def validate_reply(self, method: str, params: object) -> dict[str, object]:
        """Check a reply's parameters against the method's output struct.

        Raises:
            KeyError: no such method. ValidationError: the parameters do not match.
        """
        try:
            return self._struct(self.methods[method].returns, params)
        except _Invalid as exc:
            raise ValidationError(exc.path, exc.reason) from None

    def validate_error(self, error: str, params: object) -> dict[str, object]:
        """Check an error reply's parameters against the error's declaration.

        Raises:
            KeyError: no such error. ValidationError: the parameters do not match.
        """
        try:
            return self._struct(self.errors[error].parameters, params)
        except _Invalid as exc:
            raise ValidationError(exc.path, exc.reason) from None

    def _struct(self, t: Struct, value: object) -> dict[str, object]:
        if not isinstance(value, dict):
            raise _Invalid("expected an object")
        if len(value) > len(t.fields) or any(k not in value for k, _ in t.fields):
            declared = {n for n, _ in t.fields}
            for key in value:
                if key not in declared:
                    exc = _Invalid("unknown field")
                    exc.keys.append(str(key))
                    raise exc
        out: dict[str, object] = {}
        for fname, ftype in t.fields:
            if fname not in value:
                if isinstance(ftype, Maybe):
                    out[fname] = None
                    continue
                exc = _Invalid("missing")
                exc.keys.append(fname)
                raise exc
            try:
                out[fname] = self._value(ftype, value[fname])
            except _Invalid as exc:
                exc.keys.append(fname)
                raise
        return out

    def _value(self, t: VarlinkType, value: object) -> object:
        if isinstance(t, Maybe):
            return None if value is None else self._value(t.inner, value)
        if value is None:
            raise _Invalid("null for a non-optional type")
        if isinstance(t, Primitive):
            return _primitive(t.kind, value)
        if isinstance(t, Named):
            return self._value(self.types[t.name], value)
        if isinstance(t, Struct):
            return self._struct(t, value)
        if isinstance(t, Enum):
            if not isinstance(value, str) or value not in t.values:
                raise _Invalid(f"expected one of {', '.join(t.values)}")
            return value
        if isinstance(t, Array):
            return self._array(t, value)
        return self._map(t, value)

    def _array(self, t: Array, value: object) -> list[object]:
        if not isinstance(value, list):
            raise _Invalid("expected an array")
        if isinstance(t.inner, Primitive):
            fast = _bulk_primitive(t.inner.kind, value)
            if fast is not None:
                return list(fast)
        items: list[object] = []
        for i, v in enumerate(value):
            try:
                items.append(self._value(t.inner, v))
            except _Invalid as exc:
                exc.keys.append(str(i))
                raise
        return items

    def _map(self, t: Dict, value: object) -> dict[str, object]:
        if not isinstance(value, dict):
            raise _Invalid("expected an object (map)")
        if isinstance(t.inner, Primitive):
            fast = _bulk_primitive(t.inner.kind, list(value.values()))
            if fast is not None:
                return dict(value)
        mapping: dict[str, object] = {}
        for k, v in value.items():
            try:
                mapping[k] = self._value(t.inner, v)
            except _Invalid as exc:
                exc.keys.append(str(k))
                raise
        return mapping


def _primitive(kind: str, value: object) -> object:
    # bool is a subclass of int in Python: test it explicitly everywhere.
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            if INT_MIN <= value <= INT_MAX:
                return value
            raise _Invalid("integer out of range")
    elif kind == "float":
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if INT_MIN <= value <= INT_MAX:
                return float(value)  # JSON has one number type; Varlink float accepts 1
            raise _Invalid("number out of range")
    elif kind == "string":
        if isinstance(value, str):
            return value
    elif kind == "object" and isinstance(value, dict):
        return value
    raise _Invalid(f"expected {kind}")
