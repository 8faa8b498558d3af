"""capsuled.varlink.shape: JSON depth and values counted on the bytes, before json builds them."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsuled.varlink.connection import ConnectionState, ServerConnection
from capsuled.varlink.errors import RemoteProtocolError
from capsuled.varlink.messages import parse_call
from capsuled.varlink.shape import check_shape

MIB = 1024 * 1024


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _values(value: object) -> int:
    """Values as the scan counts them: every value once, an empty container twice."""
    if isinstance(value, dict):
        return 1 + (sum(_values(v) for v in value.values()) if value else 1)
    if isinstance(value, list):
        return 1 + (sum(_values(v) for v in value) if value else 1)
    return 1


# Strings with everything that could confuse a byte scan: quotes, backslashes, brackets, commas.
_tricky_text = st.text(alphabet=st.sampled_from('ab"\\[]{},:\n\u00e9\U0001f600\x00\x1f'))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _tricky_text,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(_tricky_text, children, max_size=5)
    ),
    max_leaves=40,
)


@settings(max_examples=500, deadline=None)
@given(value=_json, ensure_ascii=st.booleans())
def test_counts_are_exact_for_json(value: object, ensure_ascii: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ensure_ascii).encode()
    depth, values = _depth(value), _values(value)
    check_shape(raw, max_depth=max(depth, 1), max_values=values)  # exactly at both limits
    if depth > 1:
        with pytest.raises(RemoteProtocolError, match="deeper"):
            check_shape(raw, max_depth=depth - 1, max_values=values)
    with pytest.raises(RemoteProtocolError, match="values"):
        check_shape(raw, max_depth=max(depth, 1), max_values=values - 1)


@pytest.mark.parametrize(
    ("raw", "depth", "values"),
    [
        (b'"a[b{c,d"', 0, 1),
        (b'["\\"[", "\\\\"]', 1, 3),
        (b'{"a\\\\\\"]": [1, 2]}', 2, 4),
        (b"[[[[]]]]", 4, 5),
        (b'{"a":[{"b":[{}]}]}', 5, 6),
    ],
)
def test_strings_and_escapes_hide_no_structure(raw: bytes, depth: int, values: int) -> None:
    json.loads(raw)  # each case is JSON
    check_shape(raw, max_depth=max(depth, 1), max_values=values)
    with pytest.raises(RemoteProtocolError):
        check_shape(raw, max_depth=max(depth, 1), max_values=values - 1)


def test_alternating_brackets_are_one_level_each() -> None:
    raw = b'{"a":[' * 10 + b"]}" * 10
    check_shape(raw, max_depth=20, max_values=100)
    with pytest.raises(RemoteProtocolError, match="deeper than 19"):
        check_shape(raw, max_depth=19, max_values=100)


def test_unbalanced_brackets_are_refused_when_they_could_hide_depth() -> None:
    with pytest.raises(RemoteProtocolError):
        check_shape(b"[" * 40, max_depth=16, max_values=100)


# What issue 11 sent (8 MiB of tiny objects stalled the loop ~1 s and built ~250 MiB), at the
# 1 MiB call cap, plus the other shapes that are cheap to send and dear to build.
HOSTILE = {
    "tiny objects": b'{"method":"a.b.C","parameters":{"x":[' + b"{}," * (MIB // 3) + b"{}]}}",
    "deep": b"[" * (MIB // 2) + b"]" * (MIB // 2),
    "empty strings": b"[" + b'"",' * (MIB // 3) + b'""]',
    "quotes": b'"' * MIB,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_shapes_are_refused_before_json_builds_them(name: str) -> None:
    raw = HOSTILE[name]
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            parse_call(raw, max_depth=16, max_values=8192)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The scan copies the text a few times at most; json.loads of "tiny objects" alone peaks at
    # ~60 MiB (tens of bytes per dict), which is what this bound tells apart.
    assert peak < 4 * len(raw), f"{name}: peak {peak} bytes for a {len(raw)}-byte message"


def test_the_server_connection_checks_shape_before_parsing() -> None:
    conn = ServerConnection(MIB, max_depth=4, max_values=10)
    conn.receive_data(b'{"method":"a.b.C","parameters":{"x":[1,2,3]}}\0')
    call = conn.next_call()
    assert call is not None
    assert call.parameters == {"x": [1, 2, 3]}
    conn.receive_data(b'{"method":"a.b.C","parameters":{"x":[[[[1]]]]}}\0')
    with pytest.raises(RemoteProtocolError, match="deeper than 4"):
        conn.next_call()
    assert conn.state is ConnectionState.ERROR


def test_without_limits_the_connection_parses_as_before() -> None:
    conn = ServerConnection(MIB)
    conn.receive_data(b'{"method":"a.b.C","parameters":{"x":' + b"[" * 50 + b"]" * 50 + b"}}\0")
    call = conn.next_call()
    assert call is not None
