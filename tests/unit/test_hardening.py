"""Regression tests for issue 11's semantic findings (hardening), one section per finding.

Each test failed before its fix; the finding's number is in the section title.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from jeepney.low_level import HeaderFields, Message
from methods_fixtures import (
    ALICE,
    BOB,
    ENTRIES_FROM_USEC,
    GOOD_UNIT,
    ROOT,
    USERS,
    ObservedLocks,
    World,
    config,
    entry,
    items,
    make_world,
)
from test_methods_streams import Stream, capsule_event

from capsulectl import output
from capsulectl.failures import explain_error
from capsuled import audit, errors, wire
from capsuled import install as installer
from capsuled.audit import RESULT_DENIED, AuditLog, verify_chain
from capsuled.methods import streams
from capsuled.methods.context import GrantChanges, GrantSubscription
from capsuled.policy import actions as act
from capsuled.policy.authorizer import Authorizer
from capsuled.policy.builtin import BuiltinBackend
from capsuled.policy.config import apply_layer
from capsuled.policy.engine import Decision, Identity, PolicyConfig, Rule, Who
from capsuled.records import Phase, new_record
from capsuled.systemd import backend, hostfs, messages
from capsuled.systemd.manager import DBusCapsuleManager
from capsuled.varlink.errors import PermissionDenied, VarlinkError

CHECKOUT = Path(__file__).resolve().parents[2]
BOB_ONLY = Who(users=frozenset({"bob"}))


def bob_may(*rules: Rule) -> PolicyConfig:
    """bob may read every capsule and do what `rules` say; nothing else is allowed."""
    reader = Rule(Decision.YES, who=BOB_ONLY, actions=frozenset({act.READ}))
    return config(rules=(reader, *rules))


def manage_units(*verbs: str) -> Rule:
    return Rule(
        Decision.YES, who=BOB_ONLY, actions=frozenset({act.MANAGE_UNITS}), verbs=frozenset(verbs)
    )


def authorizer_for(
    policy: PolicyConfig, users: dict[int, tuple[str, frozenset[str]]] | None = None
) -> Authorizer:
    """A builtin-policy Authorizer over the fixtures' user directory (or `users`)."""
    table = dict(USERS if users is None else users)

    def lookup(uid: int) -> Identity:
        name, groups = table.get(uid, (None, frozenset()))
        return Identity(uid, name, groups)

    return Authorizer(policy, BuiltinBackend(policy), lookup=lookup, is_alive=lambda _p: True)


RUN = Rule(Decision.YES, who=BOB_ONLY, actions=frozenset({act.RUN}))


def install(**flags: bool) -> dict[str, object]:
    return {"name": "alpha", "unit": "new.service", "content": GOOD_UNIT, **flags}


# --- 6. InstallUnit and RemoveUnit authorize every effect before any write --------------------


@pytest.mark.parametrize("flag", ["enable", "start"])
def test_install_granted_alone_neither_enables_nor_starts(tmp_path: Path, flag: str) -> None:
    world = make_world(tmp_path, policy=bob_may(manage_units("install"), RUN)).standard()
    exc = world.error("InstallUnit", install(**{flag: True}), uid=BOB)
    assert isinstance(exc, PermissionDenied)
    # Refused before anything was written: no unit file, no link, no job.
    assert not world.unit_file("alpha", "new.service").exists()
    assert not world.wants_link("alpha", "new.service").exists()
    assert world.backend.calls == []


def test_install_with_every_effect_granted_does_them_all(tmp_path: Path) -> None:
    rule = manage_units("install", "enable", "start")
    world = make_world(tmp_path, policy=bob_may(rule, RUN)).standard()
    world.backend.add_unit("alpha", "new.service")  # what the fake manager loads from the file
    world.run("InstallUnit", install(enable=True, start=True), uid=BOB)
    assert world.unit_file("alpha", "new.service").is_file()
    assert world.wants_link("alpha", "new.service").is_symlink()
    assert world.backend.capsules["alpha"].units["new.service"].active_state == "active"


