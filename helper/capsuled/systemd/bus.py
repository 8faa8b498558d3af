"""asyncio D-Bus adapter over jeepney: the only place in capsuled that awaits a D-Bus reply.

One ``BusConnection`` is one socket with one receiver task. Replies are matched by serial;
signals go to bounded ``SignalQueue``s registered with a jeepney ``MatchRule``. In-flight calls
per connection are capped by one semaphore: dbus-daemon refuses more than ~128 pending replies
per connection (max_replies_per_connection), and a capsule's manager is no reason to queue more.

Two ways to open one:
- ``open_system_bus()``: the system bus; AUTH EXTERNAL, then ``Hello``.
- ``open_peer(sock)``: a peer-to-peer link such as a capsule manager's ``systemd/private``
  socket. There is no bus daemon: no ``Hello`` (it would fail with "Unknown object
  '/org/freedesktop/DBus'"), and the destination field is ignored. As root we authenticate as
  uid 0; claiming the capsule's uid from a root process gets the connection reset (verified on
  systemd 257).

jeepney's own parser trusts its bus. Ours may face a peer we do not trust (a process in the
capsule can replace the manager's socket), so the message size is capped here, before buffering
(the lesson of h11), and a malformed message closes the link instead of crashing the daemon.

The cap is per connection, because the two kinds of peer are trusted differently. jeepney
parses a message synchronously in the event loop at roughly 0.37 s of CPU per MiB (measured on
systemd 257's testbed host): a 32 MiB message from a hostile "manager" stalled the whole daemon
for ~12 s. A process inside a capsule runs as the capsule's uid, so it can bind its own socket
at ``/run/capsules/NAME/systemd/private`` and pass the ownership pinning; its messages are
therefore capped at ``MAX_PEER_MESSAGE_BYTES`` (1 MiB, a stall of well under half a second).
The system bus carries PID 1, which we trust, and keeps ``MAX_SYSTEM_BUS_MESSAGE_BYTES``.

Within the cap, only the header (bounded by ``MAX_HEADER_FIELDS_BYTES``) is parsed before we
know somebody wants the message: a reply to a serial we are not waiting for, or a method call
to us, is dropped unparsed, and signals on a peer link are capped lower
(``MAX_PEER_SIGNAL_BYTES``), so what a hostile peer can send unasked costs little CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Final

from jeepney import (
    Header,
    HeaderFields,
    MatchRule,
    Message,
    MessageType,
)
from jeepney.low_level import calc_msg_size

from . import messages
from .errors import (
    BackendError,
    BackendTimeout,
    SystemdUnavailable,
    WatchOverflow,
    error_from_dbus,
)

SYSTEM_BUS_ADDRESS: Final = "/run/dbus/system_bus_socket"
MAX_IN_FLIGHT_CALLS: Final = 64
# The D-Bus spec's maximum message is 128 MiB; nothing we ask for comes near. ListUnits on a
# large host is a few MiB; only trusted senders (PID 1, the bus daemon) reach us on this link,
# so the cap only guards against a runaway, not an attacker.
MAX_SYSTEM_BUS_MESSAGE_BYTES: Final = 32 * 1024 * 1024
# A capsule's manager link: the peer may be any process in the capsule (see the module
# docstring). 1 MiB is ample: a user manager's ListUnits is tens of KiB (~200 bytes per unit;
# a capsule would need ~5000 loaded units to come near), ListUnitFiles is smaller, and the
# signals we consume (JobRemoved, PropertiesChanged) are a few KiB.
MAX_PEER_MESSAGE_BYTES: Final = 1024 * 1024
# Signals nobody asked for arrive unprompted, so they get a lower cap on a peer link: a
# PropertiesChanged of a unit or a JobRemoved is a few KiB.
MAX_PEER_SIGNAL_BYTES: Final = 128 * 1024
# The header fields array (path, interface, member, error name, destination, sender, signature,
# reply serial) is a few hundred bytes in practice; jeepney parses it in Python too.
MAX_HEADER_FIELDS_BYTES: Final = 64 * 1024
# sd-bus's default method call timeout (BUS_DEFAULT_TIMEOUT) is 25 s.
CALL_TIMEOUT_S: Final = 25.0
AUTH_TIMEOUT_S: Final = 5.0
MAX_AUTH_LINE_BYTES: Final = 1024
STREAM_LIMIT_BYTES: Final = 64 * 1024
DEFAULT_SIGNAL_QUEUE: Final = 256

# What a peer may send that jeepney's decoder chokes on: treat as a broken link.
_DECODE_ERRORS = (ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError, TypeError)


class SignalQueue:
    """A bounded queue of signals matching one rule.

    Never blocks the receiver: when full, it records the overflow and drops the signal; the
    consumer then gets ``overflow_error`` from ``get()`` (after the signals already queued).
    """

    def __init__(self, rule: MatchRule, maxsize: int, overflow_error: BackendError) -> None:
        self.rule = rule
        self._items: deque[Message] = deque()
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._error: BackendError | None = None
        self._overflow_error = overflow_error

    def _push(self, msg: Message) -> None:
        if self._error is not None:
            return
        if len(self._items) >= self._maxsize:
            self._error = self._overflow_error
        else:
            self._items.append(msg)
        self._wakeup.set()

    def _fail(self, error: BackendError) -> None:
        if self._error is None:
            self._error = error
        self._wakeup.set()

    def get_nowait(self) -> Message | None:
        """The next queued signal, or None; raises the queue's error once drained."""
        if self._items:
            return self._items.popleft()
        if self._error is not None:
            raise self._error
        return None

    async def get(self) -> Message:
        """Wait for the next signal. Raises WatchOverflow-like or SystemdUnavailable errors."""
        while True:
            msg = self.get_nowait()
            if msg is not None:
                return msg
            self._wakeup.clear()
            await self._wakeup.wait()


