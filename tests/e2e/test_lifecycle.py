"""Capsule lifecycle against real systemd in the testbeds (257, the newest), called as the
users it is meant for (the owner, root) and as those it must refuse.

Every assertion on state is made twice: on the Varlink reply, and on what
systemd itself says (`systemctl`, the file system), so a reply cannot lie.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from e2e.rules import shared_read_rule
from e2e.vcall import call, fails, ok
from testbed import Testbed

pytestmark = pytest.mark.e2e

NO_SUCH = "org.capsuled.Manager.NoSuchCapsule"


def uid_of(bed: Testbed, user: str) -> int:
    return int(bed.as_root("id", "-u", user).check().stdout)


def systemd_state(bed: Testbed, name: str) -> str:
    return bed.as_root("systemctl", "is-active", f"capsule@{name}.service").stdout.strip()


def data_dir_exists(bed: Testbed, name: str) -> bool:
    return bed.as_root("test", "-d", f"/var/lib/private/capsules/{name}").returncode == 0


def test_owner_walks_the_whole_lifecycle(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    alice = uid_of(bed, "alice")

    created = ok(bed, "alice", "Create", name=name)["capsule"]
    assert created["name"] == name
    assert created["owner"] == alice
    assert created["ownerName"] == "alice"
    assert created["state"] == "inactive"
    assert created["hasData"] is True
    assert systemd_state(bed, name) == "inactive"
    assert data_dir_exists(bed, name)

    started = ok(bed, "alice", "Start", name=name)
    assert started["job"] == "done"
    assert started["capsule"]["state"] == "active"
    assert started["capsule"]["subState"] == "running"
    dynamic_uid = started["capsule"]["uid"]
    assert isinstance(dynamic_uid, int)
    assert dynamic_uid >= 61184
    assert systemd_state(bed, name) == "active"
    shown = bed.as_root("id", "-u", f"c-{name}").check().stdout.strip()
    assert int(shown) == dynamic_uid
    # cpu.stat exists in every cgroup v2; the pids and memory controllers are not delegated
    # to the testbed (the build hosts run a cgroup v1 hybrid), so those two may be null there.
    assert started["capsule"]["cpuUsageNSec"] > 0
    assert started["capsule"]["tasksCurrent"] in (None,) or started["capsule"]["tasksCurrent"] >= 1

    described = ok(bed, "alice", "Describe", name=name)["capsule"]
    assert described["state"] == "active"
    assert described["owner"] == alice

    restarted = ok(bed, "alice", "Restart", name=name)
    assert restarted["job"] == "done"
    assert restarted["capsule"]["state"] == "active"
    assert systemd_state(bed, name) == "active"

    stopped = ok(bed, "alice", "Stop", name=name)
    assert stopped["job"] == "done"
    assert stopped["capsule"]["state"] == "inactive"
    assert stopped["capsule"]["uid"] is None
    assert systemd_state(bed, name) == "inactive"

    listed = ok(bed, "alice", "List")["capsules"]
    assert [c["name"] for c in listed if c["name"] == name] == [name]

    assert ok(bed, "alice", "Remove", name=name) == {}
    assert not data_dir_exists(bed, name)
    assert bed.as_root("test", "-e", f"/var/lib/capsuled/capsules/{name}.json").returncode == 1
    assert fails(bed, "alice", "Describe", name=name)[0] == NO_SUCH
    assert name not in [c["name"] for c in ok(bed, "alice", "List")["capsules"]]


def test_list_streams_one_capsule_per_reply(bed: Testbed, capsule_name: str) -> None:
    ok(bed, "alice", "Create", name=capsule_name)
    second = capsule_name[:-1] + ("x" if capsule_name[-1] != "x" else "y")
    ok(bed, "alice", "Create", name=second)
    try:
        r = call(bed, "alice", "List", more=True)
        assert all(len(reply["parameters"]["capsules"]) == 1 for reply in r.replies)
        assert all(reply.get("continues") for reply in r.replies[:-1])
        assert not r.last.get("continues")
        names = [reply["parameters"]["capsules"][0]["name"] for reply in r.replies]
        assert capsule_name in names
        assert second in names
    finally:
        ok(bed, "root", "Remove", name=second)


def test_users_who_may_not_read_cannot_tell_it_exists(bed: Testbed, capsule_name: str) -> None:
    ok(bed, "alice", "Create", name=capsule_name)
    absent = "nobody-has-this"
    for user in ("mallory", "bob"):
        for method in ("Describe", "Start", "Stop", "Restart", "Remove", "SetLimits"):
            extra = {"tasksMax": 10} if method == "SetLimits" else {}
            on_real = fails(bed, user, method, name=capsule_name, **extra)
            on_absent = fails(bed, user, method, name=absent, **extra)
            assert on_real == (NO_SUCH, {"name": capsule_name}), (user, method, on_real)
            assert on_absent == (NO_SUCH, {"name": absent}), (user, method, on_absent)
        err = fails(bed, user, "SetAutostart", name=capsule_name, enabled=True)
        assert err[0] == NO_SUCH
        assert capsule_name not in [c["name"] for c in ok(bed, user, "List")["capsules"]]
    # Nothing the refused users tried had an effect.
    assert systemd_state(bed, capsule_name) == "inactive"
    assert data_dir_exists(bed, capsule_name)


def test_non_member_may_not_create(bed: Testbed, capsule_name: str) -> None:
    err, _ = fails(bed, "mallory", "Create", name=capsule_name)
    assert err == "org.capsuled.Manager.InteractiveAuthenticationRequired"
    assert not data_dir_exists(bed, capsule_name)
    assert systemd_state(bed, capsule_name) == "inactive"


def test_root_manages_any_capsule(bed: Testbed, capsule_name: str) -> None:
    ok(bed, "alice", "Create", name=capsule_name)
    assert ok(bed, "root", "Start", name=capsule_name)["capsule"]["state"] == "active"
    assert ok(bed, "root", "Stop", name=capsule_name)["capsule"]["state"] == "inactive"


@pytest.mark.parametrize(
    "bad",
    ["", "x" * 30, "a/b", "..", "a.b", "émile", "a b", "web\n", "a:b"],
)
def test_invalid_names_never_reach_systemd(bed: Testbed, bad: str) -> None:
    err, params = fails(bed, "alice", "Create", name=bad)
    assert err == "org.capsuled.Manager.InvalidName"
    assert params["name"] == bad
    assert params["reason"]
    # systemd never saw it: no unit of that name was ever loaded.
    units = bed.as_root("systemctl", "list-units", "--all", "--plain", "--no-legend", "capsule@*")
    assert f"capsule@{bad}.service" not in units.stdout if bad else True


def test_longest_valid_name_works(bed: Testbed) -> None:
    name = "n" * 29
    try:
        assert ok(bed, "alice", "Create", name=name)["capsule"]["name"] == name
    finally:
        ok(bed, "root", "Remove", name=name)


def test_create_twice_is_capsule_exists(bed: Testbed, capsule_name: str) -> None:
    ok(bed, "alice", "Create", name=capsule_name)
    assert fails(bed, "alice", "Create", name=capsule_name) == (
        "org.capsuled.Manager.CapsuleExists",
        {"name": capsule_name},
    )
    assert fails(bed, "bob", "Create", name=capsule_name)[0] == (
        "org.capsuled.Manager.CapsuleExists"
    )


def test_concurrent_creates_of_one_name_yield_one_capsule(bed: Testbed, capsule_name: str) -> None:
    results: list[str | None] = []

    def create(user: str) -> None:
        results.append(call(bed, user, "Create", {"name": capsule_name}).error)

    threads = [threading.Thread(target=create, args=(u,)) for u in ("alice", "bob", "carol")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=str) == sorted(
        [None, "org.capsuled.Manager.CapsuleExists", "org.capsuled.Manager.CapsuleExists"],
        key=str,
    )


def test_capsule_made_with_plain_systemctl_is_listed_unowned(
    bed: Testbed, capsule_name: str
) -> None:
    bed.as_root("systemctl", "start", f"capsule@{capsule_name}.service").check()
    listed = {c["name"]: c for c in ok(bed, "root", "List")["capsules"]}
    assert listed[capsule_name]["owner"] is None
    assert listed[capsule_name]["state"] == "active"
    # It belongs to nobody, so no unprivileged user sees it.
    assert capsule_name not in [c["name"] for c in ok(bed, "alice", "List")["capsules"]]
    assert fails(bed, "alice", "Stop", name=capsule_name)[0] == NO_SUCH
    assert systemd_state(bed, capsule_name) == "active"


def test_a_unit_known_only_to_pid1_is_listed_while_it_is_not_inactive(
    bed: Testbed, capsule_name: str
) -> None:
    # No state dir, no autostart link: only PID 1's state decides (a unit merely loaded,
    # e.g. by `systemctl status`, is no capsule; a running one is, its dir gone or not).
    name, unit = capsule_name, f"capsule@{capsule_name}.service"
    bed.as_root("systemctl", "status", unit)  # loads it; exit 3: inactive
    assert bed.as_root("systemctl", "show", "-p", "LoadState", "--value", unit).stdout.strip() in (
        "loaded",
        "not-found",
    )
    assert name not in [c["name"] for c in ok(bed, "root", "List")["capsules"]]
    bed.as_root("systemctl", "start", unit).check()
    try:
        bed.as_root("rm", "-rf", f"/var/lib/private/capsules/{name}").check()
        assert not data_dir_exists(bed, name)
        listed = {c["name"]: c for c in ok(bed, "root", "List")["capsules"]}
        assert listed[name]["state"] == "active"
        assert listed[name]["hasData"] is False
    finally:
        bed.as_root("systemctl", "stop", unit).check()
    assert name not in [c["name"] for c in ok(bed, "root", "List")["capsules"]]


def test_failed_manager_start_is_an_error_with_the_unit_result(
    bed: Testbed, capsule_name: str
) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    dropin = f"/run/systemd/system/capsule@{name}.service.d"
    bed.as_root("mkdir", "-p", dropin).check()
    bed.as_root("sh", "-c", f"printf '[Service]\\nExecStartPre=/bin/false\\n' > {dropin}/fail.conf")
    bed.as_root("systemctl", "daemon-reload").check()
    try:
        err, params = fails(bed, "alice", "Start", name=name)
        assert err == "org.capsuled.Manager.JobFailed"
        assert params["result"] == "failed"
        assert params["unitResult"] == "exit-code"
        assert systemd_state(bed, name) == "failed"
        assert ok(bed, "alice", "Describe", name=name)["capsule"]["state"] == "failed"
    finally:
        bed.as_root("rm", "-rf", dropin)
        bed.as_root("systemctl", "daemon-reload")
    assert ok(bed, "alice", "Start", name=name)["capsule"]["state"] == "active"


def test_remove_of_a_running_capsule_stops_it_and_deletes_its_data(
    bed: Testbed, capsule_name: str
) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name, start=True)
    assert systemd_state(bed, name) == "active"
    assert ok(bed, "alice", "Remove", name=name) == {}
    assert systemd_state(bed, name) == "inactive"
    assert not data_dir_exists(bed, name)


def test_remove_keep_data_keeps_the_directory_and_its_owner(
    bed: Testbed, capsule_name: str
) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    ok(bed, "alice", "Remove", name=name, keepData=True)
    assert data_dir_exists(bed, name)
    # Still alice's (issue 11, item 13): bob cannot take the name and inherit her data ...
    assert ok(bed, "alice", "Describe", name=name)["capsule"]["owner"] == uid_of(bed, "alice")
    assert fails(bed, "bob", "Create", name=name)[0] == "org.capsuled.Manager.CapsuleExists"
    # ... alice takes it back with Create, and a Remove without keepData frees the name.
    assert ok(bed, "alice", "Create", name=name, start=True)["capsule"]["state"] == "active"
    ok(bed, "alice", "Remove", name=name)
    assert not data_dir_exists(bed, name)
    ok(bed, "bob", "Create", name=name)


def test_set_limits_is_persistent_and_visible_in_systemctl(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    capsule = ok(
        bed, "alice", "SetLimits", name=name, memoryMax=256 * 1024 * 1024, tasksMax=64, cpuWeight=50
    )["capsule"]
    assert capsule["memoryMax"] == 256 * 1024 * 1024
    assert capsule["tasksMax"] == 64
    assert capsule["cpuWeight"] == 50
    shown = bed.as_root(
        "systemctl", "show", "-p", "MemoryMax,TasksMax,CPUWeight", f"capsule@{name}.service"
    ).stdout
    assert "MemoryMax=268435456" in shown
    assert "TasksMax=64" in shown
    assert "CPUWeight=50" in shown
    # Persistent: written under /etc (system.control), not /run.
    assert (
        bed.as_root(
            "test", "-d", f"/etc/systemd/system.control/capsule@{name}.service.d"
        ).returncode
        == 0
    )
    reset = ok(bed, "alice", "SetLimits", name=name, tasksMax=-1)["capsule"]
    assert reset["tasksMax"] is None
    assert reset["memoryMax"] == 256 * 1024 * 1024
    # Invalid values change nothing.
    err, params = fails(bed, "alice", "SetLimits", name=name, cpuWeight=0)
    assert err == "org.capsuled.Manager.InvalidValue"
    assert params["parameter"] == "cpuWeight"
    err, params = fails(bed, "alice", "SetLimits", name=name, tasksMax=True)
    assert err == "org.varlink.service.InvalidParameter"
    assert params["parameter"] == "tasksMax"
    # Removing the capsule drops its limits: a new capsule of that name starts clean.
    ok(bed, "alice", "Remove", name=name)
    assert (
        bed.as_root(
            "test", "-e", f"/etc/systemd/system.control/capsule@{name}.service.d"
        ).returncode
        == 1
    )


def test_set_limits_is_held_to_the_quota_ceiling(bed: Testbed, capsule_name: str) -> None:
    dropin = "/etc/capsuled/capsuled.toml.d/50-e2e-carol.toml"
    bed.as_root("mkdir", "-p", "/etc/capsuled/capsuled.toml.d").check()
    bed.as_root(
        "sh",
        "-c",
        f'printf \'[[quota_rule]]\\nusers = ["carol"]\\nmax_memory_bytes = "64M"\\n\' > {dropin}',
    ).check()
    # The helper reads its policy when it starts (socket activation restarts it).
    bed.as_root("systemctl", "stop", "capsuled.service").check()
    try:
        ok(bed, "carol", "Create", name=capsule_name)
        limit = 64 * 1024 * 1024
        # Unlimited (-1) is above any ceiling.
        assert fails(bed, "carol", "SetLimits", name=capsule_name, memoryMax=-1) == (
            "org.capsuled.Manager.QuotaExceeded",
            {"what": "memoryMax", "limit": limit},
        )
        err, _ = fails(bed, "carol", "SetLimits", name=capsule_name, memoryMax=limit + 1)
        assert err == "org.capsuled.Manager.QuotaExceeded"
        assert (
            ok(bed, "carol", "SetLimits", name=capsule_name, memoryMax=limit)["capsule"][
                "memoryMax"
            ]
            == limit
        )
        # Root has no ceiling.
        ok(bed, "root", "SetLimits", name=capsule_name, memoryMax=-1)
    finally:
        bed.as_root("rm", "-f", dropin)
        bed.as_root("systemctl", "stop", "capsuled.service")


def test_audit_records_carry_structured_fields(bed: Testbed, capsule_name: str) -> None:
    ok(bed, "alice", "Create", name=capsule_name)
    ok(bed, "alice", "Start", name=capsule_name)
    alice = uid_of(bed, "alice")
    out = (
        bed.as_root(
            "journalctl",
            "-o",
            "json",
            "--no-pager",
            # Only journald sets these: a record without them is not capsuled's (README).
            "_SYSTEMD_UNIT=capsuled.service",
            "_UID=0",
            "_TRANSPORT=journal",
            f"CAPSULE={capsule_name}",
            "CAPSULED_ACTION=start",
        )
        .check()
        .stdout
    )
    records = [json.loads(line) for line in out.splitlines()]
    assert records, "no audit record for start"
    assert records[-1]["CAPSULED_CALLER_UID"] == str(alice)
    assert records[-1]["CAPSULED_RESULT"] == "ok"


def test_a_create_killed_half_way_is_finished_by_a_retry(bed: Testbed, capsule_name: str) -> None:
    """What a SIGKILL between the record and systemd leaves behind: a retry finishes it."""
    alice = uid_of(bed, "alice")
    record = {"format": 1, "name": capsule_name, "owner": alice, "phase": "creating", "created": 1}
    bed.as_root(
        "sh",
        "-c",
        f"mkdir -p /var/lib/capsuled/capsules && printf '%s' '{json.dumps(record)}' "
        f"> /var/lib/capsuled/capsules/{capsule_name}.json",
    ).check()
    bed.as_root("systemctl", "kill", "-s", "KILL", "capsuled.service")
    capsule = ok(bed, "alice", "Create", name=capsule_name)["capsule"]
    assert capsule["owner"] == alice
    assert capsule["hasData"]
    # Another user cannot hijack a half-created capsule.
    assert fails(bed, "bob", "Create", name=capsule_name)[0] == (
        "org.capsuled.Manager.CapsuleExists"
    )


def test_a_remove_killed_half_way_is_finished_by_a_retry(bed: Testbed, capsule_name: str) -> None:
    ok(bed, "alice", "Create", name=capsule_name)
    bed.as_root(
        "sed", "-i", 's/"ready"/"removing"/', f"/var/lib/capsuled/capsules/{capsule_name}.json"
    ).check()
    bed.as_root("systemctl", "kill", "-s", "KILL", "capsuled.service")
    ok(bed, "alice", "Remove", name=capsule_name)
    assert not data_dir_exists(bed, capsule_name)


def test_info_tells_the_caller_who_it_is(bed: Testbed) -> None:
    info = ok(bed, "mallory", "Info")
    assert info["callerUid"] == uid_of(bed, "mallory")
    assert info["systemdVersion"] >= 256
    assert info["policyBackend"] in ("builtin", "polkit")


def test_autostart_survives_a_reboot(bed: Testbed, capsule_name: str) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    assert ok(bed, "alice", "SetAutostart", name=name, enabled=True)["capsule"]["autostart"]
    link = f"/etc/systemd/system/multi-user.target.wants/capsule@{name}.service"
    assert bed.as_root("test", "-L", link).returncode == 0
    bed.reboot()
    assert systemd_state(bed, name) == "active"
    capsule = ok(bed, "alice", "Describe", name=name)["capsule"]
    assert capsule["autostart"] is True
    assert capsule["state"] == "active"
    assert not ok(bed, "alice", "SetAutostart", name=name, enabled=False)["capsule"]["autostart"]
    assert bed.as_root("test", "-e", link).returncode == 1


def test_sigkill_in_the_middle_of_create_then_a_retry_finishes(
    bed: Testbed, capsule_name: str
) -> None:
    """A real SIGKILL while systemd's start job runs (made slow by a drop-in)."""
    name = capsule_name
    dropin = f"/run/systemd/system/capsule@{name}.service.d"
    bed.as_root("mkdir", "-p", dropin).check()
    bed.as_root(
        "sh", "-c", f"printf '[Service]\\nExecStartPre=/bin/sleep 3\\n' > {dropin}/slow.conf"
    ).check()
    bed.as_root("systemctl", "daemon-reload").check()
    replies: list[object] = []
    creating = threading.Thread(
        target=lambda: replies.append(call(bed, "alice", "Create", {"name": name}).last)
    )
    creating.start()
    try:
        record = f"/var/lib/capsuled/capsules/{name}.json"
        deadline = time.monotonic() + 30
        while bed.as_root("test", "-e", record).returncode != 0:
            assert time.monotonic() < deadline, "Create never wrote its record"
            time.sleep(0.05)
        bed.as_root("systemctl", "kill", "-s", "KILL", "capsuled.service").check()
    finally:
        creating.join()
    assert replies == [{"closed": True}]
    assert '"creating"' in bed.as_root("cat", record).stdout
    # The retry (socket activation starts a fresh helper) finishes the job.
    capsule = ok(bed, "alice", "Create", name=name)["capsule"]
    assert capsule["owner"] == uid_of(bed, "alice")
    assert capsule["state"] == "inactive"
    assert '"ready"' in bed.as_root("cat", record).stdout
    bed.as_root("rm", "-rf", dropin)
    bed.as_root("systemctl", "daemon-reload")