@pytest.mark.parametrize("state", ["enabled", "running"])
def test_remove_granted_alone_neither_disables_nor_stops(tmp_path: Path, state: str) -> None:
    world = make_world(tmp_path, policy=bob_may(manage_units("remove"))).standard()
    world.backend.add_unit("alpha", "new.service")
    world.run("InstallUnit", install(enable=state == "enabled", start=state == "running"))
    world.forget_history()
    exc = world.error("RemoveUnit", {"name": "alpha", "unit": "new.service"}, uid=BOB)
    assert isinstance(exc, PermissionDenied)
    assert world.unit_file("alpha", "new.service").is_file()
    assert world.wants_link("alpha", "new.service").is_symlink() == (state == "enabled")
    expected = "active" if state == "running" else "inactive"
    assert world.backend.capsules["alpha"].units["new.service"].active_state == expected


def test_remove_granted_alone_removes_a_stopped_disabled_unit(tmp_path: Path) -> None:
    world = make_world(tmp_path, policy=bob_may(manage_units("remove"))).standard()
    world.run("InstallUnit", install())
    world.run("RemoveUnit", {"name": "alpha", "unit": "new.service"}, uid=BOB)
    assert not world.unit_file("alpha", "new.service").exists()


# --- 7. manage-units is code execution: installing a unit also needs run -----------------------


def test_install_without_run_is_refused(tmp_path: Path) -> None:
    rule = manage_units("install", "enable", "start")
    world = make_world(tmp_path, policy=bob_may(rule)).standard()
    exc = world.error("InstallUnit", install(), uid=BOB)
    assert isinstance(exc, PermissionDenied)
    assert not world.unit_file("alpha", "new.service").exists()


def shipped_recipe(title: str) -> str:
    """A commented recipe of config/capsuled.toml, uncommented: from its title line to the
    next blank comment line."""
    text = (CHECKOUT / "config" / "capsuled.toml").read_text(encoding="utf-8")
    block = text[text.index(title) :].split("\n\n", 1)[0]
    toml = [line[2:] for line in block.splitlines() if re.match(r"# (\[|[a-z_-]+ = )", line)]
    assert toml, f"no TOML under {title!r}"
    return "\n".join(toml) + "\n"


def test_the_shipped_forbid_run_in_prod_recipe_forbids_run_and_install(tmp_path: Path) -> None:
    recipe = shipped_recipe("# Never let anybody but root run commands in capsules named prod-*")
    world = make_world(tmp_path, policy=apply_layer(config(), "recipe", recipe))
    for name in ("prod-web", "dev-web"):
        world.run("Create", {"name": name, "start": True})
        world.make_home(name)
        world.backend.add_unit(name, "x.service")
    calls: list[tuple[str, dict[str, object]]] = [
        ("Run", {"name": "prod-web", "command": ["/bin/true"]}),
        ("InstallUnit", {"name": "prod-web", "unit": "x.service", "content": GOOD_UNIT}),
    ]
    for method, params in calls:
        assert isinstance(world.error(method, params), PermissionDenied), method
        world.run(method, params | {"name": "dev-web"})  # the owner keeps run elsewhere
        world.run(method, params, uid=ROOT)  # and root everywhere
    # manage-units without code: the owner still starts and stops what root installed.
    world.run("StopUnit", {"name": "prod-web", "unit": "x.service"})
    world.run("StartUnit", {"name": "prod-web", "unit": "x.service"})


# --- 9. Run takes the capsule's lock and re-checks the owner ------------------------------------