class BusConnection:
    """One authenticated D-Bus connection with a receiver task."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_message_bytes: int,
        call_timeout_s: float = CALL_TIMEOUT_S,
        max_signal_bytes: int | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max_message_bytes = max_message_bytes
        self._max_signal_bytes = max_message_bytes if max_signal_bytes is None else max_signal_bytes
        self.call_timeout_s = call_timeout_s
        self._serials = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._queues: set[SignalQueue] = set()
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT_CALLS)
        self._closed_error: BackendError | None = None
        self.unique_name: str | None = None
        # Unique bus name whose signals we believe (set by the owner of the connection after
        # GetNameOwner); None on a peer-to-peer link, where only the peer can send.
        self.signal_sender: str | None = None
        self._receiver = asyncio.get_running_loop().create_task(self._receive_loop())

    # -- life cycle ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the link is gone; every later call raises SystemdUnavailable."""
        return self._closed_error is not None

    async def close(self) -> None:
        """Close the socket and fail everything still waiting on it."""
        self._shut(SystemdUnavailable("D-Bus connection closed"))
        self._receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._receiver
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    def _shut(self, error: BackendError) -> None:
        if self._closed_error is None:
            self._closed_error = error
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self._closed_error)
        for queue in self._queues:
            queue._fail(self._closed_error)

    # -- calls -----------------------------------------------------------------------------

    async def call(
        self, msg: Message, *, unit: str = "", timeout_s: float | None = None
    ) -> tuple[object, ...]:
        """Send a method call and return the reply body.

        Raises:
            BackendError subclasses: D-Bus error replies via errors.error_from_dbus (``unit``
            names the unit in NoSuchUnit/UnitBusy), BackendTimeout, SystemdUnavailable.
        """
        reply = await self.call_raw(msg, timeout_s=timeout_s)
        body = reply.body
        if reply.header.message_type is MessageType.error:
            name = reply.header.fields.get(HeaderFields.error_name, "")
            text = body[0] if body and isinstance(body[0], str) else ""
            raise error_from_dbus(str(name), text, unit)
        if not isinstance(body, tuple):
            body = tuple(body)
        return body

    async def call_raw(self, msg: Message, *, timeout_s: float | None = None) -> Message:
        """Send a method call and return the reply message (method return or error)."""
        async with self._in_flight:
            if self._closed_error is not None:
                raise self._closed_error
            serial = next(self._serials)
            fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            self._pending[serial] = fut
            try:
                self._writer.write(msg.serialise(serial))
                try:
                    async with asyncio.timeout(timeout_s or self.call_timeout_s):
                        await self._writer.drain()
                        return await fut
                except TimeoutError as exc:
                    raise BackendTimeout(
                        f"no reply to {msg.header.fields.get(HeaderFields.member)}"
                    ) from exc
                except (ConnectionError, OSError) as exc:
                    self._shut(SystemdUnavailable(f"D-Bus connection lost: {exc}"))
                    raise SystemdUnavailable(f"D-Bus connection lost: {exc}") from exc
            finally:
                self._pending.pop(serial, None)

    # -- signals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def signals(
        self,
        rule: MatchRule,
        maxsize: int = DEFAULT_SIGNAL_QUEUE,
        overflow_error: BackendError | None = None,
    ) -> Iterator[SignalQueue]:
        """Collect signals matching ``rule`` locally while the block runs.

        This only filters what reaches us; on a bus, the matching AddMatch must be in place
        (``add_match``) for the daemon to route the signal here at all. Register the queue
        *before* making the call whose signals you wait for.
        """
        queue = SignalQueue(rule, maxsize, overflow_error or WatchOverflow("signal queue full"))
        if self._closed_error is not None:
            queue._fail(self._closed_error)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    async def add_match(self, rule: MatchRule) -> None:
        """Ask the bus daemon to route matching signals to us (bus connections only)."""
        await self.call(messages.add_match(rule))

    async def remove_match(self, rule: MatchRule) -> None:
        """Undo add_match."""
        await self.call(messages.remove_match(rule))

    @contextlib.asynccontextmanager
    async def match(self, rule: MatchRule) -> AsyncIterator[None]:
        """AddMatch for the duration of the block."""
        await self.add_match(rule)
        try:
            yield
        finally:
            if not self.closed:
                with contextlib.suppress(BackendError):
                    await self.remove_match(rule)

    # -- receiver --------------------------------------------------------------------------

    async def _read_message(self) -> Message | None:
        """The next message, or None for one nobody wants (dropped with its body unparsed)."""
        fixed = await self._reader.readexactly(16)
        try:
            size = calc_msg_size(fixed)
            # Bytes 12..16: the header fields array's length, in the message's byte order.
            (fields_len,) = struct.unpack("<I" if fixed[:1] == b"l" else ">I", fixed[12:16])
        except _DECODE_ERRORS as exc:
            raise SystemdUnavailable(f"malformed D-Bus header: {exc}") from exc
        if not 16 <= size <= self._max_message_bytes:
            raise SystemdUnavailable(f"D-Bus message of {size} bytes exceeds our cap")
        if fields_len > MAX_HEADER_FIELDS_BYTES:
            raise SystemdUnavailable(f"D-Bus header of {fields_len} bytes exceeds our cap")
        buf = fixed + await self._reader.readexactly(size - 16)
        try:
            header, _pos = Header.from_buffer(buf)
            if not self._wanted(header, size):
                return None
            return Message.from_buffer(buf)
        except _DECODE_ERRORS as exc:
            raise SystemdUnavailable(f"malformed D-Bus message: {exc}") from exc

    def _wanted(self, header: Header, size: int) -> bool:
        """Whether a message with this header is worth parsing its body (see module doc)."""
        kind = header.message_type
        if kind in (MessageType.method_return, MessageType.error):
            serial = header.fields.get(HeaderFields.reply_serial)
            fut = self._pending.get(serial) if isinstance(serial, int) else None
            return fut is not None and not fut.done()
        if kind is MessageType.signal:
            if size > self._max_signal_bytes:
                raise SystemdUnavailable(f"D-Bus signal of {size} bytes exceeds our cap")
            return bool(self._queues)
        # Method calls *to* us (a peer probing) get no answer: we export nothing.
        return False

    def _dispatch(self, msg: Message) -> None:
        kind = msg.header.message_type
        if kind in (MessageType.method_return, MessageType.error):
            serial = msg.header.fields.get(HeaderFields.reply_serial)
            fut = self._pending.get(serial) if isinstance(serial, int) else None
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif kind is MessageType.signal:
            for queue in list(self._queues):
                if queue.rule.matches(msg):
                    queue._push(msg)
        # Method calls *to* us (a peer probing) get no answer: we export nothing.

    async def _receive_loop(self) -> None:
        error: BackendError = SystemdUnavailable("D-Bus receiver stopped")
        try:
            while True:
                msg = await self._read_message()
                if msg is not None:
                    self._dispatch(msg)
        except asyncio.IncompleteReadError:
            error = SystemdUnavailable("D-Bus peer closed the connection")
        except (ConnectionError, OSError) as exc:
            error = SystemdUnavailable(f"D-Bus connection lost: {exc}")
        except SystemdUnavailable as exc:
            error = exc
        finally:
            # Whatever ended the loop (even our own bug, which still propagates to the task),
            # nobody may wait for a reply that can no longer come.
            self._shut(error)
            self._writer.close()


