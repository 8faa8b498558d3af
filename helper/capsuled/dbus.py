"""The one asyncio D-Bus adapter over jeepney: the only place in capsuled that awaits a D-Bus reply.

A `DBusConnection` is one socket and one receiver task. It is used for every outside system that
speaks D-Bus: the system bus (one connection, shared by PID 1's calls and polkitd's, see
`SystemBus`) and a capsule's own manager (a peer-to-peer link, opened by capsuled.systemd.bus).
jeepney builds and parses messages (pure code); this module only moves them.

Two ways to open one:
- `open_bus(address)`: a bus; AUTH EXTERNAL as our euid, then ``Hello``.
- `open_peer(sock)`: a peer-to-peer link such as a capsule manager's ``systemd/private``
  socket. There is no bus daemon: no ``Hello`` (it would fail with "Unknown object
  '/org/freedesktop/DBus'"), and the destination field is ignored.

File descriptors travel both ways (SCM_RIGHTS, after NEGOTIATE_UNIX_FD in the handshake, as
sd-bus does): polkitd >= 124 identifies a subject by its pidfd, and StartTransientUnit takes
the fds a unit's stdin/stdout/stderr are to use. jeepney 0.9's own asyncio adapter can send none.
Outgoing fds are duplicated when a message is queued and closed once the kernel has them, so the
caller may close its own at once (a Varlink client that hangs up takes its pidfd along). An
incoming fd is handed only to a caller that asked for fds in its reply (`accept_fds`); every
other one (signals, unwanted replies, dropped messages) is closed on arrival.

Order. Messages are handed out in the order they arrived, and two hooks run inside that order,
synchronously, before anything else sees the next message: a signal handler
(`handle_signals`) and a call's ``on_reply``. Somebody keeping state from a peer's signals and
replies (capsuled.systemd.model) applies each one there, so a reply never overwrites what a
later signal said, nor a signal what a later reply said.

Limits (`BusLimits`, a parameter: how far a peer is trusted is the opener's business). jeepney's
parser trusts its bus, and parses at roughly 0.37 s of CPU per MiB in the event loop (measured on
systemd 257's testbed host: a 32 MiB message from a hostile "manager" stalled the daemon ~12 s),
so, before anything is buffered or parsed:
- a message over ``max_message_bytes``, a header fields array over ``max_header_fields_bytes``,
  more than ``max_unix_fds`` fds, or a signal over ``max_signal_bytes`` closes the link (every
  call waiting on it fails with `BusClosed`);
- only the header is parsed before we know somebody wants the message: a reply to a serial we
  are not waiting for, a signal no registered queue's rule matches on its header (type, sender,
  path, interface, member), or a method call to us (we export nothing) is dropped with its body
  unparsed;
- calls in flight are capped by one semaphore (dbus-daemon's system.conf allows 128 pending
  replies per connection, max_replies_per_connection).
Malformed input closes the link instead of crashing the daemon.

Errors (each layer above translates them once, e.g. capsuled.systemd.bus into BackendError)::

    DBusError                base of everything raised here
    ├── BusClosed            the link is gone: peer hung up, refused us, broke a limit, or sent
    │                        garbage; every later call raises it too (also an OSError)
    ├── BusTimeout           no reply in time (also a TimeoutError)
    ├── ErrorReply           the peer answered with an error (.name, .text, .body)
    └── SignalOverflow       a signal queue's consumer fell behind (the default overflow error)
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from jeepney import DBusAddress, Header, HeaderFields, MatchRule, Message, MessageType
from jeepney import new_method_call as _new_method_call
from jeepney.fds import FileDescriptor
from jeepney.low_level import calc_msg_size

__all__ = [
    "SYSTEM_BUS_ADDRESS",
    "SYSTEM_BUS_LIMITS",
    "BusClosed",
    "BusLimits",
    "BusTimeout",
    "DBusConnection",
    "DBusError",
    "ErrorReply",
    "SignalOverflow",
    "SignalQueue",
    "SystemBus",
    "add_match",
    "get_name_owner",
    "hello",
    "open_bus",
    "open_peer",
    "remove_match",
]

SYSTEM_BUS_ADDRESS: Final = "/run/dbus/system_bus_socket"
AUTH_TIMEOUT_S: Final = 5.0
MAX_AUTH_LINE_BYTES: Final = 1024
# Bytes asked of one recvmsg(): never past the end of the message being read, so every fd that
# arrives belongs to that message (the kernel attaches a sendmsg's fds to its first byte and
# stops a read after them).
READ_CHUNK_BYTES: Final = 256 * 1024
DEFAULT_SIGNAL_QUEUE: Final = 256
# The fixed part of every message: endianness, type, flags, version, body length, serial and the
# header fields array's length (D-Bus specification, "Message Format").
_FIXED_HEADER_BYTES: Final = 16

# What a peer may send that jeepney's decoder chokes on: treat as a broken link.
_DECODE_ERRORS = (ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError, TypeError)


@dataclass(frozen=True, slots=True)
class BusLimits:
    """What one connection accepts from its peer, and how many calls it keeps waiting."""

    max_message_bytes: int
    max_signal_bytes: int
    # The header fields array (path, interface, member, error name, destination, sender,
    # signature, reply serial, unix fds) is a few hundred bytes in practice; jeepney parses it in
    # Python too.
    max_header_fields_bytes: int = 64 * 1024
    max_in_flight_calls: int = 64
    # Per message, both ways: libdbus's default (DBUS_DEFAULT_MESSAGE_UNIX_FDS) is 16 on the
    # system bus; StartTransientUnit needs three, CheckAuthorization one.
    max_unix_fds: int = 16
    # sd-bus's default method call timeout (BUS_DEFAULT_TIMEOUT) is 25 s.
    call_timeout_s: float = 25.0

    def __post_init__(self) -> None:
        if min(self.max_message_bytes, self.max_signal_bytes, self.max_in_flight_calls) < 1:
            raise ValueError("bus limits must be positive")
        if self.max_header_fields_bytes < 1 or self.max_unix_fds < 0 or self.call_timeout_s <= 0:
            raise ValueError("bus limits must be positive")


# The system bus carries PID 1 and polkitd, which we trust; dbus-daemon itself caps a message at
# 128 MiB. ListUnits on a large host is a few MiB, so the cap only guards against a runaway.
# One connection serves PID 1 and polkitd: polkit keeps at most 64 checks waiting (an interactive
# one may wait minutes for a human), so 120 in flight leave PID 1 at least 56 under dbus-daemon's
# 128 pending replies per connection.
SYSTEM_BUS_LIMITS: Final = BusLimits(
    max_message_bytes=32 * 1024 * 1024,
    max_signal_bytes=32 * 1024 * 1024,
    max_in_flight_calls=120,
)


class DBusError(Exception):
    """Base of every error raised by this module."""


class BusClosed(DBusError, ConnectionError):
    """The link is gone (hung up, refused us, broke a limit, sent garbage); open a new one."""


class BusTimeout(DBusError, TimeoutError):
    """The peer did not answer a call in time."""


class ErrorReply(DBusError):
    """The peer answered a call with an error message."""

    def __init__(self, name: str, text: str, body: tuple[object, ...]) -> None:
        super().__init__(f"{name}: {text}" if text else name)
        self.name = name
        self.text = text
        self.body = body


class SignalOverflow(DBusError):
    """A signal queue was full: its consumer fell behind and signals were dropped."""


# ---------------------------------------------------------------------------------------------
# Pure builders for the bus daemon itself (org.freedesktop.DBus)

BUS_DAEMON: Final = DBusAddress(
    "/org/freedesktop/DBus", bus_name="org.freedesktop.DBus", interface="org.freedesktop.DBus"
)


def hello() -> Message:
    """org.freedesktop.DBus.Hello: first message on a bus (never on a peer-to-peer link)."""
    return _new_method_call(BUS_DAEMON, "Hello")


def add_match(rule: MatchRule) -> Message:
    """org.freedesktop.DBus.AddMatch(rule)."""
    return _new_method_call(BUS_DAEMON, "AddMatch", "s", (rule.serialise(),))


def remove_match(rule: MatchRule) -> Message:
    """org.freedesktop.DBus.RemoveMatch(rule)."""
    return _new_method_call(BUS_DAEMON, "RemoveMatch", "s", (rule.serialise(),))


def get_name_owner(name: str) -> Message:
    """org.freedesktop.DBus.GetNameOwner(name) -> unique name (e.g. ":1.2")."""
    return _new_method_call(BUS_DAEMON, "GetNameOwner", "s", (name,))


def header_matches(rule: MatchRule, header: Header) -> bool:
    """Whether a message with this header could match ``rule`` (its arg conditions need the
    body, so they are left to MatchRule.matches once the body is parsed)."""
    if rule.message_type is not None and header.message_type is not rule.message_type:
        return False
    for name, expected in rule.header_fields.items():
        if header.fields.get(HeaderFields[name]) != expected:
            return False
    if rule.path_namespace is not None:
        path = header.fields.get(HeaderFields.path)
        namespace = rule.path_namespace.rstrip("/")
        if not isinstance(path, str) or not (path == namespace or path.startswith(namespace + "/")):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Signals


class SignalQueue:
    """A bounded queue of signals matching one rule.

    Never blocks the receiver: when full, it records the overflow and drops the signal; the
    consumer then gets ``overflow_error`` from ``get()`` (after the signals already queued).
    When the link is lost, ``get()`` raises ``closed_error(BusClosed)`` once the queue is drained.
    """

    def __init__(
        self,
        rule: MatchRule,
        maxsize: int,
        overflow_error: Exception,
        closed_error: Callable[[BusClosed], Exception],
    ) -> None:
        self.rule = rule
        self._items: deque[Message] = deque()
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._error: Exception | None = None
        self._overflow_error = overflow_error
        self._closed_error = closed_error

    def _push(self, msg: Message) -> None:
        if self._error is not None:
            return
        if len(self._items) >= self._maxsize:
            self._error = self._overflow_error
        else:
            self._items.append(msg)
        self._wakeup.set()

    def _fail(self, error: BusClosed) -> None:
        if self._error is None:
            self._error = self._closed_error(error)
        self._wakeup.set()

    def get_nowait(self) -> Message | None:
        """The next queued signal, or None; raises the queue's error once drained."""
        if self._items:
            return self._items.popleft()
        if self._error is not None:
            raise self._error
        return None

    async def get(self) -> Message:
        """Wait for the next signal. Raises the overflow or closed error (see the class doc)."""
        while True:
            msg = self.get_nowait()
            if msg is not None:
                return msg
            self._wakeup.clear()
            await self._wakeup.wait()