def test_sigkill_in_the_middle_of_remove_then_a_retry_finishes(
    bed: Testbed, capsule_name: str
) -> None:
    name = capsule_name
    ok(bed, "alice", "Create", name=name, start=True)
    dropin = f"/run/systemd/system/capsule@{name}.service.d"
    bed.as_root("mkdir", "-p", dropin).check()
    bed.as_root(
        "sh", "-c", f"printf '[Service]\\nExecStopPost=/bin/sleep 3\\n' > {dropin}/slow.conf"
    ).check()
    bed.as_root("systemctl", "daemon-reload").check()
    replies: list[object] = []
    removing = threading.Thread(
        target=lambda: replies.append(call(bed, "alice", "Remove", {"name": name}).last)
    )
    removing.start()
    record = f"/var/lib/capsuled/capsules/{name}.json"
    try:
        deadline = time.monotonic() + 30
        while '"removing"' not in bed.as_root("cat", record).stdout:
            assert time.monotonic() < deadline, "Remove never marked its record"
            time.sleep(0.05)
        bed.as_root("systemctl", "kill", "-s", "KILL", "capsuled.service").check()
    finally:
        removing.join()
    assert replies == [{"closed": True}]
    assert data_dir_exists(bed, name)
    assert ok(bed, "alice", "Remove", name=name) == {}
    assert not data_dir_exists(bed, name)
    assert bed.as_root("test", "-e", record).returncode == 1
    bed.as_root("rm", "-rf", dropin)
    bed.as_root("systemctl", "daemon-reload")


