"""The Varlink protocol core: bytes in, events out; events in, bytes out. No I/O (h11's shape).

Imports only the standard library's pure parts (no asyncio, socket, os, logging), so the
unprivileged client can use it cheaply and the layering test can check it.
"""

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
