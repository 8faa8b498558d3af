"""Decision tables for the pure policy engine (capsuled.policy.engine): no I/O anywhere."""

from __future__ import annotations

from dataclasses import replace

import pytest

from capsuled.policy import actions
from capsuled.policy.engine import (
    DEFAULT_CONFIG,
    DENY_ALL,
    UNLIMITED,
    Decision,
    Identity,
    OwnerGrants,
    PolicyConfig,
    Quota,
    QuotaRule,
    Request,
    Rule,
    Who,
    builtin_decide,
    decide,
    grant,
    quota_for,
)

YES, NO, AUTH = Decision.YES, Decision.NO, Decision.AUTH_ADMIN

ROOT = Identity(0, "root", frozenset({"root"}))
ALICE = Identity(1000, "alice", frozenset({"alice", "capsule"}))
BOB = Identity(1001, "bob", frozenset({"bob", "capsule"}))
MALLORY = Identity(1002, "mallory", frozenset({"mallory"}))
# alice after `gpasswd -d alice capsule`: same uid, the group is gone
ALICE_REMOVED = Identity(1000, "alice", frozenset({"alice"}))
WENDY = Identity(1004, "wendy", frozenset({"wendy", "webteam"}))
NOBODY_KNOWN = Identity(4242, None, frozenset())

OWNED_ACTIONS = [a for a in actions.ALL if a != actions.CREATE]


def req(
    action: str,
    capsule: str = "c1",
    owner: int | None = None,
    verb: str | None = None,
    unit: str | None = None,
) -> Request:
    return Request(action, capsule, owner, verb, unit)


# (who, action, owner of the capsule, expected) under the default policy, builtin backend.
DEFAULT_TABLE = [
    # root: everything, on anything
    *[(ROOT, a, None, YES) for a in actions.ALL],
    *[(ROOT, a, ALICE.uid, YES) for a in actions.ALL],
    # a member of group capsule: creates, fully manages what they own
    (ALICE, actions.CREATE, None, YES),
    *[(ALICE, a, ALICE.uid, YES) for a in OWNED_ACTIONS],
    # ... but nothing of another member's capsule or an unowned one
    *[(ALICE, a, BOB.uid, AUTH) for a in OWNED_ACTIONS],
    *[(ALICE, a, None, AUTH) for a in OWNED_ACTIONS],
    # a non-member: admin authentication for everything, even on a capsule recorded as theirs
    *[(MALLORY, a, None, AUTH) for a in actions.ALL],
    *[(MALLORY, a, MALLORY.uid, AUTH) for a in OWNED_ACTIONS],
    *[(MALLORY, a, ALICE.uid, AUTH) for a in OWNED_ACTIONS],
    # removed from the group: loses creation and the owner grants at the next decision
    (ALICE_REMOVED, actions.CREATE, None, AUTH),
    *[(ALICE_REMOVED, a, ALICE.uid, AUTH) for a in OWNED_ACTIONS],
    # a uid without a passwd entry: no groups, nothing
    (NOBODY_KNOWN, actions.CREATE, None, AUTH),
    *[(NOBODY_KNOWN, a, NOBODY_KNOWN.uid, AUTH) for a in OWNED_ACTIONS],
]


@pytest.mark.parametrize(("who", "action", "owner", "expected"), DEFAULT_TABLE)
def test_default_policy(who: Identity, action: str, owner: int | None, expected: Decision) -> None:
    assert decide(who, req(action, owner=owner), DEFAULT_CONFIG) is expected


def test_default_table_covers_every_action_for_every_kind_of_caller() -> None:
    for who in (ROOT, ALICE, MALLORY, ALICE_REMOVED):
        covered = {a for w, a, _, _ in DEFAULT_TABLE if w == who}
        assert covered == set(actions.ALL), who


def test_grant_defers_to_the_backend_only_when_capsuled_has_no_answer() -> None:
    assert grant(ROOT, req(actions.RUN), DEFAULT_CONFIG) is YES
    assert grant(ALICE, req(actions.RUN, owner=ALICE.uid), DEFAULT_CONFIG) is YES
    assert grant(ALICE, req(actions.CREATE), DEFAULT_CONFIG) is YES
    assert grant(ALICE, req(actions.RUN, owner=BOB.uid), DEFAULT_CONFIG) is None
    assert grant(MALLORY, req(actions.CREATE), DEFAULT_CONFIG) is None


def test_deny_all_refuses_everybody_but_root() -> None:
    for a in actions.ALL:
        assert decide(ROOT, req(a, owner=ALICE.uid), DENY_ALL) is YES
        assert decide(ALICE, req(a, owner=ALICE.uid), DENY_ALL) is NO
        assert decide(MALLORY, req(a), DENY_ALL) is NO
        assert grant(ALICE, req(a, owner=ALICE.uid), DENY_ALL) is NO
    assert quota_for(ALICE, DENY_ALL).max_capsules == 0
    assert quota_for(ROOT, DENY_ALL) == UNLIMITED