# ---------------------------------------------------------------------------------------------
# The connection


async def _readable(sock: socket.socket) -> None:
    """Wait until ``sock`` has something to read (or is closed by the peer)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Message]
    accept_fds: bool
    on_reply: Callable[[Message], None] | None = None


SignalHandler = Callable[[Message], None]


@dataclass(slots=True)
class _Outgoing:
    data: bytes
    fds: list[int]  # our duplicates, closed once sent (or when the link dies)
    sent: int = 0


def _close_all(fds: list[FileDescriptor]) -> None:
    for fd in fds:
        fd.close()


class DBusConnection:
    """One authenticated D-Bus connection with a receiver task (see the module docstring)."""

    def __init__(
        self, sock: socket.socket, limits: BusLimits, *, unix_fds: bool, name: str = "D-Bus"
    ) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self.limits = limits
        self.unix_fds = unix_fds  # the peer agreed to NEGOTIATE_UNIX_FD
        self.name = name  # for messages: "the system bus", "capsule web's manager"
        self._serials = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._queues: set[SignalQueue] = set()
        self._handlers: dict[object, tuple[MatchRule, SignalHandler]] = {}
        self._in_flight = asyncio.Semaphore(limits.max_in_flight_calls)
        self._out: deque[_Outgoing] = deque()
        self._writing = False
        self._closed_error: BusClosed | None = None
        self.unique_name: str | None = None
        self._receiver = self._loop.create_task(self._receive_loop(), name=f"capsuled-{name}")

    # -- life cycle ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the link is gone; every later call raises BusClosed."""
        return self._closed_error is not None

    async def close(self) -> None:
        """Close the socket and fail everything still waiting on it."""
        self._shut(BusClosed("D-Bus connection closed"))
        self._receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._receiver
        self._sock.close()

    async def wait_closed(self) -> None:
        """Return once the link is gone (whoever or whatever ended it)."""
        # asyncio.wait: neither the receiver's own ending nor its exception is ours to raise.
        await asyncio.wait({self._receiver})

    def _shut(self, error: BusClosed) -> None:
        if self._closed_error is None:
            self._closed_error = error
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(BusClosed(str(self._closed_error)))
        for queue in self._queues:
            queue._fail(self._closed_error)
        self._stop_writing()
        while self._out:
            for fd in self._out.popleft().fds:
                os.close(fd)

    def _raise_if_closed(self) -> None:
        if self._closed_error is not None:
            raise BusClosed(str(self._closed_error))

    # -- calls -----------------------------------------------------------------------------

    async def call(
        self,
        msg: Message,
        *,
        timeout_s: float | None = None,
        accept_fds: bool = False,
        on_reply: Callable[[Message], None] | None = None,
    ) -> tuple[object, ...]:
        """Send a method call and return the reply body (``on_reply``: see `call_raw`).

        Raises:
            ErrorReply: the peer answered with an error.
            BusTimeout, BusClosed: no answer in time, or the link is gone.
        """
        reply = await self.call_raw(
            msg, timeout_s=timeout_s, accept_fds=accept_fds, on_reply=on_reply
        )
        body = tuple(reply.body)
        if reply.header.message_type is MessageType.error:
            name = reply.header.fields.get(HeaderFields.error_name, "")
            text = body[0] if body and isinstance(body[0], str) else ""
            raise ErrorReply(str(name), text, body)
        return body

    async def call_raw(
        self,
        msg: Message,
        *,
        timeout_s: float | None = None,
        accept_fds: bool = False,
        on_reply: Callable[[Message], None] | None = None,
    ) -> Message:
        """Send a method call and return the reply message (a method return or an error).

        With ``accept_fds`` the caller owns the FileDescriptors in the reply's body and must
        close them; without, any fd in the reply is closed before it is returned. ``on_reply``
        sees the reply (or error) where it arrived among the other messages (module docstring).

        Raises:
            BusTimeout, BusClosed: no answer in time, or the link is gone.
        """
        async with self._in_flight:
            self._raise_if_closed()
            serial = next(self._serials)
            future: asyncio.Future[Message] = self._loop.create_future()
            self._pending[serial] = _Pending(future, accept_fds, on_reply)
            try:
                self._send(msg, serial)
                try:
                    async with asyncio.timeout(timeout_s or self.limits.call_timeout_s):
                        return await future
                except TimeoutError as exc:
                    member = msg.header.fields.get(HeaderFields.member)
                    raise BusTimeout(f"no reply to {member}") from exc
            finally:
                # Also on cancellation: a late reply then finds no serial and is dropped.
                self._pending.pop(serial, None)

    # -- signals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def signals(
        self,
        rule: MatchRule,
        maxsize: int = DEFAULT_SIGNAL_QUEUE,
        overflow_error: Exception | None = None,
        closed_error: Callable[[BusClosed], Exception] | None = None,
    ) -> Iterator[SignalQueue]:
        """Collect signals matching ``rule`` locally while the block runs.

        This only filters what reaches us; on a bus, the matching AddMatch must be in place
        (``add_match``) for the daemon to route the signal here at all. Register the queue *before*
        making the call whose signals you wait for.
        """
        queue = SignalQueue(
            rule,
            maxsize,
            overflow_error or SignalOverflow("signal queue full"),
            closed_error or (lambda error: error),
        )
        if self._closed_error is not None:
            queue._fail(self._closed_error)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    @contextlib.contextmanager
    def handle_signals(self, rule: MatchRule, handler: SignalHandler) -> Iterator[None]:
        """Call ``handler`` with every signal matching ``rule`` while the block runs, at its
        place among the messages (module docstring); as with `signals`, a bus also needs the
        AddMatch. The handler must not raise: what it cannot use it ignores."""
        key = object()
        self._handlers[key] = (rule, handler)
        try:
            yield
        finally:
            del self._handlers[key]

    # -- sending ---------------------------------------------------------------------------

    def _send(self, msg: Message, serial: int) -> None:
        """Queue one message and write what the socket takes now; never blocks, never splits.

        Raises:
            BusClosed: the link is gone.
            ValueError: the message carries fds this link cannot pass, or too many.
        """
        self._raise_if_closed()
        fds = array.array("i")
        data = msg.serialise(serial, fds=fds)
        if fds and not self.unix_fds:
            raise ValueError(f"{self.name} did not agree to pass file descriptors")
        if len(fds) > self.limits.max_unix_fds:
            raise ValueError(
                f"{len(fds)} file descriptors in one message; at most {self.limits.max_unix_fds}"
            )
        # Ours until the kernel has them: the caller may close its own right after this.
        owned = [os.dup(fd) for fd in fds]
        self._out.append(_Outgoing(data, owned))
        self._flush()

    def _flush(self) -> None:
        """Write queued messages until the socket would block (then wait for it, off-call)."""
        try:
            while self._out:
                item = self._out[0]
                view = memoryview(item.data)[item.sent :]
                if item.fds:
                    # The fds travel with the first byte(s); the kernel keeps them attached.
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", item.fds))]
                    item.sent += self._sock.sendmsg([view], rights)
                    for fd in item.fds:
                        os.close(fd)
                    item.fds = []
                else:
                    item.sent += self._sock.send(view)
                if item.sent >= len(item.data):
                    self._out.popleft()
        except BlockingIOError:
            self._start_writing()
            return
        except OSError as exc:
            self._shut(BusClosed(f"D-Bus connection lost: {exc}"))
            return
        self._stop_writing()

    def _start_writing(self) -> None:
        if not self._writing:
            self._loop.add_writer(self._sock.fileno(), self._flush)
            self._writing = True

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())

    # -- receiving -------------------------------------------------------------------------

    async def _recv_exactly(self, n: int, fds: list[FileDescriptor]) -> bytes:
        """``n`` bytes of the message being read; fds that come with them go to ``fds``."""
        chunks: list[bytes] = []
        want = n
        ancillary = socket.CMSG_SPACE(self.limits.max_unix_fds * 4) if self.unix_fds else 0
        while want:
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    min(want, READ_CHUNK_BYTES), ancillary, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await _readable(self._sock)
                continue
            fds.extend(FileDescriptor.from_ancdata(ancdata))
            if flags & socket.MSG_CTRUNC:
                raise BusClosed(f"{self.name} sent more file descriptors than we accept")
            if len(fds) > self.limits.max_unix_fds:
                raise BusClosed(f"{self.name} sent {len(fds)} file descriptors with one message")
            if not data:
                raise BusClosed("D-Bus peer closed the connection")
            chunks.append(data)
            want -= len(data)
        return b"".join(chunks)

    def _sizes(self, fixed: bytes) -> int:
        """The message's total size from its fixed header, refused over the caps."""
        try:
            size = calc_msg_size(fixed)
            # Bytes 12..16: the header fields array's length, in the message's byte order.
            (fields_len,) = struct.unpack("<I" if fixed[:1] == b"l" else ">I", fixed[12:16])
        except _DECODE_ERRORS as exc:
            raise BusClosed(f"malformed D-Bus header: {exc}") from exc
        if not _FIXED_HEADER_BYTES <= size <= self.limits.max_message_bytes:
            raise BusClosed(f"D-Bus message of {size} bytes exceeds our cap")
        if fields_len > self.limits.max_header_fields_bytes:
            raise BusClosed(f"D-Bus header of {fields_len} bytes exceeds our cap")
        return int(size)

    def _wanted(self, header: Header, size: int) -> bool:
        """Whether a message with this header is worth parsing its body (see module doc)."""
        kind = header.message_type
        if kind in (MessageType.method_return, MessageType.error):
            serial = header.fields.get(HeaderFields.reply_serial)
            entry = self._pending.get(serial) if isinstance(serial, int) else None
            return entry is not None and not entry.future.done()
        if kind is MessageType.signal:
            if size > self.limits.max_signal_bytes:
                raise BusClosed(f"D-Bus signal of {size} bytes exceeds our cap")
            return any(header_matches(queue.rule, header) for queue in self._queues) or any(
                header_matches(rule, header) for rule, _ in self._handlers.values()
            )
        # Method calls *to* us (a peer probing) get no answer: we export nothing.
        return False

    async def _receive_one(self) -> None:
        fds: list[FileDescriptor] = []
        try:
            fixed = await self._recv_exactly(_FIXED_HEADER_BYTES, fds)
            size = self._sizes(fixed)
            buf = fixed + await self._recv_exactly(size - _FIXED_HEADER_BYTES, fds)
            try:
                header, _pos = Header.from_buffer(buf)
                if header.fields.get(HeaderFields.unix_fds, 0) != len(fds):
                    raise BusClosed(f"{self.name} sent a message with the wrong number of fds")
                if not self._wanted(header, size):
                    return
                msg = Message.from_buffer(buf, fds)
            except _DECODE_ERRORS as exc:
                raise BusClosed(f"malformed D-Bus message: {exc}") from exc
            fds = self._deliver(msg, fds)
        finally:
            _close_all(fds)  # whatever nobody took

    def _deliver(self, msg: Message, fds: list[FileDescriptor]) -> list[FileDescriptor]:
        """Hand a message to whoever waits for it; returns the fds nobody took."""
        kind = msg.header.message_type
        if kind in (MessageType.method_return, MessageType.error):
            serial = msg.header.fields.get(HeaderFields.reply_serial)
            entry = self._pending.get(serial) if isinstance(serial, int) else None
            if entry is not None and not entry.future.done():
                if entry.on_reply is not None:
                    entry.on_reply(msg)
                if entry.accept_fds:
                    entry.future.set_result(msg)
                    return []
                _close_all(fds)  # before the caller sees the body: nothing it can misuse
                entry.future.set_result(msg)
        elif kind is MessageType.signal:
            _close_all(fds)  # no signal we consume carries fds
            for rule, handler in list(self._handlers.values()):
                if rule.matches(msg):
                    handler(msg)
            for queue in list(self._queues):
                if queue.rule.matches(msg):
                    queue._push(msg)
        return fds

    async def _receive_loop(self) -> None:
        error = BusClosed("D-Bus receiver stopped")
        try:
            while True:
                await self._receive_one()
        except BusClosed as exc:
            error = exc
        except OSError as exc:
            error = BusClosed(f"D-Bus connection lost: {exc}")
        finally:
            # Whatever ended the loop (even our own bug, which still propagates to the task),
            # nobody may wait for a reply that can no longer come.
            self._shut(error)
            self._sock.close()


