"""The authorization matrix: users x capsules x actions, every cell asserted, on both backends.

Run end-to-end in each testbed (real systemd and polkitd), twice per backend:

- `test_authorizer_matrix`: capsuled.policy.authorizer.Authorizer itself, inside the container as
  root, with subjects taken (SO_PEERCRED + SO_PEERPIDFD) from real processes running as each user —
  the policy stack alone, polkitd included, independent of the daemon's methods;
- `test_check_access_matrix`: the daemon, org.capsuled.Manager.CheckAccess called by each user over
  the real socket, plus real calls (Describe, Stop, Create, Remove) whose refusals must agree.

Both backends must give the same answer in every cell. The set-up adds, for both backends alike:
group "webteam" with user wendy and a rule "webteam may read, create, manage, manage-units capsules
named web-*" (a polkit rules file for polkit, a [[rule]] drop-in for builtin), user quinn in group
"capsule" with a quota of one capsule, and removes carol from group "capsule" *while she is
connected* ("a user whose group was just removed").
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.conftest import remove_capsule
from testbed import Testbed

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ACTIONS = ("read", "create", "remove", "manage", "manage-units", "run", "set-limits")
ANSWER = {"Y": "yes", "A": "auth_admin", "N": "no"}
BACKENDS = ("builtin", "polkit")

# Capsule roles: the capsule's owner (None: nobody; "none"/"webnone" are never created).
OWNERS: dict[str, str | None] = {
    "alice": "alice",
    "bob": "bob",
    "web": "bob",
    "carol": "carol",
    "none": None,
    "webnone": None,
}

# One string per (user, capsule): the answers for ACTIONS in order.
# Y = yes, A = auth_admin (refused without interaction), N = no.
MATRIX: dict[str, dict[str, str]] = {
    # root: everything
    "root": {
        "alice": "YYYYYYY",
        "bob": "YYYYYYY",
        "web": "YYYYYYY",
        "carol": "YYYYYYY",
        "none": "YYYYYYY",
        "webnone": "YYYYYYY",
    },
    # group member: all of their own, create anywhere, nothing of others' or unowned capsules
    "alice": {
        "alice": "YYYYYYY",
        "bob": "AYAAAAA",
        "web": "AYAAAAA",
        "carol": "AYAAAAA",
        "none": "AYAAAAA",
        "webnone": "AYAAAAA",
    },
    "bob": {
        "alice": "AYAAAAA",
        "bob": "YYYYYYY",
        "web": "YYYYYYY",
        "carol": "AYAAAAA",
        "none": "AYAAAAA",
        "webnone": "AYAAAAA",
    },
    # not a member: admin authentication for everything
    "mallory": {
        "alice": "AAAAAAA",
        "bob": "AAAAAAA",
        "web": "AAAAAAA",
        "carol": "AAAAAAA",
        "none": "AAAAAAA",
        "webnone": "AAAAAAA",
    },
    # just removed from group capsule: not even her own capsule any more
    "carol": {
        "alice": "AAAAAAA",
        "bob": "AAAAAAA",
        "web": "AAAAAAA",
        "carol": "AAAAAAA",
        "none": "AAAAAAA",
        "webnone": "AAAAAAA",
    },
    # webteam rule: read, create, manage, manage-units on web-*; not remove, run, set-limits
    "wendy": {
        "alice": "AAAAAAA",
        "bob": "AAAAAAA",
        "web": "YYAYYAA",
        "carol": "AAAAAAA",
        "none": "AAAAAAA",
        "webnone": "YYAYYAA",
    },
}
# carol while still a member, on the same connection, before the removal
BEFORE_REMOVAL: dict[str, dict[str, str]] = {
    "carol": {"carol": "YYYYYYY", "alice": "AYAAAAA", "webnone": "AYAAAAA"},
}

NO_SUCH = "org.capsuled.Manager.NoSuchCapsule"
AUTH_REQUIRED = "org.capsuled.Manager.InteractiveAuthenticationRequired"
QUOTA = "org.capsuled.Manager.QuotaExceeded"

WEBTEAM_DROPIN = """\
[[rule]]
groups = ["webteam"]
capsules = ["web-*"]
actions = ["read", "create", "manage", "manage-units"]
result = "yes"
"""
QUOTA_DROPIN = """\
[[quota_rule]]
users = ["quinn"]
max_capsules = 1
"""
DROPIN_DIR = "/etc/capsuled/capsuled.toml.d"
POLKIT_RULE = "/etc/polkit-1/rules.d/50-capsuled-webteam.rules"


def webteam_polkit_rule() -> str:
    # The shipped example, minus the actions the builtin drop-in does not grant either.
    text = (REPO / "polkit" / "50-capsuled-webteam.rules.example").read_text()
    return text.replace('        "org.capsuled.remove",\n', "")


@dataclass
class World:
    names: dict[str, str]  # capsule role -> real name
    created: list[str]


def root_ok(bed: Testbed, *argv: str, input: str | None = None) -> str:
    result = bed.run(*argv, user="root", input=input)
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return str(result.stdout)


@dataclass
class Driven:
    backend: object  # the Authorizer's backend_name (direct mode), None otherwise
    results: list[object]  # one per step


def drive(bed: Testbed, spec: dict[str, object]) -> Driven:
    # Children per user, steps in order, one result each: e2e/inbed/policy_driver.py.
    result = bed.run_module("root", "e2e.inbed.policy_driver", input=json.dumps(spec), timeout=300)
    assert result.returncode == 0, f"driver failed:\n{result.stderr}"
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(output, dict)
    assert isinstance(output["results"], list)
    steps = spec["steps"]
    assert isinstance(steps, list)
    assert len(output["results"]) == len(steps)
    return Driven(output.get("backend"), output["results"])


def as_dict(value: object) -> dict[str, object]:
    assert isinstance(value, dict), value
    return value


@pytest.fixture(scope="module")
def world(bed: Testbed) -> Iterator[World]:
    """Users, groups, rules and quota for the matrix; undone afterwards."""
    token = secrets.token_hex(3)
    names = {
        "alice": f"pm-a-{token}",
        "bob": f"pm-b-{token}",
        "web": f"web-{token}",
        "carol": f"pm-c-{token}",
        "none": f"pm-n-{token}",
        "webnone": f"web-n{token}",
    }
    root_ok(bed, "groupadd", "-f", "webteam")
    for user, groups in (("wendy", "webteam"), ("quinn", "capsule")):
        if bed.run("id", user).returncode != 0:
            root_ok(bed, "useradd", "--create-home", "--user-group", "--groups", groups, user)
    root_ok(bed, "mkdir", "-p", DROPIN_DIR)
    root_ok(bed, "sh", "-c", f"cat > {DROPIN_DIR}/50-matrix-webteam.toml", input=WEBTEAM_DROPIN)
    root_ok(bed, "sh", "-c", f"cat > {DROPIN_DIR}/50-matrix-quota.toml", input=QUOTA_DROPIN)
    root_ok(bed, "sh", "-c", f"cat > {POLKIT_RULE}", input=webteam_polkit_rule())
    root_ok(bed, "chmod", "0644", f"{DROPIN_DIR}/50-matrix-webteam.toml")
    root_ok(bed, "chmod", "0644", f"{DROPIN_DIR}/50-matrix-quota.toml", POLKIT_RULE)
    root_ok(bed, "gpasswd", "-a", "carol", "capsule")
    world = World(names, [])
    try:
        yield world
    finally:
        for name in world.created:
            remove_capsule(bed, name)
        bed.run("rm", "-f", f"{DROPIN_DIR}/50-matrix-webteam.toml", POLKIT_RULE)
        bed.run("rm", "-f", f"{DROPIN_DIR}/50-matrix-quota.toml", f"{DROPIN_DIR}/99-matrix.toml")
        bed.run("gpasswd", "-a", "carol", "capsule")
        bed.run("userdel", "--remove", "wendy")
        bed.run("userdel", "--remove", "quinn")
        bed.run("groupdel", "webteam")
        # Next connection starts the daemon with the configuration as it was.
        bed.run("systemctl", "stop", "capsuled.service")


def expected_cells(
    table: dict[str, dict[str, str]],
) -> list[tuple[str, str, str, str]]:
    """(user, capsule role, action, expected answer) for every cell of a table."""
    cells = []
    for user, row in table.items():
        for role, answers in row.items():
            assert len(answers) == len(ACTIONS), (user, role)
            for action, letter in zip(ACTIONS, answers, strict=True):
                cells.append((user, role, action, ANSWER[letter]))
    return cells


def test_matrix_is_complete() -> None:
    assert set(MATRIX) == {"root", "alice", "bob", "mallory", "carol", "wendy"}
    for row in MATRIX.values():
        assert set(row) == set(OWNERS)


def compare(cells: list[tuple[str, str, str, str]], got: list[object], what: str) -> list[str]:
    return [
        f"{what}: {user} {action} on {role}: expected {want}, got {answer}"
        for (user, role, action, want), answer in zip(cells, got, strict=True)
        if answer != want
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_authorizer_matrix(bed: Testbed, world: World, backend: str) -> None:
    """The policy stack alone (polkitd included), subjects from real processes."""
    root_ok(bed, "gpasswd", "-a", "carol", "capsule")
    before = expected_cells(BEFORE_REMOVAL)
    after = expected_cells(MATRIX)

    def check(user: str, role: str, action: str) -> dict[str, object]:
        return {
            "op": "check",
            "user": user,
            "action": action,
            "capsule": world.names[role],
            "owner": OWNERS[role],
        }

    steps: list[dict[str, object]] = [check(u, r, a) for u, r, a, _ in before]
    steps.append({"op": "root", "argv": ["gpasswd", "-d", "carol", "capsule"]})
    steps += [check(u, r, a) for u, r, a, _ in after]
    steps += [{"op": "quota", "user": u} for u in ("root", "alice", "quinn", "mallory")]
    # A peer that is gone by the time of the check is refused, even on its own capsule.
    steps += [{"op": "kill", "user": "alice"}, check("alice", "alice", "read")]
    steps.append({"op": "root", "argv": ["gpasswd", "-a", "carol", "capsule"]})

    users = ["root", "alice", "bob", "mallory", "carol", "wendy", "quinn"]
    output = drive(bed, {"mode": "direct", "backend": backend, "users": users, "steps": steps})
    assert output.backend == backend
    results = output.results

    n_before = len(before)
    mismatches = compare(before, results[:n_before], "before removal")
    assert results[n_before] == 0  # gpasswd -d worked
    rest = results[n_before + 1 :]
    mismatches += compare(after, rest[: len(after)], "matrix")
    assert mismatches == []
    quotas = rest[len(after) : len(after) + 4]
    assert quotas == [
        [None, None, None, None],
        [8, None, None, None],
        [1, None, None, None],
        [8, None, None, None],
    ]
    assert rest[len(after) + 4 :] == [None, "no", 0]


def set_backend(bed: Testbed, backend: str) -> None:
    root_ok(
        bed,
        "sh",
        "-c",
        f"cat > {DROPIN_DIR}/99-matrix.toml && chmod 0644 {DROPIN_DIR}/99-matrix.toml",
        input=f'[policy]\nbackend = "{backend}"\n',
    )
    # The daemon reads its configuration when it starts; the next connection starts it anew.
    root_ok(bed, "systemctl", "stop", "capsuled.service")


def call(user: str, method: str, **parameters: object) -> dict[str, object]:
    return {
        "op": "call",
        "user": user,
        "method": f"org.capsuled.Manager.{method}",
        "parameters": parameters,
    }


@pytest.fixture(scope="module")
def capsules(bed: Testbed, world: World) -> World:
    """The owned capsules, created by their owners through capsuled."""
    steps = []
    for role in ("alice", "bob", "web", "carol"):
        owner = OWNERS[role]
        assert owner is not None
        world.created.append(world.names[role])
        steps.append(call(owner, "Create", name=world.names[role]))
    output = drive(bed, {"mode": "varlink", "users": ["alice", "bob", "carol"], "steps": steps})
    for reply in output.results:
        assert "error" not in as_dict(reply), reply
    return world


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_access_matrix(bed: Testbed, capsules: World, backend: str) -> None:
    """The daemon: CheckAccess answers, and real calls refused or allowed to match."""
    world = capsules
    set_backend(bed, backend)
    root_ok(bed, "gpasswd", "-a", "carol", "capsule")
    names = world.names
    quinn_first, quinn_second = f"pm-q1-{names['none'][5:]}", f"pm-q2-{names['none'][5:]}"
    world.created += [quinn_first, quinn_second]
    for leftover in (quinn_first, quinn_second):
        remove_capsule(bed, leftover)  # from the other backend's run

    before = expected_cells(BEFORE_REMOVAL)
    after = expected_cells(MATRIX)

    def access(user: str, role: str, action: str) -> dict[str, object]:
        return call(user, "CheckAccess", name=names[role], action=action)

    steps: list[dict[str, object]] = [call("root", "Info")]
    steps += [access(u, r, a) for u, r, a, _ in before]
    steps.append({"op": "root", "argv": ["gpasswd", "-d", "carol", "capsule"]})
    steps += [access(u, r, a) for u, r, a, _ in after]
    real = [
        # (call, expected error or None)
        (call("mallory", "Describe", name=names["alice"]), NO_SUCH),
        (call("mallory", "Describe", name=names["none"]), NO_SUCH),
        (call("alice", "Describe", name=names["bob"]), NO_SUCH),
        (call("bob", "Stop", name=names["alice"]), NO_SUCH),
        (call("carol", "Describe", name=names["carol"]), NO_SUCH),
        (call("mallory", "Create", name=names["none"]), AUTH_REQUIRED),
        (call("alice", "Describe", name=names["alice"]), None),
        (call("root", "Describe", name=names["bob"]), None),
        (call("wendy", "Describe", name=names["web"]), None),
        (call("wendy", "Remove", name=names["web"]), AUTH_REQUIRED),
        (call("quinn", "Create", name=quinn_first), None),
        (call("quinn", "Create", name=quinn_second), QUOTA),
    ]
    steps += [c for c, _ in real]
    steps.append({"op": "root", "argv": ["gpasswd", "-a", "carol", "capsule"]})

    users = ["root", "alice", "bob", "mallory", "carol", "wendy", "quinn"]
    results = drive(bed, {"mode": "varlink", "users": users, "steps": steps}).results

    info = as_dict(as_dict(results[0]).get("parameters"))
    assert info.get("policyBackend") == backend, info

    def answer(value: object) -> object:
        reply = as_dict(value)
        params = reply.get("parameters")
        if "error" in reply or not isinstance(params, dict):
            return reply
        access = params.get("access")
        return access.get("result") if isinstance(access, dict) else reply

    i = 1
    mismatches = compare(before, [answer(r) for r in results[i : i + len(before)]], "before")
    i += len(before)
    assert results[i] == 0
    i += 1
    mismatches += compare(after, [answer(r) for r in results[i : i + len(after)]], "matrix")
    i += len(after)
    for (step, want), value in zip(real, results[i : i + len(real)], strict=True):
        reply = as_dict(value)
        got = reply.get("error")
        if got != want:
            mismatches.append(f"{step['user']} {step['method']}: expected {want}, got {reply}")
        if want == QUOTA:
            assert reply.get("parameters") == {"what": "capsules", "limit": 1}
        if want == NO_SUCH:
            # The same reply whether the capsule exists or not: only the name asked for.
            assert reply.get("parameters") == {"name": as_dict(step["parameters"])["name"]}
    assert mismatches == []
    assert results[-1] == 0


@pytest.mark.parametrize(
    ("text", "mode", "reason"),
    [
        ('[quota]\nmax_capsules = 100\n[[rule]]\nresult = "yes"\n', "0666", "writable by group"),
        ("[[rule]]\nactions = ['read']\n", "0644", "result is missing"),
    ],
    ids=["world-writable", "malformed"],
)
def test_refused_config_denies_all_but_root(
    bed: Testbed, capsules: World, text: str, mode: str, reason: str
) -> None:
    """An unsafe or malformed drop-in: logged, and every non-root call refused, never allowed."""
    path = f"{DROPIN_DIR}/60-matrix-refused-{secrets.token_hex(3)}.toml"
    root_ok(bed, "sh", "-c", f"cat > {path} && chmod {mode} {path}", input=text)
    root_ok(bed, "systemctl", "stop", "capsuled.service")
    try:
        name = capsules.names["alice"]
        steps = [
            call("alice", "CheckAccess", name=name, action="read"),
            call("alice", "Describe", name=name),
            call("alice", "CheckAccess", name=f"pm-new-{secrets.token_hex(3)}", action="create"),
            call("mallory", "CheckAccess", name=name, action="read"),
            call("root", "CheckAccess", name=name, action="remove"),
            call("root", "Describe", name=name),
        ]
        results = drive(
            bed, {"mode": "varlink", "users": ["alice", "mallory", "root"], "steps": steps}
        ).results
        replies = [as_dict(r) for r in results]
        access = [
            as_dict(as_dict(r.get("parameters", {})).get("access", {})).get("result")
            for r in replies
        ]
        assert access[0] == "no"
        assert replies[1].get("error") == NO_SUCH
        assert access[2:5] == ["no", "no", "yes"]
        assert "error" not in replies[5]
        journal = bed.run("journalctl", "--no-pager", "-o", "cat", "-u", "capsuled.service").stdout
        lines = [line for line in journal.splitlines() if path in line]
        assert lines, journal[-2000:]
        assert reason in lines[-1]
        assert "denying every request from non-root callers" in lines[-1]
    finally:
        bed.run("rm", "-f", path)
        bed.run("systemctl", "stop", "capsuled.service")


def test_polkit_check_is_cancelled_in_polkitd(bed: Testbed, world: World) -> None:
    """A check waiting for an authentication agent, cancelled: polkitd accepts the cancellation."""
    result = bed.run_module("root", "e2e.inbed.polkit_cancel", timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["pending"] is True
    assert out["cancelled"] is True
    # Hello, then the checks that came back before the agent was up, then the cancellation
    # of the one left waiting: polkitd answers an unknown cancellation id with an error.
    assert out["seen"][0] == ["Hello", "method_return"]
    assert out["seen"][-1] == ["CancelCheckAuthorization", "method_return"]


OWNER_RULE_FILE = "/etc/polkit-1/rules.d/45-capsuled-e2e-owner.rules"
# For mallory only: a read rule that would answer differently for owned capsules if it ever saw an
# owner, and a manage rule keyed on the owner.
OWNER_RULES = """
polkit.addRule(function(action, subject) {
    if (subject.user != "mallory" || action.id.indexOf("org.capsuled.") != 0) return;
    var owner = action.lookup("owner");
    if (action.id == "org.capsuled.read") {
        if (owner) return polkit.Result.NO;
        if (/^web-/.test(action.lookup("capsule"))) return polkit.Result.YES;
    }
    if (action.id == "org.capsuled.manage" && owner == "bob") return polkit.Result.YES;
});
"""


def test_polkit_rules_never_see_the_owner_of_a_capsule_the_caller_may_not_read(
    bed: Testbed, world: World
) -> None:
    """Owner details reach polkit rules only for capsules the caller may read (polkit backend)."""
    names = world.names

    def check(action: str, role: str) -> dict[str, object]:
        return {
            "op": "check",
            "user": "mallory",
            "action": action,
            "capsule": names[role],
            "owner": OWNERS[role],
        }

    probe: dict[str, object] = {
        "op": "check",
        "user": "mallory",
        "action": "read",
        "capsule": "web-probe",
        "owner": None,
    }

    def rule_loaded() -> bool:
        spec: dict[str, object] = {
            "mode": "direct",
            "backend": "polkit",
            "users": ["mallory"],
            "steps": [probe],
        }
        return drive(bed, spec).results == ["yes"]

    def wait_until(loaded: bool) -> None:
        deadline = time.monotonic() + 30
        while rule_loaded() != loaded:
            assert time.monotonic() < deadline, f"polkitd never {'loaded' if loaded else 'dropped'}"

    root_ok(bed, "sh", "-c", f"cat > {OWNER_RULE_FILE}", input=OWNER_RULES)
    try:
        wait_until(loaded=True)
        steps = [
            check("read", "alice"),  # exists, owned by alice
            check("read", "none"),  # does not exist
            check("manage", "web"),  # owned by bob, readable (web-*): the owner rule applies
            check("manage", "bob"),  # owned by bob, not readable: the owner stays hidden
            check("manage", "none"),
        ]
        spec: dict[str, object] = {
            "mode": "direct",
            "backend": "polkit",
            "users": ["mallory"],
            "steps": steps,
        }
        results = drive(bed, spec).results
        # "no" for alice's capsule would tell mallory it exists; she gets the default for both.
        assert results == ["auth_admin", "auth_admin", "yes", "auth_admin", "auth_admin"]
    finally:
        bed.run("rm", "-f", OWNER_RULE_FILE)
        wait_until(loaded=False)
