"""The policy decision, as a pure function of (who, what, config): no I/O, no clock, no cache.

Order of a decision (design brief, "Policy model"):

1. root (uid 0) -> yes;
2. a refused configuration (malformed or unsafe file) -> no, for everybody else;
3. capsuled's own grants, the same whichever backend answers next:
   - the capsule's owner gets the owner grants (default: every action on it while the owner is still
     a member of group ``capsule``),
   - members of the creator groups may create (default: group ``capsule``);
4. the backend: the builtin rules below (`builtin_decide`), or polkitd (policy/polkit.py).

Step 3 lives here rather than in a polkit rules file so that polkit needs no active rule shipped
by us (polkit(8): a mechanism ships its .policy defaults and only *example* rules) and both backends
give the same answers for the default policy. Admins who want polkit to decide creation, too, empty
``[create] groups`` and install polkit/50-capsuled-group.rules.example.

The caller (policy/authorizer.py) turns the socket peer into an `Identity` from the user and group
databases (through policy/accounts.py: a change of their files takes effect at the next call, any
other within 1 s), so that removing a user from a group needs no helper restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Final

from capsuled.policy import actions


class Decision(StrEnum):
    """An answer, in polkit's vocabulary for implicit authorizations."""

    YES = "yes"
    NO = "no"
    # Authentication as an administrator would be needed. The builtin backend cannot authenticate
    # anybody, and polkit's challenge result does not say which kind of authentication it wants, so
    # `auth_self` is folded into this (the caller sees "interactive authentication required").
    AUTH_ADMIN = "auth_admin"


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller as the user database sees it *now*."""

    uid: int
    user: str | None  # None: the uid has no passwd entry (e.g. a dynamic user)
    groups: frozenset[str]  # names of the primary and supplementary groups (getgrouplist)
    # The system unit the calling process runs in (peer.Peer.unit, from its cgroup, which only
    # PID 1 and root set); None outside any unit. A DynamicUser= service has no stable uid, but
    # its unit name is stable: `caller_units` rules match it.
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """What the caller wants to do: built once per check (CallContext.authorize), its fields are
    also the polkit details."""

    action: str  # one of actions.ALL
    capsule: str
    # uid recorded as the capsule's owner; None: no owner. For CREATE: the caller, who would own it.
    owner: int | None
    verb: str | None = None
    unit: str | None = None
    # The call's allowInteractiveAuthentication: polkit may ask the caller's agent. Never a
    # detail, and no rule sees it; the builtin backend has nobody to ask.
    allow_interactive: bool = False
    # For org.capsuled.deploy: the signer of the bundle (the name of the trusted key that
    # verified it, never a name the bundle claims).
    signer: str | None = None


@dataclass(frozen=True, slots=True)
class Quota:
    """Ceilings for one user; None is unlimited."""

    max_capsules: int | None
    max_memory_bytes: int | None
    max_tasks: int | None
    max_cpu_weight: int | None


UNLIMITED: Final = Quota(None, None, None, None)
QUOTA_FIELDS: Final[tuple[str, ...]] = (
    "max_capsules",
    "max_memory_bytes",
    "max_tasks",
    "max_cpu_weight",
)


@dataclass(frozen=True, slots=True)
class Who:
    """A set of callers: any listed user name, uid or group matches; all empty matches everybody."""

    users: frozenset[str] = frozenset()
    uids: frozenset[int] = frozenset()
    groups: frozenset[str] = frozenset()

    def matches(self, identity: Identity) -> bool:
        if not (self.users or self.uids or self.groups):
            return True
        return (
            identity.uid in self.uids
            or (identity.user is not None and identity.user in self.users)
            or not self.groups.isdisjoint(identity.groups)
        )


def _matches_globs(value: str | None, patterns: tuple[str, ...]) -> bool:
    """No patterns match anything; else `value` must be given and match one of them."""
    if not patterns:
        return True
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


@dataclass(frozen=True, slots=True)
class Rule:
    """A builtin-backend rule; every given criterion must match, empty criteria match anything."""

    result: Decision
    who: Who = Who()
    actions: frozenset[str] = frozenset()  # empty: every action
    capsules: tuple[str, ...] = ()  # fnmatch patterns on the capsule name, case-sensitive
    verbs: frozenset[str] = frozenset()
    units: tuple[str, ...] = ()  # fnmatch patterns on the unit name
    # True: only the capsule's recorded owner matches (never for CREATE: nobody owns it yet).
    # What lets a recipe take an action out of [owner] actions for some capsules and give it
    # back to owners everywhere else (config/capsuled.toml, "forbid run in prod-*").
    owner: bool = False
    signers: frozenset[str] = frozenset()  # deploy: the bundle's signer must be one of these
    caller_units: tuple[str, ...] = ()  # fnmatch patterns on the calling process's system unit
    origin: str = ""  # "file: rule #n", for logs

    def matches(self, identity: Identity, request: Request) -> bool:
        if self.actions and request.action not in self.actions:
            return False
        if not self.who.matches(identity):
            return False
        if self.owner and (
            request.action == actions.CREATE
            or request.owner is None
            or request.owner != identity.uid
        ):
            return False
        if self.capsules and not any(fnmatchcase(request.capsule, p) for p in self.capsules):
            return False
        # A rule that names verbs, units or signers never matches a request without one: it was
        # written for a narrower question than the one asked. Likewise a caller outside any
        # system unit (identity.unit None) matches no caller_units rule.
        if self.verbs and request.verb not in self.verbs:
            return False
        if self.signers and request.signer not in self.signers:
            return False
        return _matches_globs(request.unit, self.units) and _matches_globs(
            identity.unit, self.caller_units
        )


@dataclass(frozen=True, slots=True)
class QuotaRule:
    """Per-user or per-group quota overrides; only the fields given here are overridden."""

    who: Who
    limits: tuple[tuple[str, int | None], ...]  # (field of Quota, value; None = unlimited)
    origin: str = ""


@dataclass(frozen=True, slots=True)
class OwnerGrants:
    """What a capsule's owner may do to it without asking the backend."""

    actions: frozenset[str]
    # The owner keeps the grants only while a member of this group; None: no such condition.
    require_group: str | None


