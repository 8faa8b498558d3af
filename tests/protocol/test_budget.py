"""Memory and fairness through the socket (issue 11, findings 3 and 8): the buffer budget shared
by all connections, JSON shapes refused before they are built, accounts, open streams and calls
that wait without a call slot."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
from collections.abc import Callable

from protocol.harness import TIMEOUT_S, RawClient, ThreadServer
from protocol.test_limits import NOBODY, OtherUidClient, needs_root

T = "org.example.test"
KIB = 1024
BUSY = {"error": "org.example.test.Busy", "parameters": {}}
HEAD, TAIL = b'{"method":"org.example.test.Ping","parameters":{"text":"', b'"}}\0'


def _hold(srv: ThreadServer, size: int) -> RawClient:
    """A client that sent the start of a Ping of `size` bytes and no end (no NUL)."""
    c = RawClient(srv.path)
    c.send_raw(HEAD + b"a" * (size - len(HEAD)))
    return c


def _finish(c: RawClient) -> dict[str, object]:
    c.send_raw(TAIL)
    return c.recv()


def _still_open(c: RawClient) -> bool:
    """True if the server has not closed `c` (nothing arrives within a short wait)."""
    c.sock.settimeout(0.05)
    try:
        return c.sock.recv(1, socket.MSG_PEEK) != b""
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False
    finally:
        c.sock.settimeout(TIMEOUT_S)


def test_unhandled_input_past_the_budget_closes_the_largest_and_oldest_first(
    make_server: object,
) -> None:
    # Regression for finding 3: 40 unterminated 16 MiB messages took the helper to ~690 MiB.
    srv: ThreadServer = make_server(max_message_bytes=64 * KIB, max_buffered_bytes=128 * KIB)  # type: ignore[operator]
    small = _hold(srv, 8 * KIB)
    first = _hold(srv, 60 * KIB)
    second = _hold(srv, 60 * KIB)
    srv.run(srv.server.wait_until(lambda: srv.server.buffered_bytes >= 128 * KIB))
    assert srv.server.evicted == 0  # exactly at the budget: nothing to do yet
    third = _hold(srv, 60 * KIB)
    srv.run(srv.server.wait_until(lambda: srv.server.evicted >= 1))
    first.expect_closed()  # the largest three tie; the oldest of them goes
    assert srv.server.evicted == 1
    assert srv.server.buffered_bytes <= 128 * KIB
    for c in (small, second, third):
        assert _still_open(c)
    # The small one was never at fault: it completes its call.
    assert _finish(small) == {"parameters": {"text": "a" * (8 * KIB - len(HEAD))}}
    for c in (small, first, second, third):
        c.close()
    srv.wait_connections(0)
    assert srv.server.buffered_bytes == 0


def test_many_connections_never_hold_more_than_the_budget(make_server: object) -> None:
    srv: ThreadServer = make_server(max_message_bytes=64 * KIB, max_buffered_bytes=256 * KIB)  # type: ignore[operator]
    held = [_hold(srv, 63 * KIB) for _ in range(16)]  # 1008 KiB sent in all
    srv.run(srv.server.wait_until(lambda: srv.server.evicted >= 12))
    assert srv.server.buffered_bytes <= 256 * KIB
    with RawClient(srv.path) as c:
        assert c.call(f"{T}.Ping", text="fine") == {"parameters": {"text": "fine"}}
    for c in held:
        c.close()


def test_replies_being_sent_count_against_the_budget(make_server: object) -> None:
    # Three streams nobody reads: each holds a 100 KiB reply the kernel cannot take. With a
    # long send timeout, only the budget can end one of them.
    srv: ThreadServer = make_server(  # type: ignore[operator]
        send_timeout_s=60, max_message_bytes=64 * KIB, max_buffered_bytes=256 * KIB
    )
    readers = []
    for _ in range(3):
        c = RawClient(srv.path)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KIB)
        c.send({"method": f"{T}.Forever", "parameters": {"size": 100 * KIB}, "more": True})
        readers.append(c)
    srv.run(srv.server.wait_until(lambda: srv.server.evicted >= 1))
    assert srv.server.buffered_bytes <= 256 * KIB
    for c in readers:
        c.close()


def test_too_many_json_values_are_refused_without_a_reply(client: RawClient) -> None:
    # 10,000 tiny objects: the old server built them all and answered InvalidParameter.
    client.send_raw(
        b'{"method":"org.example.test.Ping","parameters":{"x":[' + b"{}," * 9999 + b"{}]}}\0"
    )
    client.expect_closed()


def test_deep_json_is_refused_without_a_reply(client: RawClient) -> None:
    client.send_raw(
        b'{"method":"org.example.test.Ping","parameters":{"text":' + b"[" * 20 + b"]" * 20 + b"}}\0"
    )
    client.expect_closed()


def test_a_call_within_the_shape_limits_is_served(make_server: object) -> None:
    srv: ThreadServer = make_server(max_json_depth=4, max_json_values=8)  # type: ignore[operator]
    with RawClient(srv.path) as c:
        assert c.call(f"{T}.Ping", text="x") == {"parameters": {"text": "x"}}
    with RawClient(srv.path) as c:
        c.send({"method": f"{T}.Ping", "parameters": {"text": "x", "a": [1, 2, 3, 4, 5, 6]}})
        c.expect_closed()


def test_an_account_past_its_input_rate_is_read_later_and_others_are_not(
    make_server: object,
) -> None:
    # A peer sending whole calls as fast as it can (here 40 pipelined 16 KiB Pings, twenty
    # times the bucket) is read at its rate; another account's call meanwhile is read at once.
    order = iter([1, 2])
    srv: ThreadServer = make_server(  # type: ignore[operator]
        account=lambda uid: next(order),
        max_message_bytes=16 * KIB,
        max_input_bytes_per_uid_s=16 * KIB,
    )
    ping = json.dumps({"method": f"{T}.Ping", "parameters": {"text": "a" * (16 * KIB - 100)}})
    with (
        RawClient(srv.path) as heavy,
        RawClient(srv.path) as light,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        sending = pool.submit(heavy.send_raw, (ping.encode() + b"\0") * 40)
        srv.run(srv.server.wait_until(lambda: srv.server.throttled > 0))
        assert light.call(f"{T}.Ping", text="me") == {"parameters": {"text": "me"}}
        # heavy is read at 16 KiB a second: it has not even sent all its calls yet.
        assert not sending.done()
        heavy.sock.shutdown(socket.SHUT_RDWR)  # ends its blocked sendall
        with contextlib.suppress(OSError):
            sending.result(TIMEOUT_S)
    assert srv.server.evicted == 0


# -- accounts ---------------------------------------------------------------------------------


@needs_root
def test_connections_count_against_the_account_not_the_uid(make_server: object) -> None:
    # Everybody counts against root here, as a capsule's processes count against its owner.
    srv: ThreadServer = make_server(  # type: ignore[operator]
        account=lambda uid: 0, max_connections=8, max_connections_per_uid=2
    )
    mine = [RawClient(srv.path) for _ in range(2)]
    assert all(c.call(f"{T}.Ping")["parameters"] == {"text": None} for c in mine)
    with OtherUidClient(NOBODY, srv.path) as other:
        assert other.reply == {"closed": True}  # nobody's own uid is below its limit
    for c in mine:
        c.close()


@needs_root
def test_without_an_account_each_uid_has_its_own_share(make_server: object) -> None:
    srv: ThreadServer = make_server(max_connections=8, max_connections_per_uid=2)  # type: ignore[operator]
    mine = [RawClient(srv.path) for _ in range(2)]
    assert all(c.call(f"{T}.Ping")["parameters"] == {"text": None} for c in mine)
    with OtherUidClient(NOBODY, srv.path) as other:
        assert other.reply["parameters"]["uid"] == NOBODY  # type: ignore[index]
    for c in mine:
        c.close()


# -- open streams -----------------------------------------------------------------------------


def _stream(srv: ThreadServer, method: str) -> RawClient:
    c = RawClient(srv.path)
    c.send({"method": f"{T}.{method}", "parameters": {"size": 1}, "more": True})
    return c


def test_open_streams_get_a_small_share_of_their_own(make_server: object) -> None:
    srv: ThreadServer = make_server(  # type: ignore[operator]
        open_streams=frozenset({f"{T}.Forever"}),
        max_streams=8,
        max_streams_per_uid=8,
        max_open_streams=4,
        max_open_streams_per_uid=2,
    )
    opened = [_stream(srv, "Forever") for _ in range(2)]
    for c in opened:
        assert c.recv().get("continues") is True
    with _stream(srv, "Forever") as third:
        assert third.recv() == BUSY  # the per-uid share of open streams is used up
    # Streams that needed authorization are not held back by them.
    with RawClient(srv.path) as c:
        c.send({"method": f"{T}.Stream", "parameters": {"count": 3}, "more": True})
        assert [c.recv() for _ in range(4)][-1] == {"parameters": {"index": 3}}
    for c in opened:
        c.close()


# -- waiting without a call slot -------------------------------------------------------------


def test_a_parked_call_gives_its_call_slot_to_others(make_server: object) -> None:
    srv: ThreadServer = make_server(  # type: ignore[operator]
        max_inflight_calls=1, max_inflight_calls_per_uid=1, slot_wait_s=0.2
    )
    with RawClient(srv.path) as parked, RawClient(srv.path) as other:
        parked.send({"method": f"{T}.Park", "parameters": {"key": "human"}})
        assert srv.state.started_event("human").wait(TIMEOUT_S)
        # The only call slot is free again: another call runs while the first one waits.
        assert other.call(f"{T}.Ping", text="meanwhile") == {"parameters": {"text": "meanwhile"}}
        srv.release("human")
        assert parked.recv() == {"parameters": {}}


def test_waiting_slots_are_bounded_per_uid(make_server: object) -> None:
    srv: ThreadServer = make_server(max_waiting_calls=4, max_waiting_calls_per_uid=1)  # type: ignore[operator]
    with RawClient(srv.path) as first, RawClient(srv.path) as second:
        first.send({"method": f"{T}.Park", "parameters": {"key": "one"}})
        assert srv.state.started_event("one").wait(TIMEOUT_S)
        assert second.call(f"{T}.Park", key="two") == BUSY
        srv.release("one")
        assert first.recv() == {"parameters": {}}


def test_a_parked_call_waits_for_a_call_slot_again_before_it_goes_on(make_server: object) -> None:
    srv: ThreadServer = make_server(  # type: ignore[operator]
        max_inflight_calls=1, max_inflight_calls_per_uid=1, slot_wait_s=0.3
    )
    with RawClient(srv.path) as parked, RawClient(srv.path) as blocker:
        parked.send({"method": f"{T}.Park", "parameters": {"key": "human"}})
        assert srv.state.started_event("human").wait(TIMEOUT_S)
        blocker.send({"method": f"{T}.Block", "parameters": {"key": "slot"}})
        assert srv.state.started_event("slot").wait(TIMEOUT_S)
        srv.release("human")  # answered, but the slot is taken for longer than slot_wait_s
        assert parked.recv() == BUSY
        srv.release("slot")
        assert blocker.recv() == {"parameters": {}}


# -- fair call slots -------------------------------------------------------------------------


def _admitted(srv: ThreadServer, n: int) -> Callable[[], bool]:
    return lambda: srv.server.connections == n


def test_a_freed_call_slot_goes_to_the_next_account_not_the_next_call(
    make_server: object,
) -> None:
    # Finding 8: with FIFO slots, another account's call waited behind every call a flooding
    # account had queued; now accounts take turns. Accounts by order of connection: A A A B B B C.
    order = iter([1, 1, 1, 2, 2, 2, 3])
    srv: ThreadServer = make_server(  # type: ignore[operator]
        account=lambda uid: next(order),
        max_inflight_calls=4,
        max_inflight_calls_per_uid=3,
        slot_wait_s=TIMEOUT_S,
    )
    clients = []
    for key in range(7):
        c = RawClient(srv.path)
        c.send({"method": f"{T}.Block", "parameters": {"key": str(key)}})
        clients.append(c)
        if key < 4:  # A A A B fill the four slots
            assert srv.state.started_event(str(key)).wait(TIMEOUT_S)
        else:  # B B C queue, in that order
            srv.run(srv.server.wait_until(_admitted(srv, key + 1)))
    srv.release("0")  # B's turn first: it has waited longest
    assert srv.state.started_event("4").wait(TIMEOUT_S)
    srv.release("1")  # then C's, though B queued another call before C's
    assert srv.state.started_event("6").wait(TIMEOUT_S)
    assert not srv.state.started_event("5").is_set()
    for key in (2, 3, 4, 5, 6):
        srv.release(str(key))
    assert [c.recv() for c in clients] == [{"parameters": {}}] * 7
    for c in clients:
        c.close()