def test_run_waits_for_the_lock_and_refuses_if_the_owner_changed(tmp_path: Path) -> None:
    locks = ObservedLocks()
    world = make_world(tmp_path, locks=locks).standard()

    async def main() -> None:
        locks.arrivals = asyncio.Queue()
        async with locks.hold("alpha"):
            await asyncio.wait_for(locks.arrivals.get(), 1.0)  # our own hold
            run = asyncio.create_task(
                world.call("Run", {"name": "alpha", "command": ["/bin/true"]})
            )
            # Run reached the lock and waits there, having started nothing yet.
            assert await asyncio.wait_for(locks.arrivals.get(), 1.0) == "alpha"
            # Meanwhile alpha was removed and bob created it again.
            world.own("alpha", BOB)
        with pytest.raises(VarlinkError) as refused:
            await asyncio.wait_for(run, 1.0)
        assert isinstance(refused.value, errors.NoSuchCapsule)
        units = world.backend.capsules["alpha"].units
        assert [u for u in units if u.startswith("run-")] == []

    asyncio.run(main())


# --- 13. Run puts only the executable in the unit's Description --------------------------------


def test_run_description_names_the_executable_not_its_arguments() -> None:
    props = dict(messages.transient_service_properties(["/usr/bin/curl", "-u", "me:s3cret"]))
    assert props["Description"] == ("s", "/usr/bin/curl")


# --- 13. A deleted account's uid, reused, does not inherit its capsules ------------------------


def test_a_reused_uid_gets_no_owner_grants(tmp_path: Path) -> None:
    world = make_world(tmp_path).standard()
    # "gone" was made by an account named olduser whose uid (alice's now) was freed and reused.
    world.records.put(new_record("gone", ALICE, "olduser").with_phase(Phase.READY))
    world.backend.add_capsule("gone")
    for method in ("Describe", "Remove", "Start"):
        exc = world.error(method, {"name": "gone"})
        assert isinstance(exc, errors.NoSuchCapsule), method
    capsule = world.run("Describe", {"name": "gone"}, uid=ROOT).reply["capsule"]
    assert isinstance(capsule, dict)
    assert capsule["owner"] is None
    assert "gone" not in [c["name"] for c in items(world.run("List").reply, "capsules")]


# --- 1. Logs shows one incarnation: nothing from before the record was created -----------------


def incarnation_world(tmp_path: Path) -> World:
    """alpha's journal has lines 1..5; the record (this incarnation) was created after line 2,
    so lines 1 and 2 are a previous owner's."""
    world = make_world(tmp_path).standard()
    world.journal.entries = [entry(n) for n in range(1, 6)]
    record = world.records.get("alpha")
    assert record is not None
    world.records.put(dataclasses.replace(record, created_usec=ENTRIES_FROM_USEC + 3))
    return world


def logged(reply: dict[str, object]) -> list[object]:
    return [e["message"] for e in items(reply, "entries")]


def test_logs_do_not_show_a_previous_incarnation(tmp_path: Path) -> None:
    world = incarnation_world(tmp_path)
    assert logged(world.run("Logs", {"name": "alpha"}).reply) == ["line 3", "line 4", "line 5"]
    # An earlier `since` does not reach back either.
    assert logged(world.run("Logs", {"name": "alpha", "since": 0}).reply)[0] == "line 3"
    # Root reads every incarnation, as journalctl -u does.
    assert len(logged(world.run("Logs", {"name": "alpha"}, uid=ROOT).reply)) == 5


# --- 2. Streams end when the grant they were authorized for changes ----------------------------


async def next_or_end(s: Stream) -> dict[str, object] | BaseException:
    """The stream's next reply, or how the call ended (its error), whichever comes first."""
    getter = asyncio.ensure_future(s.replies.get())
    done, _ = await asyncio.wait({getter, s.task}, timeout=2.0, return_when="FIRST_COMPLETED")
    if getter in done:
        return getter.result()
    getter.cancel()
    if s.task in done:
        return s.task.exception() or AssertionError(f"ended with {s.task.result()!r}")
    raise AssertionError("neither a reply nor an end in time")


def ended_with(outcome: object, reason: str) -> bool:
    return isinstance(outcome, errors.AccessChanged) and outcome.parameters == {
        "name": "alpha",
        "reason": reason,
    }


def follow_world(tmp_path: Path, policy: PolicyConfig | None = None) -> World:
    world = incarnation_world(tmp_path)
    world.journal.entries = []
    world.journal.new = asyncio.Queue()
    return world


