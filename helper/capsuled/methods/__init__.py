"""org.capsuled.Manager's method table: every method bound to its handler in one place.

Like systemd's helpers bind all methods in one `sd_varlink_server_bind_method_many` call,
this table shows the whole API surface at a glance. A method declared in the IDL but
missing here answers org.varlink.service.MethodNotImplemented (the Dispatcher does that).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from capsuled import errors
from capsuled.dispatch import Dispatcher
from capsuled.methods import inside, lifecycle, streams
from capsuled.methods.context import CallContext, Notify, Services
from capsuled.varlink.interface import Interface
from capsuled.varlink.messages import Call
from capsuled.varlink.service import ServiceInfo

Handler = Callable[[CallContext, dict[str, object]], Awaitable[dict[str, object]]]

HANDLERS: Mapping[str, Handler] = {
    "List": lifecycle.list_capsules,
    "Describe": lifecycle.describe,
    "Create": lifecycle.create,
    "Start": lifecycle.start,
    "Stop": lifecycle.stop,
    "Restart": lifecycle.restart,
    "Remove": lifecycle.remove,
    "SetAutostart": lifecycle.set_autostart,
    "SetLimits": lifecycle.set_limits,
    "CheckAccess": lifecycle.check_access,
    "Info": lifecycle.info,
    "ListUnits": inside.list_units,
    "InstallUnit": inside.install_unit,
    "RemoveUnit": inside.remove_unit,
    "StartUnit": inside.start_unit,
    "StopUnit": inside.stop_unit,
    "RestartUnit": inside.restart_unit,
    "EnableUnit": inside.enable_unit,
    "DisableUnit": inside.disable_unit,
    "Run": inside.run,
    "Logs": streams.logs,
    "Watch": streams.watch,
}

# Streaming-only methods: a plain call gets org.varlink.service.ExpectedMore.
REQUIRES_MORE = frozenset({"Watch"})


def build_dispatcher(
    interface: Interface,
    services: Services,
    info: ServiceInfo,
    *,
    validate_replies: bool = False,
) -> Dispatcher[CallContext]:
    """The Dispatcher serving org.capsuled.Manager with these handlers and services."""

    def make_context(call: Call, peer: object, notify: Notify) -> CallContext:
        return CallContext(peer=peer, more=call.more, notify=notify, services=services)  # type: ignore[arg-type]  # Peer satisfies PeerLike structurally

    return Dispatcher(
        interface,
        HANDLERS,
        make_context=make_context,
        requires_more=REQUIRES_MORE,
        internal_error=errors.InternalError,
        info=info,
        validate_replies=validate_replies,
    )
