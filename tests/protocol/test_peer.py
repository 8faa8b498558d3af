"""peer_credentials against real processes: the start time is recorded at accept, and a peer that
exits afterwards is refused whether or not the kernel gave a pidfd."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from capsuled.peer import Peer, peer_credentials, process_is_alive, read_start_time

# Connects, says so, and stays until its stdin closes.
CHILD = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "s.connect(sys.argv[1])\n"
    "print(flush=True)\n"
    "sys.stdin.read()\n"
)


@contextmanager
def listener(sockdir: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(sockdir / "peer.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
        srv.listen(4)
        srv.settimeout(10)
        yield path, srv
    finally:
        srv.close()
        os.unlink(path)


def connected_child(path: str) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"\n"  # connected
    return child


def end(child: subprocess.Popen[bytes]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(timeout=10) == 0


def close(peer: Peer, conn: socket.socket) -> None:
    if peer.pidfd is not None:
        os.close(peer.pidfd)
    conn.close()


def test_start_time_is_recorded_at_accept_and_checked_after_exit(sockdir: Path) -> None:
    with listener(sockdir) as (path, srv):
        child = connected_child(path)
        try:
            conn, _ = srv.accept()
            peer = peer_credentials(conn)
            assert peer.pid == child.pid
            assert peer.start_time == read_start_time(child.pid)
            assert peer.pidfd is not None  # kernel 6.18 here
            without_pidfd = dataclasses.replace(peer, pidfd=None)  # as on kernels < 6.5
            assert process_is_alive(peer)
            assert process_is_alive(without_pidfd)
        finally:
            end(child)
        try:
            # Exited and reaped: its pid is gone or belongs to a later process.
            assert not process_is_alive(peer)
            assert not process_is_alive(without_pidfd)
        finally:
            close(peer, conn)


def test_a_peer_gone_before_accept_has_no_start_time(sockdir: Path) -> None:
    with listener(sockdir) as (path, srv):
        child = connected_child(path)
        started = read_start_time(child.pid)
        end(child)
        conn, _ = srv.accept()
        peer = peer_credentials(conn)
        try:
            assert peer.pid == child.pid
            # None, unless a later process took the pid at once: never the peer's own.
            assert peer.start_time != started
            assert not process_is_alive(peer)
            assert not process_is_alive(dataclasses.replace(peer, pidfd=None))
        finally:
            close(peer, conn)
