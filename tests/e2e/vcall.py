"""Raw Varlink calls made *inside* the testbed, as a given user.

The client (e2e/inbed/vcall.py) runs in the container as that user, so the helper sees the real
uid on its socket, and speaks JSON+NUL with nothing but the standard library: end-to-end tests
assert on the exact wire replies, independent of capsulectl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from e2e.inbed.wire import INTERFACE, SOCKET
from testbed import Testbed

ARG_MAX_BYTES = 64 * 1024


@dataclass
class Replies:
    # Parsed JSON from the wire: tests index into it freely and assert on what they find.
    replies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        return self.replies[-1]

    @property
    def error(self) -> str | None:
        err = self.last.get("error")
        return err if isinstance(err, str) else None

    @property
    def parameters(self) -> dict[str, Any]:
        params = self.last.get("parameters", {})
        assert isinstance(params, dict)
        return params


def call(
    bed: Testbed,
    user: str,
    method: str,
    params: dict[str, object] | None = None,
    *,
    more: bool = False,
    limit: int = 0,
    timeout: float = 120.0,
    socket: str = SOCKET,
) -> Replies:
    """Call org.capsuled.Manager.METHOD (or a full method name) as USER inside the bed.

    socket: the helper's socket path inside the bed (default: where capsuled.socket listens).
    """
    full = method if "." in method else f"{INTERFACE}.{method}"
    arg = json.dumps([full, params or {}, more, limit, timeout, socket])
    if len(arg) > ARG_MAX_BYTES:
        # One argument may hold at most 128 KiB (MAX_ARG_STRLEN): a large call goes on stdin.
        result = bed.run_module(user, "e2e.inbed.vcall", "-", input=arg, timeout=timeout + 10)
    else:
        result = bed.run_module(user, "e2e.inbed.vcall", arg, timeout=timeout + 10)
    assert result.returncode == 0, f"client failed: {result.stderr}"
    replies = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert replies, f"no reply to {full}: {result.stderr}"
    return Replies(replies)


def ok(bed: Testbed, user: str, method: str, **params: object) -> dict[str, Any]:
    """Call and insist on success; the reply's parameters."""
    r = call(bed, user, method, params)
    assert r.error is None, f"{user} {method}({params}) -> {r.last}"
    return r.parameters


def fails(bed: Testbed, user: str, method: str, **params: object) -> tuple[str, dict[str, Any]]:
    """Call and insist on an error reply; (error name, parameters)."""
    r = call(bed, user, method, params)
    assert r.error is not None, f"{user} {method}({params}) unexpectedly succeeded: {r.last}"
    return r.error, r.parameters