def test_deny_all_wins_over_rules() -> None:
    config = replace(DENY_ALL, rules=(Rule(YES),))
    assert decide(MALLORY, req(actions.READ), config) is NO


def test_owner_grants_without_group_condition() -> None:
    config = replace(DEFAULT_CONFIG, owner=OwnerGrants(frozenset(OWNED_ACTIONS), None))
    assert decide(ALICE_REMOVED, req(actions.MANAGE, owner=ALICE.uid), config) is YES
    assert decide(MALLORY, req(actions.MANAGE, owner=MALLORY.uid), config) is YES
    assert decide(MALLORY, req(actions.MANAGE, owner=ALICE.uid), config) is AUTH


def test_owner_grants_never_cover_create() -> None:
    # The methods pass the caller as the would-be owner of a capsule being created.
    config = replace(DEFAULT_CONFIG, owner=OwnerGrants(frozenset(actions.ALL), None))
    assert decide(MALLORY, req(actions.CREATE, owner=MALLORY.uid), config) is AUTH
    assert decide(MALLORY, req(actions.RUN, owner=MALLORY.uid), config) is YES
    assert decide(ALICE, req(actions.CREATE, owner=ALICE.uid), config) is YES  # by [create]


def test_owner_grants_are_limited_to_the_listed_actions() -> None:
    config = replace(DEFAULT_CONFIG, owner=OwnerGrants(frozenset({actions.READ}), "capsule"))
    assert decide(ALICE, req(actions.READ, owner=ALICE.uid), config) is YES
    assert decide(ALICE, req(actions.RUN, owner=ALICE.uid), config) is AUTH


def test_create_groups_empty_leaves_creation_to_the_backend() -> None:
    config = replace(DEFAULT_CONFIG, create_groups=frozenset())
    assert grant(ALICE, req(actions.CREATE), config) is None
    assert decide(ALICE, req(actions.CREATE), config) is AUTH


WEB_RULE = Rule(
    YES,
    who=Who(groups=frozenset({"webteam"})),
    actions=frozenset({actions.READ, actions.CREATE, actions.MANAGE}),
    capsules=("web-*",),
)


@pytest.mark.parametrize(
    ("who", "action", "capsule", "expected"),
    [
        (WENDY, actions.MANAGE, "web-shop", YES),
        (WENDY, actions.CREATE, "web-x", YES),
        (WENDY, actions.READ, "web-", YES),
        (WENDY, actions.MANAGE, "web", AUTH),  # the pattern needs the dash
        (WENDY, actions.MANAGE, "Web-shop", AUTH),  # case-sensitive, like capsule names
        (WENDY, actions.MANAGE, "myweb-shop", AUTH),  # whole-name match, not a substring
        (WENDY, actions.RUN, "web-shop", AUTH),  # action not in the rule
        (MALLORY, actions.MANAGE, "web-shop", AUTH),  # not in the group
        (ALICE, actions.MANAGE, "web-shop", AUTH),
    ],
)
def test_group_rule_on_a_name_pattern(
    who: Identity, action: str, capsule: str, expected: Decision
) -> None:
    config = replace(DEFAULT_CONFIG, rules=(WEB_RULE,))
    assert decide(who, req(action, capsule, owner=BOB.uid), config) is expected


def test_fnmatch_patterns_character_classes_and_question_marks() -> None:
    rule = Rule(YES, capsules=("db-[0-9]", "tmp??"))
    config = replace(DEFAULT_CONFIG, rules=(rule,))
    assert builtin_decide(MALLORY, req(actions.READ, "db-7"), config) is YES
    assert builtin_decide(MALLORY, req(actions.READ, "db-x"), config) is AUTH
    assert builtin_decide(MALLORY, req(actions.READ, "tmpab"), config) is YES
    assert builtin_decide(MALLORY, req(actions.READ, "tmpabc"), config) is AUTH


def test_first_matching_rule_wins() -> None:
    deny = Rule(NO, who=Who(users=frozenset({"wendy"})), capsules=("web-secret",))
    config = replace(DEFAULT_CONFIG, rules=(deny, WEB_RULE))
    assert decide(WENDY, req(actions.MANAGE, "web-secret"), config) is NO
    assert decide(WENDY, req(actions.MANAGE, "web-shop"), config) is YES
    config = replace(DEFAULT_CONFIG, rules=(WEB_RULE, deny))
    assert decide(WENDY, req(actions.MANAGE, "web-secret"), config) is YES


def test_rules_come_after_owner_grants() -> None:
    deny_run = Rule(NO, actions=frozenset({actions.RUN}), capsules=("prod-*",))
    config = replace(DEFAULT_CONFIG, rules=(deny_run,))
    assert decide(ALICE, req(actions.RUN, "prod-1", owner=ALICE.uid), config) is YES
    assert decide(BOB, req(actions.RUN, "prod-1", owner=ALICE.uid), config) is NO
    assert decide(ROOT, req(actions.RUN, "prod-1"), config) is YES