def test_a_reader_told_no_gets_permission_denied(bed: Testbed) -> None:
    """Read allowed, manage refused outright (not auth_admin): PermissionDenied, not masked."""
    assert ok(bed, "root", "Info")["policyBackend"] == "polkit"
    name = "shared-e2e"
    ok(bed, "alice", "Create", name=name)
    try:
        with shared_read_rule(
            bed, lambda: call(bed, "bob", "Describe", {"name": name}).error is None
        ):
            assert ok(bed, "bob", "Describe", name=name)["capsule"]["owner"] == uid_of(bed, "alice")
            assert fails(bed, "bob", "Start", name=name) == (
                "org.varlink.service.PermissionDenied",
                {},
            )
            assert systemd_state(bed, name) == "inactive"
            # The owner is untouched by the rule; mallory (not in the group) still sees nothing.
            assert ok(bed, "alice", "Start", name=name)["capsule"]["state"] == "active"
            assert fails(bed, "mallory", "Stop", name=name)[0] == NO_SUCH
    finally:
        ok(bed, "root", "Remove", name=name)


def _burn_cpu_inside(bed: Testbed, name: str, seconds: float) -> None:
    """Use `seconds` of CPU in a transient unit inside the capsule (counted in its cgroup)."""
    loop = f"import time\nwhile time.process_time() < {seconds}: pass\n"
    bed.as_user(
        "alice", "capsulectl", "run", name, "--wait", "--", "/usr/bin/python3", "-c", loop
    ).check()


