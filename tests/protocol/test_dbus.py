"""capsuled.dbus against a raw D-Bus peer on a socketpair: file descriptors both ways, the
header filter, writes that survive cancellation, and the shared system bus connection.

The peer runs its blocking socket calls in worker threads (asyncio.to_thread), so it can speak
SCM_RIGHTS, which asyncio streams cannot. (Limits and error translation on a capsule manager's
link: tests/protocol/test_systemd_bus.py.)
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import struct
import tempfile
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from jeepney import (
    DBusAddress,
    HeaderFields,
    MatchRule,
    Message,
    Parser,
    new_method_call,
    new_method_return,
    new_signal,
)
from jeepney.fds import FileDescriptor

from capsuled import dbus
from capsuled.peer import Peer
from capsuled.policy import actions
from capsuled.policy.engine import Decision, Identity, Request
from capsuled.policy.polkit import PolkitBackend
from fds import open_fds
from protocol.harness import Parsed

T = TypeVar("T")
TIMEOUT_S = 5.0
LIMITS = dbus.BusLimits(max_message_bytes=1 << 20, max_signal_bytes=1 << 20)
TARGET = DBusAddress("/org/example/Target", bus_name="org.example", interface="org.example.I")


class RawPeer:
    """The far end: a blocking socket driven from worker threads; knows SCM_RIGHTS."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT_S)  # a test that goes wrong fails instead of hanging
        self.sock = sock
        self.parser = Parser()

    async def handshake(self, answer: bytes = b"OK 0123456789abcdef\r\nAGREE_UNIX_FD\r\n") -> bytes:
        got = b""
        while not got.endswith(b"BEGIN\r\n"):
            got += await asyncio.to_thread(self.sock.recv, 4096)
        await asyncio.to_thread(self.sock.sendall, answer)
        return got

    async def next_message(self) -> Message:
        while True:
            msg = self.parser.get_next_message()
            if msg is not None:
                return msg
            data, anc, _flags, _ = await asyncio.to_thread(
                self.sock.recvmsg, 65536, socket.CMSG_SPACE(64 * 4)
            )
            if not data:
                raise EOFError
            self.parser.add_data(data, fds=FileDescriptor.from_ancdata(anc))

    async def send(self, msg: Message, serial: int = 1000) -> None:
        fds = array.array("i")
        data = msg.serialise(serial, fds=fds)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if fds else []
        sent = await asyncio.to_thread(self.sock.sendmsg, [data], rights)
        await asyncio.to_thread(self.sock.sendall, data[sent:])


async def connected(
    answer: bytes = b"OK 0123456789abcdef\r\nAGREE_UNIX_FD\r\n", limits: dbus.BusLimits = LIMITS
) -> tuple[dbus.DBusConnection, RawPeer]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = RawPeer(theirs)
    shaking = asyncio.create_task(peer.handshake(answer))
    conn = await dbus.open_peer(ours, limits, uid=0)
    await shaking
    return conn, peer


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        async with asyncio.timeout(TIMEOUT_S * 2):
            return await scenario()

    return asyncio.run(main())


def inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


# -- file descriptors out -------------------------------------------------------------------


def test_an_fd_travels_out_and_the_caller_may_close_its_own_at_once() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        assert conn.unix_fds
        with tempfile.TemporaryFile() as f:
            before = open_fds()
            fd = os.dup(f.fileno())
            call = asyncio.create_task(conn.call(new_method_call(TARGET, "Take", "h", (fd,))))
            await asyncio.sleep(0)  # the call is queued (and written): its fd is ours to drop
            os.close(fd)
            msg = await peer.next_message()
            (received,) = msg.body
            assert inode(received.fileno()) == inode(f.fileno())  # the same open file
            received.close()
            await peer.send(new_method_return(msg))
            assert await call == ()
            # Our duplicate went with the message: nothing of it is left open.
            assert open_fds() == before
        await conn.close()

    run(scenario)