def write_line(world: World, n: int) -> None:
    """alpha's capsule logs line n (the fake journal's followers get it)."""
    assert world.journal.new is not None
    world.journal.new.put_nowait(entry(n))


async def following(world: World, uid: int) -> Stream:
    """A follower of alpha's log as `uid`, once it has relayed a line written after it began."""
    s = Stream(world, "Logs", {"name": "alpha", "follow": True}, uid)
    write_line(world, 10)
    assert logged(await s.next()) == ["line 10"]
    return s


def test_a_follower_ends_when_the_capsule_is_removed(tmp_path: Path) -> None:
    world = follow_world(tmp_path)

    async def main() -> None:
        s = await following(world, ALICE)
        await world.call("Remove", {"name": "alpha"}, uid=ROOT)
        assert ended_with(await next_or_end(s), "removed")

    asyncio.run(main())


def test_a_follower_ends_when_the_record_is_replaced(tmp_path: Path) -> None:
    world = follow_world(tmp_path)

    async def main() -> None:
        s = await following(world, ALICE)
        # alpha removed and created again by bob (here: his record, as Create writes it), and
        # his capsule logs a line: alice's follower must not get it.
        world.own("alpha", BOB)
        world.services.grants.changed("alpha")
        write_line(world, 11)
        assert ended_with(await next_or_end(s), "replaced")

    asyncio.run(main())


def test_a_follower_ends_when_a_policy_reload_withdraws_the_grant(tmp_path: Path) -> None:
    world = follow_world(tmp_path)
    reader = Rule(Decision.YES, who=BOB_ONLY, actions=frozenset({act.READ}))
    world.services.authorizer = authorizer_for(config(rules=[reader]))

    async def main() -> None:
        s = await following(world, BOB)
        world.services.authorizer = authorizer_for(config())  # the rule is gone
        world.services.grants.reloaded()
        assert ended_with(await next_or_end(s), "access-withdrawn")

    asyncio.run(main())


def test_a_follower_ends_soon_after_its_owner_leaves_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nobody tells capsuled about NSS changes: the periodic re-check finds them.
    monkeypatch.setattr(streams, "STREAM_RECHECK_S", 0.01)
    world = follow_world(tmp_path)

    async def main() -> None:
        s = await following(world, ALICE)
        outside = {**USERS, ALICE: ("alice", frozenset({"alice"}))}
        world.services.authorizer = authorizer_for(config(), users=outside)
        assert ended_with(await next_or_end(s), "access-withdrawn")

    asyncio.run(main())


def test_roots_follower_outlives_a_new_incarnation(tmp_path: Path) -> None:
    world = follow_world(tmp_path)

    async def main() -> None:
        s = Stream(world, "Logs", {"name": "alpha", "follow": True}, ROOT)
        world.own("alpha", BOB)
        world.services.grants.changed("alpha")
        write_line(world, 11)
        assert logged(await s.next()) == ["line 11"]
        await s.close()

    asyncio.run(main())


def test_a_named_watch_ends_when_the_capsule_is_removed(tmp_path: Path) -> None:
    world = make_world(tmp_path).standard()

    async def main() -> None:
        s = Stream(world, "Watch", {"names": ["alpha"]}, ALICE)
        assert capsule_event(await s.next())[:2] == ("alpha", "active")
        await world.call("Remove", {"name": "alpha"}, uid=ROOT)
        # Whatever alpha's removal sent before the record went, then the end.
        outcome = await next_or_end(s)
        while isinstance(outcome, dict):
            event = outcome["event"]
            assert isinstance(event, dict)
            assert event["state"] in ("deactivating", "inactive"), event
            outcome = await next_or_end(s)
        assert ended_with(outcome, "removed")

    asyncio.run(main())


