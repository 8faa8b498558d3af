"""File descriptors a call brought, and fds a reply takes back, as a handler sees them.

The whole fd API of a method (docs/ARCHITECTURE.md, "File descriptors"):

- The fds that came with a call are `Call.fds` (CallContext.fds): numbers the transport owns.
  A handler may hand them on (D-Bus duplicates what it sends) but never closes them itself;
  `close_received()` closes them early, e.g. once systemd has its own copies, and the
  transport closes whatever is left when the call ends, however it ends.
- Only methods in the server's fd table (`methods.TAKES_FDS`, each documented in the IDL as
  taking fds) get any: fds sent to any other method, or more than it takes, are closed and the
  call is answered FileDescriptorsRefused before the handler runs.
- `push_fd(fd)` gives an fd to the transport, to send with the next reply of this call (a
  `continues` one or the last), as sd_varlink_push_fd() does. From then on it is the
  transport's: closed once sent, or when the call ends without sending it.

Outside a call the transport serves (unit tests, scripts), `received()` is empty, and
`push_fd` raises unless a test installed its own holder with `holding`. A leaf module, as
capsuled.callslot: the transport provides the holder, handlers use the functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol

__all__ = [
    "FdHolder",
    "close_received",
    "hold",
    "holding",
    "push_fd",
    "received",
]


class FdHolder(Protocol):
    """What the transport gives each call it runs."""

    def received(self) -> tuple[int, ...]:
        """The call's fds not closed yet."""
        ...

    def close_received(self) -> None:
        """Close the call's fds now (idempotent)."""
        ...

    def push_fd(self, fd: int) -> None:
        """Take `fd`, to send with the call's next reply."""
        ...


_HOLDER: ContextVar[FdHolder | None] = ContextVar("capsuled_fds", default=None)


def hold(holder: FdHolder) -> None:
    """The transport: `holder` is the running call's for the rest of the current context. Only
    for code that runs each call in a task of its own (whose context copy ends with it): one
    ContextVar.set, no context manager to enter and leave per call."""
    _HOLDER.set(holder)


@contextlib.contextmanager
def holding(holder: FdHolder) -> Iterator[None]:
    """The transport: `holder` is the running call's, for code awaited inside the block."""
    token = _HOLDER.set(holder)
    try:
        yield
    finally:
        _HOLDER.reset(token)


def received() -> tuple[int, ...]:
    """The running call's fds that are still open (empty outside a served call)."""
    holder = _HOLDER.get()
    return holder.received() if holder is not None else ()


def close_received() -> None:
    """Close the running call's fds now: the helper keeps no copy longer than it must."""
    holder = _HOLDER.get()
    if holder is not None:
        holder.close_received()


def push_fd(fd: int) -> None:
    """Send `fd` with the running call's next reply; the transport owns it from here on.

    Raises:
        RuntimeError: no call is being served here (the fd is not taken: still the caller's).
    """
    holder = _HOLDER.get()
    if holder is None:
        raise RuntimeError("push_fd outside a call served by the transport")
    holder.push_fd(fd)