def test_a_peer_that_refuses_fds_still_talks_but_takes_none() -> None:
    async def scenario() -> None:
        conn, peer = await connected(b"OK 0123456789abcdef\r\nERROR\r\n")
        assert not conn.unix_fds
        with pytest.raises(ValueError, match="did not agree"):
            await conn.call(new_method_call(TARGET, "Take", "h", (0,)))
        call = asyncio.create_task(conn.call(new_method_call(TARGET, "Ping")))
        await peer.send(new_method_return(await peer.next_message(), "s", ("pong",)))
        assert await call == ("pong",)
        await conn.close()

    run(scenario)


def test_a_write_the_socket_cannot_take_at_once_survives_its_callers_cancellation() -> None:
    # Half a message on the wire would corrupt every message after it: once queued, a message
    # is written whole even if the caller that sent it gives up.
    async def scenario() -> None:
        conn, peer = await connected()
        big = "x" * (4 << 20)  # far beyond a socketpair's buffer
        first = asyncio.create_task(conn.call(new_method_call(TARGET, "Big", "s", (big,))))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(conn.call(new_method_call(TARGET, "Ping")))
        got = await peer.next_message()
        assert got.header.fields[HeaderFields.member] == "Big"
        assert got.body == (big,)
        ping = await peer.next_message()
        assert ping.header.fields[HeaderFields.member] == "Ping"
        await peer.send(new_method_return(ping))
        assert await second == ()
        await conn.close()

    run(scenario)


# -- file descriptors in --------------------------------------------------------------------


async def _reply_with_pipe(call: Message, peer: RawPeer) -> int:
    """Answer ``call`` with the read end of a new pipe; return its write end."""
    r, w = os.pipe()
    await peer.send(new_method_return(call, "h", (r,)))
    os.close(r)
    return w


def test_an_fd_in_a_reply_is_handed_to_a_caller_that_asked() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(new_method_call(TARGET, "Open"), accept_fds=True))
        w = await _reply_with_pipe(await peer.next_message(), peer)
        (received,) = await call
        assert isinstance(received, FileDescriptor)
        os.write(w, b"through")
        os.close(w)
        with received.to_file("rb") as f:
            assert f.read() == b"through"
        await conn.close()

    run(scenario)


def test_an_fd_nobody_asked_for_is_closed_on_arrival() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        before = open_fds()
        call = asyncio.create_task(conn.call(new_method_call(TARGET, "Open")))
        w = await _reply_with_pipe(await peer.next_message(), peer)
        (received,) = await call
        assert isinstance(received, FileDescriptor)
        with pytest.raises(RuntimeError, match="closed"):
            received.fileno()
        assert open_fds() == before | {w}
        # The pipe's read end is gone everywhere: writing to it now fails.
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
        os.close(w)
        await conn.close()

    run(scenario)


def test_fds_with_signals_and_dropped_messages_are_closed() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        before = open_fds()
        emitter = DBusAddress("/org/example/Target", interface="org.example.I")
        rule = MatchRule(type="signal", interface="org.example.I", member="Wanted")
        with conn.signals(rule) as queue, tempfile.TemporaryFile() as f:
            await peer.send(new_signal(emitter, "Wanted", "h", (f.fileno(),)), serial=1)
            await peer.send(new_signal(emitter, "Unwanted", "h", (f.fileno(),)), serial=2)
            stray = new_method_return(new_method_call(TARGET, "X"), "h", (f.fileno(),))
            stray.header.fields[HeaderFields.reply_serial] = 4242  # nobody waits for it
            await peer.send(stray, serial=3)
            call = asyncio.create_task(conn.call(new_method_call(TARGET, "Ping")))
            await peer.send(new_method_return(await peer.next_message()), serial=4)
            await call  # everything before the reply has been read
            wanted = queue.get_nowait()
            assert wanted is not None
            assert wanted.header.fields[HeaderFields.member] == "Wanted"
            assert queue.get_nowait() is None
            assert open_fds() == before | {f.fileno()}
        await conn.close()

    run(scenario)


