"""capsuled.varlink.connection: the per-connection state table, bytes in and bytes out."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsuled.varlink.connection import ClientConnection, ConnectionState, ServerConnection
from capsuled.varlink.errors import LocalProtocolError, RemoteProtocolError
from capsuled.varlink.messages import Call, ErrorReply, Reply, encode

PLAIN = b'{"method":"a.b.Plain"}\0'
MORE = b'{"method":"a.b.More","more":true}\0'
ONEWAY = b'{"method":"a.b.Oneway","oneway":true}\0'
UPGRADE = b'{"method":"a.b.Up","upgrade":true}\0'


def _server(data: bytes) -> tuple[ServerConnection, list[Call]]:
    conn = ServerConnection()
    conn.receive_data(data)
    calls = []
    while (call := conn.next_call()) is not None:
        calls.append(call)
    return conn, calls


@pytest.mark.parametrize("cut", range(len(PLAIN + MORE) + 1))
def test_every_split_point(cut: int) -> None:
    data = PLAIN + MORE
    conn = ServerConnection()
    conn.receive_data(data[:cut])
    calls = []
    while (call := conn.next_call()) is not None:
        calls.append(call)
    conn.receive_data(data[cut:])
    while (call := conn.next_call()) is not None:
        calls.append(call)
    assert [c.method for c in calls] == ["a.b.Plain", "a.b.More"]
    assert conn.pending == 2


def test_replies_go_to_pending_calls_in_order() -> None:
    conn, calls = _server(PLAIN + MORE + ONEWAY + PLAIN)
    assert len(calls) == 4
    assert conn.pending == 3
    assert conn.send(Reply({"n": 1})) == b'{"parameters":{"n":1}}\0'
    assert conn.send(Reply({"i": 0}, continues=True)).endswith(b'"continues":true}\0')
    assert conn.pending == 2
    conn.send(Reply({"i": 1}))
    conn.send(ErrorReply("a.b.Failed", {}))
    assert conn.pending == 0


def test_reply_to_a_oneway_call_is_a_local_error() -> None:
    conn, _ = _server(ONEWAY)
    with pytest.raises(LocalProtocolError):
        conn.send(Reply({}))
    assert conn.state is ConnectionState.ERROR
    with pytest.raises(LocalProtocolError):
        conn.next_call()


def test_continues_without_more_is_a_local_error() -> None:
    conn, _ = _server(PLAIN)
    with pytest.raises(LocalProtocolError):
        conn.send(Reply({}, continues=True))
    assert conn.state is ConnectionState.ERROR


def test_upgrade_may_only_be_refused() -> None:
    conn, _ = _server(UPGRADE)
    with pytest.raises(LocalProtocolError):
        conn.send(Reply({}))
    conn, _ = _server(UPGRADE)
    conn.send(ErrorReply("org.varlink.service.InvalidParameter", {"parameter": "upgrade"}))
    assert conn.pending == 0


def test_unencodable_reply_leaves_the_call_pending() -> None:
    conn, _ = _server(PLAIN)
    with pytest.raises(LocalProtocolError):
        conn.send(Reply({"x": object()}))
    assert conn.state is ConnectionState.OPEN
    assert conn.pending == 1
    conn.send(ErrorReply("a.b.InternalError", {}))
    assert conn.pending == 0


def test_malformed_input_breaks_the_connection() -> None:
    conn = ServerConnection()
    conn.receive_data(b"[]\0" + PLAIN)
    with pytest.raises(RemoteProtocolError):
        conn.next_call()
    assert conn.state is ConnectionState.ERROR
    with pytest.raises(LocalProtocolError):
        conn.next_call()


def test_bad_utf8_is_a_remote_error() -> None:
    conn = ServerConnection()
    conn.receive_data(b'{"method":"a.b.C","parameters":{"x":"\xc3"}}\0')
    with pytest.raises(RemoteProtocolError):
        conn.next_call()


def test_server_cap_is_configurable() -> None:
    conn = ServerConnection(max_message_bytes=len(PLAIN) - 1)
    conn.receive_data(PLAIN)  # exactly at the cap
    assert conn.next_call() is not None
    conn.receive_data(b'{"method":"a.b.Plain2"}\0')
    with pytest.raises(RemoteProtocolError):
        conn.next_call()


def test_client_round_trip() -> None:
    client = ClientConnection()
    server = ServerConnection()
    server.receive_data(client.send(Call("a.b.More", more=True)))
    server.receive_data(client.send(Call("a.b.Oneway", oneway=True)))
    server.receive_data(client.send(Call("a.b.Plain", {"x": 1})))
    assert client.pending == 2
    calls = [server.next_call(), server.next_call(), server.next_call()]
    assert [c.method for c in calls if c] == ["a.b.More", "a.b.Oneway", "a.b.Plain"]
    data = server.send(Reply({"i": 0}, continues=True)) + server.send(Reply({"i": 1}))
    data += server.send(ErrorReply("a.b.Err", {"why": "x"}))
    for cut in range(len(data) + 1):  # every split point on the client side too
        c = ClientConnection()
        c.send(Call("a.b.More", more=True))
        c.send(Call("a.b.Plain"))
        c.receive_data(data[:cut])
        got = []
        while (r := c.next_reply()) is not None:
            got.append(r)
        c.receive_data(data[cut:])
        while (r := c.next_reply()) is not None:
            got.append(r)
        assert got == [
            Reply({"i": 0}, continues=True),
            Reply({"i": 1}),
            ErrorReply("a.b.Err", {"why": "x"}),
        ]
        assert c.pending == 0


def test_client_refuses_unsolicited_and_illegal_replies() -> None:
    c = ClientConnection()
    c.receive_data(encode(Reply({})))
    with pytest.raises(RemoteProtocolError):
        c.next_reply()
    c = ClientConnection()
    c.send(Call("a.b.Plain"))
    c.receive_data(b'{"parameters":{},"continues":true}\0')
    with pytest.raises(RemoteProtocolError):
        c.next_reply()
    assert c.state is ConnectionState.ERROR


def test_client_refuses_upgrade() -> None:
    with pytest.raises(LocalProtocolError):
        ClientConnection().send(Call("a.b.C", upgrade=True))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=6,
)
_CALLS = st.builds(
    Call,
    method=st.sampled_from(["a.b.C", "org.example.test.Ping", "io.systemd-x.Y"]),
    parameters=st.dictionaries(st.text(max_size=6), _JSON, max_size=4),
    more=st.booleans(),
)


@settings(max_examples=40, deadline=None)
@given(calls=st.lists(_CALLS, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10_000)))
def test_any_chunking_yields_the_same_calls(calls: list[Call], cuts: list[int]) -> None:
    data = b"".join(encode(c) for c in calls)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    conn = ServerConnection()
    got = []
    for start, end in itertools.pairwise(points):
        conn.receive_data(data[start:end])
        while (call := conn.next_call()) is not None:
            got.append(call)
    assert got == calls
