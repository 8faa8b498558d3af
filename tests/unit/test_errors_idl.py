"""The IDL, the error classes and the method table agree (style: errors are declared in the IDL,
one class per error; one method table binding every method)."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from pathlib import Path

import pytest
import varlink
from methods_fixtures import (
    IDL_PATH,
    INTERFACE,
    NAMED_METHODS,
    ROOT,
    make_world,
    params_for,
    peer,
)

from capsuled import errors
from capsuled.methods import HANDLERS, REQUIRES_MORE
from capsuled.methods.context import backend_errors
from capsuled.systemd import errors as sd
from capsuled.varlink.errors import PermissionDenied, VarlinkError, error_class
from capsuled.varlink.interface import Interface, parse_interface
from capsuled.varlink.messages import Call

TEXT = IDL_PATH.read_text(encoding="utf-8")
METHODS_DIR = Path(errors.__file__).parent / "methods"


@pytest.fixture(scope="module")
def idl() -> Interface:
    return parse_interface(TEXT)


def manager_error_classes() -> dict[str, type[errors.ManagerError]]:
    """Every concrete error class defined in capsuled.errors, by class name."""
    return {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls)
        and issubclass(cls, errors.ManagerError)
        and cls is not errors.ManagerError
    }


def test_the_idl_names_our_interface(idl: Interface) -> None:
    assert idl.name == INTERFACE == errors.INTERFACE


def test_error_classes_and_idl_errors_are_the_same_set(idl: Interface) -> None:
    assert set(manager_error_classes()) == set(idl.errors)


@pytest.mark.parametrize("short", sorted(manager_error_classes()))
def test_each_class_carries_its_wire_name(short: str) -> None:
    cls = manager_error_classes()[short]
    assert cls.name == f"{INTERFACE}.{short}"
    assert error_class(cls.name) is cls  # a client turns the reply back into this class
    assert cls.__doc__
    assert cls.__doc__.strip()


def test_the_error_module_draws_every_class_in_its_tree() -> None:
    tree = errors.__doc__ or ""
    missing = [name for name in manager_error_classes() if not re.search(rf"\b{name}\b", tree)]
    assert missing == []


def test_every_idl_method_has_a_handler(idl: Interface) -> None:
    assert set(HANDLERS) == set(idl.methods)
    assert set(REQUIRES_MORE) <= set(idl.methods)


def test_no_method_answers_method_not_implemented(tmp_path: Path, idl: Interface) -> None:
    """Each method, called with valid parameters, gets past the table lookup."""
    world = make_world(tmp_path).standard()

    async def answer(method: str) -> str:
        async def notify(_reply: dict[str, object]) -> None:
            return None

        params = params_for(method, "alpha") if method in NAMED_METHODS else {}
        call = Call(f"{INTERFACE}.{method}", params, more=True)
        try:
            await world.dispatcher.handle(call, peer(ROOT), notify)
        except VarlinkError as exc:
            return exc.name
        return "ok"

    async def main() -> dict[str, str]:
        # Watch streams forever when it succeeds; a short bound is enough to see it started.
        results = {}
        for method in sorted(idl.methods):
            try:
                results[method] = await asyncio.wait_for(answer(method), 0.5)
            except TimeoutError:
                results[method] = "streaming"
        return results

    results = asyncio.run(main())
    assert set(results) == set(idl.methods)
    assert "org.varlink.service.MethodNotImplemented" not in results.values(), results
    assert "org.varlink.service.InvalidParameter" not in results.values(), results


def test_every_error_the_methods_raise_is_declared(idl: Interface) -> None:
    """`errors.X` in capsuled/methods/*.py: each X is an error of the IDL."""
    used: set[str] = set()
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "errors"
                and node.attr[:1].isupper()
            ):
                used.add(node.attr)
    assert used  # the walk found the handlers' errors at all
    assert used - {"ManagerError"} <= set(idl.errors)


@pytest.mark.parametrize("kind", ["method", "error"])
def test_every_method_and_error_has_a_doc_comment(kind: str) -> None:
    lines = TEXT.splitlines()
    undocumented = [
        line
        for i, line in enumerate(lines)
        if line.startswith(f"{kind} ") and not (i > 0 and lines[i - 1].startswith("#"))
    ]
    assert undocumented == []


def test_the_reference_parser_reads_the_idl(idl: Interface) -> None:
    ref = varlink.Interface(TEXT)
    assert ref.name == idl.name
    ref_methods = {n for n, m in ref.members.items() if isinstance(m, varlink.scanner._Method)}
    ref_errors = {n for n, m in ref.members.items() if isinstance(m, varlink.scanner._Error)}
    assert ref_methods == set(idl.methods) == set(HANDLERS)
    assert ref_errors == set(idl.errors) == set(manager_error_classes())


def test_the_dispatcher_serves_the_idl_verbatim(tmp_path: Path) -> None:
    world = make_world(tmp_path)

    async def notify(_reply: dict[str, object]) -> None:
        return None

    call = Call("org.varlink.service.GetInterfaceDescription", {"interface": INTERFACE})
    reply = asyncio.run(world.dispatcher.handle(call, peer(ROOT), notify))
    assert reply == {"description": TEXT}


# --- backend errors -> Varlink errors (methods/context.py, the one table) ---------------------

BACKEND_MAPPING: list[tuple[sd.BackendError, VarlinkError]] = [
    (sd.SystemdUnavailable("no bus"), errors.SystemdUnavailable()),
    (sd.SystemdTooOld(252), errors.SystemdTooOld(version=252)),
    (sd.NoSuchUnit("capsule@c.service"), errors.NoSuchCapsule(name="c")),
    (
        sd.JobFailed("failed", "exit-code"),
        errors.JobFailed(result="failed", unitResult="exit-code"),
    ),
    (sd.JobFailed("timeout"), errors.JobFailed(result="timeout", unitResult=None)),
    (sd.UnitBusy("capsule@c.service"), errors.CapsuleRunning(name="c")),
    (sd.ManagerUnavailable("c", "not running"), errors.CapsuleNotRunning(name="c")),
    (sd.AccessDenied("polkit said no"), PermissionDenied()),
    (sd.BackendTimeout("no answer"), errors.SystemdUnavailable()),
    (sd.BadReply("odd body"), errors.InternalError()),
    (sd.WatchOverflow("behind"), errors.InternalError()),
    (sd.DBusCallFailed("org.example.Error", "text"), errors.InternalError()),
]


def test_every_backend_error_has_a_mapping_case() -> None:
    def subclasses(cls: type[sd.BackendError]) -> set[type[sd.BackendError]]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    covered = {type(exc) for exc, _ in BACKEND_MAPPING} | {sd.InvalidArgument}
    assert subclasses(sd.BackendError) == covered


@pytest.mark.parametrize(
    ("exc", "expected"), BACKEND_MAPPING, ids=[type(e).__name__ for e, _ in BACKEND_MAPPING]
)
def test_backend_errors_map_to_declared_varlink_errors(
    idl: Interface, exc: sd.BackendError, expected: VarlinkError
) -> None:
    with pytest.raises(VarlinkError) as raised, backend_errors("c"):
        raise exc
    got = raised.value
    assert (type(got), got.parameters) == (type(expected), expected.parameters)
    assert got.__cause__ is exc  # the journal keeps the lower layer's reason
    interface, _, short = got.name.rpartition(".")
    if interface == INTERFACE:
        idl.validate_error(short, got.parameters)


def test_other_exceptions_pass_through_the_mapping() -> None:
    with pytest.raises(KeyError), backend_errors("c"):
        raise KeyError("not ours to translate")


def test_systemd_refusing_a_value_is_invalid_value(idl: Interface) -> None:
    with pytest.raises(VarlinkError) as raised, backend_errors("c"):
        raise sd.InvalidArgument("Value specified in CPUWeight is out of range")
    assert isinstance(raised.value, errors.InvalidValue)
    idl.validate_error("InvalidValue", raised.value.parameters)
