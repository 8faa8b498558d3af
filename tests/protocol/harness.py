"""Protocol-suite harness: org.example.test handlers, a server in a thread, a raw client.

The client speaks raw JSON + NUL over a blocking socket (no varlink library), so every test sees
exactly the bytes the server sends.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import os
import socket
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from capsuled import callslot, fdpass
from capsuled.dispatch import Dispatcher, Notify
from capsuled.peer import Peer
from capsuled.transport import Account, Limits, Listener, Server, ServerErrors
from capsuled.varlink.errors import VarlinkError
from capsuled.varlink.interface import parse_interface
from capsuled.varlink.messages import Call
from capsuled.varlink.service import ServiceInfo

IDL_PATH = Path(__file__).with_name("org.example.test.varlink")
IDL_TEXT = IDL_PATH.read_text(encoding="utf-8")
SECRET = "secret-traceback-text-that-must-not-leak"
TIMEOUT_S = 5.0

T = TypeVar("T")


class TestFailed(VarlinkError):
    """The declared error of the test interface."""

    name = "org.example.test.TestFailed"


class TestBusy(VarlinkError):
    """The test server's answer when no call or stream slot is free."""

    name = "org.example.test.Busy"


class TestFdsRefused(VarlinkError):
    """The test server's answer to fds its method does not take."""

    name = "org.example.test.FdsRefused"


def fds_refused(method: str, accepted: int) -> VarlinkError:
    return TestFdsRefused(method=method, accepted=accepted)


class TestInternalError(VarlinkError):
    """The test interface's generic error for unexpected exceptions."""

    name = "org.example.test.InternalError"


@dataclass
class State:
    """Shared between the test thread and the server's loop."""

    blocks: dict[str, asyncio.Event] = field(default_factory=dict)
    started: dict[str, threading.Event] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    forever_ended: threading.Event = field(default_factory=threading.Event)
    forever_sent_bytes: int = 0
    seen_fds: list[int] = field(default_factory=list)  # as FdInfo got them
    kept_read_ends: list[int] = field(default_factory=list)  # of the pipes FdBack sent

    def started_event(self, key: str) -> threading.Event:
        return self.started.setdefault(key, threading.Event())


@dataclass
class Ctx:
    call: Call
    peer: Peer
    notify: Notify
    state: State


Params = dict[str, object]


async def echo(ctx: Ctx, p: Params) -> Params:
    return {"value": p["value"]}


async def ping(ctx: Ctx, p: Params) -> Params:
    return {"text": p["text"]}


async def stream(ctx: Ctx, p: Params) -> Params:
    count = p["count"]
    assert isinstance(count, int)
    if ctx.call.more:
        for i in range(count):
            await ctx.notify({"index": i})
    return {"index": count}


async def forever(ctx: Ctx, p: Params) -> Params:
    size = p["size"]
    assert isinstance(size, int)
    payload = "x" * size
    try:
        while True:
            await ctx.notify({"payload": payload})
            ctx.state.forever_sent_bytes += size
    finally:
        ctx.state.forever_ended.set()


async def block(ctx: Ctx, p: Params) -> Params:
    key = p["key"]
    assert isinstance(key, str)
    event = ctx.state.blocks.setdefault(key, asyncio.Event())
    ctx.state.started_event(key).set()
    await event.wait()
    return {}


async def park(ctx: Ctx, p: Params) -> Params:
    async with callslot.released():
        return await block(ctx, p)


class _Unencodable:
    pass


async def fail(ctx: Ctx, p: Params) -> Params:
    kind = p["kind"]
    if kind == "internal":
        raise RuntimeError(SECRET)
    if kind == "raised-internal":
        # As context.backend_errors does for a backend error no table names.
        raise TestInternalError() from RuntimeError(SECRET)
    if kind == "declared":
        raise TestFailed(reason="on purpose")
    if kind == "notify":
        await ctx.notify({})
    if kind == "unencodable":
        return {"x": _Unencodable()}
    if kind == "badreply":
        return {"unexpected": 1}
    if kind == "undeclared-error":
        raise TestFailed(reason=1)  # wrong parameter type for the declared error
    return {}


async def record(ctx: Ctx, p: Params) -> Params:
    note = p["note"]
    assert isinstance(note, str)
    ctx.state.notes.append(note)
    return {}


async def notes(ctx: Ctx, p: Params) -> Params:
    return {"notes": list(ctx.state.notes)}


async def who_am_i(ctx: Ctx, p: Params) -> Params:
    peer = ctx.peer
    return {"uid": peer.uid, "gid": peer.gid, "pid": peer.pid, "hasPidfd": peer.pidfd is not None}


async def fd_info(ctx: Ctx, p: Params) -> Params:
    fds = ctx.call.fds
    ctx.state.seen_fds.extend(fds)
    if p["hold"]:
        await block(ctx, {"key": "fds"})
    return {
        "inodes": [os.fstat(fd).st_ino for fd in fds],
        "cloexec": [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in fds],
    }