def test_a_watch_drops_unit_events_of_another_incarnation(tmp_path: Path) -> None:
    world = make_world(tmp_path).standard()
    world.services.authorizer = authorizer_for(
        config(rules=[Rule(Decision.YES, who=BOB_ONLY, actions=frozenset({act.READ}))])
    )

    async def main() -> None:
        s = Stream(world, "Watch", {"names": ["alpha"]}, BOB)  # bob may read every capsule
        assert capsule_event(await s.next())[:2] == ("alpha", "active")
        event = (await s.next())["event"]  # web.service, as the unit watch found it
        assert isinstance(event, dict)
        assert event["kind"] == "unit"
        world.own("alpha", ALICE)  # replaced (here: by hand), still readable by bob
        world.services.grants.changed("alpha")
        await world.call("StartUnit", {"name": "alpha", "unit": "web.service"}, uid=ROOT)
        assert ended_with(await next_or_end(s), "replaced")

    asyncio.run(main())


# --- 10. Terminal escapes: capsulectl escapes control characters; bad unit names are dropped ---

OSC52 = "\x1b]52;c;cm0gLXJmIH4=\x07"  # sets the terminal's clipboard
CLEAR = "\x1b[2J\x1b[H"  # clears the screen


def test_log_lines_come_out_escaped() -> None:
    log: wire.LogEntry = {
        "timestamp": ENTRIES_FROM_USEC,
        "cursor": "c",
        "unit": "web.service",
        "priority": 6,
        "identifier": "web\x1b[1m",
        "pid": 7,
        "message": f"hello{OSC52}{CLEAR}\nfake-host sshd[1]: forged line",
    }
    line = output.log_line(log, output.Style(colour=False))
    assert "\x1b" not in line
    assert "\x07" not in line
    assert "\n" not in line
    assert "hello\\x1b]52;c;cm0gLXJmIH4=\\a\\x1b[2J\\x1b[H\\nfake-host" in line
    assert "web\\x1b[1m[7]:" in line


def test_tables_status_events_and_errors_come_out_escaped() -> None:
    unit: wire.Unit = {
        "name": "web.service",
        "description": f"web{CLEAR}",
        "loadState": "loaded",
        "activeState": "active",
        "subState": "running\u202e",
        "enabled": True,
        "hasFile": True,
    }
    shown = "\n".join(output.unit_table([unit]))
    assert "\x1b" not in shown
    assert "\u202e" not in shown
    assert "web\\x1b[2J\\x1b[H" in shown
    assert "running\\u202e" in shown
    event: wire.Event = {
        "kind": "unit",
        "capsule": "alpha",
        "unit": f"x{OSC52}.service",
        "state": "active",
        "subState": "running",
        "timestamp": ENTRIES_FROM_USEC,
    }
    assert "\x1b" not in output.event_line(event, output.Style(colour=False))
    refused = errors.InvalidUnit(unit="x.service", reason=f"bad{CLEAR}", line=3)
    text, _ = explain_error(refused, "install a unit")
    assert "\x1b" not in text
    assert "bad\\x1b[2J" in text


def test_colour_is_not_escaped() -> None:
    log: wire.LogEntry = {
        "timestamp": ENTRIES_FROM_USEC,
        "cursor": "c",
        "unit": None,
        "priority": 3,
        "identifier": "web",
        "pid": None,
        "message": "boom",
    }
    assert "\x1b[1;31mboom\x1b[0m" in output.log_line(log, output.Style(colour=True))


class ScriptedLink:
    """The capsule manager's side of a private link, answering ListUnits and ListUnitFiles."""

    def __init__(self, units: list[str], files: list[str]) -> None:
        self._units = units
        self._files = files

    async def call(self, msg: Message, **_: object) -> tuple[object, ...]:
        member = msg.header.fields[HeaderFields.member]
        if member == "ListUnits":
            rows = [
                (u, "d", "loaded", "active", "running", "", "/x", 0, "", "/") for u in self._units
            ]
            return (rows,)
        assert member == "ListUnitFiles"
        return (
            [(f"/var/lib/capsules/a/.config/systemd/user/{f}", "enabled") for f in self._files],
        )


