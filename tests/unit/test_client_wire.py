"""capsulectl's wire types and calls agree with the IDL, the one contract with capsuled."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from test_client import CASES

from capsulectl import client as client_module
from capsuled import wire
from capsuled.varlink.interface import (
    Array,
    Dict,
    Enum,
    Interface,
    Maybe,
    Named,
    Primitive,
    Struct,
    VarlinkType,
    parse_interface,
)

IDL = Path(__file__).resolve().parents[2] / "helper" / "capsuled" / "org.capsuled.Manager.varlink"

REPLY_TYPES: dict[str, type] = {
    "List": wire.ListReply,
    "Describe": wire.CapsuleReply,
    "Create": wire.CapsuleReply,
    "Start": wire.JobReply,
    "Stop": wire.JobReply,
    "Restart": wire.JobReply,
    "Remove": wire.EmptyReply,
    "SetAutostart": wire.CapsuleReply,
    "SetLimits": wire.CapsuleReply,
    "CheckAccess": wire.CheckAccessReply,
    "ListUnits": wire.ListUnitsReply,
    "InstallUnit": wire.UnitReply,
    "RemoveUnit": wire.EmptyReply,
    "StartUnit": wire.UnitJobReply,
    "StopUnit": wire.UnitJobReply,
    "RestartUnit": wire.UnitJobReply,
    "EnableUnit": wire.UnitReply,
    "DisableUnit": wire.UnitReply,
    "Run": wire.RunReply,
    "Logs": wire.LogsReply,
    "Watch": wire.WatchReply,
    "Deploy": wire.DeployReply,
    "Rollback": wire.DeployReply,
    "Audit": wire.AuditReply,
    "Info": wire.InfoReply,
}

_PRIMITIVES: dict[str, object] = {"string": str, "int": int, "bool": bool, "float": float}


@pytest.fixture(scope="module")
def interface() -> Interface:
    return parse_interface(IDL.read_text())


def expected(t: VarlinkType, iface: Interface) -> object:
    """The Python annotation a faithful TypedDict uses for an IDL type."""
    if isinstance(t, Primitive):
        return _PRIMITIVES.get(t.kind, object)
    if isinstance(t, Maybe):
        return typing.Optional[expected(t.inner, iface)]  # noqa: UP045 -- equal to X | None
    if isinstance(t, Array):
        return list[expected(t.inner, iface)]  # type: ignore[misc] # a runtime-built alias
    if isinstance(t, Dict):
        return dict[str, expected(t.inner, iface)]  # type: ignore[misc] # a runtime-built alias
    if isinstance(t, Named):
        target = iface.types[t.name]
        if isinstance(target, Enum):
            return typing.Literal[target.values]
        return getattr(wire, t.name)
    raise AssertionError(f"no mapping for {t!r}")


def assert_matches(td: type, struct: Struct, iface: Interface) -> None:
    hints = typing.get_type_hints(td)
    assert list(hints) == [name for name, _ in struct.fields], td.__name__
    for name, t in struct.fields:
        assert hints[name] == expected(t, iface), f"{td.__name__}.{name}"


@pytest.mark.parametrize(
    "type_name",
    ["Capsule", "Unit", "LogEntry", "Event", "AccessResult", "DeployedBundle", "AuditRecord"],
)
def test_wire_types_mirror_idl_types(interface: Interface, type_name: str) -> None:
    struct = interface.types[type_name]
    assert isinstance(struct, Struct)
    assert_matches(getattr(wire, type_name), struct, interface)


def test_capsule_state_is_the_idl_enum(interface: Interface) -> None:
    enum = interface.types["CapsuleState"]
    assert isinstance(enum, Enum)
    assert typing.get_args(wire.CapsuleState) == enum.values


def test_every_method_has_a_reply_type_that_mirrors_it(interface: Interface) -> None:
    assert set(REPLY_TYPES) == set(interface.methods)
    for method, td in REPLY_TYPES.items():
        assert_matches(td, interface.methods[method].returns, interface)


def test_reply_shape_check_names_only_non_nullable_fields(interface: Interface) -> None:
    keys = client_module._REPLY_KEYS
    assert set(keys) == set(interface.methods)
    for method, fields in keys.items():
        required = [
            n for n, t in interface.methods[method].returns.fields if not isinstance(t, Maybe)
        ]
        assert list(fields) == required, method


def test_every_method_is_sent_by_the_client(interface: Interface) -> None:
    assert {case[1] for case in CASES} | {"Watch"} == set(interface.methods)


@pytest.mark.parametrize(("attr", "method", "args", "kwargs", "sent", "reply"), CASES)
def test_client_calls_and_scripted_replies_are_valid_for_the_idl(
    interface: Interface,
    attr: str,
    method: str,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    sent: dict[str, object],
    reply: dict[str, object],
) -> None:
    # The calls the client tests expect are ones capsuled accepts, and the fake's replies are ones
    # capsuled could send: the unit tests cannot drift from the contract.
    interface.validate_call(method, sent)
    interface.validate_reply(method, reply)
