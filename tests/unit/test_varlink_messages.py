"""capsuled.varlink.messages: strict parsing of calls and replies, encoding."""

from __future__ import annotations

import json

import pytest

from capsuled.varlink.errors import LocalProtocolError, RemoteProtocolError
from capsuled.varlink.messages import (
    Call,
    ErrorReply,
    Reply,
    encode,
    is_valid_interface_name,
    is_valid_method_name,
    parse_call,
    parse_reply,
)


@pytest.mark.parametrize(
    ("raw", "call"),
    [
        (b'{"method":"a.b.C"}', Call("a.b.C")),
        (b'{"method":"a.b.C","parameters":{}}', Call("a.b.C")),
        (b'{"method":"a.b.C","parameters":{"x":[1]}}', Call("a.b.C", {"x": [1]})),
        (b'{"method":"a.b.C","oneway":true}', Call("a.b.C", oneway=True)),
        (b'{"method":"a.b.C","more":true,"oneway":false}', Call("a.b.C", more=True)),
        (b'{"method":"a.b.C","upgrade":true}', Call("a.b.C", upgrade=True)),
        (b' {"method" : "io.systemd-x.y2.Z9"} ', Call("io.systemd-x.y2.Z9")),
        ('{"method":"a.b.C","parameters":{"s":"\u00e9"}}'.encode(), Call("a.b.C", {"s": "é"})),
        (b'{"method":"a.b.C","parameters":{"s":"\\ud83d\\ude00"}}', Call("a.b.C", {"s": "😀"})),
    ],
)
def test_parse_call(raw: bytes, call: Call) -> None:
    assert parse_call(raw) == call


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff",
        b'{"method":"a.b.C","parameters":{"s":"\xed\xa0\x80"}}',  # UTF-8-encoded surrogate
        '{"method":"a.b.C"}'.encode("utf-16"),
        b"[]",
        b"null",
        b"{}",
        b'{"method":1}',
        b'{"method":"C"}',
        b'{"method":"a.C"}',  # the interface needs at least two labels
        b'{"method":"a.b.c"}',
        b'{"method":"a..b.C"}',
        b'{"method":"-a.b.C"}',
        b'{"method":"a.b-.C"}',
        b'{"method":"a.b.C","oneway":0}',
        b'{"method":"a.b.C","more":null}',
        b'{"method":"a.b.C","oneway":true,"more":true}',
        b'{"method":"a.b.C","x":1}',
        b'{"method":"a.b.C","parameters":null}',
        b'{"method":"a.b.C","parameters":[]}',
        b'{"method":"a.b.C","method":"a.b.C"}',
        b'{"method":"a.b.C","parameters":{"a":NaN}}',
        b'{"method":"a.b.C","parameters":{"a":Infinity}}',
        b'{"method":"a.b.C","parameters":{"a":1e400}}',
        b'{"method":"a.b.C","parameters":{"a":-1E+999}}',
        b'{"method":"a.b.C","parameters":{"a":"\\udc00"}}',
        b'{"method":"a.b.C","parameters":{"\\ud800":1}}',
        b'{"method":"a.b.C","parameters":{"a":' + b"1" * 5000 + b"}}",
        b'{"method":"a.b.C","parameters":{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
    ],
)
def test_parse_call_refuses(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_call(raw)


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (b'{"parameters":{}}', Reply({})),
        (b"{}", Reply({})),
        (b'{"parameters":{"a":1},"continues":true}', Reply({"a": 1}, continues=True)),
        (b'{"error":"a.b.E","parameters":{"x":1}}', ErrorReply("a.b.E", {"x": 1})),
        (b'{"error":"a.b.E"}', ErrorReply("a.b.E", {})),
    ],
)
def test_parse_reply(raw: bytes, reply: Reply | ErrorReply) -> None:
    assert parse_reply(raw) == reply


@pytest.mark.parametrize(
    "raw",
    [
        b'{"method":"a.b.C"}',
        b'{"error":1}',
        b'{"error":"E"}',
        b'{"error":"a.b.E","continues":true}',
        b'{"continues":1}',
        b'{"parameters":[]}',
        b"[]",
    ],
)
def test_parse_reply_refuses(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_reply(raw)


@pytest.mark.parametrize(
    "msg",
    [
        Call("a.b.C"),
        Call("a.b.C", {"x": "é"}, more=True),
        Call("a.b.C", oneway=True),
        Reply({"a": [1, None]}),
        Reply({}, continues=True),
        ErrorReply("a.b.E", {"p": "x"}),
    ],
)
def test_encode_round_trips(msg: Call | Reply | ErrorReply) -> None:
    raw = encode(msg)
    assert raw.endswith(b"\0")
    assert raw.count(b"\0") == 1
    back = parse_call(raw[:-1]) if isinstance(msg, Call) else parse_reply(raw[:-1])
    assert back == msg


def test_encode_is_compact_utf8() -> None:
    assert (
        encode(Reply({"s": "é"}, continues=True))
        == '{"parameters":{"s":"é"},"continues":true}\0'.encode()
    )
    assert encode(Call("a.b.C")) == b'{"method":"a.b.C"}\0'


@pytest.mark.parametrize("params", [{"x": float("nan")}, {"x": {1, 2}}, {"x": "\udc00"}])
def test_encode_refuses_what_json_cannot_carry(params: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        encode(Reply(params))


@pytest.mark.parametrize(
    "build",
    [
        lambda: Call("nodots"),
        lambda: Call("a.b.C", oneway=True, more=True),
        lambda: Call("a.b.C", parameters=[]),  # type: ignore[arg-type]
        lambda: Call("a.b.C", more=1),  # type: ignore[arg-type]
        lambda: Reply([]),  # type: ignore[arg-type]
        lambda: ErrorReply("Nope"),
    ],
)
def test_ill_formed_messages_cannot_be_built(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


def test_name_validators() -> None:
    assert is_valid_interface_name("org.varlink.service")
    assert is_valid_interface_name("io.systemd.Machine-1")
    assert not is_valid_interface_name("org")
    assert not is_valid_interface_name("org.")
    assert is_valid_method_name("org.varlink.service.GetInfo")
    assert not is_valid_method_name("org.varlink.service.getInfo")
    assert json.loads(encode(Call("a.b.C"))[:-1]) == {"method": "a.b.C"}


def test_remembered_method_names_stay_bounded_and_never_admit_a_bad_one() -> None:
    from capsuled.varlink import messages

    for i in range(3 * messages._MAX_VALID_NAMES):
        Call(f"org.example.test.M{i}")
        assert len(messages._VALID_NAMES) <= messages._MAX_VALID_NAMES
    Call("org.example.test." + "A" * 1000)  # valid, too long to be remembered
    assert all(len(n) <= messages._MAX_REMEMBERED_NAME for n in messages._VALID_NAMES)
    for bad in ("org.example.test.m", "org.example.test.M!", "Ping", "org..test.M"):
        with pytest.raises(LocalProtocolError, match="invalid method name"):
            Call(bad)
        with pytest.raises(LocalProtocolError, match="invalid error name"):
            ErrorReply(bad)
    assert not any(messages._VALID_NAMES & {"org.example.test.m", "Ping"})
    Call("org.example.test.M0")  # forgotten or not, still accepted