def test_unit_names_from_a_capsules_manager_are_checked() -> None:
    bad = f"evil{OSC52}.service"
    link = ScriptedLink(["web.service", bad, "../../x.service"], ["web.service", bad, "t@.service"])
    manager = DBusCapsuleManager(link, "a", 1.0, uid=61184)  # type: ignore[arg-type]  # a scripted stand-in
    names = [u.name for u in asyncio.run(manager.list_units())]
    assert names == ["t@.service", "web.service"]


# --- 5. Refusals are aggregated per uid; documented queries match journald's own fields ---------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_of_refusals_becomes_one_summary_per_action() -> None:
    written: list[dict[str, str]] = []
    clock = Clock()
    log = AuditLog(sink=written.append, clock=clock)
    for n in range(10_000):
        log.record("start", caller_uid=1002, capsule=f"c{n % 3}", result=RESULT_DENIED)
    log.record("remove", caller_uid=1002, capsule="c0", result=errors.NoSuchCapsule.name)
    # Another uid's refusals and everybody's real records are not held back by 1002's flood.
    log.record("start", caller_uid=1001, capsule="x", result=RESULT_DENIED)
    log.record("start", caller_uid=1000, capsule="web", result="ok")
    assert len(written) == audit.REFUSALS_RECORDED_PER_WINDOW + 2
    clock.now += audit.REFUSAL_WINDOW_S
    assert log.flush_refusals() == 2
    summaries = {r["CAPSULED_ACTION"]: r for r in written[-2:]}
    start = summaries["start"]
    assert start["CAPSULED_REFUSALS"] == str(10_000 - audit.REFUSALS_RECORDED_PER_WINDOW)
    assert start["CAPSULED_RESULT"] == "refused"
    assert start["CAPSULED_CALLER_UID"] == "1002"
    assert start["CAPSULED_CAPSULES"] == "c0,c1,c2"
    assert (
        start["MESSAGE"]
        == f"{start['CAPSULED_REFUSALS']} refusals of start by uid 1002 in the last 60 s"
    )
    assert summaries["remove"]["CAPSULED_REFUSALS"] == "1"
    # Summaries are part of the chain like any record.
    assert verify_chain(written) is None


def test_summaries_are_written_at_exit_too() -> None:
    written: list[dict[str, str]] = []
    log = AuditLog(sink=written.append, clock=Clock())
    for _ in range(audit.REFUSALS_RECORDED_PER_WINDOW + 5):
        log.record("run", caller_uid=7, capsule="a", result=RESULT_DENIED)
    assert log.flush_refusals() == 0  # the window has not ended
    assert log.flush_refusals(everything=True) == 1
    assert written[-1]["CAPSULED_REFUSALS"] == "5"


def journal_queries(text: str) -> list[str]:
    """Every journalctl command line in a document: code spans (which may wrap) and
    indented lines (literal blocks, docstring examples)."""
    spans = [" ".join(q.split()) for q in re.findall(r"`(journalctl [^`]*)`", text)]
    return spans + re.findall(r"^\s+(journalctl .*)$", text, re.MULTILINE)


def test_every_documented_query_of_audit_records_matches_journalds_own_fields() -> None:
    documents = [
        CHECKOUT / "README.md",
        *(CHECKOUT / "docs").glob("*.md"),
        *(CHECKOUT / "man").glob("*.rst"),
        CHECKOUT / "helper" / "capsuled" / "audit.py",
        CHECKOUT / "config" / "capsuled.toml",
    ]
    checked = 0
    for path in documents:
        for query in journal_queries(path.read_text(encoding="utf-8")):
            if "CAPSULED_" in query or "MESSAGE_ID=" in query:
                checked += 1
                assert audit.TRUSTED_MATCH in query, f"{path.name}: {query}"
    assert checked >= 2


# --- 11. Remove undoes only what capsuled wrote; Create adopts an admin's config, saying so ---


