"""org.capsuled.Manager's method table: every method bound to its handler in one place.

Like systemd's helpers bind all methods in one `sd_varlink_server_bind_method_many` call,
this table shows the whole API surface at a glance. A method declared in the IDL but
missing here answers org.varlink.service.MethodNotImplemented (the Dispatcher does that).

A socket-activated start imports only what its first call needs: the modules of the methods
(lifecycle, inside, streams, deploy, trail: capsules, units, logs and watches, bundles, the
audit trail, with the wire types, pty, unit file and bundle code they pull in) are imported on
their method's first call (`Deferred`), which is a third of the helper's own imports (issue 12:
cold activation); Info, often a client's first call, is bound at start (info.py). They come
from the package directory `capsuled` itself was loaded from at start, through the same
sys.path: nothing is found in a place that was not already trusted at start
(daemon.unsafe_import_paths checks it).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

from capsuled import errors
from capsuled.audit import RESULT_CANCELLED, RESULT_DENIED, AuditAction
from capsuled.dispatch import Dispatcher
from capsuled.methods import info
from capsuled.methods.context import CallContext, Notify, Outcome, Services
from capsuled.peer import Peer
from capsuled.records import RecordsUnwritable
from capsuled.varlink.errors import InvalidParameter, VarlinkError
from capsuled.varlink.interface import Interface
from capsuled.varlink.messages import Call
from capsuled.varlink.service import ServiceInfo

Handler = Callable[[CallContext, dict[str, object]], Awaitable[dict[str, object]]]
P = TypeVar("P", bound=Mapping[str, object])
R = TypeVar("R", bound=Mapping[str, object])


def bind(handler: Callable[[CallContext, P], Awaitable[R]]) -> Handler:
    """A handler typed with capsuled.wire, as the Dispatcher calls it.

    The Dispatcher checks every call's parameters against the IDL before the handler runs, and
    the wire TypedDicts mirror that IDL (tests/unit/test_wire.py), so the handler's typed view of
    them holds; the one cast of the method table says so here instead of in every handler.
    """
    return cast(Handler, handler)


log = logging.getLogger(__name__)


class MethodUnavailable(errors.InternalError):
    """A Deferred method's module could not be imported: InternalError on the wire, never
    audited (the call ran nothing)."""


# Methods whose import failure has been logged since their last successful import.
_UNAVAILABLE: set[str] = set()


@dataclass(frozen=True, slots=True)
class Deferred:
    """A handler whose module (capsuled.methods.MODULE) is imported on its method's first call.

    A module that cannot be imported (a dependency missing, say `cryptography` for Deploy)
    fails that method only: the call is answered InternalError (MethodUnavailable), every other
    method goes on working, and the next call tries again (Python keeps no half-imported
    module). The reason is logged once per method until an import succeeds, and such a call is
    not audited: it ran nothing, not even the policy, so any local user repeating it would
    otherwise write a journal line, an audit record and an fsync per call. The import runs on
    the event loop, once: later calls find it in sys.modules.
    """

    method: str
    module: str
    function: str

    def resolve(self) -> Handler:
        """The handler itself, importing its module if that has not happened yet.

        Raises:
            errors.InternalError: the module could not be imported (logged).
        """
        name = f"{__name__}.{self.module}"
        try:
            # Once imported, every call of the method passes here: sys.modules first (a None
            # there, a failed import's mark, goes to import_module, which raises for it).
            module = sys.modules.get(name) or importlib.import_module(name)
        except ImportError as exc:
            if self.method not in _UNAVAILABLE:
                _UNAVAILABLE.add(self.method)
                log.error(
                    "method %s is unavailable: importing %s failed: %s", self.method, name, exc
                )
            raise MethodUnavailable() from exc
        _UNAVAILABLE.discard(self.method)
        return cast(Handler, getattr(module, self.function))

    async def __call__(self, ctx: CallContext, p: dict[str, object]) -> dict[str, object]:
        return await self.resolve()(ctx, p)


def handler_function(handler: Handler) -> Callable[..., object]:
    """The function a table entry runs (a Deferred's once imported), for its type hints."""
    return handler.resolve() if isinstance(handler, Deferred) else handler


def _deferred(module: str, **functions: str) -> dict[str, Handler]:
    return {method: Deferred(method, module, function) for method, function in functions.items()}


HANDLERS: Mapping[str, Handler] = {
    "Info": bind(info.info),
    **_deferred(
        "lifecycle",
        List="list_capsules",
        Describe="describe",
        Create="create",
        Start="start",
        Stop="stop",
        Restart="restart",
        Remove="remove",
        SetAutostart="set_autostart",
        SetLimits="set_limits",
        CheckAccess="check_access",
    ),
    **_deferred(
        "inside",
        ListUnits="list_units",
        InstallUnit="install_unit",
        RemoveUnit="remove_unit",
        StartUnit="start_unit",
        StopUnit="stop_unit",
        RestartUnit="restart_unit",
        EnableUnit="enable_unit",
        DisableUnit="disable_unit",
        Run="run",
    ),
    **_deferred("streams", Logs="logs", Watch="watch"),
    **_deferred("deploy", Deploy="deploy", Rollback="rollback"),
    **_deferred("trail", Audit="audit"),
}

# Streaming-only methods: a plain call gets org.varlink.service.ExpectedMore.
REQUIRES_MORE = frozenset({"Watch"})

# Methods anybody may stream from without any authorization (each filters what it sends to
# what the caller may read): the transport gives their streams a small share of their own
# (transport.Limits.max_open_streams), so that nobody can take every stream slot without
# being allowed anything.
OPEN_STREAMS = frozenset({"Watch", "List"})

# Methods that take file descriptors (SCM_RIGHTS) with their call, and how many at most; the
# IDL documents each (a test holds the two together). fds sent to any other method are closed
# and the call is answered FileDescriptorsRefused before its handler runs (capsuled.fdpass).
# Run --pipe: the command's stdin, stdout and stderr.
TAKES_FDS: Mapping[str, int] = {"Run": 3}

# Mutating methods and the audit action each is recorded under (invariant 6). Handlers audit
# their own outcome with details; `audited` makes sure a refusal, a failure or a hang-up in
# the middle is recorded too, reading what the call's context says happened (ctx.outcome).
AUDITED: Mapping[str, AuditAction] = {
    "Create": AuditAction.CREATE,
    "Remove": AuditAction.REMOVE,
    "Start": AuditAction.START,
    "Stop": AuditAction.STOP,
    "Restart": AuditAction.RESTART,
    "SetAutostart": AuditAction.SET_AUTOSTART,
    "SetLimits": AuditAction.SET_LIMITS,
    "InstallUnit": AuditAction.INSTALL_UNIT,
    "RemoveUnit": AuditAction.REMOVE_UNIT,
    "StartUnit": AuditAction.START_UNIT,
    "StopUnit": AuditAction.STOP_UNIT,
    "RestartUnit": AuditAction.RESTART_UNIT,
    "EnableUnit": AuditAction.ENABLE_UNIT,
    "DisableUnit": AuditAction.DISABLE_UNIT,
    "Run": AuditAction.RUN,
    "Deploy": AuditAction.DEPLOY,
    "Rollback": AuditAction.ROLLBACK,
}


# A call refused for its input changed nothing and proved nothing about anyone; recording it
# would let any user write junk (bad names, random bytes as bundles) into the audit trail.
# (A bundle refused for its signature is such input too: it is checked before the policy.)
INPUT_ERRORS = (
    errors.InvalidName,
    errors.InvalidUnit,
    errors.InvalidValue,
    InvalidParameter,
    errors.InvalidBundle,
    errors.UnsignedBundle,
    errors.UntrustedSigner,
    errors.BadSignature,
)


def audited(action: AuditAction, handler: Handler) -> Handler:
    """Record a mutating call's outcome if its handler could not: refused, failed (a Varlink
    error, or InternalError for anything else), cancelled; and answer only once the trail has
    the record on disk (AuditLog.sync)."""

    async def handle(ctx: CallContext, p: dict[str, object]) -> dict[str, object]:
        raw_name = p.get("name")
        name = raw_name if isinstance(raw_name, str) else None
        try:
            try:
                reply = await handler(ctx, p)
            except RecordsUnwritable as exc:
                # records.py's OSError, translated once here, where every writer of records
                # passes: a Create or Remove cut short is finished by the same call later.
                raise errors.RecordsUnwritable(reason=str(exc)) from exc
        except VarlinkError as exc:
            if ctx.outcome is Outcome.DENIED:
                ctx.audit(action, name, RESULT_DENIED)
            elif ctx.outcome is Outcome.OPEN and not isinstance(
                exc, (*INPUT_ERRORS, MethodUnavailable)
            ):
                ctx.audit(action, name, exc.name)
            await ctx.services.audit.sync()
            raise
        except asyncio.CancelledError:
            # The client hung up mid-call: systemd may still finish a job we queued.
            if ctx.outcome is not Outcome.RECORDED:
                ctx.audit(action, name, RESULT_CANCELLED)
            raise
        except Exception:
            # No answer of ours: a bug, or an import, allocation or fd failing mid-call (the
            # transport answers InternalError). What the call changed before it (Remove may
            # have stopped and cleaned the capsule) is still recorded: nothing changes
            # unaudited.
            if ctx.outcome is Outcome.OPEN:
                ctx.audit(action, name, errors.InternalError.name)
            await ctx.services.audit.sync()
            raise
        await ctx.services.audit.sync()
        return reply

    return handle


def build_dispatcher(
    interface: Interface,
    services: Services,
    info: ServiceInfo,
    *,
    validate_replies: bool = False,
) -> Dispatcher[CallContext]:
    """The Dispatcher serving org.capsuled.Manager with these handlers and services."""

    def make_context(call: Call, peer: Peer, notify: Notify) -> CallContext:
        return CallContext(peer=peer, more=call.more, send_continued=notify, services=services)

    handlers = {
        method: audited(AUDITED[method], handler) if method in AUDITED else handler
        for method, handler in HANDLERS.items()
    }
    return Dispatcher(
        interface,
        handlers,
        make_context=make_context,
        requires_more=REQUIRES_MORE,
        info=info,
        validate_replies=validate_replies,
    )
