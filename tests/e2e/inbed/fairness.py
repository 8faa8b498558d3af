"""One client's pipelined burst against another's single call (e2e/test_limits.py runs it).

    python3 -m e2e.inbed.fairness N

Connection A sends N GetInfo calls in one write; once A's first reply is back, connection B
sends one. Prints {"before": K, "answered": M}: K of A's replies had arrived by the time B's
reply did (read as they come, both sockets watched at once, plus what A had waiting the moment
B's reply was read), M of A's replies in all. A helper that serves connections in turn answers
B after a few of A's calls; one that runs a whole burst before looking at anyone else answers B
after nearly all of them.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys

from e2e.inbed.wire import SOCKET

CALL = b'{"method":"org.varlink.service.GetInfo","parameters":{}}\0'


def main(argv: list[str]) -> int:
    n = int(argv[1])
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (a, b):
        sock.settimeout(60.0)
        sock.connect(SOCKET)
    # B is known to the helper before the burst starts (its connection accepted).
    b.sendall(CALL)
    _read_one(b)
    a.sendall(CALL * n)
    a_seen, a_buf = 0, b""
    sent_b, before = False, None
    b_buf = b""
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, "a")
    sel.register(b, selectors.EVENT_READ, "b")
    while a_seen < n or before is None:
        for key, _ in sel.select(timeout=60.0):
            chunk = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]  # a socket
            if not chunk:
                raise SystemExit(f"connection {key.data} closed")
            if key.data == "a":
                a_buf += chunk
                a_seen += a_buf.count(b"\0")
                a_buf = a_buf[a_buf.rfind(b"\0") + 1 :]
                if not sent_b and a_seen:
                    b.sendall(CALL)
                    sent_b = True
            else:
                b_buf += chunk
                if b"\0" in b_buf and before is None:
                    a.setblocking(False)
                    try:
                        waiting = a.recv(1 << 24)
                    except BlockingIOError:
                        waiting = b""
                    a.setblocking(True)
                    a.settimeout(60.0)
                    a_buf += waiting
                    a_seen += a_buf.count(b"\0")
                    a_buf = a_buf[a_buf.rfind(b"\0") + 1 :]
                    before = a_seen
    print(json.dumps({"before": before, "answered": a_seen}))
    return 0


def _read_one(sock: socket.socket) -> bytes:
    buf = b""
    while b"\0" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("closed")
        buf += chunk
    return buf


if __name__ == "__main__":
    sys.exit(main(sys.argv))
