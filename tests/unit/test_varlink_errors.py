"""capsuled.varlink.errors: the registry of error classes."""

from __future__ import annotations

from capsuled.varlink import errors as e


def test_predefined_errors_are_registered() -> None:
    for cls in (
        e.InterfaceNotFound,
        e.MethodNotFound,
        e.MethodNotImplemented,
        e.InvalidParameter,
        e.PermissionDenied,
        e.ExpectedMore,
    ):
        assert cls.name.startswith("org.varlink.service.")
        assert e.error_class(cls.name) is cls


def test_subclasses_register_only_with_a_name() -> None:
    class Base(e.VarlinkError):
        pass

    class Concrete(Base):
        name = "org.example.unit.Concrete"

    assert e.error_class("org.example.unit.Concrete") is Concrete
    assert Base not in e._REGISTRY.values()


def test_error_from_name() -> None:
    err = e.error_from_name("org.varlink.service.InvalidParameter", {"parameter": "x"})
    assert isinstance(err, e.InvalidParameter)
    assert err.parameters == {"parameter": "x"}
    unknown = e.error_from_name("org.example.unit.Unknown", {"a": 1})
    assert unknown.name == "org.example.unit.Unknown"
    assert unknown.parameters == {"a": 1}
    assert e.error_class("org.example.unit.Unknown") is None  # ad-hoc classes do not register
    assert "org.example.unit.Unknown" in str(unknown)


def test_protocol_error_tree() -> None:
    assert issubclass(e.LocalProtocolError, e.ProtocolError)
    assert issubclass(e.RemoteProtocolError, e.ProtocolError)
    assert not issubclass(e.VarlinkError, e.ProtocolError)