def test_rule_matching_by_uid_and_by_user_name() -> None:
    by_uid = Rule(YES, who=Who(uids=frozenset({4242})))
    by_name = Rule(YES, who=Who(users=frozenset({"mallory"})), actions=frozenset({actions.READ}))
    config = replace(DEFAULT_CONFIG, rules=(by_uid, by_name))
    assert decide(NOBODY_KNOWN, req(actions.RUN), config) is YES
    assert decide(MALLORY, req(actions.READ), config) is YES
    assert decide(MALLORY, req(actions.RUN), config) is AUTH
    assert decide(ALICE, req(actions.READ, owner=BOB.uid), config) is AUTH


def test_verb_and_unit_criteria_need_the_detail() -> None:
    restart_only = Rule(YES, actions=frozenset({actions.MANAGE}), verbs=frozenset({"restart"}))
    units = Rule(YES, actions=frozenset({actions.MANAGE_UNITS}), units=("web*.service",))
    config = replace(DEFAULT_CONFIG, rules=(restart_only, units))
    assert decide(MALLORY, req(actions.MANAGE, verb="restart"), config) is YES
    assert decide(MALLORY, req(actions.MANAGE, verb="stop"), config) is AUTH
    assert decide(MALLORY, req(actions.MANAGE), config) is AUTH
    assert decide(MALLORY, req(actions.MANAGE_UNITS, unit="web1.service"), config) is YES
    assert decide(MALLORY, req(actions.MANAGE_UNITS, unit="db.service"), config) is AUTH
    assert decide(MALLORY, req(actions.MANAGE_UNITS), config) is AUTH


def test_defaults_per_action() -> None:
    defaults = dict(DEFAULT_CONFIG.defaults)
    defaults[actions.READ] = YES
    defaults[actions.RUN] = NO
    config = replace(DEFAULT_CONFIG, defaults=defaults)
    assert decide(MALLORY, req(actions.READ), config) is YES
    assert decide(MALLORY, req(actions.RUN), config) is NO
    assert decide(MALLORY, req(actions.MANAGE), config) is AUTH


def test_a_rule_without_criteria_matches_everybody() -> None:
    config = replace(DEFAULT_CONFIG, rules=(Rule(NO),))
    assert decide(MALLORY, req(actions.READ), config) is NO
    assert decide(ALICE, req(actions.READ, owner=BOB.uid), config) is NO


def test_group_membership_is_whatever_the_identity_says_at_each_call() -> None:
    # The engine keeps nothing between calls: the same uid with different groups decides anew.
    config = replace(DEFAULT_CONFIG, rules=(WEB_RULE,))
    wendy_left = Identity(WENDY.uid, "wendy", frozenset({"wendy"}))
    assert decide(WENDY, req(actions.MANAGE, "web-a"), config) is YES
    assert decide(wendy_left, req(actions.MANAGE, "web-a"), config) is AUTH
    assert decide(WENDY, req(actions.MANAGE, "web-a"), config) is YES


def test_quota_default_and_root() -> None:
    assert quota_for(ALICE, DEFAULT_CONFIG) == Quota(8, None, None, None)
    assert quota_for(MALLORY, DEFAULT_CONFIG).max_capsules == 8
    assert quota_for(ROOT, DEFAULT_CONFIG) == UNLIMITED


def test_quota_rules_first_match_per_field() -> None:
    config = replace(
        DEFAULT_CONFIG,
        quota=Quota(8, 1 << 30, 100, 100),
        quota_rules=(
            QuotaRule(Who(users=frozenset({"alice"})), (("max_capsules", 2),)),
            QuotaRule(
                Who(groups=frozenset({"capsule"})),
                (("max_capsules", 20), ("max_memory_bytes", None), ("max_tasks", 500)),
            ),
        ),
    )
    assert quota_for(ALICE, config) == Quota(2, None, 500, 100)
    assert quota_for(BOB, config) == Quota(20, None, 500, 100)
    assert quota_for(MALLORY, config) == Quota(8, 1 << 30, 100, 100)
    assert quota_for(ROOT, config) == UNLIMITED


def test_who_matches_any_of_its_lists() -> None:
    who = Who(users=frozenset({"mallory"}), uids=frozenset({4242}), groups=frozenset({"webteam"}))
    assert who.matches(MALLORY)
    assert who.matches(NOBODY_KNOWN)
    assert who.matches(WENDY)
    assert not who.matches(ALICE)
    assert Who().matches(ALICE)


def test_default_config_is_what_the_brief_asks() -> None:
    c: PolicyConfig = DEFAULT_CONFIG
    assert c.owner.actions == frozenset(OWNED_ACTIONS)
    assert c.owner.require_group == "capsule"
    assert c.create_groups == frozenset({"capsule"})
    assert set(c.defaults.values()) == {AUTH}
    assert set(c.defaults) == set(actions.ALL)
    assert c.quota.max_capsules == 8
    assert not c.deny_all