def test_more_fds_than_the_limit_close_the_link() -> None:
    async def scenario() -> None:
        limits = dbus.BusLimits(max_message_bytes=1 << 20, max_signal_bytes=1 << 20, max_unix_fds=2)
        conn, peer = await connected(limits=limits)
        before = open_fds()
        call = asyncio.create_task(conn.call(new_method_call(TARGET, "Open"), accept_fds=True))
        msg = await peer.next_message()
        with tempfile.TemporaryFile() as f:
            fd = f.fileno()
            # We may hang up before the peer has written it all.
            with contextlib.suppress(BrokenPipeError):
                await peer.send(new_method_return(msg, "hhh", (fd, fd, fd)))
            with pytest.raises(dbus.BusClosed, match="file descriptors"):
                await call
            assert conn.closed
            assert open_fds() - before <= {fd}  # nothing of what arrived is kept
        await conn.close()

    run(scenario)


# -- the header filter ----------------------------------------------------------------------


def test_signals_are_filtered_on_their_header_before_any_body_is_parsed(
    parsed: list[Parsed],
) -> None:
    def signal(path: str, interface: str, member: str, sender: str) -> Message:
        msg = new_signal(DBusAddress(path, interface=interface), member, "s", ("z" * 65536,))
        msg.header.fields[HeaderFields.sender] = sender
        return msg

    async def scenario() -> None:
        conn, peer = await connected()
        rule = MatchRule(
            type="signal", sender=":1.7", path="/a", interface="org.example.I", member="Right"
        )
        with conn.signals(rule) as queue:
            wrong = [
                signal("/a", "org.example.I", "Right", ":1.666"),  # a forger
                signal("/b", "org.example.I", "Right", ":1.7"),
                signal("/a", "org.example.Other", "Right", ":1.7"),
                signal("/a", "org.example.I", "Wrong", ":1.7"),
            ]
            for i, msg in enumerate([*wrong, signal("/a", "org.example.I", "Right", ":1.7")]):
                await peer.send(msg, serial=i + 1)
            got = await queue.get()
            assert got.header.fields[HeaderFields.sender] == ":1.7"
        await conn.close()

    run(scenario)
    # Only the signal the rule wants had its body parsed (the peer parses nothing here: we send
    # it nothing after the handshake).
    assert [p.member for p in parsed] == ["Right"]


# -- what nobody asked for, on a bus (finding 4) -----------------------------------------------


def _from(msg: Message, sender: str) -> Message:
    msg.header.fields[HeaderFields.sender] = sender
    return msg


def test_an_oversized_signal_from_anyone_is_skipped_without_closing_or_buffering(
    parsed: list[Parsed],
) -> None:
    # On the shared system bus any client may send a unicast signal to our unique name. One
    # over our cap used to close the connection (failing PID 1's and polkit's calls in flight)
    # after it had been buffered whole; now it is read past in chunks and the link lives on.
    async def scenario() -> None:
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(new_method_call(TARGET, "Ping")))
        msg = await peer.next_message()
        spam = DBusAddress("/x", interface="org.example.Spam")
        big = _from(new_signal(spam, "Spam", "s", ("z" * (3 << 20),)), ":1.666").serialise(5)
        wire = big + new_method_return(msg, "s", ("still here",)).serialise(6)
        del big
        tracemalloc.start()
        try:
            await asyncio.to_thread(peer.sock.sendall, wire)
            assert await call == ("still here",)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, peak  # the 3 MiB were never held at once
        assert not conn.closed
        assert conn.skipped == 1
        await conn.close()

    run(scenario)
    assert all(p.member != "Spam" for p in parsed)


