"""Byte pipes to capsuled: a Unix socket, or `ssh HOST capsulectl --bridge` for a remote host.

A transport moves bytes and knows deadlines; it knows nothing of Varlink (jeepney's io/ adapters are
shaped the same way). Failures to connect become the client's own exceptions here, once.

    ClientError                 capsulectl got no answer (nothing the helper decided)
    ├── InvalidAddress          --address or -H cannot be used (also a ValueError)
    ├── NotRunning              the socket is missing or refuses connections (ENOENT, ECONNREFUSED)
    ├── ConnectFailed           any other failure to connect; `errno` tells which (EACCES, ...)
    ├── Timeout                 no reply within the timeout
    └── ConnectionLost          the peer hung up or sent bytes that are not Varlink
"""

from __future__ import annotations

# The C socket type itself, not socket.py: that wrapper (its enums, selectors) costs every
# command ~4 ms of start-up (python -X importtime), and a client uses nothing it adds.
import _socket
import errno
import os
import time

# Not typing's: a plain command loads no typing, ~5 ms of its start-up (mypy: true all the same).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # Transport is a structural type for the checker only

__all__ = [
    "DEFAULT_ADDRESS",
    "EXIT_BRIDGE_NOT_RUNNING",
    "ClientError",
    "ConnectFailed",
    "ConnectionLost",
    "InvalidAddress",
    "NotRunning",
    "SshTransport",
    "Timeout",
    "Transport",
    "UnixTransport",
    "parse_address",
]

DEFAULT_ADDRESS = "unix:/run/capsuled/org.capsuled.Manager"
RECV_CHUNK_BYTES = 64 * 1024
# The most fds one reply may bring (Run --pty brings one); more truncate and close the link.
MAX_REPLY_FDS = 4
SSH_EXIT_WAIT_S = 5.0
# `capsulectl --bridge` exits with this (sysexits.h EX_UNAVAILABLE) when capsuled is not running
# on its host; ssh exits with the remote command's status, so -H can say so in one line.
EXIT_BRIDGE_NOT_RUNNING = 69
EXIT_SSH_FAILED = 255  # ssh(1): "ssh exits with 255 if an error occurred"


class ClientError(Exception):
    """capsulectl could not get an answer from capsuled."""


class InvalidAddress(ClientError, ValueError):
    """Raised for an address that is not a Unix socket, or an unusable -H host."""


class NotRunning(ClientError):
    """Raised when nothing listens on the socket: capsuled (or its .socket unit) is not running."""

    def __init__(self, address: str) -> None:
        super().__init__(f"nothing listens on {address}")
        self.address = address


class ConnectFailed(ClientError):
    """Raised when connecting fails for another reason than "not running"."""

    def __init__(self, address: str, exc: OSError) -> None:
        super().__init__(f"cannot connect to {address}: {exc.strerror or exc}")
        self.address = address
        self.errno = exc.errno


class Timeout(ClientError):
    """Raised when no reply arrived within the timeout."""


class ConnectionLost(ClientError):
    """Raised when the connection ended, or the peer sent something that is not Varlink."""


def parse_address(address: str) -> str:
    """Turn "unix:PATH", "unix:@ABSTRACT" or a plain path into a socket path.

    Varlink addresses may carry ";mode=..." style parameters after the path (UAPI.20); a connecting
    client ignores them.

    Raises:
        InvalidAddress: the address is not a Unix socket address.
    """
    if address.startswith("unix:"):
        path = address[len("unix:") :].split(";", 1)[0]
    elif ":" in address.split("/", 1)[0]:
        raise InvalidAddress(f"unsupported address {address!r} (use unix:PATH, a path, or -H HOST)")
    else:
        path = address
    if not path:
        raise InvalidAddress(f"empty socket path in {address!r}")
    if path.startswith("@"):
        return "\0" + path[1:]  # Linux abstract namespace, as varlink and systemd spell it
    return path


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise Timeout("capsuled did not answer in time")
    return left


class Transport(Protocol):
    """A connected byte stream to a Varlink service.

    File descriptors ride with a message's bytes (SCM_RIGHTS) on a Unix socket only: `send`
    sends `fds` with the first byte of `data`; `take_fds` hands out what the last `recv` got
    (the caller owns them then). Over ssh none can travel."""

    def send(self, data: bytes, deadline: float | None, fds: tuple[int, ...] = ()) -> None:
        """Write all of data before the monotonic deadline (None: no limit)."""

    def recv(self, deadline: float | None) -> bytes:
        """Read what is available (b"" at end of stream), waiting at most until the deadline."""

    def take_fds(self) -> tuple[int, ...]:
        """The fds the last recv() brought, now the caller's (O_CLOEXEC)."""

    def close(self) -> None:
        """Release the connection; idempotent."""


