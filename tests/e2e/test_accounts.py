"""The account cache against a real user database: leaving the group is seen at the next call.

capsuled keeps what it read of an account for up to 1 s (policy/accounts.py), but drops it at
once when /etc/group (or another file of the user database) changes. The calls here run on one
connection per user from one process in the bed, so they come well inside that second: alice's
answer is cached when gpasswd runs, and only the file's change can take it away.
"""

from __future__ import annotations

import pytest

from e2e.test_policy_matrix import NO_SUCH, as_dict, call, drive
from e2e.vcall import ok
from testbed import Testbed

pytestmark = pytest.mark.e2e


def error_of(reply: object) -> object:
    return as_dict(reply).get("error")


def test_an_owner_who_leaves_the_group_is_refused_at_the_next_call(
    bed: Testbed, capsule_name: str
) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    steps: list[dict[str, object]] = [
        call("alice", "Describe", name=name),
        call("alice", "Describe", name=name),  # answered from the cache
        {"op": "root", "argv": ["gpasswd", "-d", "alice", "capsule"]},
        call("alice", "Describe", name=name),
        call("alice", "CheckAccess", name=name, action="read"),
        {"op": "root", "argv": ["gpasswd", "-a", "alice", "capsule"]},
        call("alice", "Describe", name=name),
    ]
    try:
        results = drive(bed, {"mode": "varlink", "users": ["alice"], "steps": steps}).results
    finally:
        bed.as_root("gpasswd", "-a", "alice", "capsule").check()
    assert error_of(results[0]) is None, results[0]
    assert error_of(results[1]) is None, results[1]
    assert results[2] == 0  # gpasswd -d worked
    assert error_of(results[3]) == NO_SUCH, results[3]
    access = as_dict(as_dict(as_dict(results[4])["parameters"])["access"])
    assert access["result"] != "yes", access
    assert results[5] == 0
    assert error_of(results[6]) is None, results[6]  # back in the group: the owner again
