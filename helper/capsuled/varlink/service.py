"""org.varlink.service: the interface every Varlink service provides (UAPI.20), without I/O.

The IDL text below is the upstream definition; `GetInterfaceDescription("org.varlink.service")`
returns it verbatim and our parser checks calls to it like any other interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from capsuled.varlink.interface import Interface, parse_interface

__all__ = ["SERVICE_INTERFACE", "SERVICE_INTERFACE_NAME", "ServiceInfo", "service_interface"]

SERVICE_INTERFACE_NAME = "org.varlink.service"

SERVICE_INTERFACE = """\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
"""

_SERVICE: Interface | None = None


def service_interface() -> Interface:
    """The parsed org.varlink.service interface (parsed once)."""
    global _SERVICE
    if _SERVICE is None:
        _SERVICE = parse_interface(SERVICE_INTERFACE)
    return _SERVICE


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What org.varlink.service.GetInfo reports, apart from the interface list."""

    vendor: str
    product: str
    version: str
    url: str

    def get_info_reply(self, interfaces: list[str]) -> dict[str, object]:
        """The GetInfo reply parameters."""
        return {
            "vendor": self.vendor,
            "product": self.product,
            "version": self.version,
            "url": self.url,
            "interfaces": list(interfaces),
        }
