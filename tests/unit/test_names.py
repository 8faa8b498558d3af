"""Name validation against systemd's capsule_name_is_valid() and unit_name_is_valid()."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsuled import names

ACCEPTED_CAPSULES = [
    "a",
    "foo",
    "Foo_Bar-9",
    "-",  # "c--": strict mode forbids '-' only as the *first* char of the user name
    "-leading-dash",
    "123",  # "c-123" is not numeric, so the parse_uid() branch never fires
    "0",
    "_",
    "x" * 29,  # "c-" + 29 = 31 = UT_NAMESIZE - 1
]

REFUSED_CAPSULES = [
    ("", "empty"),
    (".", "not a file name"),
    ("..", "not a file name"),
    ("a/b", "'/'"),
    ("x" * 30, "longer than 29 characters"),
    ("x" * 256, "longer than 255 bytes"),  # filename_is_valid() fires first
    ("a.b", "'.'"),
    ("a b", "' '"),
    ("a@b", "'@'"),
    ("a:b", "':'"),
    ("caf\u00e9", "'\u00e9'"),  # ascii_isalpha() only
    ("\u0430", "'\u0430'"),  # Cyrillic a looks like Latin a
    ("a\nb", "U+000A"),
    ("a\0b", "NUL"),
    ("a\\b", "'\\\\'"),
]


@pytest.mark.parametrize("name", ACCEPTED_CAPSULES)
def test_capsule_name_accepted(name: str) -> None:
    assert names.capsule_name_problem(name) is None
    assert names.is_valid_capsule_name(name)


@pytest.mark.parametrize(("name", "fragment"), REFUSED_CAPSULES)
def test_capsule_name_refused_with_reason(name: str, fragment: str) -> None:
    problem = names.capsule_name_problem(name)
    assert problem is not None
    assert fragment in problem
    assert not names.is_valid_capsule_name(name)


def test_capsule_name_max_is_29() -> None:
    assert names.CAPSULE_NAME_MAX == 29
    assert names.is_valid_capsule_name("a" * names.CAPSULE_NAME_MAX)
    assert not names.is_valid_capsule_name("a" * (names.CAPSULE_NAME_MAX + 1))


def test_capsule_name_invalid_char_reported_before_length() -> None:
    # valid_user_group_name() checks characters before length; so do we.
    problem = names.capsule_name_problem("." * 40)
    assert problem is not None
    assert "'.'" in problem


ACCEPTED_UNITS = [
    "foo.service",
    "foo.socket",
    "foo.timer",
    "foo.path",
    "foo.target",
    "foo.slice",
    "foo.scope",
    "foo.mount",
    "a.b.service",  # the type is after the *last* dot
    "foo@bar.service",
    "foo@bar@baz.service",  # further '@' in the instance are allowed
    "x:y-z_w\\x2d.service",
    "F00.service",
    "x" * (256 - 1 - len(".service")) + ".service",  # 255 chars: strlen < UNIT_NAME_MAX
]

REFUSED_UNITS = [
    ("", "empty"),
    ("foo", "no unit type suffix"),
    ("foo.", "unknown unit type suffix ''"),
    ("foo.txt", "unknown unit type suffix 'txt'"),
    ("foo.Service", "unknown unit type suffix 'Service'"),
    (".service", "nothing before"),
    ("../foo.service", "'/'"),
    ("a/b.service", "'/'"),
    ("@foo.service", "starts with '@'"),
    ("@.service", "starts with '@'"),
    ("foo@.service", "template"),
    ("foo bar.service", "' '"),
    ("f\u00f6\u00f6.service", "'\u00f6'"),
    ("foo\0.service", "U+0000"),
    ("foo\n.service", "U+000A"),
    ("x" * (256 - len(".service")) + ".service", "longer than 255"),
    # unit_type_may_template(): only service, socket, target, timer, path take '@'.
    ("a@b.mount", "cannot be a template or an instance"),
    ("a@b.scope", "cannot be a template or an instance"),
    ("a@b.slice", "cannot be a template or an instance"),
    # Deliberately stricter than systemd (documented in unit_name_problem):
    ("..service", "starts with '.'"),
    (".foo.service", "starts with '.'"),
    ("a..b.service", "'..'"),
]


@pytest.mark.parametrize("name", ACCEPTED_UNITS)
def test_unit_name_accepted(name: str) -> None:
    assert names.unit_name_problem(name) is None
    assert names.is_valid_unit_name(name)


@pytest.mark.parametrize(("name", "fragment"), REFUSED_UNITS)
def test_unit_name_refused_with_reason(name: str, fragment: str) -> None:
    problem = names.unit_name_problem(name)
    assert problem is not None
    assert fragment in problem


def test_template_only_when_allowed() -> None:
    assert names.unit_name_problem("foo@.service", allow_template=True) is None
    assert names.unit_name_problem("@.service", allow_template=True) is not None
    # Instances and plain names stay valid with the flag.
    assert names.unit_name_problem("foo@x.service", allow_template=True) is None
    assert names.unit_name_problem("foo.service", allow_template=True) is None


def test_unit_type() -> None:
    assert names.unit_type("a.b@c.timer") == "timer"


def test_every_unit_type_accepted() -> None:
    # unit-def.c unit_type_table has exactly these eleven entries on systemd 252..257.
    assert len(names.UNIT_TYPES) == 11
    for suffix in names.UNIT_TYPES:
        assert names.is_valid_unit_name(f"u.{suffix}")


@pytest.mark.parametrize("suffix", sorted(names.TEMPLATABLE_UNIT_TYPES))
def test_templatable_types_take_instances(suffix: str) -> None:
    assert names.is_valid_unit_name(f"a@b.{suffix}")
    assert names.is_valid_unit_name(f"a@.{suffix}", allow_template=True)


def test_types_restriction() -> None:
    installable = names.INSTALLABLE_UNIT_TYPES
    assert names.unit_name_problem("a.service", types=installable) is None
    assert names.unit_name_problem("a.slice", types=installable) is None
    for refused in ("a.scope", "a.mount", "a.device", "a.swap", "a.automount"):
        problem = names.unit_name_problem(refused, types=installable)
        assert problem is not None
        assert "cannot be used here" in problem


# The whole of capsule_name_is_valid() reduces to this; checked against arbitrary text, with
# the interesting characters over-represented.
_CAPSULE_MODEL = re.compile(r"[A-Za-z0-9_-]{1,29}")


@given(st.text(alphabet=st.sampled_from("aZ09_-./@: \u00e9\0\n") | st.characters(), max_size=40))
def test_capsule_name_matches_the_model(name: str) -> None:
    assert names.is_valid_capsule_name(name) == (_CAPSULE_MODEL.fullmatch(name) is not None)


@given(st.text(alphabet=st.sampled_from("aZ09_-./@: \u00e9\0\n") | st.characters(), max_size=40))
def test_capsule_name_check_and_its_reasons_agree(name: str) -> None:
    # is_valid_capsule_name is a pattern; capsule_name_problem mirrors systemd step by step.
    assert names.is_valid_capsule_name(name) == (names.capsule_name_problem(name) is None)
