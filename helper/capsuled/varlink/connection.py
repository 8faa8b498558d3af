"""Per-connection Varlink state, with no I/O: bytes in -> events out, events in -> bytes out (h11's
shape).

A server connection keeps the calls still owed a reply, in arrival order (Varlink answers pipelined
calls in order). The table below is the whole rule set for what may be sent to the oldest pending
call:

    call flags      Reply(continues=False)  Reply(continues=True)  ErrorReply
    (none)          final                   illegal                final
    more            final                   allowed, stays         final
    upgrade         illegal (unsupported)   illegal                final
    oneway          -- never pending: nothing may be sent for it --

Any illegal move raises LocalProtocolError and leaves the connection in the ERROR state; any
malformed input raises RemoteProtocolError and does the same. After an error every method raises
again.

File descriptors (SCM_RIGHTS) ride with the message they accompany, as in sd-varlink. The I/O
layer says which fds came with which bytes (`receive_data(data, fds)`); the connection hands
them out with that message (`Call.fds`, `Reply.fds`) and never does anything else with them.
The rules, each a RemoteProtocolError:

- fds are accepted only if the connection allows them (`max_fds`, per message; 0: none);
- a read that brings fds belongs to the *last* message that begins in its bytes: Linux ends a
  stream read right after the bytes of a sendmsg() that carried fds, and a sender sends a
  message's fds with its first byte (sd-varlink's rule), so bytes of an earlier message may
  come first in the same read, never bytes of a later one. A read with fds in which no
  message begins (the middle of a message) is refused;
- at most `max_fds` per message, and fds for at most one message not yet handed out: what a
  peer makes us hold stays bounded by the cap, however much it pipelines.

Every fd given to `receive_data` is held until it leaves with its message; `release_fds()`
hands back all still held (the I/O layer closes them: on a protocol error, at disconnect).
"""

from __future__ import annotations

from capsuled.varlink.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from capsuled.varlink.framing import MAX_MESSAGE_BYTES, MessageBuffer
from capsuled.varlink.messages import Call, ErrorReply, Reply, encode, parse_call, parse_reply

# Not typing's: capsulectl's start-up loads no typing, ~5 ms of it (mypy: true all the same).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections import deque
    from typing import ClassVar, NoReturn
else:
    # collections' own source of deque: the collections package (namedtuple, OrderedDict, ...)
    # costs the client's start-up ~2 ms for nothing it uses.
    from _collections import deque

__all__ = ["ClientConnection", "ConnectionState", "ServerConnection"]


class ConnectionState:
    """Whether the connection can still be used: ConnectionState.OPEN or .ERROR (compare with
    `is`). Two constants rather than an Enum: enum costs capsulectl's start-up ~2-3 ms."""

    __slots__ = ("value",)
    OPEN: ClassVar[ConnectionState]
    ERROR: ClassVar[ConnectionState]

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"<ConnectionState.{self.value.upper()}: {self.value!r}>"


ConnectionState.OPEN = ConnectionState("open")
ConnectionState.ERROR = ConnectionState("error")


def _check_send(call: Call, msg: Reply | ErrorReply) -> bool:
    """Apply the table above; return True if `msg` is the final answer to `call`."""
    if isinstance(msg, ErrorReply):
        return True
    if call.upgrade:
        # We implement no protocol upgrades; only an error may answer such a call.
        raise LocalProtocolError(f"cannot accept the upgrade requested by {call.method}")
    if msg.continues and not call.more:
        raise LocalProtocolError(f"{call.method} was not called with more; cannot continue")
    return not msg.continues


class _Connection:
    """What both ends share: the receive buffer, the pending calls in order, the ERROR state."""

    __slots__ = (
        "_at_boundary",
        "_buffer",
        "_consumed",
        "_fds_at",
        "_max_fds",
        "_orphans",
        "_pending",
        "_received",
        "_state",
    )

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES, *, max_fds: int = 0) -> None:
        if max_fds < 0:
            raise ValueError("max_fds must not be negative")
        self._buffer = MessageBuffer(max_message_bytes)
        self._pending: deque[Call] = deque()
        self._state = ConnectionState.OPEN
        self._max_fds = max_fds
        # Stream offsets: bytes fed so far, bytes returned as messages (with their NULs), and
        # whether the last byte fed ended a message. `_fds_at` holds the fds not yet handed
        # out and the offset of the message they belong to.
        self._received = 0
        self._consumed = 0
        self._at_boundary = True
        self._fds_at: tuple[int, tuple[int, ...]] | None = None
        self._orphans: list[int] = []  # fds refused or of a message refused: to be closed

    @property
    def max_fds(self) -> int:
        """The most file descriptors one message may carry (0: none accepted)."""
        return self._max_fds

    @property
    def held_fds(self) -> int:
        """File descriptors received and not yet handed out with their message."""
        return len(self._orphans) + (len(self._fds_at[1]) if self._fds_at is not None else 0)

    def release_fds(self) -> tuple[int, ...]:
        """Give up every fd still held (the caller closes them); the connection keeps none."""
        held = tuple(self._orphans) + (self._fds_at[1] if self._fds_at is not None else ())
        self._orphans.clear()
        self._fds_at = None
        return held

    @property
    def state(self) -> ConnectionState:
        """OPEN, or ERROR after any protocol error."""
        return self._state

    @property
    def pending(self) -> int:
        """Number of calls still owed a (final) reply."""
        return len(self._pending)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buffer)

    def _check_open(self) -> None:
        if self._state is ConnectionState.ERROR:
            raise LocalProtocolError("connection is in the ERROR state")

    def receive_data(self, data: bytes | memoryview, fds: tuple[int, ...] = ()) -> None:
        """Feed bytes read from the socket (copied: the caller may reuse its buffer), and the
        fds that one read brought with them (held from here on, even if this raises).

        Raises:
            RemoteProtocolError: fds that break the rules in the module docstring.
        """
        view = memoryview(data)
        if fds:
            # Held before anything can fail, so release_fds() returns them whatever happens.
            self._orphans.extend(fds)
            self._check_open()
            if len(fds) > self._max_fds:
                self._fail(f"{len(fds)} file descriptors in one message; at most {self._max_fds}")
            if self._fds_at is not None:
                self._fail("file descriptors for a second message before the first was read")
            start = self._last_start(view)
            if start is None:
                self._fail("file descriptors arrived inside a message, not with its first byte")
            del self._orphans[-len(fds) :]
            self._fds_at = (start, tuple(fds))
        self._check_open()
        self._buffer.feed(view)
        if len(view):
            self._received += len(view)
            self._at_boundary = view[-1] == 0

    def _last_start(self, view: memoryview) -> int | None:
        """Stream offset of the last message that begins within `view`, or None."""
        # The last NUL that is not the final byte: a message begins right after it.
        end = len(view) - 1
        nul = bytes(view[:end]).rfind(b"\0") if end > 0 else -1
        if nul >= 0:
            return self._received + nul + 1
        return self._received if self._at_boundary and len(view) else None

    def _fail(self, why: str) -> NoReturn:
        self._state = ConnectionState.ERROR
        raise RemoteProtocolError(why)

    def _next_message(self) -> tuple[bytes, tuple[int, ...]] | None:
        """The next message without its NUL and the fds that came with it."""
        raw = self._buffer.next_message()
        if raw is None:
            return None
        start = self._consumed
        self._consumed += len(raw) + 1
        fds: tuple[int, ...] = ()
        if self._fds_at is not None and self._fds_at[0] == start:
            fds, self._fds_at = self._fds_at[1], None
        return raw, fds


