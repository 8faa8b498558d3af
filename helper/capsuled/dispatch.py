"""Method dispatch: look the method up, validate parameters against the IDL, answer
org.varlink.service, then call the handler.

The order mirrors sd-varlink's dispatch: interface -> method -> parameters -> flags -> handler.
Every refusal is a `VarlinkError`; anything else a handler raises propagates to the one error
boundary in transport.py, which answers the interface's InternalError (ServerErrors.internal,
named by whoever wires the server) without leaking the exception text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

from capsuled.peer import Peer
from capsuled.varlink.errors import (
    ExpectedMore,
    InterfaceNotFound,
    InvalidParameter,
    MethodNotFound,
    MethodNotImplemented,
    VarlinkError,
)
from capsuled.varlink.interface import Interface
from capsuled.varlink.messages import Call
from capsuled.varlink.service import SERVICE_INTERFACE_NAME, ServiceInfo, service_interface

__all__ = ["Dispatcher", "Handler", "Notify"]

Ctx = TypeVar("Ctx")

Notify = Callable[[dict[str, object]], Awaitable[None]]
"""Sends a reply with continues=true (only if the call had `more`); awaits the transport's drain."""

Handler = Callable[[Ctx, dict[str, object]], Awaitable[dict[str, object]]]
"""Gets validated parameters (absent optional fields as None); returns the final reply."""


class Dispatcher(Generic[Ctx]):
    """Routes one call of one interface (plus org.varlink.service) to its handler."""

    def __init__(
        self,
        interface: Interface,
        handlers: Mapping[str, Handler[Ctx]],
        make_context: Callable[[Call, Peer, Notify], Ctx],
        requires_more: frozenset[str],
        info: ServiceInfo,
        validate_replies: bool = False,
    ) -> None:
        unknown = (set(handlers) | requires_more) - set(interface.methods)
        if unknown:
            raise ValueError(f"not methods of {interface.name}: {sorted(unknown)}")
        self.interface = interface
        self.handlers = dict(handlers)
        self.make_context = make_context
        self.requires_more = requires_more
        self.info = info
        self.validate_replies = validate_replies
        self._service = service_interface()

    @property
    def interface_names(self) -> list[str]:
        """Interfaces this dispatcher answers, as GetInfo lists them."""
        return [SERVICE_INTERFACE_NAME, self.interface.name]

    async def handle(self, call: Call, peer: Peer, notify: Notify) -> dict[str, object]:
        """Answer one call; returns the final reply parameters.

        Raises:
            VarlinkError: the error reply to send (lookup, validation, or the handler's own).
            Exception: a handler bug; the transport logs it and replies ServerErrors.internal.
        """
        interface, _, member = call.method.rpartition(".")
        if interface == SERVICE_INTERFACE_NAME:
            return self._service_call(call, member)
        if interface != self.interface.name:
            raise InterfaceNotFound(interface=interface)
        if member not in self.interface.methods:
            raise MethodNotFound(method=call.method)
        if call.upgrade:
            # No method of ours supports protocol upgrades (sd-varlink answers the same way).
            raise InvalidParameter(parameter="upgrade")
        params = self.interface.validate_call(member, call.parameters)
        if member in self.requires_more and not call.more:
            raise ExpectedMore()
        handler = self.handlers.get(member)
        if handler is None:
            raise MethodNotImplemented(method=call.method)
        if self.validate_replies:
            notify = self._checked_notify(member, notify)
        ctx = self.make_context(call, peer, notify)
        try:
            result = await handler(ctx, params)
        except VarlinkError as exc:
            if self.validate_replies:
                self.check_error(exc)
            raise
        if self.validate_replies:
            self.interface.validate_reply(member, result)
        return result

    def _service_call(self, call: Call, member: str) -> dict[str, object]:
        if member not in self._service.methods:
            raise MethodNotFound(method=call.method)
        if call.upgrade:
            raise InvalidParameter(parameter="upgrade")
        params = self._service.validate_call(member, call.parameters)
        if member == "GetInfo":
            return self.info.get_info_reply(self.interface_names)
        wanted = params["interface"]
        if wanted == SERVICE_INTERFACE_NAME:
            return {"description": self._service.description}
        if wanted == self.interface.name:
            return {"description": self.interface.description}
        raise InterfaceNotFound(interface=wanted)

    def _checked_notify(self, member: str, notify: Notify) -> Notify:
        async def checked(params: dict[str, object]) -> None:
            self.interface.validate_reply(member, params)
            await notify(params)

        return checked

    def check_error(self, exc: VarlinkError) -> None:
        """Check an error reply against the IDL that declares it (when validate_replies is set).

        Raises:
            ValidationError, KeyError: the error is undeclared or its parameters do not match.
        """
        interface, _, member = exc.name.rpartition(".")
        if interface == SERVICE_INTERFACE_NAME:
            self._service.validate_error(member, exc.parameters)
        elif interface == self.interface.name:
            self.interface.validate_error(member, exc.parameters)
        else:
            raise KeyError(f"error {exc.name} is not declared by any interface we serve")
