"""The builtin backend: the last step of a decision from the configuration's [[rule]]s and
[defaults] (capsuled.policy.config reads them; capsuled.policy.engine matches them)."""

from __future__ import annotations

from capsuled.peer import Peer
from capsuled.policy.engine import Decision, Identity, PolicyConfig, Request, builtin_decide

__all__ = ["BuiltinBackend"]


class BuiltinBackend:
    """The last step from the [[rule]]s and [defaults]; cannot authenticate anybody."""

    name = "builtin"

    def __init__(self, config: PolicyConfig) -> None:
        self._config = config

    async def check(self, peer: Peer, identity: Identity, request: Request) -> Decision:
        # No agent to ask: allow_interactive changes nothing, auth_admin stays a refusal.
        return builtin_decide(identity, request, self._config)

    async def aclose(self) -> None:
        return None
