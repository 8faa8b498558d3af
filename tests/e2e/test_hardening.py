"""Issue 11's findings as they were tried in the testbed, against real systemd and polkitd.

- bob's new capsule of a removed name must not show alice's old secret (finding 1);
- alice's follower of that name ends at the Remove, before bob's line exists (finding 2);
- a polkit rule granting bob only `install` does not let him enable or start, nor install
  without `run` (findings 6 and 7); one granting only `remove` does not disable or stop;
- an OSC 52 / clear-screen logged inside a capsule comes out of `capsulectl logs` escaped
  (finding 10);
- Remove leaves an admin's drop-ins, Create adopts them and says so (finding 11).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from e2e.test_inside import poll
from e2e.vcall import fails, ok
from testbed import Testbed

pytestmark = pytest.mark.e2e

T = TypeVar("T")
DENIED = "org.varlink.service.PermissionDenied"
CMD_TIMEOUT_S = 120.0
FOLLOWER_END_S = 30.0  # a follower ends at once when its capsule goes (wakes on the Remove)
SECRET_UNIT = """\
[Unit]
Description=says a secret

[Service]
ExecStart=/bin/sh -c 'echo {line}; exec sleep infinity'
"""
# systemd turns "\\\\" into "\\", so sh's printf gets \\033 and \\007 and prints ESC and BEL.
# Restarted until a follower sees its line: no start limit (5 starts in 10 s by default).
FOLLOWED_UNIT = """\
[Unit]
Description=says a line at each start
StartLimitIntervalSec=0

[Service]
ExecStart=/bin/sh -c 'echo {line}; exec sleep infinity'
"""
ESCAPES_UNIT = r"""[Unit]
Description=logs terminal escapes

[Service]
ExecStart=/bin/sh -c 'printf "osc\\033]52;c;SGVsbG8=\\007cls\\033[2Jend\\n"; exec sleep infinity'
"""


def messages(bed: Testbed, user: str, name: str, **params: object) -> list[str]:
    return [e["message"] for e in ok(bed, user, "Logs", name=name, **params)["entries"]]


def logged(bed: Testbed, user: str, name: str, line: str) -> bool:
    return line in messages(bed, user, name)


# --- 1. bob's new capsule of a removed name does not show alice's old secret -------------------


def test_a_new_owner_of_a_name_does_not_read_the_old_owners_logs(
    bed: Testbed, capsule_name: str
) -> None:
    name, secret = capsule_name, f"secret-{secrets.token_hex(6)}"
    ok(bed, "alice", "Create", name=name, start=True)
    unit = SECRET_UNIT.format(line=secret)
    ok(bed, "alice", "InstallUnit", name=name, unit="s.service", content=unit, start=True)
    poll(lambda: logged(bed, "alice", name, secret), what="alice's secret in her logs")
    ok(bed, "alice", "Remove", name=name)
    ok(bed, "bob", "Create", name=name, start=True)
    assert secret not in messages(bed, "bob", name, lines=10000)
    assert secret not in messages(bed, "bob", name, unit="s.service")
    # The line is still in the journal: root reads every incarnation, as journalctl -u does.
    assert logged(bed, "root", name, secret)


# --- 2. alice's follower ends with the Remove and never receives bob's line --------------------


@pytest.fixture
def follower(bed: Testbed) -> Iterator[Callable[[str, str], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(user: str, name: str) -> subprocess.Popen[str]:
        argv = ("capsulectl", "logs", name, "-f", "-n", "0")
        proc = subprocess.Popen(
            bed.command(argv, user),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        # The whole session: nsenter and the capsulectl inside (which holds the pipes).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=CMD_TIMEOUT_S)


def following(
    bed: Testbed, proc: subprocess.Popen[str], user: str, name: str, line: str
) -> threading.Thread:
    """Return once `proc` (capsulectl logs -f) follows: it printed `line`, which a.service says
    at each start. The thread returned reads the rest of its output."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for printed in proc.stdout or ():
            lines.put(printed)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(20):
        ok(bed, user, "RestartUnit", name=name, unit="a.service")
        with contextlib.suppress(queue.Empty):
            if line in lines.get(timeout=3):
                return reader
    raise AssertionError(f"the follower never printed {line!r}")


def test_a_follower_ends_when_the_capsule_is_removed(
    bed: Testbed,
    capsule_name: str,
    follower: Callable[[str, str], subprocess.Popen[str]],
) -> None:
    name, mark = capsule_name, secrets.token_hex(6)
    ok(bed, "alice", "Create", name=name, start=True)
    ok(bed, "alice", "InstallUnit", name=name, unit="a.service",
       content=FOLLOWED_UNIT.format(line=f"alice-{mark}"))  # fmt: skip
    proc = follower("alice", name)
    reader = following(bed, proc, "alice", name, f"alice-{mark}")
    ok(bed, "alice", "Remove", name=name)
    proc.wait(timeout=FOLLOWER_END_S)
    reader.join(timeout=FOLLOWER_END_S)
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 1
    assert f"stopped following capsule '{name}': it was removed" in err
    # bob's capsule of the same name writes a line; alice's follower had ended before.
    ok(bed, "bob", "Create", name=name, start=True)
    ok(bed, "bob", "InstallUnit", name=name, unit="b.service",
       content=SECRET_UNIT.format(line=f"bob-{mark}"), start=True)  # fmt: skip
    poll(lambda: logged(bed, "bob", name, f"bob-{mark}"), what="bob's line")