def test_method_calls_and_huge_headers_are_skipped_on_a_bus() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        # A method call to us (dbus-daemon lets only root send one): we export nothing.
        await peer.send(_from(new_method_call(TARGET, "Poke"), ":1.9"), serial=7)
        # A signal whose header fields array is over our cap: never parsed.
        fields = LIMITS.max_header_fields_bytes + 8
        huge = b"l\x04\x01\x01" + struct.pack("<III", 8, 8, fields) + b"\0" * (fields + 8)
        await asyncio.to_thread(peer.sock.sendall, huge)
        call = asyncio.create_task(conn.call(new_method_call(TARGET, "Ping")))
        await peer.send(new_method_return(await peer.next_message(), "s", ("ok",)), serial=9)
        assert await call == ("ok",)
        assert conn.skipped == 2
        assert not conn.closed
        await conn.close()

    run(scenario)


def test_a_reply_over_the_cap_fails_its_call_only() -> None:
    async def scenario() -> None:
        conn, peer = await connected()
        call = asyncio.create_task(conn.call(new_method_call(TARGET, "Big")))
        big = new_method_return(await peer.next_message(), "s", ("z" * (2 << 20),))
        await peer.send(big, serial=5)
        with pytest.raises(dbus.ReplyTooLarge):
            await call
        call = asyncio.create_task(conn.call(new_method_call(TARGET, "Small")))
        await peer.send(new_method_return(await peer.next_message(), "s", ("ok",)), serial=6)
        assert await call == ("ok",)
        await conn.close()

    run(scenario)


def test_a_well_known_sender_is_the_bus_daemons_to_check(parsed: list[Parsed]) -> None:
    # PID 1 re-executing gets a new unique name; its broadcasts (routed to us by the daemon
    # under an AddMatch naming org.freedesktop.systemd1) must still match. A unicast signal
    # reaches us whatever our match rules say, so it never passes for PID 1's.
    def job_removed(sender: str, destination: str | None) -> Message:
        emitter = DBusAddress(
            "/org/freedesktop/systemd1", interface="org.freedesktop.systemd1.Manager"
        )
        msg = _from(new_signal(emitter, "JobRemoved", "s", ("z" * 4096,)), sender)
        if destination is not None:
            msg.header.fields[HeaderFields.destination] = destination
        return msg

    async def scenario() -> list[str]:
        conn, peer = await connected()
        rule = MatchRule(
            type="signal",
            sender="org.freedesktop.systemd1",
            interface="org.freedesktop.systemd1.Manager",
            member="JobRemoved",
        )
        senders = []
        with conn.signals(rule) as queue:
            for serial, (sender, dest) in enumerate(
                [(":1.0", None), (":1.666", ":1.42"), (":1.3", None)], start=1
            ):
                await peer.send(job_removed(sender, dest), serial=serial)
            for _ in range(2):
                senders.append((await queue.get()).header.fields[HeaderFields.sender])
        assert conn.skipped == 1
        await conn.close()
        return senders

    assert run(scenario) == [":1.0", ":1.3"]  # before and after the re-exec; not the forger
    assert len(parsed) == 2


def test_a_handler_sees_signals_in_order_and_is_told_of_one_skipped_unread() -> None:
    # The model applies PID 1's signals where they arrive; one over the cap cannot be applied,
    # so its handler's on_lost says so (the model then looks again), and nothing else changes.
    emitter = DBusAddress("/org/freedesktop/systemd1", interface="org.freedesktop.systemd1.Manager")

    def unit_new(text: str) -> Message:
        return _from(new_signal(emitter, "UnitNew", "s", (text,)), ":1.0")

    async def scenario() -> list[object]:
        conn, peer = await connected()
        rule = MatchRule(
            type="signal", sender="org.freedesktop.systemd1", interface=emitter.interface
        )
        seen: list[object] = []
        with conn.handle_signals(
            rule, lambda msg: seen.append(msg.body[0]), on_lost=lambda: seen.append("lost")
        ):
            for serial, text in enumerate(("a", "z" * (2 << 20), "b"), start=1):
                await peer.send(unit_new(text), serial=serial)
            call = asyncio.create_task(conn.call(new_method_call(TARGET, "Ping")))
            await peer.send(new_method_return(await peer.next_message(), "s", ("ok",)), serial=9)
            assert await call == ("ok",)
        assert not conn.closed
        await conn.close()
        return seen

    assert run(scenario) == ["a", "lost", "b"]


