"""The Varlink protocol core: bytes in, events out; events in, bytes out. No I/O (h11's shape).

Imports only the standard library's pure parts (no asyncio, socket, os, logging), so the
unprivileged client can use it cheaply and the layering test can check it.

The names below are loaded on first use (PEP 562), not when the package is imported: the client
needs framing, messages, connection and errors, never the IDL parser (interface, service), and
importing those eagerly cost every `capsulectl` call ~7 ms (python -X importtime). Code in this
repository imports from the submodules directly; the package-level names stay for other users.
"""

from __future__ import annotations

# Not typing's: capsulectl's start-up loads no typing, ~5 ms of it (mypy: true all the same).
TYPE_CHECKING = False
if TYPE_CHECKING:
    # For type checkers and editors only; at run time __getattr__ below resolves these.
    from capsuled.varlink.connection import ClientConnection, ConnectionState, ServerConnection
    from capsuled.varlink.errors import (
        ExpectedMore,
        InterfaceNotFound,
        InvalidParameter,
        LocalProtocolError,
        MethodNotFound,
        MethodNotImplemented,
        PermissionDenied,
        ProtocolError,
        RemoteProtocolError,
        VarlinkError,
        error_class,
        error_from_name,
    )
    from capsuled.varlink.framing import MAX_MESSAGE_BYTES, MessageBuffer
    from capsuled.varlink.interface import Interface, ValidationError, parse_interface
    from capsuled.varlink.messages import Call, ErrorReply, Reply, encode, parse_call, parse_reply
    from capsuled.varlink.service import ServiceInfo

# Public name -> the submodule that defines it. test_varlink_package.py checks this table against
# __all__ and against each submodule, so a name cannot point at the wrong module.
_SUBMODULE_OF: dict[str, str] = {
    "ClientConnection": "connection",
    "ConnectionState": "connection",
    "ServerConnection": "connection",
    "ExpectedMore": "errors",
    "InterfaceNotFound": "errors",
    "InvalidParameter": "errors",
    "LocalProtocolError": "errors",
    "MethodNotFound": "errors",
    "MethodNotImplemented": "errors",
    "PermissionDenied": "errors",
    "ProtocolError": "errors",
    "RemoteProtocolError": "errors",
    "VarlinkError": "errors",
    "error_class": "errors",
    "error_from_name": "errors",
    "MAX_MESSAGE_BYTES": "framing",
    "MessageBuffer": "framing",
    "Interface": "interface",
    "ValidationError": "interface",
    "parse_interface": "interface",
    "Call": "messages",
    "ErrorReply": "messages",
    "Reply": "messages",
    "encode": "messages",
    "parse_call": "messages",
    "parse_reply": "messages",
    "ServiceInfo": "service",
}

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Call",
    "ClientConnection",
    "ConnectionState",
    "ErrorReply",
    "ExpectedMore",
    "Interface",
    "InterfaceNotFound",
    "InvalidParameter",
    "LocalProtocolError",
    "MessageBuffer",
    "MethodNotFound",
    "MethodNotImplemented",
    "PermissionDenied",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "ServerConnection",
    "ServiceInfo",
    "ValidationError",
    "VarlinkError",
    "encode",
    "error_class",
    "error_from_name",
    "parse_call",
    "parse_interface",
    "parse_reply",
]


def __getattr__(name: str) -> object:
    """Load the submodule that defines `name` on first access (PEP 562), then cache the value."""
    submodule = _SUBMODULE_OF.get(name)
    if submodule is None:
        # AttributeError, not KeyError: `from capsuled.varlink import errors` relies on it to fall
        # back to importing the submodule, and hasattr() on it must answer False.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # __import__ with a non-empty fromlist returns the submodule itself. Not
    # importlib.import_module: the core imports only the stdlib modules test_layering.py allows.
    module = __import__(f"{__name__}.{submodule}", fromlist=[name])
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
