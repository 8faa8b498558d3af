"""A raw Varlink connection: one JSON object + NUL each way over a Unix socket, standard library
only, so that e2e tests assert on the exact wire replies, independent of capsulectl and of
capsuled's own protocol core."""

from __future__ import annotations

import json
import socket
from types import TracebackType
from typing import Any

INTERFACE = "org.capsuled.Manager"
SOCKET = "/run/capsuled/org.capsuled.Manager"
RECV_BYTES = 65536

# Parsed JSON from the wire: callers index into it freely and report what they find.
Message = dict[str, Any]


class Closed(Exception):
    """The other side closed the connection."""


def full_method(method: str) -> str:
    """org.capsuled.Manager.METHOD for a short name; a dotted name as it is."""
    return method if "." in method else f"{INTERFACE}.{method}"


class Connection:
    """One client connection; calls are made in order, replies read one by one."""

    def __init__(self, path: str = SOCKET, timeout_s: float | None = 60.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        self._sock.connect(path)
        self._buf = b""

    def send(
        self, method: str, params: dict[str, object] | None = None, more: bool = False
    ) -> None:
        """Send a call; `parameters` is always present, `more` only when asked for."""
        message: dict[str, object] = {"method": full_method(method), "parameters": params or {}}
        if more:
            message["more"] = True
        self.send_text(json.dumps(message))

    def send_text(self, text: str) -> None:
        """Send one message as given (JSON text, without its NUL)."""
        self._sock.sendall(text.encode() + b"\0")

    def read_text(self) -> str:
        """The next message's JSON text. Raises Closed."""
        while b"\0" not in self._buf:
            chunk = self._sock.recv(RECV_BYTES)
            if not chunk:
                raise Closed
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return raw.decode()

    def read(self) -> Message:
        """The next message, parsed. Raises Closed."""
        message = json.loads(self.read_text())
        if not isinstance(message, dict):
            raise ValueError(f"not a JSON object: {message!r}")
        return message

    def call(self, method: str, params: dict[str, object] | None = None) -> Message:
        """Send a plain call and read its reply."""
        self.send(method, params)
        return self.read()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
