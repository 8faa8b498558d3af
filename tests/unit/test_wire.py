"""capsuled.wire's parameter types mirror the IDL's method parameters, so the handlers typed with
them (capsuled.methods) read exactly what the Dispatcher validated. (Replies and the IDL's own
types: tests/unit/test_client_wire.py.)"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from capsuled import wire
from capsuled.methods import HANDLERS, handler_function
from capsuled.varlink.interface import (
    Array,
    Enum,
    Interface,
    Maybe,
    Named,
    Primitive,
    VarlinkType,
    parse_interface,
)

IDL = Path(__file__).resolve().parents[2] / "helper" / "capsuled" / "org.capsuled.Manager.varlink"

PARAMETERS: dict[str, type] = {
    "List": wire.NoParams,
    "Describe": wire.CapsuleParams,
    "Create": wire.CreateParams,
    "Start": wire.CapsuleParams,
    "Stop": wire.CapsuleParams,
    "Restart": wire.CapsuleParams,
    "Remove": wire.RemoveParams,
    "SetAutostart": wire.SetAutostartParams,
    "SetLimits": wire.SetLimitsParams,
    "CheckAccess": wire.CheckAccessParams,
    "ListUnits": wire.CapsuleParams,
    "InstallUnit": wire.InstallUnitParams,
    "RemoveUnit": wire.UnitParams,
    "StartUnit": wire.UnitParams,
    "StopUnit": wire.UnitParams,
    "RestartUnit": wire.UnitParams,
    "EnableUnit": wire.UnitParams,
    "DisableUnit": wire.UnitParams,
    "Run": wire.RunParams,
    "Logs": wire.LogsParams,
    "Watch": wire.WatchParams,
    "Deploy": wire.DeployParams,
    "Rollback": wire.CapsuleParams,
    "Audit": wire.AuditParams,
    "Info": wire.NoParams,
}

_PRIMITIVES: dict[str, object] = {"string": str, "int": int, "bool": bool, "float": float}


@pytest.fixture(scope="module")
def interface() -> Interface:
    return parse_interface(IDL.read_text())


def annotation(t: VarlinkType) -> object:
    """The annotation a faithful TypedDict field has for an IDL parameter type."""
    if isinstance(t, Primitive):
        return _PRIMITIVES[t.kind]
    if isinstance(t, Maybe):
        return typing.Optional[annotation(t.inner)]  # noqa: UP045 -- equal to X | None
    if isinstance(t, Array):
        return list[annotation(t.inner)]  # type: ignore[misc] # a runtime-built alias
    if isinstance(t, Named):
        return getattr(wire, t.name)
    if isinstance(t, Enum):
        return typing.Literal[t.values]  # a Literal of the values, in the IDL's order
    raise AssertionError(f"no mapping for {t!r}")


def test_every_method_has_a_parameter_type(interface: Interface) -> None:
    assert set(PARAMETERS) == set(interface.methods)


@pytest.mark.parametrize("method", sorted(PARAMETERS))
def test_parameter_types_mirror_the_idl(interface: Interface, method: str) -> None:
    hints = typing.get_type_hints(PARAMETERS[method])
    fields = interface.methods[method].parameters.fields
    assert list(hints) == [name for name, _ in fields]
    for name, t in fields:
        assert hints[name] == annotation(t), f"{method}.{name}"


@pytest.mark.parametrize("method", sorted(PARAMETERS))
def test_each_handler_takes_its_methods_parameter_type(method: str) -> None:
    # What the method table binds is typed with the TypedDict this file checks against the IDL.
    function = handler_function(HANDLERS[method])
    # A handler module bound at start may import the wire types for its annotations only
    # (methods/info.py: cold start), so they are resolved with wire at hand.
    hints = typing.get_type_hints(function, {"wire": wire, **function.__globals__})
    assert hints["p"] is PARAMETERS[method]
