"""Checks of parameter values the IDL's types cannot express, shared by the method handlers.

The Dispatcher has already checked every parameter's type against the IDL; these check the
values: names exactly as systemd's own checks (invariant 3), before the policy sees them (they
become polkit details) and before anything reaches systemd. Each returns what it checked, or
raises the interface's error naming the value.
"""

from __future__ import annotations

from capsuled import errors
from capsuled.names import (
    INSTALLABLE_UNIT_TYPES,
    capsule_name_problem,
    is_valid_capsule_name,
    unit_name_problem,
)

__all__ = ["capsule_name", "capsule_names", "optional_unit_name", "unit_name"]


def capsule_name(name: str) -> str:
    """A capsule name systemd accepts (capsule_name_is_valid).

    Raises:
        InvalidName: it is not one.
    """
    # One pattern for the valid (every call on a capsule), the step-by-step mirror for the
    # reason why not (names.py keeps the two equal, test_names.py).
    if is_valid_capsule_name(name):
        return name
    problem = capsule_name_problem(name)
    if problem is not None:
        raise errors.InvalidName(name=name, reason=problem)
    return name


def capsule_names(names: list[str] | None, limit: int) -> frozenset[str] | None:
    """At most `limit` capsule names (None: no list given).

    Raises:
        InvalidValue: more than `limit`.
        InvalidName: one of them is not a capsule name.
    """
    if names is None:
        return None
    if len(names) > limit:
        raise errors.InvalidValue(parameter="names", reason=f"at most {limit}")
    return frozenset(capsule_name(name) for name in names)


def unit_name(unit: str, *, installable: bool = False) -> str:
    """A unit name systemd accepts (unit_name_is_valid); `installable`: of a type a capsule's
    user may install a file for.

    Raises:
        InvalidUnit: it is not one.
    """
    problem = unit_name_problem(unit, types=INSTALLABLE_UNIT_TYPES if installable else None)
    if problem is not None:
        raise errors.InvalidUnit(unit=unit, reason=problem, line=None)
    return unit


def optional_unit_name(unit: str | None) -> str | None:
    """`unit_name`, where the parameter may be absent."""
    return None if unit is None else unit_name(unit)