def test_a_follower_ends_soon_after_its_owner_leaves_the_group(
    bed: Testbed,
    capsule_name: str,
    follower: Callable[[str, str], subprocess.Popen[str]],
) -> None:
    # Nobody tells capsuled about a group change in NSS: the periodic re-check (5 s) finds it.
    name = capsule_name
    ok(bed, "carol", "Create", name=name, start=True)
    ok(bed, "carol", "InstallUnit", name=name, unit="a.service",
       content=FOLLOWED_UNIT.format(line="carol-line"))  # fmt: skip
    proc = follower("carol", name)
    reader = following(bed, proc, "carol", name, "carol-line")
    bed.as_root("gpasswd", "-d", "carol", "capsule").check()
    try:
        proc.wait(timeout=FOLLOWER_END_S)
        reader.join(timeout=FOLLOWER_END_S)
        err = proc.stderr.read() if proc.stderr else ""
        assert proc.returncode == 1
        assert f"stopped following capsule '{name}': you may no longer read it" in err
    finally:
        bed.as_root("gpasswd", "-a", "carol", "capsule").check()


# --- 6 and 7. a rule granting bob only `install` (or `remove`) does no more ------------------
#
# Not with `run` as well: a unit file is a command, and org.capsuled.run implies manage-units
# in polkit (its imply annotation: whoever may run commands as the capsule can enable and start
# its units from inside anyway). So `install` alone is refused, for want of `run`.

RULES_FILE = "/etc/polkit-1/rules.d/40-capsuled-e2e-units.rules"
UNIT_VERBS_ONLY = """
polkit.addRule(function(action, subject) {{
    if (subject.user != "bob" || action.lookup("capsule") != "{name}") return;
    if (action.id == "org.capsuled.read") return polkit.Result.YES;
    if (action.id == "org.capsuled.manage-units" && action.lookup("verb") == "{verb}")
        return polkit.Result.YES;
    return polkit.Result.NO;
}});
"""


@pytest.fixture
def unit_verb_rule(bed: Testbed) -> Iterator[Callable[[str, str], None]]:
    def put(name: str, verb: str) -> None:
        rules = UNIT_VERBS_ONLY.format(name=name, verb=verb)
        bed.as_root("sh", "-c", f"cat > {RULES_FILE}", input=rules).check()

        def applied() -> bool:
            asked = {"name": name, "action": "manage-units", "verb": verb, "unit": "x.service"}
            return bool(ok(bed, "bob", "CheckAccess", **asked)["access"]["result"] == "yes")

        poll(applied, what="polkitd to load the e2e rule")

    yield put
    bed.as_root("rm", "-f", RULES_FILE)


def unit_files(bed: Testbed, name: str) -> str:
    home = f"/var/lib/private/capsules/{name}/.config/systemd/user"
    return bed.as_root("find", home, "-name", "x.service").stdout


def test_an_install_grant_neither_enables_nor_starts(
    bed: Testbed, capsule_name: str, unit_verb_rule: Callable[[str, str], None]
) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name, start=True)
    unit_verb_rule(name, "install")
    content = SECRET_UNIT.format(line="x")
    for flags in ({"enable": True}, {"start": True}, {}):
        error, _ = fails(bed, "bob", "InstallUnit", name=name, unit="x.service",
                         content=content, **flags)  # fmt: skip
        assert error == DENIED, flags
        assert unit_files(bed, name) == "", "refused, yet a file was written"
    ok(bed, "alice", "InstallUnit", name=name, unit="x.service", content=content)
    assert fails(bed, "bob", "StartUnit", name=name, unit="x.service")[0] == DENIED
    assert fails(bed, "bob", "EnableUnit", name=name, unit="x.service")[0] == DENIED


