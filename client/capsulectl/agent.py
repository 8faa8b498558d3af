"""A text-mode polkit agent for the terminal, started the way systemctl starts one.

When a call needs an administrator's password and capsulectl may ask (no --no-ask-password), it
repeats the call with allowInteractiveAuthentication=true. polkitd then asks the agent registered
for the caller's session: a desktop's agent if there is one. On a text console there is none,
so, like systemd's polkit_agent_open(), capsulectl starts `pkttyagent --notify-fd N --fallback`
on its own terminal (`--fallback`: only if the session has no agent yet) and waits until it
has registered.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys

__all__ = ["TtyAgent"]

AGENT_REGISTER_TIMEOUT_S = 10.0
AGENT_EXIT_WAIT_S = 2.0


class TtyAgent:
    """pkttyagent running for the lifetime of one capsulectl command."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start pkttyagent if standard input is a terminal (it reads the password there)."""
        if self._proc is not None or not sys.stdin.isatty():
            return
        path = shutil.which("pkttyagent")
        if path is None:
            return
        read_fd, write_fd = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [path, "--notify-fd", str(write_fd), "--fallback"], pass_fds=(write_fd,)
            )
        except OSError:
            os.close(read_fd)
            return
        finally:
            os.close(write_fd)
        # pkttyagent closes the notify fd once registered with polkitd (or exits on failure).
        select.select([read_fd], [], [], AGENT_REGISTER_TIMEOUT_S)
        os.close(read_fd)

    def stop(self) -> None:
        """Terminate the agent if it was started."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=AGENT_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
