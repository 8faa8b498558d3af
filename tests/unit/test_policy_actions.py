"""The action ids: polkit/org.capsuled.policy and capsuled.policy.actions name the same set."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from capsuled.policy import actions

REPO = Path(__file__).resolve().parents[2]
POLICY_FILE = REPO / "polkit" / "org.capsuled.policy"
IMPLY = "org.freedesktop.policykit.imply"
IMPLICIT_RESULTS = {
    "no",
    "yes",
    "auth_self",
    "auth_admin",
    "auth_self_keep",
    "auth_admin_keep",
}


def policy_actions() -> dict[str, ET.Element]:
    root = ET.parse(POLICY_FILE).getroot()
    return {a.attrib["id"]: a for a in root.iter("action")}


def test_policy_file_defines_exactly_our_actions() -> None:
    ids = list(policy_actions())
    assert len(ids) == len(set(ids))
    assert set(ids) == set(actions.ALL)


@pytest.mark.parametrize("action_id", actions.ALL)
def test_each_action_is_complete(action_id: str) -> None:
    action = policy_actions()[action_id]
    assert (action.findtext("description") or "").strip()
    assert (action.findtext("message") or "").strip()
    defaults = action.find("defaults")
    assert defaults is not None
    for key in ("allow_any", "allow_inactive", "allow_active"):
        assert defaults.findtext(key) in IMPLICIT_RESULTS, key
    # The default policy: nobody but root, the owner and group capsule (decided by capsuled
    # before asking polkit) gets anything without an administrator's password.
    assert defaults.findtext("allow_any") == "auth_admin"
    assert defaults.findtext("allow_inactive") == "auth_admin"
    assert (defaults.findtext("allow_active") or "").startswith("auth_admin")


def test_implied_actions_exist_and_are_not_self_references() -> None:
    for action_id, action in policy_actions().items():
        for annotate in action.iter("annotate"):
            if annotate.attrib["key"] != IMPLY:
                continue
            implied = (annotate.text or "").split()
            assert implied, action_id
            assert set(implied) <= set(actions.ALL), action_id
            assert action_id not in implied


def test_every_action_has_a_comment_naming_its_methods() -> None:
    text = POLICY_FILE.read_text()
    for action_id in actions.ALL:
        before = text[: text.index(f'<action id="{action_id}">')]
        comment = before[before.rindex("<!--") :]
        assert "Checked by" in comment, action_id


def test_short_names_and_resolution() -> None:
    assert actions.resolve("manage-units") == actions.MANAGE_UNITS
    assert actions.resolve(actions.RUN) == actions.RUN
    assert actions.short_name(actions.SET_LIMITS) == "set-limits"
    assert set(actions.BY_SHORT_NAME.values()) == set(actions.ALL)
    for bad in ("", "org.capsuled.", "org.capsuled.Manager", "READ", "org.capsuled.frob"):
        with pytest.raises(ValueError, match="unknown action"):
            actions.resolve(bad)


def test_action_ids_are_spelled_out_only_in_actions_py() -> None:
    # style.md: a string literal "org.capsuled.<action>" anywhere else is a review failure.
    names = "|".join(re.escape(actions.short_name(a)) for a in actions.ALL)
    pattern = re.compile(rf"""["']org\.capsuled\.({names})["']""")
    offenders = []
    for tree in ("helper", "client"):
        for path in (REPO / tree).rglob("*.py"):
            if path.name == "actions.py" and path.parent.name == "policy":
                continue
            if pattern.search(path.read_text(encoding="utf-8")):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
