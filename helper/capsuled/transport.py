"""The asyncio Varlink server: accept, peer credentials, limits, timeouts, the one error boundary.

One task per connection reads bytes into a `ServerConnection` (capsuled.varlink) and handles its
calls one after the other, as sd-varlink does, so pipelined calls are answered in order. While a
call runs the task keeps reading (bounded by the message cap) to notice the peer going away.

Limits (see `Limits`; defaults chosen for a Python daemon under systemd's default RLIMIT_NOFILE soft
limit of 1024, each connection holding a socket and a pidfd):
- connections in total, and per UID (at most 3/4 of the total, as sd-varlink's
  VARLINK_DEFAULT_CONNECTIONS_PER_UID_MAX); a connection over either limit is closed at once;
- an idle timeout per connection: time without a complete call while none is running (bytes
  trickling in do not count, so a slow sender cannot hold a slot forever);
- calls running at once, in total and per UID (3/4 of the total again);
- the message size cap (in the protocol core);
- a write buffer high-water mark: notify() and the final reply wait for the peer to read; a peer
  that stays blocked longer than `send_timeout_s` is disconnected, so nothing buffers without bound.

Error boundary (style guide "Errors"): VarlinkError -> its error reply; any other exception ->
logged with its traceback, answered with the interface's InternalError; RemoteProtocolError ->
close without a reply; LocalProtocolError (our bug) -> logged, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from capsuled.peer import Peer, peer_credentials
from capsuled.varlink.connection import ConnectionState, ServerConnection
from capsuled.varlink.errors import LocalProtocolError, RemoteProtocolError, VarlinkError
from capsuled.varlink.framing import MAX_MESSAGE_BYTES
from capsuled.varlink.messages import Call, ErrorReply, Reply

__all__ = ["Limits", "PeerGone", "Server", "ServerErrors"]

log = logging.getLogger("capsuled.transport")

READ_CHUNK_BYTES = 64 * 1024
_REJECT_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Server limits; every one is a daemon option (capsuled serve --help)."""

    max_connections: int = 256
    max_connections_per_uid: int | None = None  # None: 3/4 of max_connections
    idle_timeout_s: float = 60.0
    max_inflight_calls: int = 64
    max_inflight_calls_per_uid: int | None = None  # None: 3/4 of max_inflight_calls
    max_message_bytes: int = MAX_MESSAGE_BYTES
    write_buffer_bytes: int = 1024 * 1024
    send_timeout_s: float = 30.0
    # How long a call may wait for an in-flight slot before it is answered ServerErrors.busy.
    slot_wait_s: float = 10.0
    # A call that streams (its first `continues` reply) gives its in-flight slot back and
    # holds a stream slot instead: a Watch or a followed Logs may last for hours and must
    # not starve short calls. Streams are capped separately, in total and per UID.
    max_streams: int = 128
    max_streams_per_uid: int = 16

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_inflight_calls < 1:
            raise ValueError("connection and call limits must be at least 1")
        if self.connections_per_uid < 1 or self.inflight_calls_per_uid < 1:
            raise ValueError("per-UID limits must be at least 1")
        if self.connections_per_uid > _three_quarters(self.max_connections):
            raise ValueError("max_connections_per_uid must be at most 3/4 of max_connections")
        if self.inflight_calls_per_uid > _three_quarters(self.max_inflight_calls):
            raise ValueError("max_inflight_calls_per_uid must be at most 3/4 of max_inflight_calls")
        if not 1 <= self.max_streams_per_uid <= self.max_streams:
            raise ValueError("stream limits must be at least 1, per UID at most the total")
        if min(self.idle_timeout_s, self.send_timeout_s, self.slot_wait_s) <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_message_bytes < 1 or self.write_buffer_bytes < 1:
            raise ValueError("sizes must be positive")

    @property
    def connections_per_uid(self) -> int:
        """The effective per-UID connection limit."""
        if self.max_connections_per_uid is not None:
            return self.max_connections_per_uid
        return _three_quarters(self.max_connections)

    @property
    def inflight_calls_per_uid(self) -> int:
        """The effective per-UID limit on calls running at once."""
        if self.max_inflight_calls_per_uid is not None:
            return self.max_inflight_calls_per_uid
        return _three_quarters(self.max_inflight_calls)


