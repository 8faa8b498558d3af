"""A whole org.capsuled.Manager service in memory, for the method tests.

`World` wires the real handlers (capsuled.methods.build_dispatcher, with validate_replies=True so
every reply and error is checked against the IDL) to a FakeBackend that logs every call it gets,
a FakeJournal serving a list (injected as Services.journal, like the backend),
a builtin-policy Authorizer over a fixed user directory, a RecordStore and capsule homes under a
temporary directory, and an AuditLog whose sink appends to a list. Calls go through
`Dispatcher.handle`, as the transport makes them: IDL validation included.

Users: root (0); alice and bob, members of group `capsule` (owner grants, may create); mallory,
not a member. The standard capsules: `alpha` (alice's, running, unit web.service on disk and in
its manager), `beta` (bob's, stopped, with a home), `orphan` (made outside capsuled: no record).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from capsuled import journal
from capsuled.audit import AuditLog
from capsuled.deployments import DeploymentStore
from capsuled.dispatch import Dispatcher
from capsuled.methods import build_dispatcher
from capsuled.methods.context import LOCK_WAIT_S, CallContext, CapsuleLocks, Services
from capsuled.peer import Peer
from capsuled.policy import actions as act
from capsuled.policy.authorizer import Authorizer
from capsuled.policy.builtin import BuiltinBackend
from capsuled.policy.engine import Decision, Identity, PolicyConfig, Quota, Rule
from capsuled.policy.signers import TrustedKeys
from capsuled.records import Phase, Record, RecordStore, new_record
from capsuled.safefs import CapsuleHomes
from capsuled.trail import Trail
from capsuled.varlink.errors import VarlinkError
from capsuled.varlink.interface import Interface, parse_interface
from capsuled.varlink.messages import Call
from capsuled.varlink.service import ServiceInfo
from doubles.backend import FakeBackend

IDL_PATH = (
    Path(__file__).resolve().parents[2] / "helper" / "capsuled" / "org.capsuled.Manager.varlink"
)
INTERFACE = "org.capsuled.Manager"

ROOT, ALICE, BOB, MALLORY = 0, 1000, 1001, 1002
USERS: Mapping[int, tuple[str, frozenset[str]]] = {
    ROOT: ("root", frozenset({"root"})),
    ALICE: ("alice", frozenset({"alice", "capsule"})),
    BOB: ("bob", frozenset({"bob", "capsule"})),
    MALLORY: ("mallory", frozenset({"mallory"})),
}
NOBODY = 65534  # owner of a capsule's files on disk with systemd >= 257
UNIT_DIR = (".config", "systemd", "user")
WANTS_DIR = (*UNIT_DIR, "capsule@.target.wants")
GOOD_UNIT = "[Unit]\nDescription=web\n\n[Service]\nExecStart=/bin/sleep infinity\n"

# Every method of the SystemdBackend Protocol: SpyBackend logs each one it is asked for.
BACKEND_METHODS = frozenset(
    {
        "version",
        "check_version",
        "list_capsules",
        "capsule_info",
        "start",
        "stop",
        "restart",
        "clean",
        "set_autostart",
        "set_limits",
        "forget",
        "reset_failed",
        "capsule_manager",
        "watch",
    }
)


def load_interface() -> Interface:
    return parse_interface(IDL_PATH.read_text(encoding="utf-8"))


def config(
    *,
    default: Decision = Decision.NO,
    rules: Iterable[Rule] = (),
    quota: Quota | None = None,
) -> PolicyConfig:
    """The builtin policy the tests run under: owner grants and creator group as shipped."""
    return PolicyConfig(
        backend="builtin",
        defaults=MappingProxyType(dict.fromkeys(act.ALL, default)),
        rules=tuple(rules),
        quota=quota if quota is not None else Quota(8, None, None, None),
    )


def lookup(uid: int) -> Identity:
    name, groups = USERS.get(uid, (None, frozenset()))
    return Identity(uid, name, groups)


def peer(uid: int, unit: str | None = None) -> Peer:
    return Peer(uid=uid, gid=uid, pid=os.getpid(), pidfd=None, unit=unit)


class SpyBackend(FakeBackend):
    """FakeBackend that also logs every Protocol method asked for (reads too), in order."""

    def __init__(self, version_value: int = 257) -> None:
        super().__init__(version_value)
        self.seen: list[str] = []

    def __getattribute__(self, attr: str) -> object:
        if attr in BACKEND_METHODS:
            object.__getattribute__(self, "seen").append(attr)
        return object.__getattribute__(self, attr)

    def forget_seen(self) -> None:
        self.seen.clear()
        self.calls.clear()
        self.manager_calls.clear()


@dataclass
class Outcome:
    """What one call answered: the `continues` replies (notify) and the final reply."""

    replies: list[dict[str, object]]
    reply: dict[str, object]


@dataclass
class World:
    root: Path
    backend: SpyBackend
    journal: FakeJournal
    authorizer: Authorizer
    records: RecordStore
    audit_records: list[dict[str, str]]
    services: Services
    dispatcher: Dispatcher[CallContext]
    capsules_root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.capsules_root = Path(self.services.homes.root)

    # -- calls -------------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        params: dict[str, object] | None = None,
        *,
        uid: int = ALICE,
        more: bool = False,
        unit: str | None = None,
    ) -> Outcome:
        """One call through the Dispatcher; an error reply is raised as its VarlinkError.

        `unit`: the system unit the calling process runs in (Peer.unit)."""
        replies: list[dict[str, object]] = []

        async def notify(reply: dict[str, object]) -> None:
            replies.append(reply)

        call = Call(f"{INTERFACE}.{method}", dict(params or {}), more=more)
        reply = await self.dispatcher.handle(call, peer(uid, unit), notify)
        return Outcome(replies, reply)

    async def failure(
        self,
        method: str,
        params: dict[str, object] | None = None,
        *,
        uid: int = ALICE,
        more: bool = False,
        unit: str | None = None,
    ) -> VarlinkError:
        """The error reply of a call that must fail."""
        try:
            outcome = await self.call(method, params, uid=uid, more=more, unit=unit)
        except VarlinkError as exc:
            return exc
        raise AssertionError(f"{method} by uid {uid} succeeded: {outcome}")

    def run(
        self,
        method: str,
        params: dict[str, object] | None = None,
        *,
        uid: int = ALICE,
        more: bool = False,
        unit: str | None = None,
    ) -> Outcome:
        return asyncio.run(self.call(method, params, uid=uid, more=more, unit=unit))

    def error(
        self,
        method: str,
        params: dict[str, object] | None = None,
        *,
        uid: int = ALICE,
        more: bool = False,
        unit: str | None = None,
    ) -> VarlinkError:
        return asyncio.run(self.failure(method, params, uid=uid, more=more, unit=unit))

    # -- state -------------------------------------------------------------------------------

    def own(self, name: str, uid: int, phase: Phase = Phase.READY) -> Record:
        record = new_record(name, uid, USERS[uid][0] if uid in USERS else None).with_phase(phase)
        self.records.put(record)
        return record

    def home(self, name: str) -> Path:
        return self.capsules_root / name

    def make_home(self, name: str, units: Mapping[str, str] = MappingProxyType({})) -> Path:
        """A capsule home on disk as systemd 257 leaves it: everything owned by nobody."""
        home = self.home(name)
        unit_dir = home.joinpath(*UNIT_DIR)
        unit_dir.mkdir(parents=True, exist_ok=True)
        for unit, text in units.items():
            (unit_dir / unit).write_text(text)
        for path in [home, *home.rglob("*")]:
            os.lchown(path, NOBODY, NOBODY)
        return home

    def unit_file(self, name: str, unit: str) -> Path:
        return self.home(name).joinpath(*UNIT_DIR, unit)

    def wants_link(self, name: str, unit: str) -> Path:
        return self.home(name).joinpath(*WANTS_DIR, unit)

    def audit_for(self, action: str | None = None) -> list[dict[str, str]]:
        return [r for r in self.audit_records if action is None or r["CAPSULED_ACTION"] == action]

    def forget_history(self) -> None:
        """Start a test's observations from here: no backend calls, no audit records seen."""
        self.backend.forget_seen()
        self.audit_records.clear()

    def standard(self) -> World:
        """alpha (alice's, running, web.service), beta (bob's, stopped), orphan (no record)."""
        self.own("alpha", ALICE)
        self.make_home("alpha", {"web.service": GOOD_UNIT})
        self.backend.add_capsule("alpha")
        self.backend.add_unit("alpha", "web.service")
        asyncio.run(self.backend.start("alpha"))
        self.own("beta", BOB)
        self.make_home("beta")
        self.backend.add_capsule("beta")
        self.make_home("orphan")
        self.backend.add_capsule("orphan")
        self.forget_history()
        return self


