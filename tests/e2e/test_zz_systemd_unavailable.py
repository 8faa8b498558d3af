"""With the system bus gone, the helper answers SystemdUnavailable, changes
nothing, and recovers by itself once the bus is back.

Named to run last: stopping D-Bus disturbs logind and polkitd, which this
module restores but other modules should not have to care about.
"""

from __future__ import annotations

import pytest

from e2e.vcall import call, fails, ok
from testbed import Testbed

pytestmark = pytest.mark.e2e


def test_no_system_bus_is_systemd_unavailable_and_recovers(bed: Testbed, capsule_name: str) -> None:
    ok(bed, "root", "Create", name=capsule_name)
    bed.as_root("systemctl", "stop", "dbus.socket", "dbus.service").check()
    try:
        assert fails(bed, "root", "Start", name=capsule_name) == (
            "org.capsuled.Manager.SystemdUnavailable",
            {},
        )
        assert (
            bed.as_root("systemctl", "is-active", f"capsule@{capsule_name}.service").stdout.strip()
            == "inactive"
        )
        # Info still answers: it is about the helper, systemd's part is just unknown.
        assert ok(bed, "root", "Info")["systemdVersion"] is None
    finally:
        bed.as_root("systemctl", "start", "dbus.socket", "dbus.service").check()
    r = call(bed, "root", "Start", {"name": capsule_name})
    assert r.error is None, r.last
    assert r.parameters["capsule"]["state"] == "active"


def test_after_the_bus_drops_the_model_looks_again_before_it_answers(
    bed: Testbed, capsule_name: str
) -> None:
    # capsuled's model heard nothing while the bus was down: the capsule started meanwhile
    # (systemctl as root speaks to PID 1 over its private socket) must show at the first read.
    name = capsule_name
    ok(bed, "root", "Create", name=name)
    assert ok(bed, "root", "Describe", name=name)["capsule"]["state"] == "inactive"
    pid = helper_pid(bed)
    bed.as_root("systemctl", "stop", "dbus.socket", "dbus.service").check()
    try:
        bed.as_root("systemctl", "start", f"capsule@{name}.service").check()
    finally:
        bed.as_root("systemctl", "start", "dbus.socket", "dbus.service").check()
    described = ok(bed, "root", "Describe", name=name)["capsule"]
    assert (described["state"], described["subState"]) == ("active", "running")
    listed = {c["name"]: c for c in ok(bed, "root", "List")["capsules"]}
    assert listed[name]["state"] == "active"
    assert helper_pid(bed) == pid  # the same process: its model looked again


def helper_pid(bed: Testbed) -> int:
    out = bed.as_root("systemctl", "show", "-p", "MainPID", "--value", "capsuled.service")
    return int(out.check().stdout.strip())