class ServerConnection(_Connection):
    """The server side of one Varlink connection.

    `max_depth` and `max_values` bound a call's JSON nesting and number of values, checked on
    the bytes before anything is built (capsuled.varlink.shape); None leaves that bound out.
    `max_fds` is the most fds one call may bring (0: none). Which methods may take them, and
    how many, is the server's business: the core only hands them out with their call.
    """

    __slots__ = ("_max_depth", "_max_values")

    def __init__(
        self,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        *,
        max_depth: int | None = None,
        max_values: int | None = None,
        max_fds: int = 0,
    ) -> None:
        super().__init__(max_message_bytes, max_fds=max_fds)
        if (max_depth is not None and max_depth < 1) or (max_values is not None and max_values < 1):
            raise ValueError("JSON limits must be positive")
        self._max_depth = max_depth
        self._max_values = max_values

    def next_call(self) -> Call | None:
        """Return the next complete call, or None if more bytes are needed.

        Raises:
            RemoteProtocolError: malformed or oversized message; close without a reply.
        """
        self._check_open()
        fds: tuple[int, ...] = ()
        try:
            message = self._next_message()
            if message is None:
                return None
            raw, fds = message
            call = parse_call(raw, max_depth=self._max_depth, max_values=self._max_values)
        except ProtocolError:
            self._state = ConnectionState.ERROR
            self._orphans.extend(fds)  # still ours to hand back through release_fds()
            raise
        if fds:
            call = call.with_fds(fds)
        if not call.oneway:
            self._pending.append(call)
        return call

    def send(self, msg: Reply | ErrorReply) -> bytes:
        """Turn a reply to the oldest pending call into bytes.

        Raises:
            LocalProtocolError: no call is owed a reply (it was oneway?), or the table forbids it.
        """
        self._check_open()
        try:
            if not self._pending:
                raise LocalProtocolError("no call is waiting for a reply (oneway calls get none)")
            final = _check_send(self._pending[0], msg)
        except LocalProtocolError:
            self._state = ConnectionState.ERROR
            raise
        # An unencodable reply raises LocalProtocolError but leaves the state alone: nothing was
        # sent, so the caller may still answer this call (the server answers with InternalError).
        data = encode(msg)
        if final:
            self._pending.popleft()
        return data


class ClientConnection(_Connection):
    """The client side of one Varlink connection."""

    __slots__ = ()

    def send(self, call: Call) -> bytes:
        """Turn a call into bytes and remember that it awaits a reply (unless oneway)."""
        self._check_open()
        if call.upgrade:
            self._state = ConnectionState.ERROR
            raise LocalProtocolError("protocol upgrades are not supported")
        try:
            data = encode(call)
        except LocalProtocolError:
            self._state = ConnectionState.ERROR
            raise
        if not call.oneway:
            self._pending.append(call)
        return data

    def next_reply(self) -> Reply | ErrorReply | None:
        """Return the next complete reply, or None if more bytes are needed.

        Raises:
            RemoteProtocolError: malformed bytes, a reply nobody asked for, or `continues` on a call
                that did not ask for more.
        """
        self._check_open()
        fds: tuple[int, ...] = ()
        try:
            message = self._next_message()
            if message is None:
                return None
            raw, fds = message
            reply = parse_reply(raw)
            if fds and not isinstance(reply, Reply):
                raise RemoteProtocolError("file descriptors with an error reply")
            if not self._pending:
                raise RemoteProtocolError("reply received but no call is pending")
            if isinstance(reply, Reply) and reply.continues and not self._pending[0].more:
                raise RemoteProtocolError("continues on a call that did not ask for more")
        except ProtocolError:
            self._state = ConnectionState.ERROR
            self._orphans.extend(fds)
            raise
        if fds:
            assert isinstance(reply, Reply)  # checked above
            reply = reply.with_fds(fds)
        if isinstance(reply, ErrorReply) or not reply.continues:
            self._pending.popleft()
        return reply