# ---------------------------------------------------------------------------------------------
# Opening


async def _recv_line(sock: socket.socket) -> bytes:
    """One SASL line, read exactly: what follows it is message data, maybe with fds."""
    line = b""
    while True:
        try:
            # Peek, then take only up to the line's end: never a byte of the first message.
            peeked = sock.recv(MAX_AUTH_LINE_BYTES - len(line), socket.MSG_PEEK)
        except BlockingIOError:
            await _readable(sock)
            continue
        if not peeked:
            raise BusClosed("D-Bus peer closed the connection during authentication")
        carried = line[-1:]  # a "\r" that ended the last read may pair with this "\n"
        end = (carried + peeked).find(b"\r\n")
        if end >= 0:
            return line + sock.recv(end + 2 - len(carried))
        line += sock.recv(len(peeked))  # no line end in it: none of it is message data
        if len(line) >= MAX_AUTH_LINE_BYTES:
            raise BusClosed(f"D-Bus authentication refused: {line[:80]!r}")


async def _authenticate(sock: socket.socket, uid: int, unix_fds: bool) -> bool:
    """SASL EXTERNAL; returns whether the peer agreed to pass fds."""
    # The leading NUL byte is where the kernel attaches credentials on BSD; on Linux the server
    # uses SO_PEERCRED. NEGOTIATE_UNIX_FD and BEGIN are pipelined with AUTH, as sd-bus clients
    # do: BEGIN sent after "OK" tends to arrive in the same read as our first message, and an
    # sd-bus *server* (a capsule's manager, 257) then leaves that message unprocessed until more
    # data or a hang-up wakes it: the first call stalls (seen with Reload: "Reload requested"
    # logged only when we disconnected).
    request = b"\0AUTH EXTERNAL " + str(uid).encode().hex().encode() + b"\r\n"
    if unix_fds:
        request += b"NEGOTIATE_UNIX_FD\r\n"
    await asyncio.get_running_loop().sock_sendall(sock, request + b"BEGIN\r\n")
    line = await _recv_line(sock)
    if not line.startswith(b"OK "):
        raise BusClosed(f"D-Bus authentication refused: {line[:80]!r}")
    if not unix_fds:
        return False
    # "AGREE_UNIX_FD", or "ERROR ..." from a peer that passes none (D-Bus spec, "Authentication").
    return (await _recv_line(sock)).rstrip(b"\r\n") == b"AGREE_UNIX_FD"


