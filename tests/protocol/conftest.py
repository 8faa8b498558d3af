"""Fixtures for the protocol suite: a real server on a Unix socket, driven with raw bytes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jeepney import Header, HeaderFields, Message
from jeepney.fds import FileDescriptor

from capsuled import dbus
from capsuled.transport import Account, Limits
from protocol.harness import Parsed, RawClient, ThreadServer

MakeServer = Callable[..., ThreadServer]


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[Parsed]:
    """Every message parsed with its body, in order, by anyone: jeepney's Message.from_buffer,
    and capsuled.dbus's body parser (which reuses the header it judged the message by)."""
    seen: list[Parsed] = []
    from_buffer = Message.from_buffer
    parse_body = dbus._parse_body

    def counting(buf: bytes, fds: tuple[int, ...] = ()) -> Message:
        msg = from_buffer(buf, fds)
        seen.append(Parsed(len(buf), msg.header.fields.get(HeaderFields.member)))
        return msg

    def counting_body(
        header: Header, buf: bytes, body_at: int, fds: list[FileDescriptor]
    ) -> object:
        body = parse_body(header, buf, body_at, fds)
        seen.append(Parsed(len(buf), header.fields.get(HeaderFields.member)))
        return body

    monkeypatch.setattr(Message, "from_buffer", staticmethod(counting))
    monkeypatch.setattr(dbus, "_parse_body", counting_body)
    return seen


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are 0700, and some tests connect as another uid.
    d = tempfile.mkdtemp(prefix="capsuled-proto-")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        for entry in Path(d).iterdir():
            entry.unlink()
        os.rmdir(d)


@pytest.fixture
def make_server(sockdir: Path) -> Iterator[MakeServer]:
    servers: list[ThreadServer] = []

    def make(
        account: Account | None = None,
        open_streams: frozenset[str] = frozenset(),
        **limits: object,
    ) -> ThreadServer:
        path = str(sockdir / f"s{len(servers)}.sock")
        srv = ThreadServer(
            path,
            Limits(**limits),  # type: ignore[arg-type]  # test knobs
            account=account,
            open_streams=open_streams,
        )
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()


@pytest.fixture
def server(make_server: MakeServer) -> ThreadServer:
    return make_server()


@pytest.fixture
def client(server: ThreadServer) -> Iterator[RawClient]:
    with RawClient(server.path) as c:
        yield c
