"""Limits: connections in total and per UID, idle timeout, calls running at once."""

from __future__ import annotations

import contextlib
import json
import os
import socket

import pytest

from capsuled.transport import Limits
from protocol.harness import TIMEOUT_S, Closed, RawClient, ThreadServer

T = "org.example.test"
NOBODY = 65534
# A connection from another uid is made by a child that switches to it: only root can.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="connects as uid nobody")


def _admitted(c: RawClient) -> bool:
    try:
        return c.call(f"{T}.Ping", text="hi") == {"parameters": {"text": "hi"}}
    except Closed:
        return False


class OtherUidClient:
    """A connection made as another uid (SO_PEERCRED is taken at connect time) by a forked child.

    The child connects, calls WhoAmI, reports the reply, and keeps the connection open until the
    parent closes the control pipe.
    """

    def __init__(self, uid: int, path: str) -> None:
        r, w = os.pipe()
        hold_r, self._hold_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child: never return into pytest
            status = 1
            try:
                os.close(r)
                os.close(self._hold_w)
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                with RawClient(path) as c:
                    try:
                        reply: object = c.call(f"{T}.WhoAmI")
                    except (Closed, BrokenPipeError, ConnectionResetError):
                        reply = {"closed": True}  # refused: closed before or after we sent
                    os.write(w, json.dumps(reply).encode())
                    os.close(w)
                    os.read(hold_r, 1)  # returns at EOF: the parent is done with us
                status = 0
            finally:
                os._exit(status)
        os.close(w)
        os.close(hold_r)
        with os.fdopen(r, "rb") as f:
            value = json.loads(f.read())
        assert isinstance(value, dict)
        self.reply: dict[str, object] = value

    def close(self) -> None:
        os.close(self._hold_w)
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0

    def __enter__(self) -> OtherUidClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ping_as(uid: int, path: str) -> dict[str, object]:
    with OtherUidClient(uid, path) as c:
        return c.reply


def test_limits_are_validated() -> None:
    # Per-uid shares by default: 1/16 of the connections and of the calls (transport docstring).
    assert Limits(max_connections=512).connections_per_uid == 32
    assert Limits(max_inflight_calls=64).inflight_calls_per_uid == 4
    assert Limits(max_connections=4).connections_per_uid == 1
    assert Limits(max_connections=4, max_connections_per_uid=3).connections_per_uid == 3
    with pytest.raises(ValueError, match="3/4"):
        Limits(max_connections=4, max_connections_per_uid=4)
    with pytest.raises(ValueError, match="timeouts must be positive"):
        Limits(idle_timeout_s=0)


@needs_root
def test_total_connection_limit(make_server: object) -> None:
    srv: ThreadServer = make_server(max_connections=4, max_connections_per_uid=3)  # type: ignore[operator]
    held = [RawClient(srv.path) for _ in range(3)]
    assert all(_admitted(c) for c in held)
    with OtherUidClient(NOBODY, srv.path) as nobody:
        who = nobody.reply["parameters"]
        assert isinstance(who, dict)
        assert (who["uid"], who["gid"]) == (NOBODY, NOBODY)
        assert srv.server.connections == 4
        # nobody is far below its per-UID limit: only the total limit can refuse this one.
        with OtherUidClient(NOBODY, srv.path) as refused:
            assert refused.reply == {"closed": True}
        assert srv.server.rejected == 1
    held[0].close()
    srv.wait_connections(2)
    again = RawClient(srv.path)
    assert _admitted(again)
    for c in [*held, again]:
        c.close()


@needs_root
def test_per_uid_limit_leaves_room_for_other_users(make_server: object) -> None:
    srv: ThreadServer = make_server(max_connections=8, max_connections_per_uid=2)  # type: ignore[operator]
    mine = [RawClient(srv.path) for _ in range(2)]
    assert all(_admitted(c) for c in mine)
    third = RawClient(srv.path)
    third.expect_closed()
    # Another uid is not affected by root's connections.
    reply = _ping_as(NOBODY, srv.path)
    assert reply["parameters"]["uid"] == NOBODY  # type: ignore[index]
    for c in [*mine, third]:
        c.close()


def test_idle_connection_is_closed(make_server: object) -> None:
    srv: ThreadServer = make_server(idle_timeout_s=0.2)  # type: ignore[operator]
    with RawClient(srv.path) as c:
        assert _admitted(c)
        c.expect_closed()  # blocks until the server closes (socket timeout TIMEOUT_S)


def test_trickling_bytes_do_not_keep_a_connection_alive(make_server: object) -> None:
    srv: ThreadServer = make_server(idle_timeout_s=0.3)  # type: ignore[operator]
    with RawClient(srv.path) as c:
        c.sock.settimeout(0.05)
        closed = False
        for _ in range(int(TIMEOUT_S / 0.05)):
            try:
                c.sock.send(b" ")  # whitespace before a JSON value: never completes a message
                if c.sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed


def test_a_running_call_is_not_idle(make_server: object) -> None:
    srv: ThreadServer = make_server(idle_timeout_s=0.2)  # type: ignore[operator]
    with RawClient(srv.path) as blocked:
        blocked.send({"method": f"{T}.Block", "parameters": {"key": "k"}})
        assert srv.state.started_event("k").wait(TIMEOUT_S)
        with RawClient(srv.path) as idle:
            idle.expect_closed()  # proves more than idle_timeout_s has passed since Block began
        srv.release("k")
        assert blocked.recv() == {"parameters": {}}


@needs_root
def test_calls_running_at_once_are_bounded_per_uid(make_server: object) -> None:
    srv: ThreadServer = make_server(max_inflight_calls=4, max_inflight_calls_per_uid=3)  # type: ignore[operator]
    conns = [RawClient(srv.path) for _ in range(4)]
    for i, c in enumerate(conns):
        c.send({"method": f"{T}.Block", "parameters": {"key": str(i)}})
    for i in range(3):
        assert srv.state.started_event(str(i)).wait(TIMEOUT_S)
    # Another uid still gets the last global slot while root's fourth call waits for its own.
    assert _ping_as(NOBODY, srv.path)["parameters"]["uid"] == NOBODY  # type: ignore[index]
    assert not srv.state.started_event("3").is_set()
    srv.release("0")
    assert conns[0].recv() == {"parameters": {}}
    assert srv.state.started_event("3").wait(TIMEOUT_S)
    for i in range(1, 4):
        srv.release(str(i))
        assert conns[i].recv() == {"parameters": {}}
    for c in conns:
        c.close()


def test_connection_over_the_limit_gets_no_bytes_even_if_it_sends(make_server: object) -> None:
    srv: ThreadServer = make_server(max_connections=1)  # type: ignore[operator]
    with RawClient(srv.path) as first, RawClient(srv.path) as second:
        assert _admitted(first)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            second.send({"method": f"{T}.Ping"})
        second.expect_closed()


def test_pidfd_is_closed_with_the_connection(server: ThreadServer) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with RawClient(server.path) as c:
        assert c.call(f"{T}.WhoAmI")["parameters"]["hasPidfd"] is True  # type: ignore[index]
    server.wait_connections(0)
    after = set(os.listdir("/proc/self/fd"))
    leaked = [fd for fd in after - before if "pidfd" in _link(fd)]
    assert leaked == []


def _link(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_peer_of_a_socketpair_is_ourselves(server: ThreadServer) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    from capsuled.peer import peer_credentials

    peer = peer_credentials(a)
    try:
        assert (peer.uid, peer.gid, peer.pid) == (os.getuid(), os.getgid(), os.getpid())
    finally:
        if peer.pidfd is not None:
            os.close(peer.pidfd)
        a.close()
        b.close()


BUSY = {"error": "org.example.test.Busy", "parameters": {}}


def _streaming(srv: ThreadServer) -> RawClient:
    """A client whose Forever stream has started (it holds a stream slot, not a call slot)."""
    c = RawClient(srv.path)
    c.send({"method": f"{T}.Forever", "parameters": {"size": 1}, "more": True})
    first = c.recv()
    assert first.get("continues") is True, first
    return c


def test_long_streams_do_not_starve_short_calls(make_server: object) -> None:
    # 4 call slots (3 per uid), but 6 streams: a stream gives its call slot back.
    srv: ThreadServer = make_server(max_inflight_calls=4, max_streams=8, max_streams_per_uid=6)  # type: ignore[operator]
    streams = [_streaming(srv) for _ in range(6)]
    try:
        with RawClient(srv.path) as c:
            assert c.call(f"{T}.Ping", text="still here") == {"parameters": {"text": "still here"}}
    finally:
        for s in streams:
            s.close()


def test_streams_are_capped_per_uid_with_busy(make_server: object) -> None:
    srv: ThreadServer = make_server(max_streams=8, max_streams_per_uid=2)  # type: ignore[operator]
    streams = [_streaming(srv) for _ in range(2)]
    try:
        with RawClient(srv.path) as third:
            third.send({"method": f"{T}.Forever", "parameters": {"size": 1}, "more": True})
            assert third.recv() == BUSY
            # The refused stream gave its slot back: plain calls still work on that connection.
            assert third.call(f"{T}.Ping") == {"parameters": {"text": None}}
    finally:
        streams[0].close()
    # A slot came free: a new stream is accepted.
    _streaming(srv).close()
    streams[1].close()


def test_a_call_waiting_too_long_for_a_slot_is_answered_busy(make_server: object) -> None:
    srv: ThreadServer = make_server(max_inflight_calls=1, slot_wait_s=0.2)  # type: ignore[operator]
    with RawClient(srv.path) as blocked, RawClient(srv.path) as waiting:
        blocked.send({"method": f"{T}.Block", "parameters": {"key": "slot"}})
        assert srv.state.started_event("slot").wait(TIMEOUT_S)
        assert waiting.call(f"{T}.Ping") == BUSY
        srv.release("slot")
        assert blocked.recv() == {"parameters": {}}
        assert waiting.call(f"{T}.Ping") == {"parameters": {"text": None}}