async def open_peer(
    sock: socket.socket,
    limits: BusLimits,
    *,
    uid: int | None = None,
    unix_fds: bool = True,
    name: str = "D-Bus peer",
) -> DBusConnection:
    """Authenticate on an already connected socket; return a peer-to-peer connection (no Hello).

    Takes ownership of ``sock``. ``uid`` is the uid to claim (default: our euid).

    Raises:
        BusClosed: the peer refused authentication, hung up, or did not answer in time.
    """
    try:
        sock.setblocking(False)
        async with asyncio.timeout(AUTH_TIMEOUT_S):
            agreed = await _authenticate(sock, os.geteuid() if uid is None else uid, unix_fds)
    except TimeoutError as exc:
        sock.close()
        raise BusClosed("D-Bus authentication timed out") from exc
    except OSError as exc:  # BusClosed included
        sock.close()
        if isinstance(exc, BusClosed):
            raise
        raise BusClosed(f"D-Bus authentication failed: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return DBusConnection(sock, limits, unix_fds=agreed, name=name)


async def open_bus(
    address: str = SYSTEM_BUS_ADDRESS,
    limits: BusLimits = SYSTEM_BUS_LIMITS,
    *,
    name: str = "the system bus",
) -> DBusConnection:
    """Connect to a bus, authenticate and say Hello.

    Raises:
        BusClosed: no bus socket, or the bus refused us.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except OSError as exc:
        sock.close()
        raise BusClosed(f"cannot connect to {name} at {address}: {exc}") from exc
    conn = await open_peer(sock, limits, name=name)
    try:
        body = await conn.call(hello(), timeout_s=AUTH_TIMEOUT_S)
    except BaseException:
        await conn.close()
        raise
    if body and isinstance(body[0], str):
        conn.unique_name = body[0]
    return conn


class SystemBus:
    """The daemon's one system-bus connection: opened on first use, opened again once lost.

    PID 1's backend and polkit's share it, so a long-lived subscription to PID 1's signals and a
    policy check travel on the same link. Its owner (daemon.py) closes it at exit.
    """

    def __init__(
        self, address: str = SYSTEM_BUS_ADDRESS, limits: BusLimits = SYSTEM_BUS_LIMITS
    ) -> None:
        self._address = address
        self._limits = limits
        self._conn: DBusConnection | None = None
        self._lock = asyncio.Lock()

    async def connection(self) -> DBusConnection:
        """The open connection, opening a new one if there is none or it was lost.

        Raises:
            BusClosed: the bus cannot be reached.
        """
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._lock:
            if self._conn is None or self._conn.closed:
                old, self._conn = self._conn, None
                if old is not None:
                    await old.close()
                self._conn = await open_bus(self._address, self._limits)
            return self._conn

    async def close(self) -> None:
        """Close the connection (the next `connection()` opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
