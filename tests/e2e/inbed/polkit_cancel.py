"""A polkit check waiting on an authentication agent that never answers, cancelled the way the
daemon cancels it when the client disconnects (as root; test_policy_matrix.py).

    python3 -m e2e.inbed.polkit_cancel

Prints {"pending": the check was left waiting, "cancelled": cancelling it raised
CancelledError, "seen": [[member, reply type], ...] for every call on polkit's connection}.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Callable

from jeepney import Message

from capsuled import dbus
from capsuled.peer import Peer, read_start_time
from capsuled.policy import actions
from capsuled.policy.engine import Identity, Request
from capsuled.policy.polkit import PolkitBackend

USER = "mallory"
ATTEMPTS = 50  # checks tried until the agent has registered and one stays pending
PENDING_S = 0.2  # a check not answered within this is waiting for the agent


SEEN: list[list[str]] = []
_CALL_RAW = dbus.DBusConnection.call_raw


async def _recording(
    self: dbus.DBusConnection,
    msg: Message,
    *,
    timeout_s: float | None = None,
    accept_fds: bool = False,
    on_reply: Callable[[Message], None] | None = None,
) -> Message:
    """DBusConnection.call_raw, recording each call's member and its reply's type (Hello too:
    call() goes through call_raw)."""
    reply = await _CALL_RAW(
        self, msg, timeout_s=timeout_s, accept_fds=accept_fds, on_reply=on_reply
    )
    SEEN.append([msg.header.fields[3], reply.header.message_type.name])
    return reply


async def probe() -> dict[str, object]:
    uid = pwd.getpwnam(USER).pw_uid
    sleeper = subprocess.Popen(
        ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", "sleep", "300"]
    )
    pidfd = os.pidfd_open(sleeper.pid)
    subject = Peer(uid, uid, sleeper.pid, pidfd, read_start_time(sleeper.pid))
    # pkttyagent on a pty whose input never comes: polkitd asks it and waits.
    agent = subprocess.Popen(
        ["script", "-qfc", f"pkttyagent --process {sleeper.pid}", "/dev/null"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    dbus.DBusConnection.call_raw = _recording  # type: ignore[method-assign]  # a probe's spy
    backend = PolkitBackend()  # a system bus connection of its own
    identity = Identity(uid, USER, frozenset())
    request = Request(actions.RUN, "x", None, allow_interactive=True)
    pending = False
    for _ in range(ATTEMPTS):  # until the agent has registered: then the check stays pending
        task = asyncio.create_task(backend.check(subject, identity, request))
        done, _ = await asyncio.wait({task}, timeout=PENDING_S)
        if not done:
            pending = True
            break
    task.cancel()
    try:
        await task
        cancelled = False
    except asyncio.CancelledError:
        cancelled = True
    await backend.aclose()
    agent.kill()
    sleeper.kill()
    return {"pending": pending, "cancelled": cancelled, "seen": SEEN}


def main() -> int:
    print(json.dumps(asyncio.run(probe())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