def test_cpu_figure_is_live_and_from_the_new_cgroup_after_a_restart(
    bed: Testbed, capsule_name: str
) -> None:
    # capsuled keeps a running capsule's cgroup files open between reads (hostfs.CgroupFiles):
    # every read is still a read of now, and once the capsule restarts behind capsuled's back
    # (a new cgroup at the same path; the kernel fails reads on the old one's fds) the figure
    # is the new cgroup's.
    name = capsule_name
    ok(bed, "alice", "Create", name=name)
    ok(bed, "alice", "Start", name=name)
    before = ok(bed, "alice", "Describe", name=name)["capsule"]["cpuUsageNSec"]
    _burn_cpu_inside(bed, name, 0.6)
    burnt = ok(bed, "alice", "Describe", name=name)["capsule"]["cpuUsageNSec"]
    assert burnt >= before + 500_000_000
    bed.as_root("systemctl", "restart", f"capsule@{name}.service").check()
    fresh = ok(bed, "alice", "Describe", name=name)["capsule"]
    assert fresh["state"] == "active"
    assert isinstance(fresh["cpuUsageNSec"], int)
    assert fresh["cpuUsageNSec"] < burnt  # not the old cgroup's 0.6 s and more
    _burn_cpu_inside(bed, name, 0.6)
    again = ok(bed, "alice", "Describe", name=name)["capsule"]["cpuUsageNSec"]
    assert again >= fresh["cpuUsageNSec"] + 500_000_000