@pytest.fixture
def host_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """/etc/systemd/system and /etc/systemd/system.control under tmp_path."""
    system, control = tmp_path / "system", tmp_path / "system.control"
    monkeypatch.setattr(hostfs, "SYSTEM_CONFIG_DIR", str(system))
    monkeypatch.setattr(hostfs, "SYSTEM_CONTROL_DIR", str(control))
    monkeypatch.setattr(hostfs, "RUNTIME_CONFIG_DIR", str(tmp_path / "run-system"))
    for d in (system / "capsule@web.service.d", control / "capsule@web.service.d"):
        d.mkdir(parents=True)
    (system / "capsule@web.service.d" / "10-admin.conf").write_text("[Service]\nCPUQuota=20%\n")
    for dropin in ("50-MemoryMax.conf", "50-TasksMax.conf"):  # what SetLimits made
        (control / "capsule@web.service.d" / dropin).write_text("[Service]\nX=1\n")
    # An administrator's own `systemctl set-property capsule@web.service IOWeight=10`.
    (control / "capsule@web.service.d" / "50-IOWeight.conf").write_text("[Service]\nX=1\n")
    return system, control


class RevertWatchingBus:
    """The system bus as forget() sees it: records members, answers every call."""

    def __init__(self) -> None:
        self.members: list[str] = []

    async def call(self, msg: Message, *, unit: str = "") -> tuple[object, ...]:
        self.members.append(str(msg.header.fields[HeaderFields.member]))
        return ([],)


def test_forget_removes_only_capsuleds_own_dropins(
    host_config: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    system, control = host_config
    bus = RevertWatchingBus()
    sd = backend.DBusSystemdBackend()
    monkeypatch.setattr(sd, "_bus", lambda: asyncio.sleep(0, bus))
    asyncio.run(sd.forget("web"))
    assert "RevertUnitFiles" not in bus.members  # it would delete the admin's drop-ins too
    assert (system / "capsule@web.service.d" / "10-admin.conf").is_file()
    assert sorted(os.listdir(control / "capsule@web.service.d")) == ["50-IOWeight.conf"]
    assert bus.members == ["DisableUnitFilesWithFlags", "Reload"]


def test_admin_config_lists_what_an_administrator_staged(host_config: tuple[Path, Path]) -> None:
    system, _ = host_config
    assert hostfs.admin_config("web") == [str(system / "capsule@web.service.d" / "10-admin.conf")]
    assert hostfs.admin_config("other") == []


def test_create_adopts_an_admins_config_and_says_so(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    staged = "/etc/systemd/system/capsule@web.service.d/10-admin.conf"
    world.backend.admin_configs["web"] = [staged]
    world.run("Create", {"name": "web"})
    (record,) = world.audit_for("create")
    assert record["CAPSULED_RESULT"] == "ok"
    assert record["CAPSULED_ADMIN_CONFIG"] == staged


# --- 13. polkit: no authorization is kept across capsules --------------------------------------


def test_no_polkit_default_keeps_an_authorization() -> None:
    # polkit keys a kept authorization by (subject, action id): details such as the capsule are
    # not part of it, so auth_admin_keep for run on one capsule would be run on all.
    root = ET.parse(CHECKOUT / "polkit" / "org.capsuled.policy").getroot()
    results = {
        (action.attrib["id"], d.tag): d.text
        for action in root.iter("action")
        for d in action.iter()
        if d.tag.startswith("allow_")
    }
    assert len(results) == 3 * len(act.ALL)
    assert {k: v for k, v in results.items() if v is None or v.endswith("_keep")} == {}


# --- 13. capsuled install points the unit only at a capsuled nobody but root can replace -------


def fake_tree(modes: dict[str, tuple[int, int, int]]) -> Callable[[str], os.stat_result]:
    """lstat over a made-up tree: path -> (uid, gid, st_mode)."""

    def lstat(path: str) -> os.stat_result:
        uid, gid, mode = modes[path]
        return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))

    return lstat


SAFE_TREE = {
    "/": (0, 0, stat.S_IFDIR | 0o755),
    "/usr": (0, 0, stat.S_IFDIR | 0o755),
    "/usr/local": (0, 0, stat.S_IFDIR | 0o755),
    "/usr/local/bin": (0, 0, stat.S_IFDIR | 0o755),
    "/usr/local/bin/capsuled": (0, 0, stat.S_IFREG | 0o755),
}


