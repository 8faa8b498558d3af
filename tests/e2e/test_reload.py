"""`systemctl reload capsuled.service` applies a changed policy in the running daemon.

The unit is Type=notify-reload: systemd sends SIGHUP and waits for RELOADING=1 + MONOTONIC_USEC=,
then READY=1, so once `systemctl reload` returns the new policy must already decide. The daemon
is socket-activated and exits after 30 s without connections; every step here is a second or two
apart, and MainPID is compared so an idle exit and restart could not pass for a reload.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.vcall import ok
from testbed import Testbed

DROPIN_DIR = "/etc/capsuled/capsuled.toml.d"
DROPIN = f"{DROPIN_DIR}/50-e2e-reload.toml"
UNIT = "capsuled.service"
# mallory is in no group: by default (polkit, org.capsuled.policy) it may not create capsules.
LET_MALLORY_CREATE = """\
[policy]
backend = "builtin"

[[rule]]
users = ["mallory"]
capsules = ["m-*"]
actions = ["create"]
result = "yes"
"""
# Not TOML: the whole configuration is refused.
BROKEN = "[policy\n"


def main_pid(bed: Testbed) -> int:
    out = bed.as_root("systemctl", "show", "-p", "MainPID", "--value", UNIT).check().stdout
    return int(out.strip())


def mallory_may_create(bed: Testbed, name: str) -> dict[str, object]:
    access = ok(bed, "mallory", "CheckAccess", name=name, action="create")["access"]
    assert isinstance(access, dict)
    return access


def write_dropin(bed: Testbed, text: str) -> None:
    # Written under a temp name and renamed, root-owned 0644 (the loader refuses anything
    # group- or world-writable).
    tmp = f"{DROPIN_DIR}/.50-e2e-reload.toml.tmp"
    bed.as_root("install", "-m", "0644", "/dev/stdin", tmp, input=text).check()
    bed.as_root("mv", "-f", tmp, DROPIN).check()


def reload(bed: Testbed) -> None:
    # Returns only after the daemon's READY=1 (notify-reload), or fails if it never comes.
    bed.as_root("systemctl", "reload", UNIT, timeout=60.0).check()


def journal_of(bed: Testbed, pid: int) -> str:
    # --sync: journald handles messages already queued before answering (low-priority handler).
    bed.as_root("journalctl", "--sync").check()
    return bed.as_root("journalctl", "-o", "cat", "--no-pager", f"_PID={pid}").check().stdout


@pytest.fixture
def dropin_dir(bed: Testbed) -> Iterator[None]:
    """The drop-in directory, with our drop-in removed (and the policy reloaded) afterwards."""
    created = bed.as_root("test", "-d", DROPIN_DIR).returncode != 0
    bed.as_root("mkdir", "-p", "-m", "0755", DROPIN_DIR).check()
    try:
        yield
    finally:
        bed.as_root("rm", "-f", DROPIN, f"{DROPIN_DIR}/.50-e2e-reload.toml.tmp")
        if created:
            bed.as_root("rmdir", DROPIN_DIR)
        # Whatever state the test left: the next activation reads the files afresh.
        bed.as_root("systemctl", "stop", UNIT)


def test_reload_applies_a_changed_policy_without_a_restart(bed: Testbed, dropin_dir: None) -> None:
    before = mallory_may_create(bed, "m-reload")  # also starts the service (socket activation)
    assert before["result"] != "yes"
    pid = main_pid(bed)
    assert pid > 0

    write_dropin(bed, LET_MALLORY_CREATE)
    reload(bed)
    assert main_pid(bed) == pid
    assert mallory_may_create(bed, "m-reload") == {"result": "yes", "reason": "builtin"}
    # The rule is for m-* only.
    assert mallory_may_create(bed, "x-reload")["result"] != "yes"
    assert "policy reloaded: backend builtin" in journal_of(bed, pid)

    bed.as_root("rm", "-f", DROPIN).check()
    reload(bed)
    assert main_pid(bed) == pid
    assert mallory_may_create(bed, "m-reload") == before


def test_reload_of_a_refused_policy_denies_instead_of_keeping_the_old_one(
    bed: Testbed, dropin_dir: None
) -> None:
    write_dropin(bed, LET_MALLORY_CREATE)
    bed.as_root("systemctl", "stop", UNIT).check()  # start with the allowing policy
    assert mallory_may_create(bed, "m-reload") == {"result": "yes", "reason": "builtin"}
    pid = main_pid(bed)

    write_dropin(bed, LET_MALLORY_CREATE + BROKEN)
    reload(bed)  # the reload itself succeeds: the daemon runs, with the deny-all policy
    assert main_pid(bed) == pid
    assert mallory_may_create(bed, "m-reload") == {"result": "no", "reason": "config-refused"}
    journal = journal_of(bed, pid)
    assert "policy configuration refused" in journal
    assert "configuration refused: denying every non-root request" in journal
    # Root is never subject to the policy files.
    assert ok(bed, "root", "CheckAccess", name="m-reload", action="create")["access"] == {
        "result": "yes",
        "reason": "root",
    }

    write_dropin(bed, LET_MALLORY_CREATE)
    reload(bed)
    assert main_pid(bed) == pid
    assert mallory_may_create(bed, "m-reload") == {"result": "yes", "reason": "builtin"}