# ---------------------------------------------------------------------------------------------
# Opening


async def _authenticate(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, uid: int
) -> None:
    # SASL EXTERNAL (D-Bus spec "Authentication Protocol"): the leading NUL byte is where the
    # kernel attaches credentials on BSD; on Linux the server uses SO_PEERCRED.
    # BEGIN is pipelined with AUTH, as sd-bus clients do. Sent after "OK", it tends to arrive in
    # the same read as our first message, and an sd-bus *server* (a capsule's manager, 257)
    # then leaves that message unprocessed until more data or a hang-up wakes it: the first
    # call stalls (seen with Reload: "Reload requested" logged only when we disconnected).
    writer.write(b"\0AUTH EXTERNAL " + str(uid).encode().hex().encode() + b"\r\nBEGIN\r\n")
    await writer.drain()
    line = await reader.readuntil(b"\r\n")
    if len(line) > MAX_AUTH_LINE_BYTES or not line.startswith(b"OK "):
        raise SystemdUnavailable(f"D-Bus authentication refused: {line[:80]!r}")


async def open_peer(
    sock: socket.socket,
    *,
    uid: int | None = None,
    max_message_bytes: int = MAX_PEER_MESSAGE_BYTES,
    call_timeout_s: float = CALL_TIMEOUT_S,
    max_signal_bytes: int = MAX_PEER_SIGNAL_BYTES,
) -> BusConnection:
    """Authenticate on an already connected socket and return a peer-to-peer connection.

    Takes ownership of ``sock``. No Hello: there is no bus daemon on the other end.
    ``max_message_bytes`` defaults to the untrusted-peer cap; a message over it closes the
    link (calls waiting on it raise SystemdUnavailable) and nothing else.

    Raises:
        SystemdUnavailable: the peer refused authentication or hung up.
    """
    try:
        async with asyncio.timeout(AUTH_TIMEOUT_S):
            # The limit bounds readuntil() (the SASL line); message reads use readexactly().
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=STREAM_LIMIT_BYTES)
            try:
                await _authenticate(reader, writer, os.geteuid() if uid is None else uid)
            except BaseException:
                writer.close()
                raise
    except TimeoutError as exc:
        raise SystemdUnavailable("D-Bus authentication timed out") from exc
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise SystemdUnavailable(f"D-Bus authentication failed: {exc}") from exc
    return BusConnection(
        reader, writer, max_message_bytes, call_timeout_s, min(max_signal_bytes, max_message_bytes)
    )


async def open_system_bus(address: str = SYSTEM_BUS_ADDRESS) -> BusConnection:
    """Connect to the system bus, authenticate and say Hello.

    Raises:
        SystemdUnavailable: no bus socket, or the bus refused us.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except OSError as exc:
        sock.close()
        raise SystemdUnavailable(f"cannot connect to the system bus at {address}: {exc}") from exc
    conn = await open_peer(
        sock,
        max_message_bytes=MAX_SYSTEM_BUS_MESSAGE_BYTES,
        max_signal_bytes=MAX_SYSTEM_BUS_MESSAGE_BYTES,
    )
    try:
        body = await conn.call(messages.hello(), timeout_s=AUTH_TIMEOUT_S)
    except BaseException:
        await conn.close()
        raise
    if body and isinstance(body[0], str):
        conn.unique_name = body[0]
    return conn
