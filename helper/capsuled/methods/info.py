"""Info: about the helper and the policy, the one method that needs none of lifecycle.py.

Info is often a client's first call, and a socket-activated start answers its first call
before it imports anything else: so it lives apart from the capsule lifecycle (whose module,
with the wire types and the deployment code it pulls in, is imported on its first call;
capsuled.methods.Deferred).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capsuled.methods.context import CallContext
from capsuled.systemd import errors as sd

if TYPE_CHECKING:
    from capsuled import wire


async def info(ctx: CallContext, p: wire.NoParams) -> wire.InfoReply:
    try:
        version: int | None = await ctx.backend.version()
    except sd.BackendError:
        version = None
    return {
        "version": ctx.services.version,
        "systemdVersion": version,
        "policyBackend": ctx.services.authorizer.backend_name,
        "callerUid": ctx.peer.uid,
    }
