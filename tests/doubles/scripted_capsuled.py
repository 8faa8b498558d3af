"""FakeCapsuled: a scripted stand-in for capsuled, a threaded Unix-socket server speaking raw
JSON + NUL, plus builders of the wire values it answers with.

It shares no code with capsuled or capsulectl (plain `json` and `socket`), so the client is checked
against the wire format itself. Each test scripts replies per method and asserts on the exact calls
recorded. Its own tests are in tests/unit/test_scripted_capsuled.py. A test module that uses the
`fake` fixture imports it from here and names it in `__all__` (pytest finds fixtures by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

INTERFACE = "org.capsuled.Manager"
WAIT_S = 5.0  # every wait in these tests is bounded by this

RawReply = dict[str, object]
Responder = Callable[[dict[str, object]], list[RawReply] | None]


def ok(**parameters: object) -> RawReply:
    """A final reply."""
    return {"parameters": parameters}


def cont(**parameters: object) -> RawReply:
    """A reply with continues=true (only for calls with more)."""
    return {"parameters": parameters, "continues": True}


def err(short_name: str, **parameters: object) -> RawReply:
    """An error reply of org.capsuled.Manager (or a fully qualified name if it has a dot)."""
    name = short_name if "." in short_name else f"{INTERFACE}.{short_name}"
    return {"error": name, "parameters": parameters}


class FakeCapsuled:
    """Listens on `path`; answers each call with the next scripted reply list for its method."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: list[dict[str, object]] = []
        self.connections = 0
        self._script: dict[str, list[list[RawReply] | Responder]] = {}
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._stop_r, self._stop_w = os.pipe()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self.call_seen = threading.Event()
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    def on(self, method: str, *replies: RawReply | list[RawReply] | Responder) -> None:
        """Script the answers to successive calls of METHOD (short name, or qualified).

        Each argument answers one call: a reply dict, a list of reply dicts (a stream), or a
        function of the call returning that list. The last answer repeats for later calls.
        """
        key = method if "." in method else f"{INTERFACE}.{method}"
        self._script[key] = [r if isinstance(r, list) or callable(r) else [r] for r in replies]

    def methods(self) -> list[str]:
        """The short method names called, in order."""
        return [str(c["method"]).rpartition(".")[2] for c in self.calls]

    def _answer(self, call: dict[str, object]) -> list[RawReply] | None:
        script = self._script.get(str(call.get("method")))
        if script is None:
            return [err("org.varlink.service.MethodNotFound", method=call.get("method"))]
        answer = script.pop(0) if len(script) > 1 else script[0]
        return answer(call) if callable(answer) else answer

    def _accept_loop(self) -> None:
        while True:
            readable, _, _ = select.select([self._listener.fileno(), self._stop_r], [], [])
            if self._stop_r in readable:
                return
            conn, _ = self._listener.accept()
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\0" in buf:
                    raw, _, buf = buf.partition(b"\0")
                    call = json.loads(raw)
                    with self._lock:
                        self.calls.append(call)
                    self.call_seen.set()
                    replies = self._answer(call)
                    if replies is None:  # scripted silence: never answer
                        continue
                    if call.get("oneway"):
                        continue
                    try:
                        for reply in replies:
                            if reply == {"close": True}:
                                conn.shutdown(socket.SHUT_RDWR)
                                return
                            if "raw" in reply:
                                conn.sendall(bytes(reply["raw"]))  # type: ignore[call-overload] # test data
                                continue
                            conn.sendall(json.dumps(reply).encode() + b"\0")
                    except OSError:
                        return

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._accepter.join(WAIT_S)
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(WAIT_S)
        self._listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def SILENT(call: dict[str, object]) -> list[RawReply] | None:
    """Script it to never answer (for timeouts)."""
    return None


CLOSE: RawReply = {"close": True}


def raw(data: bytes) -> RawReply:
    """Bytes sent as they are (garbage, or a message split in pieces)."""
    return {"raw": data}


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeCapsuled]:
    """A scripted capsuled listening in tmp_path; closed after the test."""
    # A short name: sun_path holds at most 107 bytes and pytest's tmp_path can be long.
    server = FakeCapsuled(tmp_path / "s")
    try:
        yield server
    finally:
        server.close()


def capsule(name: str = "web", **overrides: object) -> dict[str, object]:
    """A wire Capsule with every IDL field, running by default."""
    value: dict[str, object] = {
        "name": name,
        "state": "active",
        "subState": "running",
        "result": "success",
        "owner": 1000,
        "ownerName": "alice",
        "uid": 61234,
        "since": 1_764_072_000_000_000,
        "autostart": True,
        "hasData": True,
        "memoryCurrent": 4_404_224,  # 4.2M as systemd prints it
        "tasksCurrent": 3,
        "cpuUsageNSec": 123_456_789,
        "memoryMax": 512 * 1024 * 1024,
        "tasksMax": 100,
        "cpuWeight": None,
        "units": 2,
        "bundle": None,
    }
    value.update(overrides)
    return value


def deployed(version: str = "1.2.0", **overrides: object) -> dict[str, object]:
    """A wire DeployedBundle with every IDL field."""
    value: dict[str, object] = {
        "name": "web",
        "version": version,
        "signer": "release",
        "keyId": "ab" * 32,
        "sha256": "cd" * 32,
        "deployed": 1_764_072_000_000_000,
        "deployedBy": 1000,
        "previousVersion": "1.1.0",
        "unfinishedVersion": None,
    }
    value.update(overrides)
    return value


def audit_record(seq: int = 7, **overrides: object) -> dict[str, object]:
    """A wire AuditRecord with every IDL field."""
    value: dict[str, object] = {
        "seq": seq,
        "time": 1_764_072_000_000_000,
        "callerUid": 1000,
        "callerPid": 4242,
        "callerUnit": "session-3.scope",
        "action": "deploy",
        "capsule": "web",
        "result": "ok",
        "details": {"version": "1.2.0", "signer": "release"},
    }
    value.update(overrides)
    return value


def unit(name: str = "app.service", **overrides: object) -> dict[str, object]:
    """A wire Unit with every IDL field."""
    value: dict[str, object] = {
        "name": name,
        "description": "The app",
        "loadState": "loaded",
        "activeState": "active",
        "subState": "running",
        "enabled": True,
        "hasFile": True,
    }
    value.update(overrides)
    return value


def log_entry(message: str = "hello", **overrides: object) -> dict[str, object]:
    """A wire LogEntry."""
    value: dict[str, object] = {
        "timestamp": 1_764_072_000_000_000,
        "cursor": "s=1;i=1",
        "unit": "app.service",
        "priority": 6,
        "identifier": "app",
        "pid": 42,
        "message": message,
    }
    value.update(overrides)
    return value
