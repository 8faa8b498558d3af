"""capsuled.systemd.bus (over capsuled.dbus) against an in-process fake D-Bus peer on a socketpair.

The peer plays a capsule's manager (no bus daemon): it answers the SASL exchange, then replies,
stays silent, or sends garbage, so the adapter's limits can be shown without systemd. (File
descriptor passing and the header filter: tests/protocol/test_dbus.py.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from jeepney import (
    DBusAddress,
    HeaderFields,
    Message,
    Parser,
    new_error,
    new_method_call,
    new_method_return,
    new_signal,
)

from capsuled import dbus
from capsuled.systemd import bus, errors, jobs
from capsuled.systemd import messages as m
from protocol.harness import Parsed

T = TypeVar("T")
AUTH_OK = b"OK 0123456789abcdef0123456789abcdef\r\nAGREE_UNIX_FD\r\n"


class FakePeer:
    """The far end of the socketpair: records what arrives, answers as told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.auth_bytes = b""
        self.parser = Parser()
        self.received: list[Message] = []

    async def handshake(self, answer: bytes = AUTH_OK) -> None:
        self.auth_bytes = await self.reader.readuntil(b"BEGIN\r\n")
        self.writer.write(answer)
        await self.writer.drain()

    async def next_call(self) -> Message:
        while True:
            msg = self.parser.get_next_message()
            if msg is not None:
                self.received.append(msg)
                return msg
            data = await self.reader.read(65536)
            if not data:
                raise EOFError
            self.parser.add_data(data)

    def send(self, msg: Message, serial: int = 1000) -> None:
        self.writer.write(msg.serialise(serial))


