"""The policy matrix, driven as root inside the testbed (test_policy_matrix.py).

    python3 -m e2e.inbed.policy_driver < SPEC.json

SPEC: {"mode": "direct" | "varlink", "backend": "builtin" | "polkit", "users": [...], "steps":
[...]}. Each user gets a child process (policy_child.py under setpriv --init-groups, so it carries
the groups it had when it started). In "direct" mode the children connect to a socket of ours and
the steps ask capsuled.policy.authorizer about their peer credentials, read as the daemon reads
them at accept; in "varlink" mode the children talk to capsuled. Steps run in order, one result
each: {"op": "root", "argv"} -> exit status; {"op": "kill", "user"} -> null (the child is gone);
{"op": "check", "user", "action", "capsule", "owner"} -> the decision; {"op": "quota", "user"} ->
its four ceilings; {"op": "call", "user", "method", "parameters"} -> the reply. Prints {"backend":
the Authorizer's backend (direct mode) or null, "results": [...]}.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import socket
import subprocess
import sys
from typing import Any

from capsuled.peer import Peer, peer_credentials
from capsuled.policy import actions
from capsuled.policy.authorizer import Authorizer
from capsuled.policy.engine import Request

CHILD = [sys.executable, "-m", "e2e.inbed.policy_child"]
BACKLOG = 64

# The spec is JSON from the test: steps are indexed freely, as the test wrote them.
Step = dict[str, Any]


def spawn(user: str, *args: str) -> subprocess.Popen[str]:
    """A child for user, once it says it is ready."""
    argv = (
        [] if user == "root" else ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
    )
    child = subprocess.Popen(
        [*argv, *CHILD, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if line != "ready":
        raise SystemExit(f"child for {user} did not start: {line!r}")
    return child


def uid(user: str | None) -> int | None:
    return None if user is None else pwd.getpwnam(user).pw_uid


def direct_subjects(
    users: list[str], children: dict[str, subprocess.Popen[str]]
) -> dict[str, tuple[Peer, socket.socket]]:
    """Each user's child connected to a socket of ours, with its credentials as capsuled reads
    them."""
    subjects = {}
    path = f"/run/policy-matrix-{os.getpid()}.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o777)
    srv.listen(BACKLOG)
    for user in users:
        children[user] = spawn(user, "direct", path)
        conn, _ = srv.accept()
        # As the daemon does at accept: SO_PEERCRED, SO_PEERPIDFD, the start time.
        peer = peer_credentials(conn)
        if peer.pidfd is None or peer.start_time is None:
            raise SystemExit(f"no pidfd or start time for {user}'s connection")
        subjects[user] = (peer, conn)
    os.unlink(path)
    return subjects


async def run_step(
    step: Step,
    auth: Authorizer | None,
    children: dict[str, subprocess.Popen[str]],
    subjects: dict[str, tuple[Peer, socket.socket]],
) -> object:
    op = step["op"]
    if op == "root":
        return subprocess.run(step["argv"], capture_output=True, text=True).returncode
    if op == "kill":
        child = children.pop(step["user"])
        child.kill()
        child.wait()
        return None
    if op == "check":
        assert auth is not None, "check needs direct mode"
        request = Request(actions.resolve(step["action"]), step["capsule"], uid(step["owner"]))
        verdict = await auth.decide(subjects[step["user"]][0], request)
        return str(verdict.decision)
    if op == "quota":
        assert auth is not None, "quota needs direct mode"
        q = auth.quota(subjects[step["user"]][0])
        return [q.max_capsules, q.max_memory_bytes, q.max_tasks, q.max_cpu_weight]
    if op == "call":
        child = children[step["user"]]
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.write(
            json.dumps({"method": step["method"], "parameters": step["parameters"]}) + "\n"
        )
        child.stdin.flush()
        return json.loads(child.stdout.readline())
    raise SystemExit(f"unknown op {op}")


async def drive(spec: dict[str, Any]) -> dict[str, object]:
    children: dict[str, subprocess.Popen[str]] = {}
    subjects: dict[str, tuple[Peer, socket.socket]] = {}
    auth: Authorizer | None = None
    if spec["mode"] == "direct":
        auth = Authorizer.from_config(backend=spec["backend"])
        subjects = direct_subjects(spec["users"], children)
    else:
        for user in spec["users"]:
            children[user] = spawn(user, "varlink")
    results = [await run_step(step, auth, children, subjects) for step in spec["steps"]]
    for child in children.values():
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    backend_name = None
    if auth is not None:
        backend_name = auth.backend_name
        await auth.aclose()
    return {"backend": backend_name, "results": results}


def main() -> int:
    print(json.dumps(asyncio.run(drive(json.load(sys.stdin)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