def test_a_handler_with_a_path_prefix_never_parses_other_paths(parsed: list[Parsed]) -> None:
    # PID 1 sends every unit's PropertiesChanged under one path namespace; the model wants only
    # the capsules'. The others are skipped on their header (never parsed, never handed over),
    # and one over the cap outside the prefix is not the model's loss (no on_lost).
    def changed(path: str, text: str) -> Message:
        address = DBusAddress(path, interface="org.freedesktop.DBus.Properties")
        return _from(new_signal(address, "PropertiesChanged", "s", (text,)), ":1.0")

    async def scenario() -> list[object]:
        conn, peer = await connected()
        rule = MatchRule(type="signal", sender=":1.0", path_namespace="/u")
        seen: list[object] = []
        with conn.handle_signals(
            rule,
            lambda msg: seen.append(msg.body[0]),
            on_lost=lambda: seen.append("lost"),
            path_prefix="/u/capsule_40",
        ):
            for serial, (path, text) in enumerate(
                [
                    ("/u/capsule_40a", "a"),
                    ("/u/var_2dlib_2emount", "mount"),
                    ("/u/user_40", "z" * (2 << 20)),
                    ("/u/capsule_40b", "b"),
                ],
                start=1,
            ):
                await peer.send(changed(path, text), serial=serial)
            call = asyncio.create_task(conn.call(new_method_call(TARGET, "Ping")))
            await peer.send(new_method_return(await peer.next_message(), "s", ("ok",)), serial=9)
            assert await call == ("ok",)
        assert not conn.closed
        await conn.close()
        return seen

    assert run(scenario) == ["a", "b"]
    # The two capsules' signals, the peer's read of our Ping, and its reply: neither the
    # mount's signal nor the large one.
    assert [p.member for p in parsed] == ["PropertiesChanged", "PropertiesChanged", "Ping", None]


def test_header_matches_follows_match_rule_semantics() -> None:
    base = new_signal(DBusAddress("/org/x/unit/a", interface="i.x"), "M")
    base.header.fields[HeaderFields.sender] = ":1.2"
    for rule, expected in [
        (MatchRule(type="signal", path_namespace="/org/x"), True),
        (MatchRule(type="signal", path_namespace="/org/x/unit/a"), True),
        (MatchRule(type="signal", path_namespace="/org/xy"), False),
        (MatchRule(type="method_call"), False),
        (MatchRule(sender=":1.2", member="M"), True),
        (MatchRule(sender=":1.3"), False),
    ]:
        assert dbus.header_matches(rule, base.header) is expected, rule.serialise()
        assert rule.matches(base) is expected  # the same answer as jeepney's full check


# -- the shared system bus ------------------------------------------------------------------


def test_the_system_bus_is_one_connection_reopened_once_lost(tmp_path: Path) -> None:
    async def scenario() -> None:
        address = str(tmp_path / "bus")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen(4)
        server.settimeout(TIMEOUT_S)

        async def serve_hello(name: str) -> RawPeer:
            raw, _ = await asyncio.to_thread(server.accept)
            peer = RawPeer(raw)
            await peer.handshake()
            await peer.send(new_method_return(await peer.next_message(), "s", (name,)))
            return peer

        bus = dbus.SystemBus(address, LIMITS)
        opening = asyncio.create_task(bus.connection())
        first_peer = await serve_hello(":1.1")
        first = await opening
        assert first.unique_name == ":1.1"
        assert await bus.connection() is first  # shared while it lives
        first_peer.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(dbus.BusClosed):  # the receiver notices the hang-up
            await first.call(new_method_call(TARGET, "Ping"))
        assert first.closed
        opening = asyncio.create_task(bus.connection())
        await serve_hello(":1.2")
        second = await opening
        assert second is not first
        assert second.unique_name == ":1.2"
        await bus.close()
        assert second.closed
        server.close()

    run(scenario)


