"""The terminal polkit agent capsulectl starts on a text console (capsulectl/agent.py)."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
from cli_fixtures import Tty

# --- the terminal polkit agent --------------------------------------------------------------------


def fake_pkttyagent(tmp_path: Path) -> Path:
    """A pkttyagent stand-in: logs its argv, closes the notify fd (as registering does), waits."""
    log = tmp_path / "agent-argv"
    script = tmp_path / "pkttyagent"
    # Python, not sh: dash cannot close a file descriptor above 9 by number.
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, time\n"
        f"open({str(log)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
        "os.close(int(sys.argv[2]))\n"
        "time.sleep(60)\n"
    )
    script.chmod(0o755)
    return log


def test_tty_agent_starts_on_a_terminal_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsulectl.agent import TtyAgent

    log = fake_pkttyagent(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr("sys.stdin", Tty())
    agent = TtyAgent()
    agent.start()  # returns once the agent closed its notify fd, i.e. has "registered"
    argv = log.read_text().split()
    assert argv[0] == "--notify-fd"
    assert argv[2] == "--fallback"
    assert argv[1].isdigit()
    proc = agent._proc
    assert proc is not None
    assert proc.poll() is None
    agent.stop()
    assert proc.poll() is not None


def test_tty_agent_not_started_without_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsulectl.agent import TtyAgent

    log = fake_pkttyagent(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr("sys.stdin", io.StringIO())
    agent = TtyAgent()
    agent.start()
    agent.stop()
    assert not log.exists()
