"""`capsulectl --bridge`: relay standard input/output to the local capsuled socket.

This is what `capsulectl -H [USER@]HOST` runs on the remote host through `ssh -T`. The bridge
understands no Varlink: it copies bytes both ways, so the remote helper sees this process — the
ssh login user — as its peer and authorizes that user, exactly as for a local capsulectl.
"""

from __future__ import annotations

import os
import select
import socket
import sys

from capsulectl.transport import EXIT_BRIDGE_NOT_RUNNING, ClientError, NotRunning, UnixTransport

__all__ = ["relay"]

CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 10.0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def relay(address: str, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """Copy bytes between the fds and the socket until the socket closes; return an exit status."""
    try:
        transport = UnixTransport(address, CONNECT_TIMEOUT_S)
    except NotRunning:
        # Said with the exit status, which ssh passes on: the client prints the one line.
        return EXIT_BRIDGE_NOT_RUNNING
    except ClientError as exc:
        print(f"capsulectl --bridge: {exc}", file=sys.stderr)
        return 1
    sock = transport.socket
    sock.settimeout(None)
    inputs = [stdin_fd, sock.fileno()]
    try:
        while True:
            readable, _, _ = select.select(inputs, [], [])
            if stdin_fd in readable:
                data = os.read(stdin_fd, CHUNK_BYTES)
                if data:
                    sock.sendall(data)
                else:
                    # The client hung up: let capsuled finish what it was asked, then see its EOF.
                    sock.shutdown(socket.SHUT_WR)
                    inputs.remove(stdin_fd)
            if sock.fileno() in readable:
                data = sock.recv(CHUNK_BYTES)
                if not data:
                    return 0
                _write_all(stdout_fd, data)
    except (BrokenPipeError, ConnectionResetError):
        return 0  # either side went away: nothing left to relay
    finally:
        transport.close()
