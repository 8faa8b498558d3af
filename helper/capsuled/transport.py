"""The asyncio Varlink server: accept, peer credentials, limits, timeouts, the one error boundary.

One task per connection reads straight from its socket into a `ServerConnection`
(capsuled.varlink) and handles its calls one after the other, as sd-varlink does, so pipelined
calls are answered in order. While a call runs the task reads on a little (READ_AHEAD_BYTES) to
notice the peer going away. Nothing buffers between the socket and the protocol core (no asyncio
streams): every byte a peer makes us hold is in the core's buffer or in a reply being sent, and
both count against one budget.

Limits (`Limits`; each is a `capsuled serve` option). Every per-caller share is counted against
the connection's *account*: its uid, except that a process inside a capsule (running as the
capsule's dynamic uid) counts against the capsule's owner, so owning capsules buys no extra
shares (`Server(account=...)`, wired in daemon.py). The defaults, and why:
- connections: 512 in total, 32 per account. A caller needs one per command and one per
  `logs -f` or Watch; 32 leaves room for scripts running many at once, and sixteen accounts must
  be busy together to fill the table (three hold at most 3/16 of it). 512 connections cost 1024
  fds (socket + pidfd), well within capsuled.service's LimitNOFILE. sd-varlink allows 1/4 of
  its table per uid, but its table is 4096 and its connections cost a few KiB in C.
- an idle timeout per connection: time without a complete call while none is running (bytes
  trickling in do not count, so a slow sender cannot hold a slot forever);
- calls running at once: 64 in total, 4 per account (a person runs one command at a time; four
  let a script work in parallel), so sixteen accounts must be busy together to fill them: a call
  may spend most of its time waiting on polkitd or PID 1, and with slots to spare a quiet
  caller never waits behind that. Free slots go to the waiting accounts in turn
  (capsuled.fairslots). A call waits at most `slot_wait_s` for a slot, then gets
  ServerErrors.busy;
- streams (a call's first `continues` reply turns it into one; it gives its call slot back):
  128 in total, 8 per account, and of those, streams that anybody may open without any
  authorization (`open_streams`: Watch) at most 16 in total and 2 per account;
- waits outside a slot: a call waiting for a human (interactive polkit) gives its call slot back
  and holds one of 16 waiting slots, 2 per account (capsuled.callslot);
- the message cap and the JSON shape limits, enforced in the protocol core;
- an input rate per account: 2 MiB a second on average, bursts of two whole calls at once. A
  peer that sends its call in full and gets closed, again and again (an unterminated call past
  the budget, a malformed one), made the helper read and drop hundreds of MiB a second, most of
  its CPU; past its rate an account's sockets are simply not read for a while, and it waits in
  its own kernel buffers. No call this interface takes comes near it;
- one buffer budget for all connections together: bytes received and not yet handled, plus
  replies being sent. Past it, the connection holding the most unhandled input is closed (then,
  with no input left to blame, the one with the largest reply outstanding; the oldest first
  among equals), until the total fits again;
- a send timeout: a peer that takes no bytes for `send_timeout_s` is disconnected;
- file descriptors (SCM_RIGHTS, capsuled.fdpass): at most `max_fds_per_message` per message
  (more, a truncated control message, or fds the protocol core refuses close the connection),
  and fds held at once 64 per account, 1024 in total (each is one of the helper's own
  RLIMIT_NOFILE): past either, the connection that brought them is closed. Every fd received
  is O_CLOEXEC (MSG_CMSG_CLOEXEC: no child of ours inherits one) and is closed when its call
  ends, when the method takes none (answered `fds_refused`), or when the connection ends.

Error boundary (style guide "Errors"): VarlinkError -> its error reply; any other exception ->
logged with its traceback, answered with the interface's InternalError; RemoteProtocolError ->
close without a reply; LocalProtocolError (our bug) -> logged, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from capsuled import callslot, fdpass
from capsuled.fairslots import FairSlots
from capsuled.peer import Peer, peer_credentials, peer_uid
from capsuled.varlink.connection import ConnectionState, ServerConnection
from capsuled.varlink.errors import LocalProtocolError, RemoteProtocolError, VarlinkError
from capsuled.varlink.messages import Call, ErrorReply, Reply

__all__ = [
    "MAX_CALL_BYTES",
    "MAX_CALL_DEPTH",
    "MAX_CALL_VALUES",
    "Limits",
    "Listener",
    "PeerGone",
    "Server",
    "ServerErrors",
]

log = logging.getLogger("capsuled.transport")

# The largest call org.capsuled.Manager needs, with room to spare: Deploy carries a bundle of at
# most 512 KiB (bundle.MAX_BUNDLE_BYTES) in base64, whose alphabet JSON does not escape: ~683 KiB;
# InstallUnit carries a unit file of at most 64 KiB (unitfile.UNIT_FILE_MAX_BYTES), which JSON
# escaping can blow up at most six-fold (a control character becomes \u00XX), 384 KiB; Run
# carries at most 4096 arguments and 1024 environment entries, far below ARG_MAX-sized command
# lines in practice. 1 MiB holds the largest Deploy with ~340 KiB to spare. (systemd's
# VARLINK_BUFFER_MAX of 16 MiB is for any interface; ours needs less, and every byte of it is
# memory any local user can make us hold.) test_transport_limits.py holds these to the
# interface's own caps.
MAX_CALL_BYTES: Final = 1024 * 1024
# A call's JSON is an object holding `parameters`, holding at most an array of strings or a map:
# three levels. 16 is margin, and a small enough nesting that nothing recursive gets deep.
MAX_CALL_DEPTH: Final = 16
# Run's 4096 arguments + 1024 environment entries are the most values a call carries (a few
# dozen more for the other fields); 8192 leaves room, and bounds what json builds from 1 MiB of
# tiny values (~250 MiB for 8 MiB of `{}` in the testbed) to a few hundred KiB.
MAX_CALL_VALUES: Final = 8192

READ_CHUNK_BYTES: Final = 64 * 1024
# Connections accepted (or refused) per turn of the event loop.
ACCEPT_BATCH: Final = 64
# While a call runs, read on only this far: enough to notice a hang-up, and any peer pipelining
# calls waits in the kernel's socket buffer (its own memory) instead of ours.
READ_AHEAD_BYTES: Final = 64 * 1024
_REJECT_LOG_INTERVAL_S: Final = 10.0
# After accept() fails for lack of fds or memory, wait this long before trying again (asyncio's
# own server waits a second; a short pause suffices to let connections end).
_ACCEPT_RETRY_S: Final = 0.1
_ACCEPT_RETRY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() failing like this means the listening socket itself is unusable: stop serving.
_ACCEPT_FATAL_ERRNOS: Final = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})


@dataclass(frozen=True, slots=True)
class Limits:
    """Server limits; every one is a daemon option (capsuled serve --help)."""

    max_connections: int = 512
    max_connections_per_uid: int | None = None  # None: 1/16 of max_connections
    idle_timeout_s: float = 60.0
    max_inflight_calls: int = 64
    max_inflight_calls_per_uid: int | None = None  # None: 1/16 of max_inflight_calls
    max_message_bytes: int = MAX_CALL_BYTES
    max_json_depth: int = MAX_CALL_DEPTH
    max_json_values: int = MAX_CALL_VALUES
    # Input received and not yet handled plus replies being sent, all connections together.
    max_buffered_bytes: int = 64 * 1024 * 1024
    # Bytes read per second for one account, on average (bursts of two whole calls pass at once).
    max_input_bytes_per_uid_s: int = 2 * 1024 * 1024
    send_timeout_s: float = 30.0
    # How long a call may wait for an in-flight slot before it is answered ServerErrors.busy.
    slot_wait_s: float = 10.0
    max_streams: int = 128
    max_streams_per_uid: int = 8
    # Streams anybody may open without authorization (Server(open_streams=...)): Watch.
    max_open_streams: int = 16
    max_open_streams_per_uid: int = 2
    # Calls waiting for a human without a call slot (capsuled.callslot).
    max_waiting_calls: int = 16
    max_waiting_calls_per_uid: int = 2
    # File descriptors: per message (Run --pipe needs 3), and held at once.
    max_fds_per_message: int = 8
    max_fds: int = 1024
    max_fds_per_uid: int = 64

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_inflight_calls < 1:
            raise ValueError("connection and call limits must be at least 1")
        if self.connections_per_uid < 1 or self.inflight_calls_per_uid < 1:
            raise ValueError("per-UID limits must be at least 1")
        # As sd-varlink (VARLINK_DEFAULT_CONNECTIONS_PER_UID_MAX): one uid never gets it all.
        if self.connections_per_uid > _three_quarters(self.max_connections):
            raise ValueError("max_connections_per_uid must be at most 3/4 of max_connections")
        if self.inflight_calls_per_uid > _three_quarters(self.max_inflight_calls):
            raise ValueError("max_inflight_calls_per_uid must be at most 3/4 of max_inflight_calls")
        for total, per_uid, what in (
            (self.max_streams, self.max_streams_per_uid, "stream"),
            (self.max_open_streams, self.max_open_streams_per_uid, "open stream"),
            (self.max_waiting_calls, self.max_waiting_calls_per_uid, "waiting call"),
        ):
            if not 1 <= per_uid <= total:
                raise ValueError(f"{what} limits must be at least 1, per UID at most the total")
        if min(self.idle_timeout_s, self.send_timeout_s, self.slot_wait_s) <= 0:
            raise ValueError("timeouts must be positive")
        if min(self.max_message_bytes, self.max_json_depth, self.max_json_values) < 1:
            raise ValueError("sizes must be positive")
        if self.max_buffered_bytes < self.max_message_bytes:
            raise ValueError("max_buffered_bytes must hold at least one message")
        if self.max_input_bytes_per_uid_s < 1:
            raise ValueError("sizes must be positive")
        if not 0 <= self.max_fds_per_message <= self.max_fds_per_uid <= self.max_fds:
            raise ValueError("fd limits: per message <= per UID <= total")

    @property
    def connections_per_uid(self) -> int:
        """The effective per-account connection limit."""
        if self.max_connections_per_uid is not None:
            return self.max_connections_per_uid
        return max(1, self.max_connections // 16)

    @property
    def inflight_calls_per_uid(self) -> int:
        """The effective per-account limit on calls running at once."""
        if self.max_inflight_calls_per_uid is not None:
            return self.max_inflight_calls_per_uid
        return max(1, self.max_inflight_calls // 16)


def _three_quarters(n: int) -> int:
    return max(1, n * 3 // 4)


@dataclass(frozen=True, slots=True)
class ServerErrors:
    """The replies the transport gives by itself. They are the served interface's own errors
    (the core knows no interface), so whoever wires the server names them."""

    internal: type[VarlinkError]  # a handler failed unexpectedly (the details go to the journal)
    busy: type[VarlinkError]  # no call, stream or waiting slot came free in time
    # fds came with a call whose method takes none, or fewer: (method, how many it takes).
    fds_refused: Callable[[str, int], VarlinkError]


class PeerGone(ConnectionError):
    """Raised by notify() when the peer disconnected or stopped reading for too long."""


NotifyFn = Callable[[dict[str, object]], Awaitable[None]]
Handle = Callable[[Call, Peer, NotifyFn], Awaitable[dict[str, object]]]
Account = Callable[[int], int]  # a peer's uid -> the uid its connections count against


def _own_uid(uid: int) -> int:
    return uid


class _Counted:
    """Counts holders in total and per account; never waits: full means refused."""

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


class _InputRate:
    """Token buckets of bytes per account: `delay()` says how long an account must wait before
    its next read, `spend()` takes what a read got (the bucket may go below zero: a read takes
    what is there, up to a chunk). Buckets outlive their connections until refilled, so that
    closing every connection and opening new ones does not buy a fresh burst."""

    def __init__(self, per_s: float, burst: float, keep: int) -> None:
        self._per_s, self._burst, self._keep = per_s, burst, keep
        self._buckets: dict[int, tuple[float, float]] = {}  # account -> (tokens, when)

    def _now(self, account: int) -> float:
        now = asyncio.get_running_loop().time()
        tokens, when = self._buckets.get(account, (self._burst, now))
        return min(self._burst, tokens + (now - when) * self._per_s)

    def delay(self, account: int) -> float:
        tokens = self._now(account)
        return 0.0 if tokens > 0 else -tokens / self._per_s + 1e-3

    def spend(self, account: int, n: int) -> None:
        self._buckets[account] = (self._now(account) - n, asyncio.get_running_loop().time())
        if len(self._buckets) > self._keep:
            self._buckets = {a: b for a, b in self._buckets.items() if self._now(a) < self._burst}


class _FdCount:
    """File descriptors held, in total and per account (they are the helper's own fds)."""

    def __init__(self, total: int, per_uid: int) -> None:
        self._limit, self._per_uid_limit = total, per_uid
        self.total = 0
        self._uids: dict[int, int] = {}

    def take(self, account: int, n: int) -> bool:
        """Count `n` more for `account`, or refuse (counting nothing) past either limit."""
        held = self._uids.get(account, 0)
        if self.total + n > self._limit or held + n > self._per_uid_limit:
            return False
        self.total += n
        self._uids[account] = held + n
        return True

    def give_back(self, account: int, n: int) -> None:
        self.total -= n
        left = self._uids[account] - n
        if left:
            self._uids[account] = left
        else:
            del self._uids[account]


_FD_SIZE: Final = struct.calcsize("i")
# A plain int: socket.MSG_CTRUNC is an IntFlag, and `flags & IntFlag` builds a member through
# enum's __and__ (~2 us, once per read).
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Every fd in a recvmsg()'s control messages (SCM_RIGHTS); other kinds carry none."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(data) - len(data) % _FD_SIZE
            fds.extend(struct.unpack(f"{whole // _FD_SIZE}i", data[:whole]))
    return fds


def _close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Closing(Exception):
    """Internal: end this connection now (peer gone, blocked, or protocol state broken)."""


async def _writable(sock: socket.socket) -> None:
    """Wait until ``sock`` can take more bytes (or is closed by the peer)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


class Listener:
    """An accepting socket being served (`Server.listen`); `close()` stops accepting.

    `wait_closed()` also returns if the accept loop died (the listening socket became unusable):
    the daemon then stops serving, and socket activation starts a fresh one.
    """

    def __init__(self, task: asyncio.Task[None]) -> None:
        self._task = task

    def close(self) -> None:
        """Stop accepting; connections already accepted go on (Server.shutdown ends them)."""
        self._task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the accept loop has stopped (closed, or failed: logged here)."""
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        except OSError as exc:
            log.error("the listening socket failed (%s); no longer accepting", exc)


class Server:
    """Serves Varlink connections through `handle` (normally Dispatcher.handle).

    `account` says which uid a peer's connections, calls and streams count against (None: its
    own); `open_streams` names the methods anybody may stream from without authorization,
    which get their own small share of the streams; `takes_fds` maps each method that takes
    file descriptors to how many it takes at most (fds sent to any other are refused).
    """

    def __init__(
        self,
        handle: Handle,
        errors: ServerErrors,
        limits: Limits | None = None,
        *,
        account: Account | None = None,
        open_streams: frozenset[str] = frozenset(),
        takes_fds: Mapping[str, int] | None = None,
    ) -> None:
        self.handle = handle
        self.errors = errors
        self.limits = limits or Limits()
        self._account = account or _own_uid
        self._open_streams = open_streams
        self._takes_fds = dict(takes_fds or {})
        if any(n > self.limits.max_fds_per_message for n in self._takes_fds.values()):
            raise ValueError("a method takes more fds than max_fds_per_message allows")
        self._fds = _FdCount(self.limits.max_fds, self.limits.max_fds_per_uid)
        self._total = 0
        self._per_uid: dict[int, int] = {}
        lim = self.limits
        self._slots = FairSlots(lim.max_inflight_calls, lim.inflight_calls_per_uid)
        self._streams = _Counted(lim.max_streams, lim.max_streams_per_uid)
        self._open = _Counted(lim.max_open_streams, lim.max_open_streams_per_uid)
        self._waiting = _Counted(lim.max_waiting_calls, lim.max_waiting_calls_per_uid)
        self._changed = asyncio.Event()
        self._budget_changed = asyncio.Event()  # for wait_until(): any charge or eviction
        self._conns: dict[asyncio.Task[None], _Connection] = {}
        self._accepted: set[asyncio.Task[None]] = set()  # strong refs until each task ends
        self.draining = False  # set by shutdown(): finish the running call, take no new ones
        self._last_reject_log = -_REJECT_LOG_INTERVAL_S
        self._last_evict_log = -_REJECT_LOG_INTERVAL_S
        self._last_accept_error_log = -_REJECT_LOG_INTERVAL_S
        self.rejected = 0  # connections refused by a limit, for logs and tests
        self.evicted = 0  # connections closed by the buffer budget, for logs and tests
        self.throttled = 0  # reads put off for an account's input rate, for tests
        self.buffered_bytes = 0  # what the budget counts now, all connections together
        # Every read goes through here and is copied out at once (_Connection._read_available).
        self._scratch = bytearray(READ_CHUNK_BYTES)
        self._input = _InputRate(
            lim.max_input_bytes_per_uid_s, 2 * lim.max_message_bytes, lim.max_connections
        )

    @property
    def connections(self) -> int:
        """Connections currently admitted."""
        return self._total

    async def listen(self, sock: socket.socket) -> Listener:
        """Serve a listening Unix socket (already bound and listening) until closed."""
        sock.setblocking(False)
        return Listener(asyncio.create_task(self._accept_loop(sock), name="capsuled-accept"))

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn_sock, _ = await loop.sock_accept(sock)
                self._take(conn_sock)
                # Then whatever else waits in the backlog, up to a batch: a flood of
                # connections fills the backlog, and everybody else's waits behind it there.
                # Refusing one costs a getsockopt and a close.
                for _ in range(ACCEPT_BATCH - 1):
                    conn_sock, _ = sock.accept()
                    self._take(conn_sock)
            except BlockingIOError:
                continue  # the backlog is empty
            except OSError as exc:
                if exc.errno in _ACCEPT_FATAL_ERRNOS:
                    raise
                self._log_accept_error(exc)
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    await asyncio.sleep(_ACCEPT_RETRY_S)
                continue  # ECONNABORTED and the like: that client is gone, the next may come
            # One batch per turn of the loop: the connections already admitted get theirs.
            await asyncio.sleep(0)

    def _take(self, sock: socket.socket) -> None:
        """Admit an accepted socket (then serve it in a task of its own) or close it now."""
        account = self._admission(sock)
        if account is None:
            sock.close()
            return
        task = asyncio.create_task(self._serve(sock, account))
        self._accepted.add(task)
        task.add_done_callback(self._accepted.discard)
        # A task cancelled before it ever ran (close_connections) never reaches _serve's
        # `finally`: give its admission back here instead.
        task.add_done_callback(lambda _: self._release_unserved(sock, account))

    def _log_accept_error(self, exc: OSError) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._last_accept_error_log >= _REJECT_LOG_INTERVAL_S:
            self._last_accept_error_log = now
            log.warning("accept failed (%s); going on", exc)

    async def serve_connected(self, sock: socket.socket) -> None:
        """Serve one already-connected socket (Accept=yes, varlinkctl exec:) until it closes."""
        await self.serve_socket(sock)

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

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds, checked whenever connections or the bytes they
        hold change (tests, diagnostics); the caller bounds the wait."""
        while not condition():
            self._changed.clear()
            self._budget_changed.clear()
            changed = [
                asyncio.ensure_future(e.wait()) for e in (self._changed, self._budget_changed)
            ]
            try:
                await asyncio.wait(changed, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in changed:
                    waiting.cancel()

    async def close_connections(self) -> None:
        """Cancel every connection task and wait for them to finish."""
        tasks = set(self._conns) | self._accepted
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

    def _admit(self, uid: int, account: int) -> bool:
        if self._total >= self.limits.max_connections:
            why = "total"
        elif self._per_uid.get(account, 0) >= self.limits.connections_per_uid:
            why = "per-UID"
        else:
            self._total += 1
            self._per_uid[account] = self._per_uid.get(account, 0) + 1
            self._changed.set()
            return True
        self.rejected += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_reject_log >= _REJECT_LOG_INTERVAL_S:  # a flood must not flood the log
            self._last_reject_log = now
            log.warning(
                "connection limit (%s) reached; refusing uid=%d (account %d; %d refused so far)",
                why,
                uid,
                account,
                self.rejected,
            )
        return False

    def _release(self, account: int) -> None:
        self._total -= 1
        left = self._per_uid[account] - 1
        if left:
            self._per_uid[account] = left
        else:
            del self._per_uid[account]
        self._changed.set()

    def _rebudget(self, conn: _Connection, charged: int) -> None:
        """`conn` now holds `charged` bytes; close the worst offenders while over the budget."""
        if charged != conn.charged:
            self.buffered_bytes += charged - conn.charged
            conn.charged = charged
            self._budget_changed.set()
        while self.buffered_bytes > self.limits.max_buffered_bytes:
            victim = self._worst_offender()
            if victim is None:
                return
            self._evict(victim)

    def _worst_offender(self) -> _Connection | None:
        live = [c for c in self._conns.values() if not c.evicted and c.charged]
        if not live:
            return None
        # Unhandled input first: a reply being sent is work a caller asked for.
        return max(live, key=lambda c: (c.conn.buffered_bytes, c.charged, -c.serial))

    def _evict(self, victim: _Connection) -> None:
        victim.evicted = True
        self.buffered_bytes -= victim.charged
        victim.charged = 0
        self.evicted += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_evict_log >= _REJECT_LOG_INTERVAL_S:
            self._last_evict_log = now
            log.warning(
                "buffer budget of %d bytes exceeded; closing %s (%d closed so far)",
                self.limits.max_buffered_bytes,
                victim.who(),
                self.evicted,
            )
        if victim.task is not asyncio.current_task():
            victim.task.cancel()
        # Our own connection: _Connection._charge raises _Closing once this returns.

    def _admission(self, sock: socket.socket) -> int | None:
        """The account a new connection counts against, if admitted; None if refused.

        On the peer's uid alone: refusing a connection reads nothing else about it."""
        try:
            uid = peer_uid(sock)
        except OSError as exc:
            log.info("cannot read peer credentials (%s); closing", exc)
            return None
        account = self._account(uid)
        return account if self._admit(uid, account) else None

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve one accepted (or passed) connection until it ends."""
        account = self._admission(sock)
        if account is None:
            sock.close()
            return
        await self._serve(sock, account)

    def _release_unserved(self, sock: socket.socket, account: int) -> None:
        if sock.fileno() >= 0:  # _serve closed it if it ran
            sock.close()
            self._release(account)

    async def _serve(self, sock: socket.socket, account: int) -> None:
        try:
            try:
                peer = peer_credentials(sock)
            except OSError as exc:
                log.info("cannot read peer credentials (%s); closing", exc)
                return
            task = asyncio.current_task()
            assert task is not None  # a coroutine the loop runs
            conn = _Connection(self, sock, peer, account, task)
            self._conns[task] = conn
            try:
                sock.setblocking(False)
                await conn.run()
            except asyncio.CancelledError:
                pass  # close_connections(), shutdown() or the budget ended us: end quietly
            finally:
                self._conns.pop(task, None)
                self._rebudget(conn, 0)
                if peer.pidfd is not None:
                    os.close(peer.pidfd)
        finally:
            sock.close()
            self._release(account)


_serials = itertools.count(1)


class _Connection:
    def __init__(
        self,
        server: Server,
        sock: socket.socket,
        peer: Peer,
        account: int,
        task: asyncio.Task[None],
    ) -> None:
        self.server = server
        self.limits = server.limits
        self.sock = sock
        self.peer = peer
        self.account = account
        self.task = task
        self.serial = next(_serials)  # admission order: the budget closes the oldest first
        self.conn = ServerConnection(
            self.limits.max_message_bytes,
            max_depth=self.limits.max_json_depth,
            max_values=self.limits.max_json_values,
            max_fds=self.limits.max_fds_per_message,
        )
        # Control buffer for one read: room for the per-message cap, no more (MSG_CTRUNC past it).
        self._cmsg_bytes = (
            socket.CMSG_SPACE(self.limits.max_fds_per_message * _FD_SIZE)
            if self.limits.max_fds_per_message
            else 0
        )
        self.fds_held = 0  # fds of this connection counted in server._fds
        self._call_fds: list[int] = []  # the running call's, still open
        self._out_fds: list[int] = []  # pushed by the running call, for its next reply
        self.eof = False
        self.busy = False  # a call is running: shutdown() lets it finish
        self.charged = 0  # bytes this connection holds, as the budget counts them
        self.evicted = False  # closed by the budget; its task is being cancelled
        self._sending = 0  # size of the reply being sent
        # Which slot the running call holds (calls on one connection run one at a time).
        self._holding: Literal["call", "stream", "waiting"] | None = None
        self._open_stream = False  # its stream slot is also an open-stream slot
        self._wait: asyncio.Future[None] | None = None  # see _readable()
        self._timer: asyncio.TimerHandle | None = None  # the account's input rate
        self._watching = False  # a reader is registered for the socket
        self._idled = False  # the idle timeout ended the wait (run)
        self._idle_timer: asyncio.TimerHandle | None = None  # see _idle_check
        self._idle_waiting = False  # run() waits for input between calls
        self._deadline = 0.0  # of the idle wait (loop time)

    def who(self) -> str:
        """The peer, for log lines."""
        if self.account != self.peer.uid:
            return f"uid={self.peer.uid} pid={self.peer.pid} (account {self.account})"
        return f"uid={self.peer.uid} pid={self.peer.pid}"

    def _charge(self) -> None:
        """Tell the budget what this connection holds now; raises _Closing if that ended it."""
        if not self.evicted:
            self.server._rebudget(self, self.conn.buffered_bytes + self._sending)
        if self.evicted:
            raise _Closing()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.idle_timeout_s
        try:
            while not self.server.draining:
                call = self.conn.next_call()
                if call is None:
                    if self.eof:
                        return
                    if loop.time() >= deadline:
                        # Checked here too, not only by the timer: an expired timer and a
                        # reader callback due in the same turn may run reader first, so a peer
                        # keeping a partial message trickling in would never be timed out.
                        log.debug("idle timeout, closing %s", self.who())
                        return
                    readable = self._readable()
                    if not readable.done():
                        # The future itself, with one timer: asyncio.wait(timeout=) would add
                        # a waiter future, callbacks and a timer of its own to every idle wait.
                        # The timer outlives the wait (see _idle_check): one per idle period,
                        # not a timer made and cancelled for every call of a busy connection.
                        self._deadline = deadline
                        if self._idle_timer is None:
                            self._idle_timer = loop.call_at(deadline, self._idle_check)
                        self._idle_waiting = True
                        try:
                            await readable
                        finally:
                            self._idle_waiting = False
                    if self._idled:
                        log.debug("idle timeout, closing %s", self.who())
                        return
                    self._read_available()
                    continue
                self._call_fds = list(call.fds)  # ours now; closed when the call ends
                self._charge()  # the call left the buffer
                self.busy = True
                try:
                    await self._run_call(call)
                finally:
                    self.busy = False
                deadline = loop.time() + self.limits.idle_timeout_s
                if self.conn.buffered_bytes:
                    # More of a pipelined burst is waiting. A call that never waits was answered
                    # without giving the loop a turn (eager start), so without this the whole
                    # burst would run before any other connection, PID 1's signals or polkit's
                    # replies are looked at (e2e test_limits: ...pipelined_burst...). A client
                    # that waits for each reply leaves nothing buffered and never pays for it.
                    await asyncio.sleep(0)
        except RemoteProtocolError as exc:
            # Peer garbage: close without a reply (UAPI.20; sd-varlink does the same). Debug level,
            # as in sd-varlink: any local user could otherwise fill the journal at will.
            log.debug("protocol error from %s, closing: %s", self.who(), exc)
        except LocalProtocolError:
            log.error("protocol misuse on our side with %s, closing", self.who(), exc_info=True)
        except (_Closing, OSError):  # OSError: ConnectionResetError and the like
            log.debug("connection to %s closed", self.who())
        finally:
            self._stop_waiting()
            self.close_received()  # a call taken from the buffer but never run (eviction)
            self._drop_fds(list(self.conn.release_fds()))

    def _drop_fds(self, fds: list[int]) -> None:
        """Close fds this connection received and give them back to the count."""
        _close_fds(fds)
        n = min(len(fds), self.fds_held)
        if n:
            self.fds_held -= n
            self.server._fds.give_back(self.account, n)

    def _readable(self) -> asyncio.Future[None]:
        """Done once the socket has bytes (or the peer hung up); then `_read_available()`.

        An account past its input rate waits for it before the socket is even watched.
        Waiting consumes nothing, so giving up on the wait loses no data."""
        if self._wait is None or self._wait.done():
            loop = asyncio.get_running_loop()
            self._wait = loop.create_future()
            delay = self.server._input.delay(self.account)
            if delay > 0:
                self.server.throttled += 1
                self._unwatch()  # not even the socket is watched before the delay
                self._timer = loop.call_later(delay, self._watch)
            elif not self._watching:
                self._watch()
        return self._wait

    def _watch(self) -> None:
        self._timer = None
        if not self._watching:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._wake)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._watching = False

    def _wake(self) -> None:
        wait = self._wait
        if wait is not None and not wait.done():
            # The reader stays registered: the next wait (after the call these bytes carry,
            # in a request-reply exchange) needs no add_reader, and this one no remove_reader.
            wait.set_result(None)
        else:
            # Bytes nobody waits for (a call runs, read-ahead is full): stop watching until
            # the next wait, or the level-triggered reader would fire at every loop turn.
            self._unwatch()

    def _idle_check(self) -> None:
        """The idle timer: ends the idle wait if its deadline has passed; else (the timer was
        set for an earlier deadline, calls were served since) it waits for the current one.
        Outside an idle wait (a call runs) it ends, and the next idle wait sets it again."""
        self._idle_timer = None
        if not self._idle_waiting:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._idle_timer = loop.call_at(self._deadline, self._idle_check)
        elif self._wait is not None and not self._wait.done():  # bytes that came first win
            self._idled = True
            self._stop_waiting(ready=True)

    def _stop_waiting(self, ready: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_timer is not None and not ready:  # the connection ends
            self._idle_timer.cancel()
            self._idle_timer = None
        self._unwatch()
        if self._wait is not None and not self._wait.done():
            if ready:
                self._wait.set_result(None)
            else:
                self._wait.cancel()

    def _read_available(self) -> None:
        """Move what the socket holds (up to a chunk) into the protocol core's buffer.

        Through the server's one scratch buffer, read and copied with no await in between:
        a read allocates nothing of its own, which keeps the allocator from fragmenting under
        many connections each holding a little (issue 11, finding 3)."""
        scratch = self.server._scratch
        fds: list[int] = []
        try:
            if self._cmsg_bytes:
                # MSG_CMSG_CLOEXEC: no fd a peer sends is ever inherited by a child of ours.
                n, ancdata, flags, _ = self.sock.recvmsg_into(
                    [scratch], self._cmsg_bytes, socket.MSG_CMSG_CLOEXEC
                )
                fds = _fds_of(ancdata)
            else:
                n, flags = self.sock.recv_into(scratch), 0
        except BlockingIOError:
            return  # woken for nothing
        except ConnectionError:
            n, flags = 0, 0  # reset by the peer: the same as a hang-up
        if fds:
            if flags & _MSG_CTRUNC or not self.server._fds.take(self.account, len(fds)):
                # More fds than a message may carry (the kernel dropped the rest), or more than
                # this account may make us hold: nothing of this read is used.
                _close_fds(fds)
                log.debug("too many file descriptors from %s, closing", self.who())
                raise _Closing()
            self.fds_held += len(fds)
        elif flags & _MSG_CTRUNC:
            raise _Closing()
        if not n:
            self._drop_fds(fds)  # fds with no bytes belong to no message
            self.eof = True
            return
        self.server._input.spend(self.account, n)
        with memoryview(scratch) as view:
            self.conn.receive_data(view[:n], tuple(fds))
        self._charge()

    async def _read_while_running(self, task: asyncio.Task[None], call: Call) -> None:
        """Wait for the call's task, reading ahead (READ_AHEAD_BYTES) so a hang-up is noticed."""
        while not task.done():
            if self.eof or self.conn.buffered_bytes >= READ_AHEAD_BYTES:
                await asyncio.wait({task})
                return
            readable = self._readable()
            await asyncio.wait((task, readable), return_when=asyncio.FIRST_COMPLETED)
            if not readable.done():
                continue  # the call ended
            self._read_available()
            if self.eof and call.more:
                # A streaming client hangs up to end the stream (varlinkctl --more, Ctrl-C).
                # A plain call is still answered after a half-close, as sd-varlink does.
                raise _Closing()

    async def _run_call(self, call: Call) -> None:
        try:
            if sys.version_info >= (3, 12):
                # Started eagerly: a call that never waits (Info, a Describe from the model)
                # is answered and sent before this returns, with no read-ahead wait to set up
                # and tear down (a future, asyncio.wait, add_reader and remove_reader each).
                loop = asyncio.get_running_loop()
                task = asyncio.Task(self._answer(call), loop=loop, eager_start=True)
            else:
                task = asyncio.create_task(self._answer(call))
            try:
                await self._read_while_running(task, call)
            except BaseException:
                # Leaving early (hang-up, the budget, our own cancellation): stop the call and
                # collect its outcome, so no exception is left "never retrieved".
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise
            task.result()  # re-raise _Closing / protocol errors from the call itself
        finally:
            # However the call ended, the helper keeps none of its fds, nor any it never sent.
            self.close_received()
            out, self._out_fds = self._out_fds, []
            _close_fds(out)

    # capsuled.fdpass's FdHolder, for the running call.

    def received(self) -> tuple[int, ...]:
        """The running call's fds still open."""
        return tuple(self._call_fds)

    def close_received(self) -> None:
        """Close the running call's fds now."""
        fds, self._call_fds = self._call_fds, []
        self._drop_fds(fds)

    def push_fd(self, fd: int) -> None:
        """Take `fd` to send with the running call's next reply."""
        if len(self._out_fds) >= self.limits.max_fds_per_message:
            os.close(fd)  # taken means taken: it is ours to close even when refused
            raise LocalProtocolError("more fds pushed than one message may carry")
        self._out_fds.append(fd)

    async def _send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Hand `data` to the kernel, `fds` with its first byte (then closed, whatever
        happens); a peer that takes nothing for send_timeout_s is dropped."""
        self._sending = len(data)
        try:
            self._charge()
            view = memoryview(data)
            sent = 0
            while sent < len(view):
                try:
                    if fds and not sent:
                        rights = struct.pack(f"{len(fds)}i", *fds)
                        cmsg = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                        sent += self.sock.sendmsg([view], cmsg)
                    else:
                        sent += self.sock.send(view[sent:])
                except BlockingIOError:
                    try:
                        async with asyncio.timeout(self.limits.send_timeout_s):
                            await _writable(self.sock)
                    except TimeoutError:
                        log.info(
                            "%s stopped reading for %.0f s, closing",
                            self.who(),
                            self.limits.send_timeout_s,
                        )
                        raise _Closing() from None
                except OSError as exc:  # EPIPE, ECONNRESET: the peer is gone
                    raise _Closing() from exc
        finally:
            _close_fds(fds)  # the kernel has its own references once sendmsg() returned
            self._sending = 0
            if not self.evicted:
                self.server._rebudget(self, self.conn.buffered_bytes)

    def _take_out_fds(self) -> tuple[int, ...]:
        out, self._out_fds = self._out_fds, []
        return tuple(out)

    async def _notify(self, params: dict[str, object]) -> None:
        if self._holding == "call":
            self._become_stream()
        fds = self._take_out_fds()
        try:
            data = self.conn.send(Reply(params, continues=True, fds=fds))
        except BaseException:
            _close_fds(fds)
            raise
        try:
            await self._send(data, fds)
        except _Closing as exc:
            raise PeerGone("the peer went away") from exc

    def _become_stream(self) -> None:
        # From its first `continues` on, a call is a stream: it gives back its call slot and
        # needs a stream slot (and an open-stream slot, for methods anybody may open), or it
        # ends here with ServerErrors.busy.
        server, account = self.server, self.account
        server._slots.release(account)
        self._holding = None
        if not server._streams.try_take(account):
            raise server.errors.busy()
        if self._open_stream and not server._open.try_take(account):
            server._streams.give_back(account)
            raise server.errors.busy()
        self._holding = "stream"

    async def _hold_call_slot(self) -> None:
        server = self.server
        # A slot free at once needs no wait to bound (a timeout's timer costs more than the rest).
        if not server._slots.try_acquire(self.account):
            try:
                async with asyncio.timeout(self.limits.slot_wait_s):
                    await server._slots.acquire(self.account)
            except TimeoutError:
                raise server.errors.busy() from None
        self._holding = "call"

    def _release_slot(self) -> None:
        server, account = self.server, self.account
        if self._holding == "call":
            server._slots.release(account)
        elif self._holding == "stream":
            server._streams.give_back(account)
            if self._open_stream:
                server._open.give_back(account)
        elif self._holding == "waiting":
            server._waiting.give_back(account)
        self._holding = None

    @contextlib.asynccontextmanager
    async def released(self) -> AsyncIterator[None]:
        """capsuled.callslot's SlotHolder: wait in a waiting slot instead of the call slot."""
        if self._holding != "call":
            yield  # a stream holds no call slot to give back
            return
        server, account = self.server, self.account
        if not server._waiting.try_take(account):
            raise server.errors.busy()
        server._slots.release(account)
        self._holding = "waiting"
        try:
            yield
        finally:
            server._waiting.give_back(account)
            self._holding = None
        await self._hold_call_slot()  # only when the block ended normally

    async def _answer(self, call: Call) -> None:
        server = self.server
        self._open_stream = call.method in server._open_streams
        reply: Reply | ErrorReply
        try:
            if call.fds:
                takes = server._takes_fds.get(call.method, 0)
                if len(call.fds) > takes:
                    # Refused before any slot or handler: the fds are closed here and now.
                    self.close_received()
                    raise server.errors.fds_refused(call.method, takes)
            try:
                await self._hold_call_slot()
                # This coroutine is the call's own task (_run_call), so its context is the
                # call's alone: the holders are set in it, not entered and left as a block.
                callslot.hold(self)
                fdpass.hold(self)
                result = await server.handle(call, self.peer, self._notify)
            finally:
                self._release_slot()
            reply = Reply(result, fds=self._take_out_fds())
        except VarlinkError as exc:
            if isinstance(exc, server.errors.internal):
                # Raised on purpose for a cause nobody expected (a backend error no table
                # names): the cause goes to the journal, as any other exception's does.
                log.error("method %s failed for %s", call.method, self.who(), exc_info=exc)
            reply = _error_reply(exc, server.errors.internal)
        except (LocalProtocolError, PeerGone):
            raise
        except Exception:
            # The one broad catch (style guide): log the traceback, tell the client nothing of it.
            log.exception("method %s failed for %s", call.method, self.who())
            reply = ErrorReply(server.errors.internal.name, server.errors.internal().parameters)
        fds = reply.fds if isinstance(reply, Reply) else ()
        if call.oneway:
            _close_fds(fds)
            if isinstance(reply, ErrorReply):
                log.debug("oneway call %s ended with %s", call.method, reply.error)
            return
        try:
            data = self.conn.send(reply)
        except LocalProtocolError:
            _close_fds(fds)
            if self.conn.state is ConnectionState.ERROR:
                raise
            # Unencodable parameters (a handler bug): answer InternalError instead.
            log.exception("reply to %s cannot be encoded", call.method)
            internal = server.errors.internal()
            data, fds = self.conn.send(ErrorReply(internal.name, internal.parameters)), ()
        await self._send(data, fds)


def _error_reply(exc: VarlinkError, internal_error: type[VarlinkError]) -> ErrorReply:
    try:
        return ErrorReply(exc.name, exc.parameters)
    except (AttributeError, LocalProtocolError):
        # A VarlinkError without a valid wire name is a bug of ours, not an answer.
        log.exception("invalid error raised")
        return ErrorReply(internal_error.name, internal_error().parameters)
