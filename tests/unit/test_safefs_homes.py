"""safefs.CapsuleHomes: work under a capsule's home runs in a bounded pool of worker threads,
opens and closes the home's fd in that thread, and outlives a cancelled caller."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from capsuled.safefs import CapsuleHome, CapsuleHomes, NoHome
from fds import open_fds

NOBODY = 65534
TIMEOUT_S = 5.0


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "capsules"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        os.chown(root / name, NOBODY, NOBODY)
    return root


def test_work_runs_off_the_event_loop_and_leaves_no_fd_open(root: Path) -> None:
    async def scenario() -> tuple[int, int, str]:
        homes = CapsuleHomes(str(root))
        loop_thread = threading.get_ident()
        before = open_fds()

        def work(home: CapsuleHome) -> tuple[int, str]:
            home.write_file_atomically(("x",), "f", b"data")
            return threading.get_ident(), home.name

        worker, name = await homes.run("a", work)
        assert open_fds() == before  # the home's dir fd was closed where it was opened
        return loop_thread, worker, name

    loop_thread, worker, name = asyncio.run(scenario())
    assert worker != loop_thread
    assert name == "a"
    assert (root / "a" / "x" / "f").read_bytes() == b"data"


def test_errors_of_the_work_reach_the_caller(root: Path) -> None:
    homes = CapsuleHomes(str(root))
    with pytest.raises(NoHome):
        asyncio.run(homes.run("absent", lambda home: None))


def test_at_most_max_threads_work_at_once(root: Path) -> None:
    async def scenario() -> int:
        homes = CapsuleHomes(str(root), max_threads=2)
        release = threading.Event()
        lock = threading.Lock()
        running, most = 0, 0
        two_in = asyncio.Event()
        loop = asyncio.get_running_loop()

        def work(home: CapsuleHome) -> None:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
                if running == 2:
                    loop.call_soon_threadsafe(two_in.set)
            assert release.wait(TIMEOUT_S)
            with lock:
                running -= 1

        calls = [asyncio.create_task(homes.run(name, work)) for name in ("a", "b", "c")]
        async with asyncio.timeout(TIMEOUT_S):
            await two_in.wait()
            release.set()
            await asyncio.gather(*calls)
        return most

    assert asyncio.run(scenario()) == 2


def test_a_cancelled_caller_waits_for_its_work_to_finish(root: Path) -> None:
    # The caller holds the capsule's lock around this call: it must not let go while a thread
    # is still writing under the home.
    async def scenario() -> tuple[bool, bool]:
        homes = CapsuleHomes(str(root))
        started, release = threading.Event(), threading.Event()
        finished = []

        def work(home: CapsuleHome) -> None:
            started.set()
            assert release.wait(TIMEOUT_S)
            home.write_file_atomically(("x",), "late", b"1")
            finished.append(True)

        call = asyncio.create_task(homes.run("a", work))
        async with asyncio.timeout(TIMEOUT_S):
            await asyncio.to_thread(started.wait, TIMEOUT_S)
            call.cancel()
            for _ in range(5):  # a scheduler turn or five: the call must still be waiting
                await asyncio.sleep(0)
            waiting = not call.done()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await call
        return waiting, bool(finished)

    waiting, finished = asyncio.run(scenario())
    assert waiting
    assert finished
    assert (root / "a" / "x" / "late").read_bytes() == b"1"
