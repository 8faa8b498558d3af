"""Fair slots: work in progress bounded in total and per account, free slots handed out in turn.

Used for the transport's call slots and for polkit's checks in flight (issue 11, finding 8):
with one FIFO semaphore, a quiet caller waited behind everything the flooding callers queued.
asyncio only; nothing of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

__all__ = ["FairSlots"]


class FairSlots:
    """Slots for work in progress, bounded in total and per account, handed out fairly.

    A freed slot goes to the accounts waiting for one in turn (round robin), not to whoever
    asked first: with many accounts flooding, any other account waits for at most one slot per
    busy account, not behind everything they queued. Within an account, first come first
    served. Entries vanish when unused.
    """

    def __init__(self, total: int, per_uid: int) -> None:
        self._free = total
        self._per_uid = per_uid
        self._running: dict[int, int] = {}
        self._waiting: dict[int, deque[asyncio.Future[None]]] = {}
        self._turns: deque[int] = deque()  # accounts with waiters, in round-robin order

    def try_acquire(self, uid: int) -> bool:
        """Take a slot if one is free for `uid` now, without waiting; pair with release()."""
        if (
            self._free > 0
            and self._running.get(uid, 0) < self._per_uid
            and uid not in self._waiting
        ):
            self._take(uid)
            return True
        return False

    async def acquire(self, uid: int) -> None:
        """Wait for a slot (the caller bounds the wait); pair with release()."""
        if self.try_acquire(uid):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.get(uid)
        if queue is None:
            queue = self._waiting[uid] = deque()
            self._turns.append(uid)
        queue.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(uid)  # granted just as we were cancelled: give it on
            else:
                self._forget(uid, waiter)
            raise

    def _forget(self, uid: int, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(uid)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
        if not queue:
            del self._waiting[uid]
            self._turns.remove(uid)

    def release(self, uid: int) -> None:
        """Give back a slot acquire() got."""
        left = self._running[uid] - 1
        if left:
            self._running[uid] = left
        else:
            del self._running[uid]
        self._free += 1
        self._grant()

    def _take(self, uid: int) -> None:
        self._free -= 1
        self._running[uid] = self._running.get(uid, 0) + 1

    def _grant(self) -> None:
        """Give free slots to waiting accounts in turn, each within its own limit."""
        passes = len(self._turns)
        while self._free > 0 and self._turns and passes > 0:
            uid = self._turns.popleft()
            queue = self._waiting[uid]
            while queue and queue[0].done():
                queue.popleft()  # cancelled, its task not yet run to forget it
            if not queue:
                del self._waiting[uid]
                passes = len(self._turns)
                continue
            if self._running.get(uid, 0) >= self._per_uid:
                self._turns.append(uid)  # at its own limit: its turn comes when one of its ends
                passes -= 1
                continue
            self._take(uid)
            queue.popleft().set_result(None)
            if queue:
                self._turns.append(uid)
            else:
                del self._waiting[uid]
            passes = len(self._turns)

    @contextlib.asynccontextmanager
    async def held(self, uid: int) -> AsyncIterator[None]:
        """A slot for the block."""
        await self.acquire(uid)
        try:
            yield
        finally:
            self.release(uid)