async def connected(
    handshake_answer: bytes = AUTH_OK,
    max_message_bytes: int | None = None,
    limits: dbus.BusLimits | None = None,
) -> tuple[bus.Link, FakePeer]:
    """open_peer on a socketpair; ``max_message_bytes`` and ``limits`` None keep open_peer's
    default (a capsule manager's)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    peer = FakePeer(reader, writer)
    hs = asyncio.create_task(peer.handshake(handshake_answer))
    if limits is not None:
        conn = await bus.open_peer(ours, uid=0, limits=limits)
    elif max_message_bytes is None:
        conn = await bus.open_peer(ours, uid=0)
    else:
        limits = dataclasses.replace(
            bus.CAPSULE_MANAGER_LIMITS,
            max_message_bytes=max_message_bytes,
            max_signal_bytes=min(max_message_bytes, bus.MAX_PEER_SIGNAL_BYTES),
        )
        conn = await bus.open_peer(ours, uid=0, limits=limits)
    await hs
    return conn, peer


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        async with asyncio.timeout(10):
            return await scenario()

    return asyncio.run(main())


def test_auth_is_external_uid0_with_pipelined_begin() -> None:
    async def scenario() -> bytes:
        conn, peer = await connected()
        await conn.close()
        return peer.auth_bytes

    # "30" is "0" in hex: root. NEGOTIATE_UNIX_FD and BEGIN follow AUTH in the same write (see
    # dbus._authenticate).
    assert run(scenario) == b"\0AUTH EXTERNAL 30\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n"


def test_rejected_auth_is_systemd_unavailable() -> None:
    async def scenario() -> None:
        with pytest.raises(errors.SystemdUnavailable, match="refused"):
            await connected(b"REJECTED EXTERNAL\r\n")

    run(scenario)


def test_reply_and_error_reply() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(m.list_units()))
        msg = await peer.next_call()
        peer.send(new_method_return(msg, "s", ("hi",)))
        assert await call == ("hi",)
        failing = asyncio.create_task(conn.call(m.start_unit("a.service"), unit="a.service"))
        msg = await peer.next_call()
        peer.send(new_error(msg, "org.freedesktop.systemd1.NoSuchUnit", "s", ("Unit a not found",)))
        with pytest.raises(errors.NoSuchUnit) as exc:
            await failing
        assert exc.value.unit == "a.service"
        await conn.close()

    run(scenario)


def test_no_more_than_64_calls_in_flight() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        calls = [asyncio.create_task(conn.call(m.list_units())) for _ in range(70)]
        first = [await peer.next_call() for _ in range(bus.MAX_PEER_IN_FLIGHT_CALLS)]
        # The 65th is held back until a reply frees a slot.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await peer.next_call()
        peer.send(new_method_return(first[0], "s", ("x",)))
        later = [await peer.next_call()]  # one reply, one slot
        for msg in first[1:]:
            peer.send(new_method_return(msg, "s", ("x",)))
        later += [await peer.next_call() for _ in range(5)]
        for msg in later:
            peer.send(new_method_return(msg, "s", ("x",)))
        assert [await c for c in calls] == [("x",)] * 70
        await conn.close()

    run(scenario)


def test_oversized_message_closes_the_link_before_buffering() -> None:
    async def scenario() -> None:
        conn, peer = await connected(max_message_bytes=4096)
        call = asyncio.create_task(conn.call(m.list_units()))
        msg = await peer.next_call()
        reply = new_method_return(msg, "s", ("x" * 8192,))
        peer.send(reply)
        with pytest.raises(errors.SystemdUnavailable, match="over our cap"):
            await call
        assert conn.closed
        with pytest.raises(errors.SystemdUnavailable):
            await conn.call(m.list_units())
        await conn.close()

    run(scenario)


def _reply_of_size(call: Message, size: int) -> bytes:
    """A method return to ``call`` whose serialised form is exactly ``size`` bytes."""
    probe = new_method_return(call, "s", ("",)).serialise(1000)
    # A string body grows byte for byte; the header does not change with its length.
    data = bytes(new_method_return(call, "s", ("x" * (size - len(probe)),)).serialise(1000))
    assert len(data) == size
    return data


def test_peer_link_caps_messages_at_1_mib_by_default() -> None:
    # A capsule's process can bind its own socket at systemd/private (same uid: pinning
    # passes); jeepney parses at ~0.4 s/MiB in the event loop, so 32 MiB stalled us ~12 s.
    async def scenario() -> None:
        assert bus.MAX_PEER_MESSAGE_BYTES == 1024 * 1024
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(m.list_units()))
        peer.writer.write(_reply_of_size(await peer.next_call(), bus.MAX_PEER_MESSAGE_BYTES))
        assert len(str((await call)[0])) > 1000 * 1000  # exactly at the cap: accepted
        call = asyncio.create_task(conn.call(m.list_units()))
        peer.writer.write(_reply_of_size(await peer.next_call(), bus.MAX_PEER_MESSAGE_BYTES + 8))
        with pytest.raises(errors.SystemdUnavailable, match="over our cap"):
            await call
        assert conn.closed
        await conn.close()

    run(scenario)


def test_system_bus_keeps_the_larger_cap(tmp_path: Path) -> None:
    # PID 1 on the system bus is trusted: a 2 MiB reply (a big host's ListUnits) is fine there.
    async def scenario() -> None:
        assert dbus.SYSTEM_BUS_LIMITS.max_message_bytes > 2 * bus.MAX_PEER_MESSAGE_BYTES
        peers: asyncio.Queue[FakePeer] = asyncio.Queue()

        async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await peers.put(FakePeer(r, w))

        address = str(tmp_path / "bus")
        server = await asyncio.start_unix_server(accept, address)
        opening = asyncio.create_task(dbus.open_bus(address))
        peer = await peers.get()
        await peer.handshake()
        hello = await peer.next_call()
        peer.send(new_method_return(hello, "s", (":1.42",)))
        conn = await opening
        assert conn.unique_name == ":1.42"
        call = asyncio.create_task(conn.call(m.list_units()))
        size = 2 * bus.MAX_PEER_MESSAGE_BYTES
        peer.writer.write(_reply_of_size(await peer.next_call(), size))
        assert len(str((await call)[0])) > size - 1000
        assert not conn.closed
        await conn.close()
        peer.writer.close()
        server.close()
        await server.wait_closed()

    run(scenario)


@pytest.mark.parametrize("junk", ["stray reply", "method call", "foreign signal"])
def test_a_manager_link_is_closed_on_anything_a_manager_would_not_send(
    parsed: list[Parsed], junk: str
) -> None:
    # Finding 4: a fake manager (any process in the capsule can bind systemd/private) must not
    # keep us reading; its junk is judged on the header and ends the link, unparsed.
    async def scenario() -> None:
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(m.list_units()))
        msg = await peer.next_call()
        probe = DBusAddress("/x", bus_name="org.example", interface="org.example.I")
        if junk == "stray reply":
            sent = new_method_return(msg, "s", ("",))
            sent.header.fields[HeaderFields.reply_serial] = 4242  # nobody waits for this
        elif junk == "method call":
            sent = new_method_call(probe, "Poke", "s", ("",))
        else:
            sent = new_signal(probe, "Tick", "s", ("",))
        sent.body = ("z" * (bus.MAX_PEER_MESSAGE_BYTES - 512),)
        peer.send(sent)
        with pytest.raises(errors.SystemdUnavailable, match="nobody asked for"):
            await call
        assert conn.closed
        await conn.close()

    run(scenario)
    # Parsed: only the fake peer's view of our call; never the 1 MiB junk body.
    assert parsed
    assert max(p.size for p in parsed) < 4096


def test_a_managers_own_broadcasts_are_skipped_unparsed_within_their_rate(
    parsed: list[Parsed],
) -> None:
    # A real manager sends every unit's changes to every private link; we follow some.
    async def scenario() -> None:
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(m.list_units()))
        msg = await peer.next_call()
        for i in range(50):
            peer.send(_signal(i), serial=10 + i)  # no queue wants them
        peer.send(new_method_return(msg, "s", ("mine",)))
        assert await call == ("mine",)
        assert conn.conn.skipped == 50
        assert not conn.closed
        await conn.close()

    run(scenario)
    assert all(p.member != "JobRemoved" for p in parsed)


def test_a_flood_of_broadcasts_closes_the_manager_link(parsed: list[Parsed]) -> None:
    # Small signals a manager might send, but far more than it would: cut off after the
    # bucket's worth, never parsed, while the loop stays free for everyone else.
    rate = 100
    limits = dataclasses.replace(bus.CAPSULE_MANAGER_LIMITS, max_skipped_per_s=rate)

    async def scenario() -> None:
        conn, peer = await connected(limits=limits)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.create_task(ticker())
        call = asyncio.create_task(conn.call(m.list_units()))
        await peer.next_call()
        peer.writer.write(_signal(0).serialise(10) * (50 * rate))
        with pytest.raises(errors.SystemdUnavailable, match="a second"):
            await call
        ticking.cancel()
        # The receiver yielded after each skipped signal: the ticker ran alongside it.
        assert ticks >= conn.conn.skipped >= rate
        assert conn.conn.skipped < 50 * rate
        await conn.close()

    run(scenario)
    assert all(p.member != "JobRemoved" for p in parsed)


def test_peer_signal_over_its_lower_cap_closes_the_link() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        emitter = DBusAddress(m.MANAGER_PATH, interface=m.MANAGER_IFACE)
        big = new_signal(emitter, "JobRemoved", "s", ("j" * bus.MAX_PEER_SIGNAL_BYTES,))
        call = asyncio.create_task(conn.call(m.list_units()))
        await peer.next_call()
        peer.send(big)
        with pytest.raises(errors.SystemdUnavailable, match="nobody asked for"):
            await call
        assert conn.closed
        await conn.close()

    run(scenario)


def test_header_fields_over_the_cap_are_refused_before_the_body() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(m.list_units()))
        await peer.next_call()
        # Little-endian method return: 8-byte body, header fields array claiming 1 MiB.
        fields_len = bus.CAPSULE_MANAGER_LIMITS.max_header_fields_bytes + 1
        peer.writer.write(b"l\x02\x01\x01" + struct.pack("<III", 8, 1, fields_len))
        with pytest.raises(errors.SystemdUnavailable, match=r"-byte header nobody asked for"):
            await call
        await conn.close()

    run(scenario)


def test_header_claiming_gigabytes_is_refused_at_once() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(m.list_units()))
        await peer.next_call()
        # Little-endian method return claiming a 1 GiB body; nothing else follows.
        peer.writer.write(b"l\x02\x01\x01" + struct.pack("<III", 1 << 30, 1, 0))
        with pytest.raises(errors.SystemdUnavailable, match="claims 1073741840 bytes"):
            await call
        await conn.close()

    run(scenario)


def test_garbage_closes_the_link() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(m.list_units()))
        await peer.next_call()
        peer.writer.write(b"X" * 64)
        with pytest.raises(errors.SystemdUnavailable):
            await call
        await conn.close()

    run(scenario)


def test_peer_hangup_fails_pending_calls() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(m.list_units()))
        await peer.next_call()
        peer.writer.close()
        with pytest.raises(errors.SystemdUnavailable, match="closed"):
            await call
        await conn.close()

    run(scenario)


def test_silent_peer_times_out_and_forgets_the_call() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        with pytest.raises(errors.BackendTimeout):
            await conn.call(m.list_units(), timeout_s=0.05)
        # A late reply to the abandoned serial is dropped (a real manager may answer late, so
        # it does not count as unsolicited); the link still works.
        late = peer.received[0] if peer.received else await peer.next_call()
        peer.send(new_method_return(late, "s", ("late",)))
        call = asyncio.create_task(conn.call(m.list_units()))
        msg = await peer.next_call()
        peer.send(new_method_return(msg, "s", ("fresh",)))
        assert await call == ("fresh",)
        await conn.close()

    run(scenario)


def _signal(i: int) -> Message:
    emitter = DBusAddress(m.MANAGER_PATH, interface=m.MANAGER_IFACE)
    return new_signal(emitter, "JobRemoved", "uoss", (i, f"/job/{i}", "a.service", "done"))


def test_signal_queue_is_bounded_and_reports_overflow() -> None:
    async def scenario() -> list[int]:
        conn, peer = await connected()
        got: list[int] = []
        with conn.signals(m.job_removed_rule(sender=None), maxsize=10) as queue:
            for i in range(50):
                peer.send(_signal(i), serial=i + 1)
            # A call after the signals: its reply proves they were all dispatched.
            call = asyncio.create_task(conn.call(m.list_units()))
            msg = await peer.next_call()
            peer.send(new_method_return(msg), serial=99)
            await call

            async def drain() -> None:
                while True:
                    got.append(int((await queue.get()).body[0]))

            with pytest.raises(errors.WatchOverflow):
                await drain()
        await conn.close()
        return got

    assert run(scenario) == list(range(10))


def test_signals_of_other_rules_and_method_calls_are_ignored() -> None:
    # On a link that skips what nobody asked for (the system bus's way; a manager's link is
    # closed instead, test_a_manager_link_is_closed_on_anything_a_manager_would_not_send).
    skipping = dataclasses.replace(bus.CAPSULE_MANAGER_LIMITS, close_on_unsolicited=False)

    async def scenario() -> None:
        conn, peer = await connected(limits=skipping)
        rule = m.job_removed_rule(sender=None)
        rule.add_arg_condition(2, "b.service")
        with conn.signals(rule, maxsize=4) as queue:
            peer.send(_signal(1), serial=1)  # a.service: not ours
            probe = DBusAddress("/x", bus_name="org.example", interface="org.example.I")
            peer.send(new_method_call(probe, "Poke"), serial=2)  # we export nothing
            call = asyncio.create_task(conn.call(m.list_units()))
            msg = await peer.next_call()
            peer.send(new_method_return(msg), serial=3)
            await call
            assert queue.get_nowait() is None
        await conn.close()

    run(scenario)


def test_closed_connection_fails_waiting_signal_consumers() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        with conn.signals(m.job_removed_rule(sender=None)) as queue:
            waiter = asyncio.create_task(queue.get())
            await asyncio.sleep(0)
            peer.writer.close()
            with pytest.raises(errors.SystemdUnavailable):
                await waiter
        await conn.close()

    run(scenario)


def test_a_job_whose_jobremoved_never_comes_is_found_gone_and_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fault proof: PID 1 re-executing sends a finishing job's JobRemoved before it owns its
    # bus name again, and the bus routes it nowhere. The wait asks after the job instead.
    monkeypatch.setattr(jobs, "JOB_RECHECK_S", 0.05)

    async def scenario() -> tuple[str, list[str | None]]:
        conn, peer = await connected()
        running = asyncio.create_task(
            jobs.run_job(conn, "a.service", m.start_unit("a.service"), timeout_s=5)
        )
        start = await peer.next_call()
        peer.send(new_method_return(start, "o", ("/org/freedesktop/systemd1/job/7",)))
        # No JobRemoved. The wait asks for the job's State: there is no such job any more...
        ask = await peer.next_call()
        peer.send(new_error(ask, "org.freedesktop.DBus.Error.UnknownObject", "s", ("gone",)))
        # ...so it reads the unit's state.
        state = await peer.next_call()
        peer.send(new_method_return(state, "v", (("s", "active"),)))
        result = await running
        await conn.close()
        return result, [msg.header.fields.get(HeaderFields.member) for msg in (start, ask, state)]

    result, asked = run(scenario)
    assert result == "done"
    assert asked == ["StartUnit", "Get", "Get"]
