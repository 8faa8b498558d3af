"""Call, Reply and ErrorReply behave as the frozen dataclasses they replaced (without dataclasses).

The expectations are what `@dataclass(frozen=True, slots=True)` gave: construction by position or
keyword, equality per class and field, the dataclass repr, `__match_args__`, hashing the fields
(which raises, as `parameters` is a dict), and no changes after construction.
"""

from __future__ import annotations

import copy
import pickle

import pytest

from capsuled.varlink.errors import LocalProtocolError
from capsuled.varlink.messages import Call, ErrorReply, Reply

Value = Call | Reply | ErrorReply


def test_positional_and_keyword_construction_agree() -> None:
    assert Call("a.b.C", {"x": 1}, False, True, False) == Call(
        method="a.b.C", parameters={"x": 1}, more=True
    )
    assert Reply({"x": 1}, True) == Reply(parameters={"x": 1}, continues=True)
    assert ErrorReply("a.b.E", {"x": 1}) == ErrorReply(error="a.b.E", parameters={"x": 1})


def test_defaults() -> None:
    call = Call("a.b.C")
    assert (call.parameters, call.oneway, call.more, call.upgrade) == ({}, False, False, False)
    assert (Reply().parameters, Reply().continues) == ({}, False)
    assert ErrorReply("a.b.E").parameters == {}


def test_each_value_gets_its_own_default_parameters() -> None:
    # field(default_factory=dict) semantics: no dict shared between instances.
    first, second = Call("a.b.C"), Call("a.b.C")
    assert first.parameters is not second.parameters
    first.parameters["x"] = 1
    assert second.parameters == {}
    assert Reply().parameters == {}
    assert ErrorReply("a.b.E").parameters == {}


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (Call("a.b.C"), Call("a.b.C", {})),
        (Call("a.b.C", {"x": [1]}, oneway=True), Call("a.b.C", {"x": [1]}, oneway=True)),
        (Reply({"x": 1}, continues=True), Reply({"x": 1}, continues=True)),
        (ErrorReply("a.b.E", {"x": 1}), ErrorReply("a.b.E", {"x": 1})),
    ],
)
def test_equal_fields_are_equal(left: Value, right: Value) -> None:
    assert left == right
    assert (left != right) is False


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (Call("a.b.C"), Call("a.b.D")),
        (Call("a.b.C"), Call("a.b.C", {"x": 1})),
        (Call("a.b.C"), Call("a.b.C", oneway=True)),
        (Call("a.b.C"), Call("a.b.C", more=True)),
        (Call("a.b.C"), Call("a.b.C", upgrade=True)),
        (Reply(), Reply(continues=True)),
        (Reply(), Reply({"x": 1})),
        (ErrorReply("a.b.E"), ErrorReply("a.b.F")),
        (ErrorReply("a.b.E"), ErrorReply("a.b.E", {"x": 1})),
        # Same field values, different classes: never equal (dataclass __eq__ checks the class).
        (Reply({}), ErrorReply("a.b.E")),
    ],
)
def test_different_fields_are_different(left: Value, right: Value) -> None:
    assert left != right
    assert (left == right) is False


def test_no_equality_with_tuples_or_dicts() -> None:
    call = Call("a.b.C")
    assert call != ("a.b.C", {}, False, False, False)
    assert Reply() != ({}, False)
    assert Reply() != {"parameters": {}, "continues": False}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (
            Call("a.b.C", {"x": 1}, more=True),
            "Call(method='a.b.C', parameters={'x': 1}, oneway=False, more=True, upgrade=False,"
            " fds=())",
        ),
        (
            Reply({"x": "y"}, continues=True),
            "Reply(parameters={'x': 'y'}, continues=True, fds=())",
        ),
        (ErrorReply("a.b.E"), "ErrorReply(error='a.b.E', parameters={})"),
    ],
)
def test_repr_is_the_dataclass_repr(value: Value, text: str) -> None:
    assert repr(value) == text


