"""Waiting for something slow without holding a call slot (issue 11, finding 8).

The transport runs at most a few calls per caller at once (call slots, capsuled.transport). A
call that waits for a human, polkit's interactive authentication, may wait minutes; holding its
slot all that time would let a caller who never answers the dialog pin slots for nothing. So the
waiting code says so:

    async with callslot.released():
        reply = await ask_polkit_interactively()

and, for that block, the call gives its slot back and holds a cheaper "waiting" slot instead
(bounded in total and per caller: full means Busy); when the block ends it takes a call slot
again (a bounded wait, then Busy). Outside a call served by the transport (tests, scripts) the
block just runs.

A leaf module: the transport provides the holder for each call it runs (`hold`), the policy
code that waits uses `released`, and neither imports the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Protocol

__all__ = [
    "SlotHolder",
    "hold",
    "holding",
    "released",
]


class SlotHolder(Protocol):
    """What the transport gives each call it runs."""

    def released(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold a waiting slot instead of the call slot for the block (raises Busy if none)."""
        ...


_HOLDER: ContextVar[SlotHolder | None] = ContextVar("capsuled_call_slot", default=None)


def hold(holder: SlotHolder) -> None:
    """The transport: `holder` is the running call's for the rest of the current context. Only
    for code that runs each call in a task of its own (whose context copy ends with it): one
    ContextVar.set, no context manager to enter and leave per call."""
    _HOLDER.set(holder)


@contextlib.contextmanager
def holding(holder: SlotHolder) -> Iterator[None]:
    """The transport: `holder` is the running call's, for code awaited inside the block."""
    token = _HOLDER.set(holder)
    try:
        yield
    finally:
        _HOLDER.reset(token)


@contextlib.asynccontextmanager
async def released() -> AsyncIterator[None]:
    """Run the block without a call slot (see the module docstring).

    Raises:
        VarlinkError: the transport's Busy, when no waiting slot or no call slot comes free.
    """
    holder = _HOLDER.get()
    if holder is None:
        yield
        return
    async with holder.released():
        yield
