"""capsuled.varlink.interface: our IDL parser, cross-checked against the reference parser
(`varlink.Interface`), and strict validation tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import varlink
from varlink import scanner

from capsuled.varlink.errors import InvalidParameter, MethodNotFound
from capsuled.varlink.interface import (
    IdlSyntaxError,
    Interface,
    ValidationError,
    format_type,
    parse_interface,
)
from capsuled.varlink.service import SERVICE_INTERFACE

ROOT = Path(__file__).resolve().parents[2]
OUR_IDL = ROOT / "helper" / "capsuled" / "org.capsuled.Manager.varlink"
TEST_IDL = ROOT / "tests" / "protocol" / "org.example.test.varlink"

GRAMMAR = """\
# Leading comment.
interface org.example-1.grammar2
# A type with every shape.
type T (
  a: bool, b: int, c: float, d: string, e: object,   # trailing comment
  f: ?bool, g: []string, h: [string]int, i: ?[]?[string]?T,
  j: (x: int, y: (p, q)), k: [string](), l: Color,
  m:?int,n:[]
    (z: int)
)
type Color (red, green, blue)
type Empty ()
method M(t: T, c: ?Color) -> (r: []T)
method N() -> ()
method O(e: (one, two), s: [string]()) -> (o: object)
error E (reason: string, at: ?int)
error F ()
"""


def _ref_type(t: object) -> str:
    """Render a varlink.scanner type the way format_type renders ours."""
    if isinstance(t, bool):
        return "bool"
    if isinstance(t, int):
        return "int"
    if isinstance(t, float):
        return "float"
    if isinstance(t, str):
        return "string"
    if isinstance(t, set):
        return "[string]()"
    if isinstance(t, scanner._Object):
        return "object"
    if isinstance(t, scanner._Maybe):
        return "?" + _ref_type(t.element_type)
    if isinstance(t, scanner._Array):
        return "[]" + _ref_type(t.element_type)
    if isinstance(t, scanner._Dict):
        return "[string]" + _ref_type(t.element_type)
    if isinstance(t, scanner._CustomType):
        return str(t.name)
    if isinstance(t, scanner._Struct):
        return "(" + ", ".join(f"{n}: {_ref_type(ft)}" for n, ft in t.fields.items()) + ")"
    if isinstance(t, scanner._Enum):
        return "(" + ", ".join(t.fields) + ")"
    raise AssertionError(f"unknown reference type {t!r}")


def _ref_members(text: str) -> tuple[str, set[tuple[str, ...]]]:
    ref = varlink.Interface(text)
    members: set[tuple[str, ...]] = set()
    for m in ref.members.values():
        if isinstance(m, scanner._Alias):
            members.add(("type", m.name, _ref_type(m.type)))
        elif isinstance(m, scanner._Method):
            members.add(("method", m.name, _ref_type(m.in_type), _ref_type(m.out_type)))
        else:
            members.add(("error", m.name, _ref_type(m.type)))
    return ref.name, members


def _our_members(iface: Interface) -> set[tuple[str, ...]]:
    members: set[tuple[str, ...]] = set()
    members |= {("type", n, format_type(t)) for n, t in iface.types.items()}
    members |= {
        ("method", n, format_type(m.parameters), format_type(m.returns))
        for n, m in iface.methods.items()
    }
    members |= {("error", n, format_type(e.parameters)) for n, e in iface.errors.items()}
    return members


@pytest.mark.parametrize(
    "text",
    [OUR_IDL.read_text("utf-8"), TEST_IDL.read_text("utf-8"), SERVICE_INTERFACE, GRAMMAR],
    ids=["org.capsuled.Manager", "org.example.test", "org.varlink.service", "grammar"],
)
def test_agrees_with_the_reference_parser(text: str) -> None:
    ours = parse_interface(text)
    name, ref = _ref_members(text)
    assert ours.name == name
    assert _our_members(ours) == ref
    assert ours.description == text  # verbatim, comments included


def test_grammar_details() -> None:
    iface = parse_interface(GRAMMAR)
    assert iface.name == "org.example-1.grammar2"
    assert format_type(iface.types["Color"]) == "(red, green, blue)"
    assert format_type(iface.methods["N"].parameters) == "()"
    assert set(iface.errors) == {"E", "F"}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "interface org.example.x\n",  # no members
        "interface example\nmethod M() -> ()",
        "interface org.example.x\nmethod m() -> ()",
        "interface org.example.x\nmethod M() -> ()\nmethod M() -> ()",
        "interface org.example.x\nmethod M(a: int, a: int) -> ()",
        "interface org.example.x\nmethod M(a: ??int) -> ()",
        "interface org.example.x\nmethod M(a: Undeclared) -> ()",
        "interface org.example.x\nmethod M(a: int) ()",
        "interface org.example.x\nmethod M(a: int -> ()",
        "interface org.example.x\nmethod M(a int) -> ()",
        "interface org.example.x\nmethod M(a: int,) -> ()",
        "interface org.example.x\nmethod M(a: [int]) -> ()",
        "interface org.example.x\nmethod M(a: map) -> ()",
        "interface org.example.x\nmethod M(a, b) -> ()",  # an enum is not a parameter list
        "interface org.example.x\ntype T (a, a)",
        "interface org.example.x\ntype T (a, b: int)",
        "interface org.example.x\ntype t (a: int)",
        "interface org.example.x\nerror E (a, b)",
        "interface org.example.x\nthing T ()",
        "interface org.example.x\nmethod M() -> () $",
        "interface org.example.x\nmethod M(_a: int) -> ()",
        "interface org.example.x\nmethod M(a__b: int) -> ()",
    ],
)
def test_syntax_errors(text: str) -> None:
    with pytest.raises(IdlSyntaxError):
        parse_interface(text)


VALIDATION = parse_interface(GRAMMAR)
GOOD_T = {
    "a": True,
    "b": 1,
    "c": 2.5,
    "d": "s",
    "e": {"x": [1]},
    "g": [],
    "h": {"k": 2},
    "j": {"x": 1, "y": "q"},
    "k": {"a": {}},
    "l": "red",
    "n": [{"z": 1}],
}


def test_validate_call_fills_absent_optionals_with_none() -> None:
    out = VALIDATION.validate_call("M", {"t": GOOD_T})
    assert out["c"] is None
    t = out["t"]
    assert isinstance(t, dict)
    assert (t["f"], t["i"], t["m"]) == (None, None, None)
    assert VALIDATION.validate_call("N", {}) == {}


def test_float_widens_ints_only() -> None:
    out = VALIDATION.validate_call("M", {"t": dict(GOOD_T, c=3)})
    t = out["t"]
    assert isinstance(t, dict)
    assert t["c"] == 3.0
    assert isinstance(t["c"], float)


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ([], ""),
        ({"t": GOOD_T, "zz": 1}, "zz"),
        ({}, "t"),
        ({"t": None}, "t"),
        ({"t": dict(GOOD_T, a=1)}, "t.a"),
        ({"t": dict(GOOD_T, a="true")}, "t.a"),
        ({"t": dict(GOOD_T, b=True)}, "t.b"),
        ({"t": dict(GOOD_T, b=1.0)}, "t.b"),
        ({"t": dict(GOOD_T, b=2**64)}, "t.b"),
        ({"t": dict(GOOD_T, b=-(2**63) - 1)}, "t.b"),
        ({"t": dict(GOOD_T, c=False)}, "t.c"),
        ({"t": dict(GOOD_T, c=None)}, "t.c"),
        ({"t": dict(GOOD_T, d=b"x")}, "t.d"),
        ({"t": dict(GOOD_T, e=[])}, "t.e"),
        ({"t": dict(GOOD_T, f=0)}, "t.f"),
        ({"t": dict(GOOD_T, g="abc")}, "t.g"),
        ({"t": dict(GOOD_T, g=["a", 1])}, "t.g.1"),
        ({"t": dict(GOOD_T, h={"k": "2"})}, "t.h.k"),
        ({"t": dict(GOOD_T, i=[{"x": {"a": 1}}])}, "t.i.0.x.a"),
        ({"t": dict(GOOD_T, j={"x": 1, "y": "r"})}, "t.j.y"),
        ({"t": dict(GOOD_T, j={"y": "p"})}, "t.j.x"),
        ({"t": dict(GOOD_T, k={"a": {"b": 1}})}, "t.k.a.b"),
        ({"t": dict(GOOD_T, l="RED")}, "t.l"),
        ({"t": dict(GOOD_T, n=[{}])}, "t.n.0.z"),
        ({"t": GOOD_T, "c": "purple"}, "c"),
    ],
)
def test_validation_errors_name_the_path(params: object, path: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        VALIDATION.validate_call("M", params)
    assert err.value.parameters == {"parameter": path}


def test_int_bounds_are_inclusive() -> None:
    for b in (-(2**63), 2**64 - 1):
        VALIDATION.validate_call("M", {"t": dict(GOOD_T, b=b)})


def test_unknown_method() -> None:
    with pytest.raises(MethodNotFound) as err:
        VALIDATION.validate_call("Nope", {})
    assert err.value.parameters == {"method": "org.example-1.grammar2.Nope"}


def test_reply_and_error_validation() -> None:
    VALIDATION.validate_reply("M", {"r": [GOOD_T]})
    with pytest.raises(ValidationError) as err:
        VALIDATION.validate_reply("M", {"r": [dict(GOOD_T, b="1")]})
    assert err.value.path == "r.0.b"
    VALIDATION.validate_error("E", {"reason": "x"})
    with pytest.raises(ValidationError):
        VALIDATION.validate_error("E", {"reason": 1})
    with pytest.raises(KeyError):
        VALIDATION.validate_error("Nope", {})


def test_recursive_type_nesting_is_bounded() -> None:
    iface = parse_interface("interface org.example.r\ntype N (n: ?N)\nmethod M(n: N) -> ()")
    deep: dict[str, object] = {}
    for _ in range(5000):
        deep = {"n": deep}
    with pytest.raises(InvalidParameter):
        iface.validate_call("M", {"n": deep})


BULK = parse_interface(
    "interface org.example.bulk\n"
    "method M(i: ?[]int, s: ?[string]string, b: ?[]bool, f: ?[]float) -> (s: []string)"
)


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"i": [1, 2, True, 4]}, "i.2"),
        ({"i": [1, 2.0]}, "i.1"),
        ({"i": [0, 2**64]}, "i.1"),
        ({"i": [-(2**63) - 1]}, "i.0"),
        ({"s": {"a": "x", "b": 1}}, "s.b"),
        ({"b": [True, 0]}, "b.1"),
        ({"f": [1.5, "2"]}, "f.1"),
    ],
)
def test_bulk_arrays_still_find_the_bad_item(params: dict[str, object], path: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        BULK.validate_call("M", params)
    assert err.value.parameters == {"parameter": path}


def test_bulk_arrays_accept_and_widen() -> None:
    out = BULK.validate_call("M", {"i": [1, 2**64 - 1], "f": [1, 2.5], "b": [], "s": {}})
    assert out == {"i": [1, 2**64 - 1], "s": {}, "b": [], "f": [1.0, 2.5]}
    assert all(isinstance(x, float) for x in out["f"])  # type: ignore[attr-defined]


def test_string_subclasses_pass_reply_validation() -> None:
    import enum

    class State(enum.StrEnum):
        ACTIVE = "active"

    BULK.validate_reply("M", {"s": [State.ACTIVE, "x"]})
