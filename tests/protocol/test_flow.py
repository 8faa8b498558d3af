"""Call flow: oneway, more, pipelining, half-close, the error boundary, hang-ups, backpressure."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from protocol.harness import SECRET, TIMEOUT_S, RawClient, ThreadServer

T = "org.example.test"
INTERNAL = {"error": f"{T}.InternalError", "parameters": {}}


def _msg(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\0"


def test_oneway_gets_no_reply_and_runs(client: RawClient) -> None:
    client.send({"method": f"{T}.Record", "parameters": {"note": "a"}, "oneway": True})
    client.send({"method": f"{T}.Fail", "parameters": {"kind": "declared"}, "oneway": True})
    client.send({"method": f"{T}.Nope", "oneway": True})
    # The next reply is the answer to Notes: nothing was sent for the three oneway calls.
    assert client.call(f"{T}.Notes") == {"parameters": {"notes": ["a"]}}


def test_more_streams_continues_then_a_final_reply(client: RawClient) -> None:
    client.send({"method": f"{T}.Stream", "parameters": {"count": 3}, "more": True})
    replies = [client.recv() for _ in range(4)]
    assert replies == [
        {"parameters": {"index": 0}, "continues": True},
        {"parameters": {"index": 1}, "continues": True},
        {"parameters": {"index": 2}, "continues": True},
        {"parameters": {"index": 3}},
    ]


def test_without_more_there_is_only_the_final_reply(client: RawClient) -> None:
    assert client.call(f"{T}.Stream", count=3) == {"parameters": {"index": 3}}


def test_pipelined_calls_are_answered_in_order(client: RawClient) -> None:
    client.send_raw(
        _msg({"method": f"{T}.Ping", "parameters": {"text": "1"}})
        + _msg({"method": f"{T}.Record", "parameters": {"note": "n"}, "oneway": True})
        + _msg({"method": f"{T}.Stream", "parameters": {"count": 1}, "more": True})
        + _msg({"method": f"{T}.Nope"})
        + _msg({"method": f"{T}.Notes"})
        + _msg({"method": f"{T}.Ping", "parameters": {"text": "2"}})
    )
    assert [client.recv() for _ in range(6)] == [
        {"parameters": {"text": "1"}},
        {"parameters": {"index": 0}, "continues": True},
        {"parameters": {"index": 1}},
        {"error": "org.varlink.service.MethodNotFound", "parameters": {"method": f"{T}.Nope"}},
        {"parameters": {"notes": ["n"]}},
        {"parameters": {"text": "2"}},
    ]


def test_every_split_point_over_the_socket(client: RawClient) -> None:
    raw = _msg({"method": f"{T}.Ping", "parameters": {"text": "split"}})
    for cut in range(1, len(raw)):
        client.send_raw(raw[:cut])
        client.send_raw(raw[cut:])
    for _ in range(1, len(raw)):
        assert client.recv() == {"parameters": {"text": "split"}}


def test_half_close_still_gets_the_answers(server: ThreadServer) -> None:
    with RawClient(server.path) as c:
        c.send_raw(_msg({"method": f"{T}.Ping", "parameters": {"text": "a"}}) * 2)
        c.sock.shutdown(socket.SHUT_WR)
        assert c.recv() == {"parameters": {"text": "a"}}
        assert c.recv() == {"parameters": {"text": "a"}}
        c.expect_closed()


def test_internal_error_hides_the_exception_and_logs_it(
    client: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="capsuled.transport"):
        raw = _msg({"method": f"{T}.Fail", "parameters": {"kind": "internal"}})
        client.send_raw(raw)
        reply = client.recv_raw()
        assert json.loads(reply) == INTERNAL
        assert SECRET.encode() not in reply
        assert b"Traceback" not in reply
        # The connection lives on.
        assert client.call(f"{T}.Ping", text="x") == {"parameters": {"text": "x"}}
    logged = [r for r in caplog.records if r.exc_info]
    assert logged
    exc_info = logged[0].exc_info
    assert exc_info is not None
    assert SECRET in str(exc_info[1])


def test_an_internal_error_raised_on_purpose_logs_its_cause(
    client: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    # The fuzz proof got a few InternalError replies with nothing in the journal to say why:
    # an InternalError a handler raises from its cause was answered without a word.
    with caplog.at_level(logging.ERROR, logger="capsuled.transport"):
        reply = client.call(f"{T}.Fail", kind="raised-internal")
        assert reply == INTERNAL
        assert SECRET not in json.dumps(reply)
    logged = [r for r in caplog.records if r.exc_info]
    assert logged
    exc_info = logged[0].exc_info
    assert exc_info is not None
    assert exc_info[1] is not None
    assert SECRET in str(exc_info[1].__cause__)


@pytest.mark.parametrize("kind", ["unencodable", "badreply", "undeclared-error"])
def test_handler_bugs_become_internal_error(client: RawClient, kind: str) -> None:
    # badreply / undeclared-error are caught by validate_replies=True (the suite's dispatcher).
    assert client.call(f"{T}.Fail", kind=kind) == INTERNAL
    assert client.call(f"{T}.Ping", text="x") == {"parameters": {"text": "x"}}


def test_notify_on_a_call_without_more_closes_the_connection(
    server: ThreadServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="capsuled.transport"), RawClient(server.path) as c:
        c.send({"method": f"{T}.Fail", "parameters": {"kind": "notify"}})
        c.expect_closed()
    server.wait_connections(0)
    assert any("protocol misuse" in r.getMessage() for r in caplog.records)
    with RawClient(server.path) as c:
        assert c.call(f"{T}.Ping", text="x") == {"parameters": {"text": "x"}}


def test_hang_up_cancels_a_streaming_handler(server: ThreadServer) -> None:
    with RawClient(server.path) as c:
        c.send({"method": f"{T}.Forever", "parameters": {"size": 10}, "more": True})
        assert c.recv()["continues"] is True
    assert server.state.forever_ended.wait(TIMEOUT_S)
    server.wait_connections(0)


def test_a_client_that_stops_reading_is_disconnected_and_buffers_stay_bounded(
    make_server: object,
) -> None:
    srv = make_server(send_timeout_s=0.3)  # type: ignore[operator]
    c = RawClient(srv.path)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    c.send({"method": f"{T}.Forever", "parameters": {"size": 65536}, "more": True})
    # Never read: the server must give up after send_timeout_s rather than buffer forever.
    assert srv.state.forever_ended.wait(TIMEOUT_S)
    srv.wait_connections(0)
    # Each reply waits until the kernel took it whole, so what the handler produced is bounded
    # by the kernel's socket buffers plus the one reply being sent: nothing queues in between.
    sndbuf = 4 * 1024 * 1024  # generous bound for wmem/rmem defaults on Linux
    assert srv.state.forever_sent_bytes < sndbuf + 65536 * 2
    assert srv.server.buffered_bytes == 0
    c.close()


def test_slow_reader_that_keeps_reading_is_served(make_server: object) -> None:
    srv = make_server(send_timeout_s=2.0)  # type: ignore[operator]
    with RawClient(srv.path) as c:
        c.send({"method": f"{T}.Stream", "parameters": {"count": 200}, "more": True})
        replies = [c.recv() for _ in range(201)]
    assert replies[-1] == {"parameters": {"index": 200}}