@pytest.mark.parametrize(
    ("path", "change", "problem"),
    [
        ("/usr/local/bin", (0, 50, stat.S_IFDIR | 0o775), "/usr/local/bin is writable by others"),
        ("/usr/local", (0, 0, stat.S_IFDIR | 0o777), "/usr/local is writable by others"),
        ("/usr/local/bin/capsuled", (1000, 0, stat.S_IFREG | 0o755), "owned by uid 1000"),
        ("/usr/local/bin/capsuled", (0, 0, stat.S_IFREG | 0o757), "capsuled is writable by"),
    ],
)
def test_install_refuses_a_capsuled_others_could_replace(
    path: str, change: tuple[int, int, int], problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os.path, "realpath", lambda p: p)
    assert (
        installer.executable_problem("/usr/local/bin/capsuled", lstat=fake_tree(SAFE_TREE)) is None
    )
    tree = SAFE_TREE | {path: change}
    found = installer.executable_problem("/usr/local/bin/capsuled", lstat=fake_tree(tree))
    assert found is not None
    assert problem in found


def test_install_checks_where_a_symlink_leads(monkeypatch: pytest.MonkeyPatch) -> None:
    tree = SAFE_TREE | {
        "/usr/local/bin/capsuled": (0, 0, stat.S_IFLNK | 0o777),
        "/home": (0, 0, stat.S_IFDIR | 0o755),
        "/home/alice": (1000, 1000, stat.S_IFDIR | 0o755),
        "/home/alice/capsuled": (1000, 1000, stat.S_IFREG | 0o755),
    }
    monkeypatch.setattr(os.path, "realpath", lambda p: "/home/alice/capsuled")
    found = installer.executable_problem("/usr/local/bin/capsuled", lstat=fake_tree(tree))
    assert found == "/home/alice is owned by uid 1000, not root"


def test_live_install_refuses_an_unsafe_capsuled(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = tmp_path / "capsuled"  # under /tmp: sticky, but writable by everybody
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(installer, "_systemd_version", lambda: 257)
    monkeypatch.setattr(installer, "_booted", lambda: True)
    monkeypatch.setattr(installer, "packaged_problem", lambda root: None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    written: list[object] = []
    monkeypatch.setattr(installer, "install_files", lambda *a, **k: written.append(a))
    monkeypatch.setattr(installer, "_activate", lambda *a, **k: written.append(a))
    assert installer.main_install(["--bindir", str(tmp_path)]) == 1
    assert "will not point capsuled.service at it" in capsys.readouterr().err
    assert written == []


def test_a_named_watch_ends_when_a_policy_reload_withdraws_the_grant(tmp_path: Path) -> None:
    world = make_world(tmp_path).standard()
    reader = Rule(Decision.YES, who=BOB_ONLY, actions=frozenset({act.READ}))
    world.services.authorizer = authorizer_for(config(rules=[reader]))

    async def main() -> None:
        s = Stream(world, "Watch", {"names": ["alpha"]}, BOB)
        assert capsule_event(await s.next())[:2] == ("alpha", "active")
        world.services.authorizer = authorizer_for(config())  # the rule is gone
        world.services.grants.reloaded()
        outcome = await next_or_end(s)
        while isinstance(outcome, dict):  # unit events already on their way
            outcome = await next_or_end(s)
        assert ended_with(outcome, "access-withdrawn")

    asyncio.run(main())


def test_grant_subscriptions_stay_bounded() -> None:
    changes = GrantChanges()
    with changes.subscribe(None) as subscription:
        for n in range(GrantSubscription.MAX_NAMES + 10):
            changes.changed(f"c{n}")
        assert subscription.take() == (frozenset(), True)  # too many: "everything changed"
        changes.changed("one")
        assert subscription.take() == (frozenset({"one"}), False)
    assert len(changes) == 0