def _all_auth_admin() -> Mapping[str, Decision]:
    return MappingProxyType(dict.fromkeys(actions.ALL, Decision.AUTH_ADMIN))


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The whole policy; DEFAULT_CONFIG is what config/capsuled.toml spells out."""

    backend: str = "auto"  # "auto" | "builtin" | "polkit"
    owner: OwnerGrants = OwnerGrants(
        frozenset(a for a in actions.ALL if a != actions.CREATE), "capsule"
    )
    create_groups: frozenset[str] = frozenset({"capsule"})
    # Builtin backend: the answer when no rule matches (polkit's <defaults>).
    defaults: Mapping[str, Decision] = field(default_factory=_all_auth_admin)
    rules: tuple[Rule, ...] = ()
    quota: Quota = Quota(max_capsules=8, max_memory_bytes=None, max_tasks=None, max_cpu_weight=None)
    quota_rules: tuple[QuotaRule, ...] = ()
    # Set when a configuration file was refused: every non-root request is denied.
    deny_all: bool = False


BACKENDS: Final = ("auto", "builtin", "polkit")
DEFAULT_CONFIG: Final = PolicyConfig()
DENY_ALL: Final = PolicyConfig(
    owner=OwnerGrants(frozenset(), None),
    create_groups=frozenset(),
    defaults=MappingProxyType(dict.fromkeys(actions.ALL, Decision.NO)),
    quota=Quota(0, 0, 0, 0),
    deny_all=True,
)


def grant(identity: Identity, request: Request, config: PolicyConfig) -> Decision | None:
    """Steps 1-3 of a decision; None means: ask the backend."""
    if identity.uid == 0:
        return Decision.YES
    if config.deny_all:
        return Decision.NO
    owner = config.owner
    # Never for CREATE: the capsule does not exist yet, so nobody owns it; the methods pass the
    # caller as the would-be owner, and `[owner] actions = ["*"]` must not let anybody create.
    if (
        request.action != actions.CREATE
        and request.owner is not None
        and request.owner == identity.uid
        and request.action in owner.actions
        and (owner.require_group is None or owner.require_group in identity.groups)
    ):
        return Decision.YES
    if request.action == actions.CREATE and not config.create_groups.isdisjoint(identity.groups):
        return Decision.YES
    return None


def builtin_decide(identity: Identity, request: Request, config: PolicyConfig) -> Decision:
    """Step 4 for the builtin backend: the first matching rule, else the action's default."""
    if identity.uid == 0:
        return Decision.YES
    if config.deny_all:
        return Decision.NO
    for rule in config.rules:
        if rule.matches(identity, request):
            return rule.result
    return config.defaults.get(request.action, Decision.AUTH_ADMIN)


def decide(identity: Identity, request: Request, config: PolicyConfig) -> Decision:
    """The whole decision with the builtin backend."""
    granted = grant(identity, request, config)
    return granted if granted is not None else builtin_decide(identity, request, config)


def quota_for(identity: Identity, config: PolicyConfig) -> Quota:
    """The caller's ceilings: for each field the first matching quota rule, else [quota]."""
    if identity.uid == 0:
        return UNLIMITED
    values: dict[str, int | None] = {
        "max_capsules": config.quota.max_capsules,
        "max_memory_bytes": config.quota.max_memory_bytes,
        "max_tasks": config.quota.max_tasks,
        "max_cpu_weight": config.quota.max_cpu_weight,
    }
    if config.deny_all:
        return config.quota
    decided: set[str] = set()
    for rule in config.quota_rules:
        if not rule.who.matches(identity):
            continue
        for name, value in rule.limits:
            if name not in decided:
                values[name] = value
                decided.add(name)
    return Quota(
        max_capsules=values["max_capsules"],
        max_memory_bytes=values["max_memory_bytes"],
        max_tasks=values["max_tasks"],
        max_cpu_weight=values["max_cpu_weight"],
    )