@pytest.mark.parametrize("value", [Call("a.b.C"), Reply(), ErrorReply("a.b.E")])
def test_hashing_fails_like_a_frozen_dataclass_with_a_dict_field(value: Value) -> None:
    with pytest.raises(TypeError, match="unhashable"):
        hash(value)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (Call("a.b.C"), "method"),
        (Call("a.b.C"), "parameters"),
        (Call("a.b.C"), "oneway"),
        (Reply(), "continues"),
        (ErrorReply("a.b.E"), "error"),
        (ErrorReply("a.b.E"), "parameters"),
    ],
)
def test_fields_cannot_be_changed_or_deleted(value: Value, field: str) -> None:
    before = getattr(value, field)
    # The message text is the dataclass one, "cannot assign to field 'name'".
    with pytest.raises(AttributeError, match=f"cannot assign to field '{field}'"):
        setattr(value, field, before)
    with pytest.raises(AttributeError, match=f"cannot delete field '{field}'"):
        delattr(value, field)
    assert getattr(value, field) is before


@pytest.mark.parametrize("value", [Call("a.b.C"), Reply(), ErrorReply("a.b.E")])
def test_no_new_attributes_and_no_instance_dict(value: Value) -> None:
    # AttributeError, where the 3.11 slots dataclass raised TypeError from its own super() call.
    with pytest.raises(AttributeError):
        value.extra = 1  # type: ignore[union-attr]  # the point: no such attribute may be added
    assert not hasattr(value, "__dict__")


def test_setting_oneway_after_the_fact_cannot_bypass_validation() -> None:
    # The reason for freezing: a value checked on construction stays valid.
    call = Call("a.b.C", more=True)
    with pytest.raises(AttributeError):
        call.oneway = True  # type: ignore[misc]  # the point: assignment is refused
    assert (call.oneway, call.more) == (False, True)


def test_match_args_follow_the_field_order() -> None:
    match Call("a.b.C", {"x": 1}, more=True):
        case Call(method, params, oneway, more, upgrade):
            assert (method, params, oneway, more, upgrade) == (
                "a.b.C",
                {"x": 1},
                False,
                True,
                False,
            )
        case _:
            pytest.fail("Call did not match positionally")
    match Reply({"x": 1}, True):
        case ErrorReply():
            pytest.fail("a Reply matched ErrorReply")
        case Reply(params, continues):
            assert (params, continues) == ({"x": 1}, True)
        case _:
            pytest.fail("Reply did not match positionally")
    match ErrorReply("a.b.E", {"x": 1}):
        case ErrorReply(error, params):
            assert (error, params) == ("a.b.E", {"x": 1})
        case _:
            pytest.fail("ErrorReply did not match positionally")


@pytest.mark.parametrize(
    "value",
    [Call("a.b.C", {"x": [1, {"y": 2}]}, oneway=True), Reply({"x": 1}, True), ErrorReply("a.b.E")],
)
def test_copy_deepcopy_and_pickle_give_equal_values(value: Value) -> None:
    for duplicate in (copy.copy(value), copy.deepcopy(value), pickle.loads(pickle.dumps(value))):
        assert duplicate == value
        assert type(duplicate) is type(value)
    deep = copy.deepcopy(value)
    assert deep.parameters is not value.parameters


@pytest.mark.parametrize(
    "build",
    [
        lambda: Call("a.b.C", None),  # type: ignore[arg-type]  # the point: None is refused
        lambda: Reply(None),  # type: ignore[arg-type]  # as above
        lambda: ErrorReply("a.b.E", None),  # type: ignore[arg-type]  # as above
        lambda: Call("a.b.C", oneway=1),  # type: ignore[arg-type]  # an int is not a flag
        lambda: Reply(continues=0),  # type: ignore[arg-type]  # as above
        lambda: Call(b"a.b.C"),  # type: ignore[arg-type]  # bytes are not a name
    ],
)
def test_invalid_values_cannot_be_built(build: object) -> None:
    assert callable(build)
    with pytest.raises(LocalProtocolError):
        build()
