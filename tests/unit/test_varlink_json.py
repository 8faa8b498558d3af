"""capsuled.varlink.messages reads and writes JSON through _json's C scanner and encoder, and
checks names without re: each must agree with what it stands for (json.loads/json.dumps with the
same arguments, the grammar's pattern), errors and their texts included."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from capsuled.varlink import messages
from capsuled.varlink.messages import _INTERFACE, is_valid_method_name

ROOT = Path(__file__).resolve().parents[2]


def outcome(fn: object, arg: object) -> tuple[str, object]:
    """("ok", value) or (exception class name, its text)."""
    try:
        return "ok", fn(arg)  # type: ignore[operator]  # a callable of one argument
    except Exception as exc:
        return type(exc).__name__, str(exc)


def json_loads(text: str) -> object:
    return json.loads(
        text,
        parse_constant=messages._refuse_constant,
        parse_float=messages._finite_float,
        object_pairs_hook=messages._object_without_duplicates,
    )


def json_dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(),  # NaN and infinities too: refused, by json's words
    st.text(st.characters(codec=None)),  # lone surrogates too
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(value=values)
def test_dumps_is_json_dumps(value: object) -> None:
    obj = {"parameters": value}
    assert outcome(messages.compact_json, obj) == outcome(json_dumps, obj)


def test_dumps_of_what_json_cannot_carry_is_json_s_error() -> None:
    cyclic: list[object] = []
    cyclic.append(cyclic)
    for obj in ({"s": {1, 2}}, {"f": float("nan")}, {"c": cyclic}, {"b": b"x"}):
        expected = outcome(json_dumps, obj)
        assert expected[0] != "ok"
        assert outcome(messages.compact_json, obj) == expected


AROUND = ["", " ", "\n", " x", "{}", "\ufeff"]
JSONISH = ' \t\n\r{}[]",:0123456789.eE+-truefalsnNaIiy\\u\ufeffé\x00d8'


@settings(max_examples=1000, deadline=None)
@given(
    text=st.one_of(
        st.text(st.sampled_from(list(JSONISH)), max_size=30),
        values.map(json.dumps),
        st.tuples(
            values.map(json.dumps), st.sampled_from(["", " ", "\n", " x", "{}", "\ufeff"])
        ).map(lambda t: t[1] + t[0] + t[1]),
    )
)
def test_loads_is_json_loads(text: str) -> None:
    assert outcome(messages._loads, text) == outcome(json_loads, text)


QUALIFIED = re.compile(rf"{_INTERFACE}\.[A-Z][A-Za-z0-9]*", re.ASCII)


@settings(max_examples=2000, deadline=None)
@given(
    name=st.one_of(
        st.text(st.sampled_from(list("aZz09-._AéK\n")), max_size=16),
        st.lists(st.text(st.sampled_from(list("aB9-")), max_size=4), max_size=5).map(".".join),
    )
)
def test_method_names_are_the_grammar_s(name: str) -> None:
    assert is_valid_method_name(name) == (QUALIFIED.fullmatch(name) is not None)


def test_method_names_known_cases() -> None:
    for good in ("org.varlink.service.GetInfo", "a.b.C", "io.systemd-x.y2.Z9", "a.9.B"):
        assert is_valid_method_name(good)
    for bad in ("a.B", "a.b.c", "a-.b.C", "9a.b.C", "a..b.C", "a.b.C-", "a.b.", "é.b.C", ""):
        assert not is_valid_method_name(bad)


def test_the_protocol_core_loads_no_json_re_or_enum() -> None:
    code = (
        "import sys\n"
        "from capsuled.varlink.connection import ClientConnection\n"
        "from capsuled.varlink.messages import Call, encode, parse_reply\n"
        "encode(Call('a.b.C', {'x': [1, 'y']}))\n"
        'parse_reply(b\'{"parameters":{"a":1.5}}\')\n'
        "print(sorted(m for m in ('json', 're', 'enum', 'typing') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],  # -S: site would load some of them itself
        env={"PYTHONPATH": str(ROOT / "helper")},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert done.stdout.strip() == "[]"
