"""Errors of the Varlink protocol core.

    Exception
    ├── ProtocolError                 the byte stream broke the Varlink rules
    │   ├── LocalProtocolError        we tried something illegal (our bug: log it, close)
    │   └── RemoteProtocolError       the peer sent garbage (close without a reply)
    └── VarlinkError                  an error *reply*: a normal answer, not a crash
        ├── InterfaceNotFound         org.varlink.service.InterfaceNotFound(interface)
        ├── MethodNotFound            org.varlink.service.MethodNotFound(method)
        ├── MethodNotImplemented      org.varlink.service.MethodNotImplemented(method)
        ├── InvalidParameter          org.varlink.service.InvalidParameter(parameter)
        ├── PermissionDenied          org.varlink.service.PermissionDenied()
        └── ExpectedMore              org.varlink.service.ExpectedMore()

Every `VarlinkError` subclass that sets `name` in its own body registers itself, so a client can
turn an error reply back into the right class with `error_class(name)` or
`error_from_name(name, parameters)`.
"""

from __future__ import annotations

# Not typing's: capsulectl's start-up loads no typing, ~5 ms of it (mypy: true all the same).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar

__all__ = [
    "ExpectedMore",
    "InterfaceNotFound",
    "InvalidParameter",
    "LocalProtocolError",
    "MethodNotFound",
    "MethodNotImplemented",
    "PermissionDenied",
    "ProtocolError",
    "RemoteProtocolError",
    "VarlinkError",
    "error_class",
    "error_from_name",
]


class ProtocolError(Exception):
    """Base of the errors that end a connection: the Varlink framing or state rules were broken."""


class LocalProtocolError(ProtocolError):
    """Raised when our side tries an illegal move (a reply to a oneway call, unencodable data)."""


class RemoteProtocolError(ProtocolError):
    """Raised when the peer's bytes are not a valid Varlink message; close without replying."""


_REGISTRY: dict[str, type[VarlinkError]] = {}


class VarlinkError(Exception):
    """An error reply: `name` is the wire name, `parameters` the reply's parameters."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Only classes that name a wire error register; abstract bases (e.g. ManagerError) do not.
        # A later class with the same name replaces the earlier one (module reloads in tests).
        if "name" in cls.__dict__:
            _REGISTRY[cls.name] = cls

    def __init__(self, **parameters: object) -> None:
        super().__init__(parameters)
        self.parameters: dict[str, object] = parameters

    def __str__(self) -> str:
        name = getattr(self, "name", type(self).__name__)
        return f"{name}({self.parameters!r})" if self.parameters else name


def error_class(name: str) -> type[VarlinkError] | None:
    """Return the registered class for an error's wire name, or None."""
    return _REGISTRY.get(name)


_UNKNOWN: dict[str, type[VarlinkError]] = {}
_UNKNOWN_CACHE_MAX = 256


def error_from_name(name: str, parameters: dict[str, object]) -> VarlinkError:
    """Build the exception for an error reply; unknown names get an ad-hoc unregistered class."""
    cls = _REGISTRY.get(name) or _UNKNOWN.get(name)
    if cls is None:
        # Unregistered: `name` is set after class creation so __init_subclass__ skips the registry.
        cls = type("UnknownVarlinkError", (VarlinkError,), {"__module__": __name__})
        cls.name = name
        if len(_UNKNOWN) < _UNKNOWN_CACHE_MAX:  # a hostile server must not grow this without bound
            _UNKNOWN[name] = cls
    return cls(**parameters)


class InterfaceNotFound(VarlinkError):
    """The call named an interface this service does not provide."""

    name = "org.varlink.service.InterfaceNotFound"


class MethodNotFound(VarlinkError):
    """The interface exists but declares no such method."""

    name = "org.varlink.service.MethodNotFound"


class MethodNotImplemented(VarlinkError):
    """The interface declares the method but this service has no code for it."""

    name = "org.varlink.service.MethodNotImplemented"


class InvalidParameter(VarlinkError):
    """A parameter is unknown, missing, or of the wrong type; `parameter` is its dotted path."""

    name = "org.varlink.service.InvalidParameter"


class PermissionDenied(VarlinkError):
    """The caller may not do this."""

    name = "org.varlink.service.PermissionDenied"


class ExpectedMore(VarlinkError):
    """A streaming-only method was called without `more`."""

    name = "org.varlink.service.ExpectedMore"
