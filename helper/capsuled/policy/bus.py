"""A small asyncio D-Bus client connection that can pass file descriptors (for polkit's pidfd).

jeepney 0.9's asyncio adapter cannot send Unix fds (only its blocking one can), and polkitd >= 124
identifies a unix-process subject by its pidfd. This is jeepney's adapter shape (its Parser,
Authenticator and message builders; one receive loop; replies matched by serial) over a non-blocking
socket with sendmsg/recvmsg and SCM_RIGHTS. The system bus is trusted (dbus-daemon caps messages),
so no extra size limit is needed here; the number of pending calls is capped by the caller.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import socket
from itertools import count
from typing import Final

from jeepney import HeaderFields, Message, MessageType, Parser
from jeepney.auth import BEGIN, AuthenticationError, Authenticator
from jeepney.bus import get_bus
from jeepney.bus_messages import message_bus
from jeepney.fds import FileDescriptor, fds_buf_size

AUTH_TIMEOUT_S: Final = 5.0
_MAX_AUTH_LINE_BYTES: Final = 1024


class BusClosed(ConnectionError):
    """The connection to the bus is gone; open a new one."""


class BusConnection:
    """One authenticated connection to a bus with fd passing; `call` sends and awaits the reply."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._parser = Parser()
        self._serials = count(start=1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._send_lock = asyncio.Lock()
        self._receiver: asyncio.Task[None] | None = None
        self.unique_name: str | None = None

    @classmethod
    async def open(cls, address: str = "SYSTEM") -> BusConnection:
        """Connect, authenticate (EXTERNAL + NEGOTIATE_UNIX_FD) and say Hello.

        Raises:
            OSError, AuthenticationError, TimeoutError: the bus is unreachable or refused us.
        """
        path = get_bus(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(AUTH_TIMEOUT_S):
                await loop.sock_connect(sock, path)
                auth = Authenticator(enable_fds=True)
                for line in auth:
                    await loop.sock_sendall(sock, line)
                    data = await loop.sock_recv(sock, _MAX_AUTH_LINE_BYTES)
                    if not data:
                        raise BusClosed("bus closed the connection during authentication")
                    auth.feed(data)
                if not auth.authenticated:
                    raise auth.error or AuthenticationError(b"", "authentication failed")
                await loop.sock_sendall(sock, BEGIN)
            conn = cls(sock)
        except BaseException:
            sock.close()
            raise
        conn._receiver = asyncio.create_task(conn._receive_loop(), name="capsuled-polkit-bus")
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_S):
                reply = await conn.call(message_bus.Hello())
        except BaseException:
            await conn.aclose()
            raise
        if reply.header.message_type is not MessageType.method_return:
            await conn.aclose()
            raise BusClosed(f"Hello failed: {reply.body!r}")
        conn.unique_name = str(reply.body[0])
        return conn

    @property
    def closed(self) -> bool:
        return self._receiver is None or self._receiver.done()

    async def call(self, message: Message) -> Message:
        """Send a method call and return its reply (a method return or an error message).

        Raises:
            BusClosed: the connection broke before the reply came.
        """
        if self.closed and self._receiver is not None:
            raise BusClosed("connection to the bus is closed")
        serial = next(self._serials)
        future: asyncio.Future[Message] = self._loop.create_future()
        self._pending[serial] = future
        try:
            await self._send(message, serial)
            return await future
        finally:
            # Also on cancellation: a late reply then finds no future and is dropped.
            self._pending.pop(serial, None)

    async def send(self, message: Message) -> None:
        """Send a message without waiting for any reply."""
        await self._send(message, next(self._serials))

    async def _send(self, message: Message, serial: int) -> None:
        fds = array.array("i")
        data = message.serialise(serial=serial, fds=fds)
        async with self._send_lock:
            sent = 0
            while True:
                try:
                    if fds:
                        # The fds travel with the first byte(s); the kernel keeps them attached.
                        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                        sent = self._sock.sendmsg([data], ancillary)
                    else:
                        sent = self._sock.send(data)
                    break
                except BlockingIOError:
                    await self._wait(writable=True)
            if sent < len(data):
                await self._loop.sock_sendall(self._sock, data[sent:])

    async def _wait(self, *, writable: bool) -> None:
        fd = self._sock.fileno()
        ready: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if writable:
            self._loop.add_writer(fd, wake)
        else:
            self._loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            if writable:
                self._loop.remove_writer(fd)
            else:
                self._loop.remove_reader(fd)

    async def _receive_loop(self) -> None:
        error: BaseException = BusClosed("bus connection closed")
        try:
            while True:
                message = self._parser.get_next_message()
                if message is not None:
                    self._dispatch(message)
                    continue
                await self._wait(writable=False)
                try:
                    data, ancdata, flags, _ = self._sock.recvmsg(
                        max(self._parser.bytes_desired(), 1), fds_buf_size()
                    )
                except BlockingIOError:
                    continue
                fds = FileDescriptor.from_ancdata(ancdata)
                if flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        fd.close()
                    error = BusClosed("file descriptors were truncated")
                    return
                if not data:
                    return
                self._parser.add_data(data, fds=fds)
        except OSError as exc:
            error = BusClosed(f"bus connection failed: {exc}")
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()

    def _dispatch(self, message: Message) -> None:
        # polkitd never sends us fds; close any that arrive instead of leaking them.
        for item in message.body:
            if isinstance(item, FileDescriptor):
                item.close()
        if message.header.message_type not in (MessageType.method_return, MessageType.error):
            return  # signals: we subscribe to none
        serial = message.header.fields.get(HeaderFields.reply_serial)
        future = self._pending.get(serial) if isinstance(serial, int) else None
        if future is not None and not future.done():
            future.set_result(message)

    async def aclose(self) -> None:
        """Close the socket; pending calls fail with BusClosed."""
        if self._receiver is not None and not self._receiver.done():
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        self._sock.close()