def _three_quarters(n: int) -> int:
    return max(1, n * 3 // 4)


@dataclass(frozen=True, slots=True)
class ServerErrors:
    """The replies the transport gives by itself. They are the served interface's own errors
    (the core knows no interface), so whoever wires the server names them."""

    internal: type[VarlinkError]  # a handler failed unexpectedly (the details go to the journal)
    busy: type[VarlinkError]  # no call or stream slot came free in time


class PeerGone(ConnectionError):
    """Raised by notify() when the peer disconnected or stopped reading for too long."""


NotifyFn = Callable[[dict[str, object]], Awaitable[None]]
Handle = Callable[[Call, Peer, NotifyFn], Awaitable[dict[str, object]]]


class _UidSlot:
    __slots__ = ("sem", "users")

    def __init__(self, n: int) -> None:
        self.sem = asyncio.Semaphore(n)
        self.users = 0


class _CallSlots:
    """Bounds calls running at once, in total and per UID; per-UID entries vanish when unused."""

    def __init__(self, total: int, per_uid: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_uid = per_uid
        self._uids: dict[int, _UidSlot] = {}

    async def acquire(self, uid: int) -> None:
        """Wait for a slot (the caller bounds the wait); pair with release()."""
        slot = self._uids.get(uid)
        if slot is None:
            slot = self._uids[uid] = _UidSlot(self._per_uid)
        slot.users += 1
        try:
            await slot.sem.acquire()
            try:
                await self._total.acquire()
            except BaseException:
                slot.sem.release()
                raise
        except BaseException:
            self._forget(uid, slot)
            raise

    def release(self, uid: int) -> None:
        slot = self._uids[uid]
        self._total.release()
        slot.sem.release()
        self._forget(uid, slot)

    def _forget(self, uid: int, slot: _UidSlot) -> None:
        slot.users -= 1
        if slot.users == 0:
            del self._uids[uid]


class _StreamSlots:
    """Counts long-lived streams in total and per UID; never waits: full means refused."""

    def __init__(self, total: int, per_uid: int) -> None:
        self._limit, self._per_uid_limit = total, per_uid
        self._total = 0
        self._uids: dict[int, int] = {}

    def try_take(self, uid: int) -> bool:
        if self._total >= self._limit or self._uids.get(uid, 0) >= self._per_uid_limit:
            return False
        self._total += 1
        self._uids[uid] = self._uids.get(uid, 0) + 1
        return True

    def give_back(self, uid: int) -> None:
        self._total -= 1
        self._uids[uid] -= 1
        if not self._uids[uid]:
            del self._uids[uid]


class _Closing(Exception):
    """Internal: end this connection now (peer gone, blocked, or protocol state broken)."""


class Server:
    """Serves Varlink connections through `handle` (normally Dispatcher.handle)."""

    def __init__(self, handle: Handle, errors: ServerErrors, limits: Limits | None = None) -> None:
        self.handle = handle
        self.errors = errors
        self.limits = limits or Limits()
        self._total = 0
        self._per_uid: dict[int, int] = {}
        self._slots = _CallSlots(self.limits.max_inflight_calls, self.limits.inflight_calls_per_uid)
        self._streams = _StreamSlots(self.limits.max_streams, self.limits.max_streams_per_uid)
        self._changed = asyncio.Event()
        self._conns: dict[asyncio.Task[None], _Connection] = {}
        self.draining = False  # set by shutdown(): finish the running call, take no new ones
        self._last_reject_log = -_REJECT_LOG_INTERVAL_S
        self.rejected = 0  # connections refused by a limit, for logs and tests

    @property
    def connections(self) -> int:
        """Connections currently admitted."""
        return self._total

    async def listen(self, sock: socket.socket) -> asyncio.Server:
        """Serve a listening Unix socket (already bound and listening)."""
        return await asyncio.start_unix_server(self.serve_stream, sock=sock)

    async def serve_connected(self, sock: socket.socket) -> None:
        """Serve one already-connected socket (Accept=yes, varlinkctl exec:) until it closes."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        await self.serve_stream(reader, writer)

    async def wait_idle(self, seconds: float) -> None:
        """Return once no connection has existed for `seconds` in a row."""
        while True:
            self._changed.clear()
            if self._total == 0:
                try:
                    await asyncio.wait_for(self._changed.wait(), seconds)
                except TimeoutError:
                    if self._total == 0:
                        return
            else:
                await self._changed.wait()

    async def wait_connections(self, n: int) -> None:
        """Return once at most `n` connections are admitted (tests, shutdown)."""
        while self._total > n:
            self._changed.clear()
            await self._changed.wait()

    async def close_connections(self) -> None:
        """Cancel every connection task and wait for them to finish."""
        tasks = list(self._conns)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def shutdown(self, grace_s: float) -> None:
        """Stop gracefully (SIGTERM): close idle connections now, let running calls finish for
        up to `grace_s`, then cancel what is left. Close the listener first."""
        self.draining = True
        for task, conn in list(self._conns.items()):
            if not conn.busy:
                task.cancel()
        try:
            async with asyncio.timeout(grace_s):
                await self.wait_connections(0)
        except TimeoutError:
            log.warning("%d call(s) still running after %.0f s; cancelling", self._total, grace_s)
        await self.close_connections()

    def _admit(self, peer: Peer) -> bool:
        if self._total >= self.limits.max_connections:
            why = "total"
        elif self._per_uid.get(peer.uid, 0) >= self.limits.connections_per_uid:
            why = "per-UID"
        else:
            self._total += 1
            self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
            self._changed.set()
            return True
        self.rejected += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_reject_log >= _REJECT_LOG_INTERVAL_S:  # a flood must not flood the log
            self._last_reject_log = now
            log.warning(
                "connection limit (%s) reached; refusing uid=%d pid=%d (%d refused so far)",
                why,
                peer.uid,
                peer.pid,
                self.rejected,
            )
        return False

    def _release(self, peer: Peer) -> None:
        self._total -= 1
        left = self._per_uid[peer.uid] - 1
        if left:
            self._per_uid[peer.uid] = left
        else:
            del self._per_uid[peer.uid]
        self._changed.set()

    async def serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection (the asyncio.start_unix_server callback)."""
        sock: socket.socket = writer.get_extra_info("socket")
        try:
            peer = peer_credentials(sock)
        except OSError as exc:
            log.info("cannot read peer credentials (%s); closing", exc)
            writer.transport.abort()
            return
        if not self._admit(peer):
            if peer.pidfd is not None:
                os.close(peer.pidfd)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        conn = _Connection(self, reader, writer, peer)
        if task is not None:
            self._conns[task] = conn
        try:
            writer.transport.set_write_buffer_limits(high=self.limits.write_buffer_bytes)
            await conn.run()
        except asyncio.CancelledError:
            # close_connections() cancels us; end quietly. (Python 3.11's StreamReaderProtocol
            # callback calls task.exception() on a cancelled task and logs a spurious error.)
            pass
        finally:
            if task is not None:
                self._conns.pop(task, None)
            writer.transport.abort()
            if peer.pidfd is not None:
                os.close(peer.pidfd)
            self._release(peer)


class _Connection:
    def __init__(
        self,
        server: Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
    ) -> None:
        self.server = server
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.conn = ServerConnection(self.limits.max_message_bytes)
        self.eof = False
        self.busy = False  # a call is running: shutdown() lets it finish
        # Which slot the running call holds (calls on one connection run one at a time).
        self._holding: Literal["call", "stream"] | None = None

    def _who(self) -> str:
        return f"uid={self.peer.uid} pid={self.peer.pid}"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.idle_timeout_s
        try:
            while not self.server.draining:
                call = self.conn.next_call()
                if call is None:
                    if self.eof:
                        return
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        log.debug("idle timeout, closing %s", self._who())
                        return
                    try:
                        async with asyncio.timeout(remaining):
                            data = await self.reader.read(READ_CHUNK_BYTES)
                    except TimeoutError:
                        log.debug("idle timeout, closing %s", self._who())
                        return
                    self._received(data)
                    continue
                self.busy = True
                try:
                    await self._run_call(call)
                finally:
                    self.busy = False
                deadline = loop.time() + self.limits.idle_timeout_s
        except RemoteProtocolError as exc:
            # Peer garbage: close without a reply (UAPI.20; sd-varlink does the same). Debug level,
            # as in sd-varlink: any local user could otherwise fill the journal at will.
            log.debug("protocol error from %s, closing: %s", self._who(), exc)
        except LocalProtocolError:
            log.error("protocol misuse on our side with %s, closing", self._who(), exc_info=True)
        except (_Closing, OSError):  # OSError: ConnectionResetError and the like
            log.debug("connection to %s closed", self._who())

    def _received(self, data: bytes) -> None:
        if data:
            self.conn.receive_data(data)
        else:
            self.eof = True

    async def _read_while_running(self, task: asyncio.Task[None], call: Call) -> None:
        """Wait for the call's task, reading ahead so a hang-up is noticed; bounded by the cap."""
        while not task.done():
            if self.eof or self.conn.buffered_bytes > self.limits.max_message_bytes:
                await asyncio.wait({task})
                return
            read = asyncio.ensure_future(self.reader.read(READ_CHUNK_BYTES))
            try:
                await asyncio.wait({task, read}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not read.done():
                    read.cancel()  # StreamReader.read loses no data when cancelled while waiting
                    with contextlib.suppress(asyncio.CancelledError):
                        await read
            if read.cancelled():
                continue
            try:
                data = read.result()
            except ConnectionError:
                data = b""
            self._received(data)
            if self.eof and call.more:
                # A streaming client hangs up to end the stream (varlinkctl --more, Ctrl-C).
                # A plain call is still answered after a half-close, as sd-varlink does.
                raise _Closing()

    async def _run_call(self, call: Call) -> None:
        task = asyncio.create_task(self._answer(call))
        try:
            await self._read_while_running(task, call)
        except BaseException:
            # Leaving early (hang-up, our own cancellation): stop the call and collect its
            # outcome, so no exception is left "never retrieved".
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        task.result()  # re-raise _Closing / protocol errors from the call itself

    async def _write(self, data: bytes) -> None:
        if self.writer.transport.is_closing():
            raise _Closing()
        self.writer.write(data)
        try:
            async with asyncio.timeout(self.limits.send_timeout_s):
                await self.writer.drain()
        except TimeoutError:
            log.info(
                "%s stopped reading for %.0f s, closing", self._who(), self.limits.send_timeout_s
            )
            raise _Closing() from None
        except ConnectionError as exc:
            raise _Closing() from exc

    async def _notify(self, params: dict[str, object]) -> None:
        if self._holding == "call":
            # From its first `continues` on, this call is a stream: it gives back its call
            # slot and needs a stream slot, or it ends here with ServerErrors.busy.
            server = self.server
            server._slots.release(self.peer.uid)
            self._holding = None
            if not server._streams.try_take(self.peer.uid):
                raise server.errors.busy()
            self._holding = "stream"
        try:
            await self._write(self.conn.send(Reply(params, continues=True)))
        except _Closing as exc:
            raise PeerGone("the peer went away") from exc

    async def _hold_call_slot(self) -> None:
        server = self.server
        try:
            async with asyncio.timeout(self.limits.slot_wait_s):
                await server._slots.acquire(self.peer.uid)
        except TimeoutError:
            raise server.errors.busy() from None
        self._holding = "call"

    def _release_slot(self) -> None:
        if self._holding == "call":
            self.server._slots.release(self.peer.uid)
        elif self._holding == "stream":
            self.server._streams.give_back(self.peer.uid)
        self._holding = None

    async def _answer(self, call: Call) -> None:
        server = self.server
        reply: Reply | ErrorReply
        try:
            try:
                await self._hold_call_slot()
                result = await server.handle(call, self.peer, self._notify)
            finally:
                self._release_slot()
            reply = Reply(result)
        except VarlinkError as exc:
            reply = _error_reply(exc, server.errors.internal)
        except (LocalProtocolError, PeerGone):
            raise
        except Exception:
            # The one broad catch (style guide): log the traceback, tell the client nothing of it.
            log.exception("method %s failed for %s", call.method, self._who())
            reply = ErrorReply(server.errors.internal.name, server.errors.internal().parameters)
        if call.oneway:
            if isinstance(reply, ErrorReply):
                log.debug("oneway call %s ended with %s", call.method, reply.error)
            return
        try:
            data = self.conn.send(reply)
        except LocalProtocolError:
            if self.conn.state is ConnectionState.ERROR:
                raise
            # Unencodable parameters (a handler bug): answer InternalError instead.
            log.exception("reply to %s cannot be encoded", call.method)
            internal = server.errors.internal()
            data = self.conn.send(ErrorReply(internal.name, internal.parameters))
        await self._write(data)


def _error_reply(exc: VarlinkError, internal_error: type[VarlinkError]) -> ErrorReply:
    try:
        return ErrorReply(exc.name, exc.parameters)
    except (AttributeError, LocalProtocolError):
        # A VarlinkError without a valid wire name is a bug of ours, not an answer.
        log.exception("invalid error raised")
        return ErrorReply(internal_error.name, internal_error().parameters)