async def fd_back(ctx: Ctx, p: Params) -> Params:
    count = p["count"]
    assert isinstance(count, int)
    for _ in range(count):
        r, w = os.pipe2(os.O_CLOEXEC)
        ctx.state.kept_read_ends.append(r)
        fdpass.push_fd(w)
    if p["fail"]:
        raise TestFailed(reason="after pushing")
    await ctx.notify({"count": count})
    return {"count": 0}


async def environment(ctx: Ctx, p: Params) -> Params:
    return {"listen": sorted(k for k in os.environ if k.startswith("LISTEN_"))}


HANDLERS = {
    "Echo": echo,
    "Ping": ping,
    "Stream": stream,
    "StreamOnly": stream,
    "Forever": forever,
    "Block": block,
    "Park": park,
    "Fail": fail,
    "Record": record,
    "Notes": notes,
    "WhoAmI": who_am_i,
    "Environment": environment,
    "FdInfo": fd_info,
    "FdBack": fd_back,
}

TAKES_FDS = {"org.example.test.FdInfo": 2}

# What the transport answers by itself for org.example.test.
ERRORS = ServerErrors(internal=TestInternalError, busy=TestBusy, fds_refused=fds_refused)

INFO = ServiceInfo(vendor="capsuled", product="test", version="1", url="https://example.org/")


def build_dispatcher(state: State, validate_replies: bool = True) -> Dispatcher[Ctx]:
    def make_context(call: Call, peer: Peer, notify: Notify) -> Ctx:
        return Ctx(call, peer, notify, state)

    return Dispatcher(
        parse_interface(IDL_TEXT),
        HANDLERS,
        make_context=make_context,
        requires_more=frozenset({"StreamOnly", "Forever"}),
        info=INFO,
        validate_replies=validate_replies,
    )


class ThreadServer:
    """The real asyncio server on a Unix socket, its loop in a background thread."""

    def __init__(
        self,
        path: str,
        limits: Limits | None = None,
        *,
        account: Account | None = None,
        open_streams: frozenset[str] = frozenset(),
    ) -> None:
        self.path = path
        self.state = State()
        self.limits = limits or Limits()
        self._account = account
        self._open_streams = open_streams
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Server = self.run(self._make_server())
        self.listener: Listener = self.run(self._listen())

    async def _make_server(self) -> Server:
        d = build_dispatcher(self.state)
        return Server(
            d.handle,
            ERRORS,
            self.limits,
            account=self._account,
            open_streams=self._open_streams,
            takes_fds=TAKES_FDS,
        )

    async def _listen(self) -> Listener:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o666)
        sock.listen(128)
        return await self.server.listen(sock)

    def run(self, coro: Coroutine[object, object, T], timeout: float = TIMEOUT_S) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def call_soon(self, fn: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def release(self, key: str) -> None:
        def set_event() -> None:
            self.state.blocks.setdefault(key, asyncio.Event()).set()

        self.call_soon(set_event)

    def wait_connections(self, n: int, timeout: float = TIMEOUT_S) -> None:
        """Wait until at most n connections are admitted."""
        self.run(self.server.wait_connections(n), timeout)

    def close(self) -> None:
        async def shutdown() -> None:
            self.listener.close()
            await self.server.close_connections()

        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT_S)
        self.loop.close()


class Closed(Exception):
    """The server closed the connection."""


class RawClient:
    """A blocking raw-socket Varlink client: JSON + NUL, nothing else."""

    def __init__(self, path: str, timeout: float = TIMEOUT_S) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj: object, fds: list[int] | None = None) -> None:
        data = json.dumps(obj).encode() + b"\0"
        if fds is None:
            self.send_raw(data)
            return
        rights = array.array("i", fds).tobytes()
        sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def recv_with_fds(self, max_fds: int = 16) -> tuple[dict[str, object], list[int]]:
        """One message and the fds that came with its bytes (nothing may be buffered yet)."""
        assert not self.buf
        fds: list[int] = []
        space = socket.CMSG_SPACE(max_fds * 4)
        while b"\0" not in self.buf:
            chunk, ancdata, _, _ = self.sock.recvmsg(1 << 20, space, socket.MSG_CMSG_CLOEXEC)
            for _, _, data in ancdata:
                fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
            if not chunk:
                raise Closed(self.buf)
            self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        value = json.loads(msg)
        assert isinstance(value, dict)
        return value, fds

    def recv_raw(self) -> bytes:
        """One message's bytes without the NUL; raises Closed at EOF."""
        while b"\0" not in self.buf:
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(self.buf)
            self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        return msg

    def recv(self) -> dict[str, object]:
        value = json.loads(self.recv_raw())
        assert isinstance(value, dict)
        return value

    def call(self, method: str, **params: object) -> dict[str, object]:
        self.send({"method": method, "parameters": params})
        return self.recv()

    def expect_closed(self) -> None:
        """Assert the server closes the connection without sending a single byte."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        assert self.buf + data == b"", f"server answered: {self.buf + data!r}"
        try:
            more = self.sock.recv(65536)
        except ConnectionResetError:
            more = b""
        assert more == b""


@dataclass(frozen=True, slots=True)
class Parsed:
    """One D-Bus message jeepney parsed whole (the `parsed` fixture): its size and member."""

    size: int
    member: str | None
