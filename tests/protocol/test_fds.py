"""File descriptors through the real server (SCM_RIGHTS): they reach only methods that take
them, ride back with replies, and the server keeps none once a call or connection ends.

"The server closed its copy" is observed, never timed: each test sends the write end of a pipe
and closes its own, so reading the read end gives EOF exactly when no copy is left anywhere.
"""

from __future__ import annotations

import os
import select
import socket

from protocol.conftest import MakeServer
from protocol.harness import TIMEOUT_S, RawClient, ThreadServer

FD_INFO = "org.example.test.FdInfo"


def _pipe() -> tuple[int, int]:
    return os.pipe2(os.O_CLOEXEC)


def _assert_all_closed(read_end: int) -> None:
    """EOF on `read_end`: every copy of the pipe's write end is closed (the server's too)."""
    try:
        ready, _, _ = select.select([read_end], [], [], TIMEOUT_S)
        assert ready, "the server still holds the write end"
        assert os.read(read_end, 16) == b""
    finally:
        os.close(read_end)


def _send_with_pipe(client: RawClient, obj: object, count: int = 1) -> list[int]:
    """Send `obj` with the write ends of `count` pipes (ours closed); returns the read ends."""
    pipes = [_pipe() for _ in range(count)]
    try:
        client.send(obj, [w for _, w in pipes])
    finally:
        for _, w in pipes:
            os.close(w)
    return [r for r, _ in pipes]


def test_fds_reach_the_method_close_on_exec_and_are_closed_after(server: ThreadServer) -> None:
    r, w = _pipe()
    with RawClient(server.path) as client:
        inode = os.fstat(w).st_ino
        client.send({"method": FD_INFO}, [w, w])
        os.close(w)
        reply = client.recv()
        assert reply == {"parameters": {"inodes": [inode, inode], "cloexec": [True, True]}}
        _assert_all_closed(r)  # the connection is still open: the call's end closed them
        assert client.call("org.example.test.Ping", text="after") == {
            "parameters": {"text": "after"}
        }


def test_fds_to_a_method_that_takes_none_are_refused_and_closed(server: ThreadServer) -> None:
    with RawClient(server.path) as client:
        (r,) = _send_with_pipe(client, {"method": "org.example.test.Ping", "parameters": {}})
        assert client.recv() == {
            "error": "org.example.test.FdsRefused",
            "parameters": {"method": "org.example.test.Ping", "accepted": 0},
        }
        _assert_all_closed(r)
    assert server.state.seen_fds == []


def test_more_fds_than_the_method_takes_are_refused(server: ThreadServer) -> None:
    with RawClient(server.path) as client:
        reads = _send_with_pipe(client, {"method": FD_INFO}, count=3)
        assert client.recv()["error"] == "org.example.test.FdsRefused"
        for r in reads:
            _assert_all_closed(r)
    assert server.state.seen_fds == []


def test_more_fds_than_a_message_may_carry_close_the_connection(
    make_server: MakeServer,
) -> None:
    srv = make_server(max_fds_per_message=2)
    with RawClient(srv.path) as client:
        reads = _send_with_pipe(client, {"method": FD_INFO}, count=3)  # MSG_CTRUNC
        client.expect_closed()
        for r in reads:
            _assert_all_closed(r)


def test_fds_past_the_accounts_share_close_the_connection(make_server: MakeServer) -> None:
    srv = make_server(max_fds_per_message=2, max_fds_per_uid=2, max_fds=4)
    with RawClient(srv.path) as holder, RawClient(srv.path) as greedy:
        (held,) = _send_with_pipe(
            holder, {"method": FD_INFO, "parameters": {"hold": True}}, count=1
        )
        srv.state.started_event("fds").wait(TIMEOUT_S)
        reads = _send_with_pipe(greedy, {"method": FD_INFO}, count=2)  # 1 + 2 > 2
        greedy.expect_closed()
        for r in reads:
            _assert_all_closed(r)
        srv.release("fds")
        assert "parameters" in holder.recv()
        _assert_all_closed(held)


def test_fds_sent_inside_a_message_close_the_connection(server: ThreadServer) -> None:
    with RawClient(server.path) as client:
        client.send_raw(b'{"method":')
        (r,) = _send_with_pipe(client, '"org.example.test.FdInfo"')  # not a message start
        client.expect_closed()
        _assert_all_closed(r)


def test_fds_of_a_running_call_are_closed_when_the_peer_hangs_up(server: ThreadServer) -> None:
    client = RawClient(server.path)
    (r,) = _send_with_pipe(client, {"method": FD_INFO, "parameters": {"hold": True}, "more": True})
    server.state.started_event("fds").wait(TIMEOUT_S)
    client.close()  # a streaming call ends with its peer
    _assert_all_closed(r)


def test_fds_of_a_call_not_yet_read_are_closed_at_disconnect(server: ThreadServer) -> None:
    client = RawClient(server.path)
    client.send_raw(b'{"method":"org.example.test.Block","parameters":{"key":"k"}}\0')
    server.state.started_event("k").wait(TIMEOUT_S)
    # Half a call with fds while Block runs: read ahead, held by the protocol core.
    r, w = _pipe()
    client.sock.sendmsg(
        [b'{"method":"org.exa'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, w.to_bytes(4, "little"))]
    )
    os.close(w)
    client.sock.shutdown(socket.SHUT_WR)
    server.release("k")
    assert client.recv() == {"parameters": {}}
    client.close()
    _assert_all_closed(r)


def test_fds_come_back_with_a_reply(server: ThreadServer) -> None:
    with RawClient(server.path) as client:
        client.send({"method": "org.example.test.FdBack", "parameters": {"count": 2}, "more": True})
        first, fds = client.recv_with_fds()
        assert first == {"parameters": {"count": 2}, "continues": True}
        assert len(fds) == 2
        for i, fd in enumerate(fds):
            os.write(fd, f"fd{i}".encode())
            os.close(fd)
        last, more = client.recv_with_fds()
        assert last == {"parameters": {"count": 0}}
        assert more == []
    for i, r in enumerate(server.state.kept_read_ends):
        assert os.read(r, 16) == f"fd{i}".encode()  # what we wrote through the fd we got
        _assert_all_closed(r)  # and the server kept no copy of it once sent


def test_pushed_fds_a_failing_call_never_sent_are_closed(server: ThreadServer) -> None:
    with RawClient(server.path) as client:
        client.send(
            {
                "method": "org.example.test.FdBack",
                "parameters": {"count": 1, "fail": True},
                "more": True,
            }
        )
        reply, fds = client.recv_with_fds()
        assert reply["error"] == "org.example.test.TestFailed"
        assert fds == []
        assert client.call("org.example.test.Ping") == {"parameters": {"text": None}}
    (r,) = server.state.kept_read_ends
    _assert_all_closed(r)
