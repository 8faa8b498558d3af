"""Commands whose stdin, stdout and stderr are the caller's: Run with stdio "pipe" or "pty"
(`run --pipe/--pty`, `shell`, `systemctl`). What is relayed here, and why:

- pipe: a stdin/stdout/stderr that is a file, pipe or socket is passed to the command itself
  (SCM_RIGHTS; binary-safe, nothing copied). One that is a terminal is *not*: a process in the
  capsule holding the caller's terminal could push input into it (TIOCSTI) or reconfigure it,
  so such a stream goes through a pipe of ours, relayed here.
- pty: the helper allocates the command's pty and sends its master back with the first reply
  (capsuled.terminal says why there); this relays it to the caller's terminal in raw mode,
  passes window-size changes on (SIGWINCH), and restores the terminal on the way out. Ctrl-C
  is a byte like any other in raw mode: the pty's line discipline turns it into SIGINT for the
  command, whose controlling terminal it is.

Both wait for the command and return its exit status. Nothing here decides anything: the
helper authorizes, validates and holds none of the fds once the command has started.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import struct
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

from capsulectl.context import EXIT_FAILURE

if TYPE_CHECKING:
    from capsulectl.client import Client
    from capsuled.wire import RunReply

__all__ = ["run_with_pipes", "run_with_pty"]

CHUNK_BYTES: Final = 64 * 1024
# After the command has ended, how long its last output may take to come through the pty or a
# pipe: the manager closes its copies of the peer when it collects the unit, right after.
DRAIN_WAIT_S: Final = 5.0
_WINSIZE: Final = struct.calcsize("HHHH")

Started = Callable[["RunReply"], None]


def _copy(src: int, dst: int, done: threading.Event, close_dst: bool = False) -> None:
    """Copy until end of input (or EIO: a pty whose peer is closed everywhere), then stop."""
    try:
        while data := os.read(src, CHUNK_BYTES):
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
    except OSError:
        pass  # EIO from a pty master once the command's side is gone; EPIPE from a reader gone
    finally:
        if close_dst:
            with contextlib.suppress(OSError):
                os.close(dst)
        done.set()


def _thread(target: Callable[[], None]) -> None:
    # Daemon threads: one blocked reading the caller's terminal must not keep us from exiting.
    threading.Thread(target=target, daemon=True).start()


def _finish(replies: Iterator[RunReply], started: Started, after_start: Callable[[], None]) -> int:
    final: RunReply | None = None
    for reply in replies:
        if final is None:
            after_start()
            started(reply)
        final = reply
    if final is None:  # the generator yields the final reply or raises
        return EXIT_FAILURE
    status = final["exitStatus"]
    return status if status is not None and 0 <= status <= 255 else EXIT_FAILURE


def run_with_pipes(
    client: Client,
    name: str,
    command: Sequence[str],
    *,
    environment: Sequence[str],
    unit: str | None,
    working_directory: str | None,
    started: Started,
) -> int:
    """Run with our stdin, stdout and stderr (terminals through relayed pipes); exit status."""
    passed: list[int] = []  # what we send
    ours: list[int] = []  # our ends of relay pipes' far sides, closed once the command has them
    outputs: list[threading.Event] = []
    for fd in (0, 1, 2):
        if not os.isatty(fd):
            passed.append(fd)
            continue
        r, w = os.pipe2(os.O_CLOEXEC)
        done = threading.Event()
        if fd == 0:
            passed.append(r)
            ours.append(r)
            _thread(functools.partial(_copy, 0, w, done, close_dst=True))
        else:
            passed.append(w)
            ours.append(w)
            outputs.append(done)
            _thread(functools.partial(_copy, r, fd, done))

    def close_ours() -> None:
        for fd in ours:
            with contextlib.suppress(OSError):
                os.close(fd)
        ours.clear()

    try:
        replies = client.run_and_wait(
            name,
            command,
            unit=unit,
            environment=environment,
            working_directory=working_directory,
            stdio="pipe",
            fds=tuple(passed),
        )
        status = _finish(replies, started, close_ours)
    finally:
        close_ours()
    for done in outputs:
        done.wait(DRAIN_WAIT_S)
    return status


def _winsize(fd: int) -> tuple[int, int] | None:
    """Our terminal's (rows, columns), if it has a size."""
    try:
        rows, cols, _, _ = struct.unpack(
            "HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * _WINSIZE)
        )
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def _copy_winsize(src: int, master: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, b"\0" * _WINSIZE)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """The caller's terminal in raw mode for the block, restored however it ends."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_with_pty(
    client: Client,
    name: str,
    command: Sequence[str],
    *,
    environment: Sequence[str],
    unit: str | None,
    working_directory: str | None,
    started: Started,
) -> int:
    """Run on a fresh pty of the helper's, relayed to our terminal; the exit status."""
    received: list[int] = []
    output_done = threading.Event()
    relaying: list[int] = []
    window = next((fd for fd in (0, 1, 2) if os.isatty(fd)), None)
    previous_winch = signal.getsignal(signal.SIGWINCH)

    def relay() -> None:
        # The started reply brought the master (the only fd any reply of Run brings).
        if len(received) != 1:
            raise OSError("capsuled sent no terminal for the command")
        master = received[0]
        relaying.append(master)
        if window is not None:
            _copy_winsize(window, master)
            signal.signal(signal.SIGWINCH, lambda *_: _copy_winsize(window, master))
        _thread(lambda: _copy(0, master, threading.Event()))
        _thread(lambda: _copy(master, 1, output_done))

    try:
        with _raw_terminal(0):
            replies = client.run_and_wait(
                name,
                command,
                unit=unit,
                environment=environment,
                working_directory=working_directory,
                stdio="pty",
                received=received,
                # Set by the helper before the command starts: it may read it only once.
                size=_winsize(window) if window is not None else None,
            )
            status = _finish(replies, started, relay)
            if relaying:
                output_done.wait(DRAIN_WAIT_S)
    finally:
        signal.signal(signal.SIGWINCH, previous_winch)
        for fd in received:
            with contextlib.suppress(OSError):
                os.close(fd)
    sys.stdout.flush()
    return status
