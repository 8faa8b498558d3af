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
so a message is read in three steps, its fixed header, its header fields, its body, and the body
is read (let alone parsed) only once the header says somebody wants it:
- a reply is wanted if a call waits for its serial; a signal if a registered queue's or
  handler's rule matches its header (type, sender, path, interface, member; a handler's path
  prefix too); a method call to us never (we export nothing). A wanted body is parsed with
  the header already read, not the whole message again;
- a message nobody wants, of any size, is skipped: its body is read in chunks and thrown away,
  so it costs neither memory nor a parse. On the system bus that is all (any client may send us
  unicast signals, and closing our connection would fail PID 1's and polkit's calls in flight
  for nothing: the next one would reach the new connection as easily);
- a link opened with ``close_on_unsolicited`` (a capsule's manager, which should send nothing
  but replies and its own broadcasts) is closed instead, except for the signals it broadcasts
  whether asked or not (``broadcasts``), which are skipped up to ``max_skipped_per_s`` a
  second on average (a token bucket as deep);
- a wanted message over ``max_message_bytes`` (a signal over ``max_signal_bytes``) is skipped
  too, and whoever wanted it is told: the waiting call fails with `ReplyTooLarge`, a matching
  queue overflows; a ``close_on_unsolicited`` link is closed instead;
- a header fields array over ``max_header_fields_bytes`` is never parsed: skipped, or the
  link closed as above; a header claiming more than the D-Bus maximum (128 MiB), more than
  ``max_unix_fds`` fds, or anything malformed closes the link (every call waiting on it fails
  with `BusClosed`);
- calls in flight are capped by one semaphore (dbus-daemon's system.conf allows 128 pending
  replies per connection, max_replies_per_connection).
After each message the receiver yields to the event loop, so a peer flooding us is one task
among the others, never a loop that runs ahead of them.

Errors (each layer above translates them once, e.g. capsuled.systemd.bus into BackendError)::

    DBusError                base of everything raised here
    ├── BusClosed            the link is gone: peer hung up, refused us, broke a limit, or sent
    │                        garbage; every later call raises it too (also an OSError)
    ├── BusTimeout           no reply in time (also a TimeoutError)
    ├── ReplyTooLarge        the reply was over our cap and was skipped unread
    ├── ErrorReply           the peer answered with an error (.name, .text, .body)
    └── SignalOverflow       a signal queue's consumer fell behind (the default overflow error)
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from jeepney import DBusAddress, Header, HeaderFields, MatchRule, Message, MessageType
from jeepney import new_method_call as _new_method_call
from jeepney.fds import FileDescriptor
from jeepney.low_level import calc_msg_size, parse_signature