def make_world(
    tmp_path: Path,
    *,
    policy: PolicyConfig | None = None,
    version: int = 257,
    locks: CapsuleLocks | None = None,
    trusted_keys: TrustedKeys | None = None,
) -> World:
    policy = policy if policy is not None else config()
    backend = SpyBackend(version)
    authorizer = Authorizer(
        policy,
        BuiltinBackend(policy),
        lookup=lookup,
        is_alive=lambda _subject: True,
        trusted_keys=trusted_keys,
    )
    records = RecordStore(tmp_path / "state")
    audit_records: list[dict[str, str]] = []
    capsules_root = tmp_path / "capsules"
    capsules_root.mkdir()
    fake_journal = FakeJournal()
    state = tmp_path / "state"
    trail = Trail(
        tmp_path / "log",
        key_path=state / "audit-signing.key",
        head_path=state / "audit-head.json",
    )
    services = Services(
        backend=backend,
        journal=fake_journal,
        authorizer=authorizer,
        records=records,
        audit=AuditLog(sink=audit_records.append, trail=trail),
        version="0-test",
        homes=CapsuleHomes(str(capsules_root)),
        deployments=DeploymentStore(state),
    )
    if locks is not None:
        services.locks = locks
    dispatcher = build_dispatcher(
        load_interface(),
        services,
        ServiceInfo(vendor="capsuled", product="capsuled", version="0-test", url="https://x"),
        validate_replies=True,
    )
    return World(
        tmp_path, backend, fake_journal, authorizer, records, audit_records, services, dispatcher
    )


