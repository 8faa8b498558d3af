"""capsuled.varlink: file descriptors ride with the message they came with, bytes and fd numbers
in, messages out (no real fds: the core never touches them, so plain numbers stand in)."""

from __future__ import annotations

import pytest

from capsuled.varlink.connection import ClientConnection, ConnectionState, ServerConnection
from capsuled.varlink.errors import LocalProtocolError, RemoteProtocolError
from capsuled.varlink.messages import Call, Reply, encode

A = b'{"method":"a.b.A"}\0'
B = b'{"method":"a.b.B","more":true}\0'


def _calls(conn: ServerConnection) -> list[Call]:
    calls = []
    while (call := conn.next_call()) is not None:
        calls.append(call)
    return calls


def test_fds_come_out_with_their_call() -> None:
    conn = ServerConnection(max_fds=3)
    conn.receive_data(A, (7, 8, 9))
    assert _calls(conn) == [Call("a.b.A", fds=(7, 8, 9))]
    assert conn.held_fds == 0
    assert conn.release_fds() == ()


@pytest.mark.parametrize("cut", range(1, len(B)))
def test_fds_with_the_first_byte_and_the_rest_later(cut: int) -> None:
    conn = ServerConnection(max_fds=1)
    conn.receive_data(B[:cut], (5,))
    assert _calls(conn) == []
    assert conn.held_fds == 1
    conn.receive_data(B[cut:])
    assert _calls(conn) == [Call("a.b.B", more=True, fds=(5,))]


@pytest.mark.parametrize("cut", range(len(A)))
def test_a_read_may_begin_with_the_end_of_an_earlier_message(cut: int) -> None:
    # Linux glues the bytes of an earlier sendmsg() without fds to those of the one with fds.
    conn = ServerConnection(max_fds=1)
    conn.receive_data(A[:cut])
    conn.receive_data(A[cut:] + B, (4,))
    assert _calls(conn) == [Call("a.b.A"), Call("a.b.B", more=True, fds=(4,))]


def test_the_next_message_after_an_fd_message_gets_none() -> None:
    conn = ServerConnection(max_fds=1)
    conn.receive_data(A, (4,))
    conn.receive_data(B)
    assert [c.fds for c in _calls(conn)] == [(4,), ()]


def test_fds_after_the_first_message_was_handed_out() -> None:
    conn = ServerConnection(max_fds=1)
    conn.receive_data(A, (4,))
    assert _calls(conn)[0].fds == (4,)
    conn.receive_data(A, (5,))
    assert _calls(conn)[0].fds == (5,)


def _refused(conn: ServerConnection, data: bytes, fds: tuple[int, ...]) -> None:
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(data, fds)
    assert conn.state is ConnectionState.ERROR


def test_fds_refused_where_none_are_allowed() -> None:
    conn = ServerConnection()
    _refused(conn, A, (3,))
    assert conn.release_fds() == (3,)  # handed back to be closed
    assert conn.release_fds() == ()


def test_more_fds_than_the_cap() -> None:
    conn = ServerConnection(max_fds=2)
    _refused(conn, A, (3, 4, 5))
    assert conn.release_fds() == (3, 4, 5)


def test_fds_inside_a_message() -> None:
    conn = ServerConnection(max_fds=2)
    conn.receive_data(A[:5])
    _refused(conn, A[5:8], (3,))
    assert conn.release_fds() == (3,)


def test_fds_for_a_second_message_before_the_first_was_read() -> None:
    conn = ServerConnection(max_fds=2)
    conn.receive_data(A[:5], (3,))
    _refused(conn, A[5:] + A, (4,))
    assert sorted(conn.release_fds()) == [3, 4]


def test_fds_received_on_a_broken_connection_are_still_handed_back() -> None:
    conn = ServerConnection(max_fds=2)
    conn.receive_data(b"[]\0")
    with pytest.raises(RemoteProtocolError):
        conn.next_call()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(A, (6,))
    assert conn.release_fds() == (6,)


def test_fds_of_a_malformed_call_are_handed_back() -> None:
    conn = ServerConnection(max_fds=2)
    conn.receive_data(b'{"method":"a.b.A","x":1}\0', (3, 4))
    with pytest.raises(RemoteProtocolError):
        conn.next_call()
    assert conn.release_fds() == (3, 4)


def test_fds_held_when_the_peer_goes_away_are_handed_back() -> None:
    conn = ServerConnection(max_fds=2)
    conn.receive_data(A[:4], (3, 4))
    assert conn.held_fds == 2
    assert conn.release_fds() == (3, 4)
    assert conn.held_fds == 0


def test_fds_are_not_json() -> None:
    with_fds = Call("a.b.A", fds=(1, 2))
    assert encode(with_fds) == encode(Call("a.b.A"))
    assert with_fds != Call("a.b.A")
    assert Reply({}, fds=(3,)).with_fds(()) == Reply({})


@pytest.mark.parametrize("bad", [(-1,), (True,), [1], ("3",)])
def test_fds_must_be_a_tuple_of_fd_numbers(bad: object) -> None:
    with pytest.raises(LocalProtocolError):
        Call("a.b.A", fds=bad)  # type: ignore[arg-type] # the point: a wrong type is refused


def test_client_gets_fds_with_the_reply() -> None:
    conn = ClientConnection(max_fds=1)
    conn.send(Call("a.b.B", more=True))
    conn.receive_data(encode(Reply({"x": 1}, continues=True)), (9,))
    conn.receive_data(encode(Reply({"x": 2})))
    assert conn.next_reply() == Reply({"x": 1}, continues=True, fds=(9,))
    assert conn.next_reply() == Reply({"x": 2})


def test_client_refuses_fds_with_an_error_reply() -> None:
    conn = ClientConnection(max_fds=1)
    conn.send(Call("a.b.A"))
    conn.receive_data(b'{"error":"a.b.Nope","parameters":{}}\0', (9,))
    with pytest.raises(RemoteProtocolError):
        conn.next_reply()
    assert conn.release_fds() == (9,)


def test_client_refuses_fds_it_did_not_allow() -> None:
    conn = ClientConnection()
    conn.send(Call("a.b.A"))
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(encode(Reply({})), (9,))
    assert conn.release_fds() == (9,)
