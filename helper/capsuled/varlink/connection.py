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
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from capsuled.varlink.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from capsuled.varlink.framing import MAX_MESSAGE_BYTES, MessageBuffer
from capsuled.varlink.messages import Call, ErrorReply, Reply, encode, parse_call, parse_reply

__all__ = ["ClientConnection", "ConnectionState", "ServerConnection"]


class ConnectionState(Enum):
    """Whether the connection can still be used."""

    OPEN = "open"
    ERROR = "error"


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

    __slots__ = ("_buffer", "_pending", "_state")

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = MessageBuffer(max_message_bytes)
        self._pending: deque[Call] = deque()
        self._state = ConnectionState.OPEN

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

    def receive_data(self, data: bytes | memoryview) -> None:
        """Feed bytes read from the socket (copied: the caller may reuse its buffer)."""
        self._check_open()
        self._buffer.feed(data)


class ServerConnection(_Connection):
    """The server side of one Varlink connection.

    `max_depth` and `max_values` bound a call's JSON nesting and number of values, checked on
    the bytes before anything is built (capsuled.varlink.shape); None leaves that bound out.
    """

    __slots__ = ("_max_depth", "_max_values")

    def __init__(
        self,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        *,
        max_depth: int | None = None,
        max_values: int | None = None,
    ) -> None:
        super().__init__(max_message_bytes)
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
        try:
            raw = self._buffer.next_message()
            if raw is None:
                return None
            call = parse_call(raw, max_depth=self._max_depth, max_values=self._max_values)
        except ProtocolError:
            self._state = ConnectionState.ERROR
            raise
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
        try:
            raw = self._buffer.next_message()
            if raw is None:
                return None
            reply = parse_reply(raw)
            if not self._pending:
                raise RemoteProtocolError("reply received but no call is pending")
            if isinstance(reply, Reply) and reply.continues and not self._pending[0].more:
                raise RemoteProtocolError("continues on a call that did not ask for more")
        except ProtocolError:
            self._state = ConnectionState.ERROR
            raise
        if isinstance(reply, ErrorReply) or not reply.continues:
            self._pending.popleft()
        return reply
