"""Malformed input: the server closes the connection without a single byte of reply (UAPI.20,
sd-varlink), keeps serving everyone else, and enforces the message cap (1 MiB for calls) exactly."""

from __future__ import annotations

import json

import pytest

from capsuled.transport import MAX_CALL_BYTES
from protocol.harness import RawClient, ThreadServer

PING = "org.example.test.Ping"

P = b'{"method":"org.example.test.Ping","parameters":'

MALFORMED: dict[str, bytes] = {
    "empty message": b"",
    "invalid utf-8": b'{"method":"org.example.test.Ping","parameters":{"text":"\xff"}}',
    "overlong utf-8": b'{"method":"org.example.test.Ping","parameters":{"text":"\xc0\xaf"}}',
    "utf-16 json": '{"method":"org.example.test.Ping"}'.encode("utf-16"),
    "not json": b"hello",
    "truncated json": b'{"method":"org.example.test.Ping"',
    "trailing garbage": b'{"method":"org.example.test.Ping"} x',
    "two objects": b'{"method":"org.example.test.Ping"}{}',
    "array": b"[]",
    "string": b'"org.example.test.Ping"',
    "null": b"null",
    "number": b"1",
    "no method": b"{}",
    "method null": b'{"method":null}',
    "method number": b'{"method":1}',
    "method object": b'{"method":{}}',
    "method without interface": b'{"method":"Ping"}',
    "method lower-case member": b'{"method":"org.example.test.ping"}',
    "method trailing dot": b'{"method":"org.example.test."}',
    "method with space": b'{"method":"org.example.test.Pi ng"}',
    "oneway int": b'{"method":"org.example.test.Ping","oneway":1}',
    "more string": b'{"method":"org.example.test.Ping","more":"true"}',
    "upgrade null": b'{"method":"org.example.test.Ping","upgrade":null}',
    "oneway and more": b'{"method":"org.example.test.Ping","oneway":true,"more":true}',
    "more and upgrade": b'{"method":"org.example.test.Ping","more":true,"upgrade":true}',
    "oneway and upgrade": b'{"method":"org.example.test.Ping","oneway":true,"upgrade":true}',
    "unknown top-level key": b'{"method":"org.example.test.Ping","id":1}',
    "reply keys in a call": b'{"method":"org.example.test.Ping","continues":false}',
    "parameters array": b'{"method":"org.example.test.Ping","parameters":[]}',
    "parameters string": b'{"method":"org.example.test.Ping","parameters":"x"}',
    "parameters null": b'{"method":"org.example.test.Ping","parameters":null}',
    "duplicate key": b'{"method":"org.example.test.Ping","method":"org.example.test.Ping"}',
    "duplicate nested key": P + b'{"text":"a","text":"b"}}',
    "NaN": b'{"method":"org.example.test.Echo","parameters":{"value":{"f":NaN}}}',
    "Infinity": b'{"method":"org.example.test.Echo","parameters":{"value":{"f":-Infinity}}}',
    "float overflowing to infinity": P + b'{"text":1e400}}',
    "lone surrogate": b'{"method":"org.example.test.Ping","parameters":{"text":"\\ud800"}}',
    "huge integer": b'{"method":"org.example.test.Ping","parameters":{"text":'
    + b"9" * 5000
    + b"}}",
    "deep nesting": b'{"method":"org.example.test.Ping","parameters":{"text":'
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}}",
    "single quotes": b"{'method':'org.example.test.Ping'}",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_closes_without_reply(server: ThreadServer, raw: bytes) -> None:
    with RawClient(server.path) as bad, RawClient(server.path) as good:
        # A well-formed call queued behind the garbage must not be answered either.
        bad.send_raw(raw + b"\0" + json.dumps({"method": PING}).encode() + b"\0")
        bad.expect_closed()
        assert good.call(PING, text="alive") == {"parameters": {"text": "alive"}}


def test_garbage_after_a_good_call_closes_after_answering_it(server: ThreadServer) -> None:
    with RawClient(server.path) as c:
        c.send_raw(json.dumps({"method": PING, "parameters": {"text": "1"}}).encode() + b"\0[]\0")
        assert c.recv() == {"parameters": {"text": "1"}}
        c.expect_closed()


HEAD, TAIL = b'{"method":"org.example.test.Ping","parameters":{"text":"', b'"}}'
OVERHEAD = len(HEAD) + len(TAIL)


def _ping_of_size(size: int) -> bytes:
    """A Ping call whose JSON is exactly `size` bytes (without the NUL)."""
    return HEAD + b"a" * (size - OVERHEAD) + TAIL


def test_message_exactly_at_the_cap_is_served(server: ThreadServer) -> None:
    raw = _ping_of_size(MAX_CALL_BYTES)
    assert len(raw) == 1024 * 1024
    with RawClient(server.path, timeout=30) as c:
        c.send_raw(raw + b"\0")
        reply = c.recv()
    text = reply["parameters"]
    assert isinstance(text, dict)
    assert len(text["text"]) == MAX_CALL_BYTES - OVERHEAD


def test_message_one_byte_over_the_cap_is_refused(server: ThreadServer) -> None:
    with RawClient(server.path, timeout=30) as c:
        c.send_raw(_ping_of_size(MAX_CALL_BYTES + 1) + b"\0")
        c.expect_closed()


def test_incomplete_message_past_the_cap_closes_before_the_nul(server: ThreadServer) -> None:
    with RawClient(server.path, timeout=30) as c:
        # No NUL ever comes: the server must give up as soon as the cap is passed.
        c.send_raw(b'{"method":"' + b"a" * MAX_CALL_BYTES)
        c.expect_closed()


def test_configured_smaller_cap(make_server: object) -> None:
    srv = make_server(max_message_bytes=100)  # type: ignore[operator]
    with RawClient(srv.path) as c:
        c.send_raw(_ping_of_size(100) + b"\0")
        assert c.recv()["parameters"] == {"text": "a" * (100 - OVERHEAD)}
        c.send_raw(_ping_of_size(101) + b"\0")
        c.expect_closed()
