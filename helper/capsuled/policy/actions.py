"""The polkit action ids of capsuled: defined here and nowhere else.

The same ids name the actions in polkit/org.capsuled.policy (a unit test keeps the two
equal), in the builtin engine, in the journal's audit records and in `CheckAccess`. The builtin
config and the CLI may use the short name (the part after ``org.capsuled.``); `resolve` turns
either form into the id.
"""

from __future__ import annotations

from typing import Final

# list, describe, show logs and list units of a capsule
READ: Final = "org.capsuled.read"
# create a new capsule (detail `capsule` is the name asked for, `owner` the caller who would own it)
CREATE: Final = "org.capsuled.create"
# remove a capsule and its data
REMOVE: Final = "org.capsuled.remove"
# start/stop/restart a capsule, enable/disable its autostart (detail `verb`)
MANAGE: Final = "org.capsuled.manage"
# install/remove/enable/start/stop units inside a capsule (details `unit`, `verb`)
MANAGE_UNITS: Final = "org.capsuled.manage-units"
# run commands inside a capsule
RUN: Final = "org.capsuled.run"
# change a capsule's resource limits
SET_LIMITS: Final = "org.capsuled.set-limits"
# deploy a signed bundle into a capsule, or roll back to the previous one (details `signer`,
# `verb`: deploy, downgrade or rollback)
DEPLOY: Final = "org.capsuled.deploy"

ALL: Final[tuple[str, ...]] = (
    READ,
    CREATE,
    REMOVE,
    MANAGE,
    MANAGE_UNITS,
    RUN,
    SET_LIMITS,
    DEPLOY,
)

_PREFIX: Final = READ.rpartition(".")[0] + "."
# short name ("manage-units") -> id ("org.capsuled.manage-units")
BY_SHORT_NAME: Final[dict[str, str]] = {action.removeprefix(_PREFIX): action for action in ALL}


def short_name(action: str) -> str:
    """The short name of an action id ("org.capsuled.run" -> "run")."""
    if action not in ALL:
        raise ValueError(f"unknown action {action!r}")
    return action.removeprefix(_PREFIX)


def resolve(name: str) -> str:
    """The action id for a full id or a short name; ValueError if it is neither."""
    if name in ALL:
        return name
    try:
        return BY_SHORT_NAME[name]
    except KeyError:
        raise ValueError(f"unknown action {name!r}") from None