# -- polkit on the shared connection ----------------------------------------------------------


async def _fake_bus(tmp_path: Path) -> tuple[dbus.SystemBus, asyncio.Task[RawPeer]]:
    """A SystemBus whose bus daemon is a RawPeer that has answered Hello."""
    address = str(tmp_path / "system_bus_socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(1)
    server.settimeout(TIMEOUT_S)

    async def serve() -> RawPeer:
        raw, _ = await asyncio.to_thread(server.accept)
        server.close()
        peer = RawPeer(raw)
        await peer.handshake()
        await peer.send(new_method_return(await peer.next_message(), "s", (":1.9",)))
        return peer

    return dbus.SystemBus(address, LIMITS), asyncio.create_task(serve())


def _me(pidfd: int) -> Peer:
    return Peer(uid=1000, gid=1000, pid=os.getpid(), pidfd=pidfd, start_time=1)


READ = Request(actions.READ, "web", None)
NOBODY_IN_PARTICULAR = Identity(1000, "alice", frozenset())


def test_polkit_gets_the_pidfd_over_the_filtered_connection(
    tmp_path: Path, parsed: list[Parsed]
) -> None:
    # polkit's own connection used to parse every message whole, whatever its size or
    # whoever it was for; on the shared one, unsolicited bodies are never parsed.
    async def scenario() -> tuple[Decision, int]:
        bus, serving = await _fake_bus(tmp_path)
        backend = PolkitBackend(bus.connection)
        pidfd = os.pidfd_open(os.getpid())
        try:
            check = asyncio.create_task(backend.check(_me(pidfd), NOBODY_IN_PARTICULAR, READ))
            peer = await serving
            call = await peer.next_message()
            ((_, subject), *_rest) = call.body
            sent = subject["pidfd"][1]
            with open(f"/proc/self/fdinfo/{sent.fileno()}") as info:
                pid = int(next(line for line in info if line.startswith("Pid:")).split()[1])
            sent.close()
            junk = "z" * (256 * 1024)
            stray = new_method_return(call, "s", (junk,))
            stray.header.fields[HeaderFields.reply_serial] = 4242  # nobody waits for it
            await peer.send(stray, serial=1)
            emitter = DBusAddress("/org/freedesktop/PolicyKit1/Authority", interface="x.y")
            await peer.send(new_signal(emitter, "Changed", "s", (junk,)), serial=2)
            await peer.send(new_method_return(call, "(bba{ss})", ((True, False, {}),)), serial=3)
            decision = await check
        finally:
            os.close(pidfd)
            await backend.aclose()
            await bus.close()
        return decision, pid

    decision, pid = run(scenario)
    assert decision is Decision.YES
    assert pid == os.getpid()  # the pidfd travelled as an fd of this very process
    assert parsed  # our Hello, the check and the answers were parsed...
    assert max(p.size for p in parsed) < 64 * 1024  # ...but neither 256 KiB body unasked


def test_a_polkit_answer_over_the_cap_closes_the_link_and_refuses_at_once(
    tmp_path: Path,
) -> None:
    async def scenario() -> Decision:
        bus, serving = await _fake_bus(tmp_path)
        backend = PolkitBackend(bus.connection)
        pidfd = os.pidfd_open(os.getpid())
        try:
            check = asyncio.create_task(backend.check(_me(pidfd), NOBODY_IN_PARTICULAR, READ))
            peer = await serving
            await peer.next_message()
            # A little-endian method return claiming a 1 GiB body, and nothing after it: a
            # parser without a cap would wait for the gigabyte (polkit's check timeout: 25 s).
            await asyncio.to_thread(
                peer.sock.sendall, b"l\x02\x01\x01" + struct.pack("<III", 1 << 30, 1, 0)
            )
            return await check
        finally:
            os.close(pidfd)
            await backend.aclose()
            await bus.close()

    assert run(scenario) is Decision.NO