def test_a_remove_grant_neither_disables_nor_stops(
    bed: Testbed, capsule_name: str, unit_verb_rule: Callable[[str, str], None]
) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name, start=True)
    content = SECRET_UNIT.format(line="x")
    ok(bed, "alice", "InstallUnit", name=name, unit="x.service", content=content,
       enable=True, start=True)  # fmt: skip
    unit_verb_rule(name, "remove")
    assert fails(bed, "bob", "RemoveUnit", name=name, unit="x.service")[0] == DENIED
    units = {u["name"]: u for u in ok(bed, "alice", "ListUnits", name=name)["units"]}
    assert (units["x.service"]["enabled"], units["x.service"]["activeState"]) == (True, "active")
    ok(bed, "alice", "StopUnit", name=name, unit="x.service")
    assert fails(bed, "bob", "RemoveUnit", name=name, unit="x.service")[0] == DENIED  # enabled
    ok(bed, "alice", "DisableUnit", name=name, unit="x.service")
    ok(bed, "bob", "RemoveUnit", name=name, unit="x.service")  # nothing else to undo
    assert unit_files(bed, name) == ""


# --- 10. escapes logged inside a capsule come out of capsulectl logs escaped --------------------


def test_terminal_escapes_from_a_capsule_are_shown_escaped(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name, start=True)
    ok(bed, "alice", "InstallUnit", name=name, unit="esc.service", content=ESCAPES_UNIT,
       start=True)  # fmt: skip

    def shown() -> str:
        r = bed.run("capsulectl", "logs", name, "-u", "esc.service", user="alice")
        assert r.returncode == 0, r.stderr
        return r.stdout if "osc" in r.stdout else ""

    out = poll(shown, what="the unit's line in capsulectl logs")
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "osc\\x1b]52;c;SGVsbG8=\\acls\\x1b[2Jend" in out
    # --json stays exact: the message as the capsule logged it.
    r = bed.run("capsulectl", "--json", "logs", name, "-u", "esc.service", user="alice")
    entries: list[dict[str, Any]] = json.loads(r.stdout)["entries"]
    assert "osc\x1b]52;c;SGVsbG8=\x07cls\x1b[2Jend" in [e["message"] for e in entries]


# --- 11. Remove leaves an administrator's drop-ins; Create adopts them and records it ----------


def test_remove_keeps_an_admins_dropins_and_create_records_adopting_them(
    bed: Testbed, capsule_name: str
) -> None:
    name = capsule_name
    staged = f"/etc/systemd/system/capsule@{name}.service.d/10-admin.conf"
    bed.as_root("mkdir", "-p", staged.rpartition("/")[0]).check()
    bed.as_root("sh", "-c", f"cat > {staged}", input="[Service]\nCPUQuota=20%\n").check()
    bed.as_root("systemctl", "daemon-reload").check()
    try:
        ok(bed, "alice", "Create", name=name, start=True)
        ok(bed, "alice", "SetLimits", name=name, memoryMax=256 * 1024 * 1024)
        control = f"/etc/systemd/system.control/capsule@{name}.service.d"
        assert bed.as_root("test", "-f", f"{control}/50-MemoryMax.conf").ok
        ok(bed, "alice", "Remove", name=name)
        assert bed.as_root("test", "-f", staged).ok, "Remove deleted the admin's drop-in"
        assert not bed.as_root("test", "-e", control).ok, "Remove left capsuled's own limits"
        ok(bed, "alice", "Create", name=name)
        shown = bed.as_root("systemctl", "show", "-p", "CPUQuotaPerSecUSec",
                            f"capsule@{name}.service").stdout  # fmt: skip
        assert shown.strip() == "CPUQuotaPerSecUSec=200ms"
        bed.as_root("journalctl", "--sync").check()
        out = bed.as_root(
            "journalctl", "-o", "json", "--no-pager",
            "_SYSTEMD_UNIT=capsuled.service", "_UID=0", "_TRANSPORT=journal",
            f"CAPSULE={name}", "CAPSULED_ACTION=create",
        ).check().stdout  # fmt: skip
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [r.get("CAPSULED_ADMIN_CONFIG") for r in records] == [staged, staged]
    finally:
        bed.as_root("rm", "-rf", staged.rpartition("/")[0])
        bed.as_root("systemctl", "daemon-reload")


# --- 5. a record forged by a local user is not in the documented query -------------------------


def test_a_forged_audit_record_does_not_match_the_documented_query(
    bed: Testbed, capsule_name: str
) -> None:
    forge = (
        "from systemd import journal; "
        f"journal.send('forged', SYSLOG_IDENTIFIER='capsuled', CAPSULED_ACTION='remove', "
        f"CAPSULE='{capsule_name}', CAPSULED_RESULT='ok', CAPSULED_CALLER_UID='0')"
    )
    bed.run("python3", "-c", forge, user="mallory").check()
    bed.as_root("journalctl", "--sync").check()

    def query(*trusted: str) -> list[dict[str, Any]]:
        matches = (*trusted, f"CAPSULE={capsule_name}", "CAPSULED_ACTION=remove")
        out = bed.as_root("journalctl", "-o", "json", "--no-pager", *matches).check().stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    assert [r["MESSAGE"] for r in query()] == ["forged"]  # the naive query is fooled
    assert query("_SYSTEMD_UNIT=capsuled.service", "_UID=0", "_TRANSPORT=journal") == []
