"""Graceful stop (SIGTERM): idle connections close at once, running calls get a grace period."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from protocol.harness import TIMEOUT_S, RawClient, ThreadServer
from protocol.test_daemon import TESTSERVER, Proc, _env

T = "org.example.test"


def test_running_call_finishes_idle_connection_closes(server: ThreadServer) -> None:
    with RawClient(server.path) as busy, RawClient(server.path) as idle:
        assert idle.call(f"{T}.Ping", text="i") == {"parameters": {"text": "i"}}
        busy.send({"method": f"{T}.Block", "parameters": {"key": "k"}})
        assert server.state.started_event("k").wait(TIMEOUT_S)
        done = asyncio.run_coroutine_threadsafe(server.server.shutdown(TIMEOUT_S), server.loop)
        idle.expect_closed()
        assert not done.done()
        server.release("k")
        assert busy.recv() == {"parameters": {}}
        busy.expect_closed()  # no further calls are taken while draining
        done.result(TIMEOUT_S)


def test_grace_period_expires(server: ThreadServer) -> None:
    with RawClient(server.path) as busy:
        busy.send({"method": f"{T}.Block", "parameters": {"key": "never"}})
        assert server.state.started_event("never").wait(TIMEOUT_S)
        server.run(server.server.shutdown(0.2))
        busy.expect_closed()


def test_sigterm_stops_the_daemon(sockdir: Path) -> None:
    path = str(sockdir / "term.sock")
    proc = Proc([sys.executable, TESTSERVER, "--listen", path], _env())
    try:
        proc.wait_for("Serving on")
        with RawClient(path) as c:
            assert c.call(f"{T}.Ping", text="x") == {"parameters": {"text": "x"}}
            proc.p.send_signal(signal.SIGTERM)
            c.expect_closed()
        assert proc.wait_exit() == 0
        proc.wait_for("exiting (signal)")
    finally:
        if proc.p.poll() is None:
            proc.p.kill()
            proc.p.wait(TIMEOUT_S)