class UnixTransport:
    """A blocking Unix stream socket with per-operation deadlines."""

    def __init__(self, address: str, timeout: float | None) -> None:
        path = parse_address(address)
        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        self.socket = self._sock  # the bridge relays on it directly
        self._fds: tuple[int, ...] = ()
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise NotRunning(address) from exc
        except TimeoutError as exc:
            self._sock.close()
            raise Timeout(f"connecting to {address} timed out") from exc
        except OSError as exc:
            self._sock.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                raise NotRunning(address) from exc
            raise ConnectFailed(address, exc) from exc

    def send(self, data: bytes, deadline: float | None, fds: tuple[int, ...] = ()) -> None:
        """Write all of data before the deadline, `fds` with its first byte."""
        try:
            self._sock.settimeout(_remaining(deadline))
            if fds:
                import struct  # only calls that pass fds (Run --pty/--pipe) need it

                rights = struct.pack(f"{len(fds)}i", *fds)
                level = _socket.SOL_SOCKET
                sent = self._sock.sendmsg([data], [(level, _socket.SCM_RIGHTS, rights)])
                data = data[sent:]
            if data:
                self._sock.sendall(data)
        except TimeoutError as exc:
            raise Timeout("capsuled did not accept the call in time") from exc
        except OSError as exc:
            raise ConnectionLost(f"sending to capsuled failed: {exc.strerror or exc}") from exc

    def recv(self, deadline: float | None) -> bytes:
        """Read up to one chunk, waiting at most until the deadline."""
        try:
            self._sock.settimeout(_remaining(deadline))
            data, ancdata, flags, _ = self._sock.recvmsg(
                RECV_CHUNK_BYTES, _socket.CMSG_SPACE(MAX_REPLY_FDS * 4), _socket.MSG_CMSG_CLOEXEC
            )
        except TimeoutError as exc:
            raise Timeout("capsuled did not answer in time") from exc
        except OSError as exc:
            raise ConnectionLost(f"reading from capsuled failed: {exc.strerror or exc}") from exc
        for level, kind, raw in ancdata:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                import struct  # only replies that bring fds need it

                whole = len(raw) - len(raw) % 4
                self._fds += struct.unpack(f"{whole // 4}i", raw[:whole])
        if flags & _socket.MSG_CTRUNC:
            for fd in self.take_fds():
                os.close(fd)
            raise ConnectionLost("capsuled sent more file descriptors than a reply may carry")
        return data

    def take_fds(self) -> tuple[int, ...]:
        """The fds received since the last call, now the caller's."""
        fds, self._fds = self._fds, ()
        return fds

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


class SshTransport:
    """`ssh -T [USER@]HOST capsulectl --bridge`: the remote capsulectl relays to its local socket.

    The remote helper sees the bridge process, i.e. the ssh login user, on its socket: that user's
    identity is what it authorizes, exactly as if they had run capsulectl there (systemd's
    varlinkctl does the same with its ssh-exec: transport). $CAPSULECTL_SSH replaces the ssh
    command (like $SYSTEMD_SSH for varlinkctl), e.g. to add options.
    """

    def __init__(self, host: str, address: str | None, timeout: float | None) -> None:
        # Imported here: only -H needs them, and subprocess alone costs a few ms at start-up.
        import shlex
        import subprocess

        if not host or host.startswith("-"):
            raise InvalidAddress(f"invalid host {host!r}")
        ssh = shlex.split(os.environ.get("CAPSULECTL_SSH", "ssh"))
        remote = ["capsulectl", "--bridge"]
        if address is not None:
            remote += ["--address", shlex.quote(address)]
        self.host = host
        try:
            # "--" ends ssh's options, so the host can never be read as one.
            self._proc = subprocess.Popen(
                [*ssh, "-T", "--", host, *remote],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
            )
        except OSError as exc:
            raise ConnectFailed(f"ssh:{host}", exc) from exc
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._stdin = self._proc.stdin
        self._stdout = self._proc.stdout

    def send(self, data: bytes, deadline: float | None, fds: tuple[int, ...] = ()) -> None:
        """Write all of data to ssh's stdin (no fds can cross ssh: capsulectl on the remote
        host passes its own there, see cli's -H handling of --pipe and --pty)."""
        if fds:
            raise ClientError(f"file descriptors cannot be passed to {self.host} over ssh")
        import select  # like subprocess, for -H only

        view = memoryview(data)
        while view:
            _, writable, _ = select.select([], [self._stdin], [], _remaining(deadline))
            if not writable:
                raise Timeout(f"{self.host} did not accept the call in time")
            try:
                written = os.write(self._stdin.fileno(), view)
            except OSError as exc:
                raise ConnectionLost(f"connection to {self.host} closed") from exc
            view = view[written:]

    def recv(self, deadline: float | None) -> bytes:
        """Read what ssh relays, waiting at most until the deadline."""
        import select

        readable, _, _ = select.select([self._stdout], [], [], _remaining(deadline))
        if not readable:
            raise Timeout(f"capsuled on {self.host} did not answer in time")
        try:
            data = os.read(self._stdout.fileno(), RECV_CHUNK_BYTES)
        except OSError as exc:
            raise ConnectionLost(f"connection to {self.host} failed: {exc}") from exc
        if not data:
            self._raise_for_exit()
        return data

    def take_fds(self) -> tuple[int, ...]:
        """None ever arrive over ssh."""
        return ()

    def _raise_for_exit(self) -> None:
        """At end of stream: turn ssh's (or the remote bridge's) exit status into our error."""
        import subprocess

        try:
            status = self._proc.wait(timeout=SSH_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            return  # still running with stdout closed: let the caller report the lost stream
        if status == EXIT_BRIDGE_NOT_RUNNING:
            raise NotRunning(f"ssh:{self.host}")
        if status == EXIT_SSH_FAILED:
            raise ConnectionLost(f"ssh to {self.host} failed (see its message above)")
        if status != 0:
            raise ConnectionLost(f"capsulectl --bridge on {self.host} exited with status {status}")

    def close(self) -> None:
        """Close the pipes and reap ssh (closing stdin ends the remote bridge)."""
        import subprocess  # already loaded by __init__; a local name keeps it off the fast path

        for pipe in (self._stdin, self._stdout):
            pipe.close()
        try:
            self._proc.wait(timeout=SSH_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