__all__ = [
    "SYSTEM_BUS_ADDRESS",
    "SYSTEM_BUS_LIMITS",
    "BusClosed",
    "BusLimits",
    "BusTimeout",
    "DBusConnection",
    "DBusError",
    "ErrorReply",
    "ReplyTooLarge",
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
# D-Bus specification, "Valid Messages": a message is at most 2^27 bytes; dbus-daemon enforces it.
SPEC_MAX_MESSAGE_BYTES: Final = 1 << 27
# Late replies to calls we gave up on are skipped, not taken for unsolicited traffic, for this
# many of the most recent such calls.
MAX_ABANDONED_SERIALS: Final = 256
# Skipped messages lose at most this many log lines per interval: any client can send them.
_SKIP_LOG_INTERVAL_S: Final = 10.0

log = logging.getLogger(__name__)

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
    # Traffic nobody asked for: skipped (False), or the link closed (True; see the module
    # docstring), except for `broadcasts` (header-matched), skipped up to `max_skipped_per_s`.
    close_on_unsolicited: bool = False
    broadcasts: tuple[MatchRule, ...] = ()
    max_skipped_per_s: int = 1000

    def __post_init__(self) -> None:
        if min(self.max_message_bytes, self.max_signal_bytes, self.max_in_flight_calls) < 1:
            raise ValueError("bus limits must be positive")
        if self.max_header_fields_bytes < 1 or self.max_unix_fds < 0 or self.call_timeout_s <= 0:
            raise ValueError("bus limits must be positive")
        if self.max_skipped_per_s < 1:
            raise ValueError("bus limits must be positive")


# The system bus carries PID 1 and polkitd, whose replies we trust; dbus-daemon itself caps a
# message at 128 MiB. ListUnits on a large host is a few MiB, so the cap only guards against a
# runaway. Signals are another matter: any client on the bus may send one to our unique name
# (dbus-daemon's default policy allows signals), and only PID 1's, header-matched on its sender,
# ever get to their body; its PropertiesChanged and JobRemoved are a few KiB, so 1 MiB is
# ample. One connection serves PID 1 and polkitd: polkit keeps at most 64 checks waiting (an
# interactive one may wait minutes for a human), so 120 in flight leave PID 1 at least 56 under
# dbus-daemon's 128 pending replies per connection. Unsolicited traffic is skipped, never a
# reason to close (see the module docstring).
SYSTEM_BUS_LIMITS: Final = BusLimits(
    max_message_bytes=32 * 1024 * 1024,
    max_signal_bytes=1024 * 1024,
    max_in_flight_calls=120,
)


class DBusError(Exception):
    """Base of every error raised by this module."""


class BusClosed(DBusError, ConnectionError):
    """The link is gone (hung up, refused us, broke a limit, sent garbage); open a new one."""


class BusTimeout(DBusError, TimeoutError):
    """The peer did not answer a call in time."""


class ReplyTooLarge(DBusError):
    """The reply to a call was over the connection's cap; it was skipped without being read."""


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
    body: `signal_matches` checks them once it is parsed).

    A rule's sender may be a well-known name (org.freedesktop.systemd1). Only the bus daemon
    knows who owns such a name now: it changes hands (PID 1 re-executing reconnects under a new
    unique name), and a message carries its sender's unique name only. The daemon checks it when
    it routes a broadcast signal to us under our AddMatch of the same rule, so a signal without
    a destination passes here. A unicast signal (it has a destination: us) reaches us whatever
    our match rules say, from anybody, so it never matches a well-known sender. This holds
    because every AddMatch we make for a well-known sender's signals names that sender
    (capsuled.systemd's rules do): a broader one would let anybody's broadcast through."""
    if rule.message_type is not None and header.message_type is not rule.message_type:
        return False
    for name, expected in rule.header_fields.items():
        if name == "sender" and not expected.startswith(":"):
            if HeaderFields.destination in header.fields:
                return False
            continue
        if header.fields.get(HeaderFields[name]) != expected:
            return False
    if rule.path_namespace is not None:
        path = header.fields.get(HeaderFields.path)
        namespace = rule.path_namespace.rstrip("/")
        if not isinstance(path, str) or not (path == namespace or path.startswith(namespace + "/")):
            return False
    return True


# The parsed body types of the signatures seen (a handful: PID 1's signals and replies repeat
# theirs), so that a message's signature is parsed once, not per message; bounded, since a
# peer chooses its signatures.
_BODY_TYPES: dict[str, Any] = {}  # jeepney's type objects (it ships no type hints)
_MAX_BODY_TYPES: Final = 256


def _parse_body(header: Header, buf: bytes, body_at: int, fds: list[FileDescriptor]) -> object:
    """The body of a message whose header is already parsed (jeepney's Message.from_buffer
    without parsing the header a second time); the caller has checked the fds' number."""
    signature = header.fields.get(HeaderFields.signature)
    if signature is None:
        return ()
    body_type = _BODY_TYPES.get(signature)
    if body_type is None:
        body_type = parse_signature(list(f"({signature})"))
        if len(_BODY_TYPES) >= _MAX_BODY_TYPES:
            _BODY_TYPES.clear()
        _BODY_TYPES[signature] = body_type
    return body_type.parse_data(buf, body_at, header.endianness, fds=fds)[0]


def signal_matches(rule: MatchRule, msg: Message) -> bool:
    """Whether a parsed signal matches ``rule``: its header (`header_matches`), then its args."""
    if not header_matches(rule, msg.header):
        return False
    if not rule.arg_conditions:
        return True
    # jeepney checks the args; its header check would compare a well-known sender literally.
    args_only = MatchRule()
    args_only.arg_conditions = rule.arg_conditions
    return bool(args_only.matches(msg))


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

    def _overflow(self) -> None:
        """A signal for this queue had to be dropped (too large): its consumer must resync."""
        if self._error is None:
            self._error = self._overflow_error
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


@dataclass(frozen=True, slots=True)
class _Handler:
    rule: MatchRule
    handler: SignalHandler
    on_lost: Callable[[], None] | None
    path_prefix: str | None = None

    def wants(self, header: Header) -> bool:
        """Whether a signal with this header is for the handler (before its body is read)."""
        if self.path_prefix is not None:
            path = header.fields.get(HeaderFields.path)
            if not (isinstance(path, str) and path.startswith(self.path_prefix)):
                return False
        return header_matches(self.rule, header)


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
        self._handlers: dict[object, _Handler] = {}
        self._in_flight = asyncio.Semaphore(limits.max_in_flight_calls)
        self._out: deque[_Outgoing] = deque()
        self._writing = False
        self._closed_error: BusClosed | None = None
        self.unique_name: str | None = None
        self.skipped = 0  # messages skipped unread, for logs and tests
        # Serials of calls we stopped waiting for (timed out, cancelled), oldest first.
        self._abandoned: dict[int, None] = {}
        self._last_skip_log = -_SKIP_LOG_INTERVAL_S
        self._skip_tokens = float(limits.max_skipped_per_s)  # see BusLimits.broadcasts
        self._skip_refilled = self._loop.time()
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
                # Also on cancellation: a late reply then finds no serial and is skipped, as
                # an answer we gave up on, not as traffic nobody asked for.
                if self._pending.pop(serial, None) is not None and (
                    future.cancelled() or not future.done()
                ):
                    self._abandoned[serial] = None
                    if len(self._abandoned) > MAX_ABANDONED_SERIALS:
                        del self._abandoned[next(iter(self._abandoned))]

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
    def handle_signals(
        self,
        rule: MatchRule,
        handler: SignalHandler,
        on_lost: Callable[[], None] | None = None,
        *,
        path_prefix: str | None = None,
    ) -> Iterator[None]:
        """Call ``handler`` with every signal matching ``rule`` while the block runs, at its
        place among the messages (module docstring); as with `signals`, a bus also needs the
        AddMatch. ``on_lost`` is called instead when a matching signal was over our cap and
        skipped unread (as a queue overflows). Neither may raise: what they cannot use they
        ignore.

        ``path_prefix`` narrows the rule to object paths starting with it (a match rule's
        path_namespace takes whole path elements only): PID 1 sends the PropertiesChanged of
        every unit under one namespace, and those of other units are then skipped unread
        instead of parsed and thrown away (they were most of the messages a Stop brings)."""
        key = object()
        self._handlers[key] = _Handler(rule, handler, on_lost, path_prefix)
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
        while want:
            data = await self._recv_some(want, fds)
            chunks.append(data)
            want -= len(data)
        return b"".join(chunks)

    async def _skip(self, n: int, fds: list[FileDescriptor]) -> None:
        """Read ``n`` bytes of the message being read and throw them away, a chunk at a time."""
        while n:
            n -= len(await self._recv_some(n, fds))

    async def _recv_some(self, want: int, fds: list[FileDescriptor]) -> bytes:
        """Up to ``want`` bytes (at most a chunk), at least one; fds that come go to ``fds``."""
        ancillary = socket.CMSG_SPACE(self.limits.max_unix_fds * 4) if self.unix_fds else 0
        while True:
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
            return data

    def _sizes(self, fixed: bytes) -> tuple[int, int]:
        """The message's total size and the end of its header (fields and padding included).

        Raises:
            BusClosed: the fixed header is malformed or claims more than D-Bus allows.
        """
        try:
            size = calc_msg_size(fixed)
            # Bytes 12..16: the header fields array's length, in the message's byte order.
            (fields_len,) = struct.unpack("<I" if fixed[:1] == b"l" else ">I", fixed[12:16])
        except _DECODE_ERRORS as exc:
            raise BusClosed(f"malformed D-Bus header: {exc}") from exc
        header_end = _FIXED_HEADER_BYTES + fields_len
        header_end += -header_end % 8  # the body starts 8-aligned
        if not header_end <= size <= SPEC_MAX_MESSAGE_BYTES:
            raise BusClosed(f"D-Bus message claims {size} bytes")
        return int(size), header_end

    def _unwanted(self, what: str, size: int, header: Header | None = None) -> None:
        """A message nobody asked for: skip it, or (close_on_unsolicited) close the link,
        except for the peer's own broadcasts within their rate (see the module docstring)."""
        limits = self.limits
        broadcast = header is not None and any(
            header_matches(rule, header) for rule in limits.broadcasts
        )
        if limits.close_on_unsolicited:
            if not broadcast or size > limits.max_signal_bytes:
                raise BusClosed(f"{self.name} sent {what} nobody asked for")
            now = self._loop.time()
            rate = limits.max_skipped_per_s
            self._skip_tokens = min(rate, self._skip_tokens + (now - self._skip_refilled) * rate)
            self._skip_refilled = now
            if self._skip_tokens < 1:
                raise BusClosed(f"{self.name} sent more than {rate} unasked-for signals a second")
            self._skip_tokens -= 1
        self.skipped += 1
        now = self._loop.time()
        sender = header.fields.get(HeaderFields.sender) if header is not None else None
        # No news: the peer's own broadcasts, a broadcast our AddMatch brought while nobody
        # waits for it (a bus signal without a destination), the bus daemon's NameAcquired.
        routed = (
            header is not None
            and header.message_type is MessageType.signal
            and HeaderFields.destination not in header.fields
        )
        if broadcast or routed or sender == BUS_DAEMON.bus_name:
            return
        if now - self._last_skip_log >= _SKIP_LOG_INTERVAL_S:
            self._last_skip_log = now
            log.info(
                "%s: skipped %s from %s (%d skipped so far)", self.name, what, sender, self.skipped
            )

    def _too_large(self, header: Header, size: int, limit: int) -> bool:
        """Whether a wanted message is over `limit`; if so, tell whoever wanted it."""
        if size <= limit:
            return False
        what = f"{size}-byte {header.message_type.name}"
        if self.limits.close_on_unsolicited:
            raise BusClosed(f"{self.name} sent a {what}, over our cap of {limit}")
        if header.message_type is MessageType.signal:
            for queue in self._queues:
                if header_matches(queue.rule, header):
                    queue._overflow()
            for hook in list(self._handlers.values()):
                if hook.on_lost is not None and hook.wants(header):
                    hook.on_lost()
        else:
            entry = self._pending.get(header.fields.get(HeaderFields.reply_serial, -1))
            if entry is not None and not entry.future.done():
                entry.future.set_exception(ReplyTooLarge(f"{what} over our cap of {limit}"))
        log.warning("%s: skipped a %s, over our cap of %d", self.name, what, limit)
        return True

    def _wanted(self, header: Header, size: int) -> bool:
        """Whether a message with this header is worth reading (see the module docstring)."""
        kind = header.message_type
        if kind in (MessageType.method_return, MessageType.error):
            serial = header.fields.get(HeaderFields.reply_serial)
            entry = self._pending.get(serial) if isinstance(serial, int) else None
            if entry is None or entry.future.done():
                if isinstance(serial, int) and self._abandoned.pop(serial, 0) is None:
                    self.skipped += 1  # late, not unsolicited
                else:
                    self._unwanted(f"a reply to serial {serial}", size, header)
                return False
            return not self._too_large(header, size, self.limits.max_message_bytes)
        if kind is MessageType.signal:
            if not any(header_matches(queue.rule, header) for queue in self._queues) and not any(
                h.wants(header) for h in self._handlers.values()
            ):
                member = header.fields.get(HeaderFields.member)
                self._unwanted(f"a {size}-byte signal {member}", size, header)
                return False
            return not self._too_large(header, size, self.limits.max_signal_bytes)
        # Method calls *to* us (a peer probing) get no answer: we export nothing.
        self._unwanted(f"a method call {header.fields.get(HeaderFields.member)}", size, header)
        return False

    async def _receive_one(self) -> None:
        fds: list[FileDescriptor] = []
        try:
            fixed = await self._recv_exactly(_FIXED_HEADER_BYTES, fds)
            size, header_end = self._sizes(fixed)
            if header_end - _FIXED_HEADER_BYTES > self.limits.max_header_fields_bytes:
                self._unwanted(f"a message with a {header_end}-byte header", size)
                await self._skip(size - _FIXED_HEADER_BYTES, fds)
                return
            head = fixed + await self._recv_exactly(header_end - _FIXED_HEADER_BYTES, fds)
            try:
                header, body_at = Header.from_buffer(head)
            except _DECODE_ERRORS as exc:
                raise BusClosed(f"malformed D-Bus header: {exc}") from exc
            if not self._wanted(header, size):
                await self._skip(size - header_end, fds)
                return
            buf = head + await self._recv_exactly(size - header_end, fds)
            if header.fields.get(HeaderFields.unix_fds, 0) != len(fds):
                raise BusClosed(f"{self.name} sent a message with the wrong number of fds")
            try:
                msg = Message(header, _parse_body(header, buf, body_at, fds))
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
            for hook in list(self._handlers.values()):
                if hook.wants(msg.header) and signal_matches(hook.rule, msg):
                    hook.handler(msg)
            for queue in list(self._queues):
                if signal_matches(queue.rule, msg):
                    queue._push(msg)
        return fds

    async def _receive_loop(self) -> None:
        error = BusClosed("D-Bus receiver stopped")
        try:
            while True:
                await self._receive_one()
                # Let every other task run between two messages: reading a socket that always
                # has data never suspends by itself.
                await asyncio.sleep(0)
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
