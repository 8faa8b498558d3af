"""The scripted fake capsuled (tests/doubles/scripted_capsuled.py) itself: the client tests are only
as good as its answers."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from doubles.scripted_capsuled import WAIT_S, FakeCapsuled, fake, ok

__all__ = ["fake"]  # the fixture, re-exported for pytest


def _roundtrip(path: Path, message: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT_S)
        s.connect(str(path))
        s.sendall(message)
        buf = b""
        while not buf.endswith(b"\0"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf


def test_fake_answers_scripted_replies_in_order(fake: FakeCapsuled) -> None:
    fake.on("Info", ok(version="1"), ok(version="2"))
    call = b'{"method":"org.capsuled.Manager.Info"}\0'
    assert json.loads(_roundtrip(fake.path, call)[:-1]) == {"parameters": {"version": "1"}}
    assert json.loads(_roundtrip(fake.path, call)[:-1]) == {"parameters": {"version": "2"}}
    assert json.loads(_roundtrip(fake.path, call)[:-1]) == {"parameters": {"version": "2"}}
    assert fake.methods() == ["Info", "Info", "Info"]


def test_fake_reports_unscripted_methods(fake: FakeCapsuled) -> None:
    reply = json.loads(_roundtrip(fake.path, b'{"method":"org.capsuled.Manager.Nope"}\0')[:-1])
    assert reply["error"] == "org.varlink.service.MethodNotFound"