class ObservedLocks(CapsuleLocks):
    """CapsuleLocks that report each caller arriving at a capsule's lock (before it waits)."""

    def __init__(self, wait_s: float = LOCK_WAIT_S) -> None:
        super().__init__(wait_s)
        self.arrivals: asyncio.Queue[str] | None = None

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        if self.arrivals is not None:
            self.arrivals.put_nowait(name)
        async with super().hold(name):
            yield


# -- journal stand-ins for Logs --------------------------------------------------------------


# Journal entries of the tests are written from here on (entry(n) at ENTRIES_FROM_USEC + n).
ENTRIES_FROM_USEC = 1_700_000_000_000_000


def entry(n: int, unit: str | None = "web.service") -> journal.Entry:
    return journal.Entry(
        timestamp_usec=ENTRIES_FROM_USEC + n,
        cursor=f"s=1;i={n}",
        unit=unit,
        priority=6,
        identifier="web",
        pid=100 + n,
        message=f"line {n}",
    )


@dataclass
class FakeJournal:
    """capsuled.journal.Journal over a list; `asked` and `followers` log each read's arguments."""

    entries: list[journal.Entry] = field(default_factory=list)
    new: asyncio.Queue[journal.Entry] | None = None
    asked: list[dict[str, object]] = field(default_factory=list)
    followers: list[dict[str, object]] = field(default_factory=list)

    async def tail(
        self, capsule: str, *, unit: str | None, lines: int, since_usec: int | None
    ) -> list[journal.Entry]:
        self.asked.append({"capsule": capsule, "unit": unit, "lines": lines, "since": since_usec})
        # Like read_tail: walking back from the newest, the first entry older than since ends it.
        newest_first: list[journal.Entry] = []
        for e in reversed(self.entries):
            if len(newest_first) >= lines or (
                since_usec is not None and e.timestamp_usec < since_usec
            ):
                break
            newest_first.append(e)
        return newest_first[::-1]

    def follow(
        self,
        capsule: str,
        *,
        unit: str | None,
        after_cursor: str | None,
        since_usec: int | None,
    ) -> _FakeFollower:
        self.followers.append(
            {"capsule": capsule, "unit": unit, "after": after_cursor, "since": since_usec}
        )
        assert self.new is not None, "set FakeJournal.new before following"
        return _FakeFollower(self.new)


class _FakeFollower:
    def __init__(self, queue: asyncio.Queue[journal.Entry]) -> None:
        self._queue = queue

    async def __aenter__(self) -> _FakeFollower:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> _FakeFollower:
        return self

    async def __anext__(self) -> journal.Entry:
        return await self._queue.get()


def params_for(method: str, name: str) -> dict[str, object]:
    """Minimal valid parameters of a method about capsule `name` (unit web.service for units)."""
    unit: dict[str, object] = {"name": name, "unit": "web.service"}
    table: dict[str, dict[str, object]] = {
        "Describe": {"name": name},
        "Create": {"name": name},
        "Start": {"name": name},
        "Stop": {"name": name},
        "Restart": {"name": name},
        "Remove": {"name": name},
        "SetAutostart": {"name": name, "enabled": True},
        "SetLimits": {"name": name, "memoryMax": 1 << 30},
        "CheckAccess": {"name": name, "action": "manage", "verb": "start"},
        "ListUnits": {"name": name},
        "InstallUnit": {"name": name, "unit": "new.service", "content": GOOD_UNIT},
        "RemoveUnit": unit,
        "StartUnit": unit,
        "StopUnit": unit,
        "RestartUnit": unit,
        "EnableUnit": unit,
        "DisableUnit": unit,
        "Run": {"name": name, "command": ["/bin/true"]},
        "Logs": {"name": name},
        "Deploy": {"name": name, "bundle": ""},
        "Rollback": {"name": name},
        "Audit": {"name": name},
    }
    return dict(table[method])


# Methods that take one capsule name, and those that mutate something (audited).
NAMED_METHODS = (
    "Describe",
    "Create",
    "Start",
    "Stop",
    "Restart",
    "Remove",
    "SetAutostart",
    "SetLimits",
    "CheckAccess",
    "ListUnits",
    "InstallUnit",
    "RemoveUnit",
    "StartUnit",
    "StopUnit",
    "RestartUnit",
    "EnableUnit",
    "DisableUnit",
    "Run",
    "Logs",
    "Deploy",
    "Rollback",
    "Audit",
)
MUTATING_BACKEND_CALLS = frozenset(
    {"start", "stop", "restart", "clean", "set_autostart", "set_limits", "forget", "reset_failed"}
)


def items(reply: dict[str, object], key: str) -> list[dict[str, object]]:
    """A reply's list of structs (the IDL check already ran; this narrows the type)."""
    value = reply[key]
    assert isinstance(value, list)
    assert all(isinstance(v, dict) for v in value)
    return value
