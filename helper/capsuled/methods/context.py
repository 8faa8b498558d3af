"""What every method handler gets: the caller, the services, and `authorize`.

`CallContext.authorize` is our `bus-polkit.c`: the one line of policy in each
handler. It resolves the capsule's owner from the records, asks the
Authorizer (root short-circuit, owner grants, builtin or polkit, the
interactive flag), and turns a refusal into the right reply - including
NoSuchCapsule for a caller who may not even read the capsule, so that a
refusal never tells whether a capsule exists.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Final

from capsuled import errors
from capsuled.audit import AuditAction, AuditLog
from capsuled.deployments import DeploymentStore
from capsuled.journal import Journal
from capsuled.peer import Peer
from capsuled.policy import actions as act
from capsuled.policy.authorizer import Authorizer, Verdict
from capsuled.policy.engine import Decision, Identity, Request
from capsuled.records import CorruptRecord, Record, RecordStore
from capsuled.safefs import CapsuleHomes
from capsuled.systemd import errors as sd
from capsuled.systemd.backend import CapsuleInfo, SystemdBackend
from capsuled.varlink.errors import PermissionDenied, VarlinkError

Notify = Callable[[dict[str, object]], Awaitable[None]]


# How long a call waits for another call on the same capsule to finish before it is answered
# Busy. A mutating call can hold the lock for as long as its job takes (a capsule that ignores
# SIGTERM holds a Stop for TimeoutStopSec=, 90 s by default); waiting that long in a call slot
# would let one slow capsule pin the slots of everyone calling on it (issue 11, finding 8).
LOCK_WAIT_S = 10.0


class CapsuleLocks:
    """One asyncio.Lock per capsule name: calls on one capsule run one at a time,
    calls on different capsules in parallel. Entries go away when unused, so the
    table is bounded by the calls in flight, not by every name ever asked for.
    A call that cannot have the lock within `wait_s` gets Busy."""

    def __init__(self, wait_s: float = LOCK_WAIT_S) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._wait_s = wait_s

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """Hold NAME's lock for the block.

        Raises:
            Busy: another call held it for longer than `wait_s`.
        """
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(self._wait_s):
                    await lock.acquire()
            except TimeoutError:
                raise errors.Busy() from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class GrantSubscription:
    """What changed for one stream since it last looked: the capsules whose record capsuled
    wrote or deleted, or everything (a policy reload); `woken` is set on each change."""

    # Names kept before a subscription counts as "everything changed" (bounded memory).
    MAX_NAMES = 256

    def __init__(self) -> None:
        self.woken = asyncio.Event()
        self._names: set[str] = set()
        self._everything = False

    def note(self, name: str | None) -> None:
        """Capsule `name` changed (None: every capsule may have)."""
        if name is None or len(self._names) >= self.MAX_NAMES:
            self._everything, self._names = True, set()
        elif not self._everything:
            self._names.add(name)
        self.woken.set()

    def take(self) -> tuple[frozenset[str], bool]:
        """(names changed, whether everything may have) since the last take; clears both."""
        names, everything = frozenset(self._names), self._everything
        self._names, self._everything = set(), False
        self.woken.clear()
        return names, everything


class GrantChanges:
    """Wakes the streams bound to a capsule's grant when it may have changed: capsuled wrote
    or deleted the capsule's record (Create, Remove), or reloaded its policy (every capsule).

    Streams subscribe while they run (bounded by the stream limits); a wake-up only makes each
    re-check its grant (streams.Binding, streams._Watch), it decides nothing itself.
    """

    def __init__(self) -> None:
        self._subscribers: dict[GrantSubscription, str | None] = {}
        # Counts every change: a stream that saw the same generation may trust what it
        # decided since (a synchronous check, so no event slips out after the change).
        self.generation = 0

    def changed(self, name: str) -> None:
        """The record of capsule `name` was written or deleted."""
        self.generation += 1
        for subscription, wanted in self._subscribers.items():
            if wanted is None or wanted == name:
                subscription.note(name)

    def reloaded(self) -> None:
        """The policy was reloaded: every grant may have changed."""
        self.generation += 1
        for subscription in self._subscribers:
            subscription.note(None)

    @contextlib.contextmanager
    def subscribe(self, name: str | None) -> Iterator[GrantSubscription]:
        """Changes of capsule `name` (None: of any capsule) while in the block."""
        subscription = GrantSubscription()
        self._subscribers[subscription] = name
        try:
            yield subscription
        finally:
            del self._subscribers[subscription]

    def __len__(self) -> int:
        return len(self._subscribers)


@dataclass(slots=True)
class Services:
    """The long-lived objects handlers use; built once, in daemon.py."""

    backend: SystemdBackend
    journal: Journal
    authorizer: Authorizer
    records: RecordStore
    audit: AuditLog
    version: str
    homes: CapsuleHomes = field(default_factory=CapsuleHomes)  # under /var/lib/private/capsules
    # What Deploy put into each capsule (under /var/lib/capsuled/bundles).
    deployments: DeploymentStore = field(default_factory=DeploymentStore)
    locks: CapsuleLocks = field(default_factory=CapsuleLocks)
    grants: GrantChanges = field(default_factory=GrantChanges)
    # Logs calls following the journal right now, per caller uid.
    followers: dict[int, int] = field(default_factory=dict)


class Outcome(Enum):
    """What the audit trail has of a call so far; the method table's audit wrapper reads it."""

    OPEN = "open"  # nothing recorded, nothing refused: a failure is recorded by the wrapper
    DENIED = "denied"  # the policy refused it (authorize): the wrapper records "denied"
    RECORDED = "recorded"  # the handler wrote its own record: the wrapper adds none


@dataclass(slots=True)
class _Authorization:
    """What authorize() allowed, so `locked` can tell if the owner changed meanwhile."""

    request: Request
    pinned_owner: bool  # the owner was given by the caller (Create), not read from records


@dataclass(slots=True)
class CallContext:
    peer: Peer
    more: bool
    send_continued: Notify  # the Dispatcher's notify: one reply with continues=true
    services: Services
    outcome: Outcome = Outcome.OPEN  # set only by authorize() and audit(), below
    # Every request authorize() allowed, per capsule: a call may need several (InstallUnit with
    # enable and start), and `locked` decides each again if the owner changed meanwhile.
    _authorized: dict[str, list[_Authorization]] = field(default_factory=dict)
    # Accounts read during one pass (`one_pass`), by uid: one answer for all of a call's
    # decisions, and one look at the Authorizer's account cache. None outside one, so that
    # every other decision asks that cache again (policy/accounts.py: its files' changes at
    # once, anything else within 1 s) and a stream's later re-checks see a group the caller left.
    _identities: dict[int, Identity] | None = None
    _names: dict[int, str | None] | None = None  # the same for user names alone
    # A decision of this pass found the peer alive: the rest of the pass's decisions (a
    # List's rows) do not check it again (one pidfd signal per call, not per row).
    _alive: bool = False

    @property
    def backend(self) -> SystemdBackend:
        return self.services.backend

    @property
    def records(self) -> RecordStore:
        return self.services.records

    async def notify(self, reply: Mapping[str, object]) -> None:
        """Send `reply` with continues=true (the call asked for `more`); waits for the drain."""
        await self.send_continued(dict(reply))

    def one_pass(self) -> contextlib.AbstractContextManager[None]:
        """Read each account from the user database once until the end of the block (one
        call's decisions: an authorize, a Describe, a List's rows). A lookup costs ~0.7 ms
        with nss-systemd (getgrouplist) unless the account cache has it, and even then a few
        stats (policy/accounts.py); a List of 1,000 capsules made 2,000 of them."""
        if self._identities is not None:  # already in one: it lasts as long as the outer
            return _NO_PASS
        return _Pass(self)

    def identity(self, uid: int) -> Identity:
        """The account that is `uid` now (read once per pass, see `one_pass`)."""
        memo = self._identities
        if memo is None:
            return self.services.authorizer.identity(uid)
        found = memo.get(uid)
        if found is None:
            found = memo[uid] = self.services.authorizer.identity(uid)
        return found

    def owner_of(self, record: Record | None) -> int | None:
        """The record's owner for every grant, or None: no record, or its uid now belongs to
        another account than the one that created it (a deleted user's uid, reused)."""
        if record is None:
            return None
        return record.owner if record.is_owner(record.owner, self.user_name(record.owner)) else None

    def user_name(self, uid: int) -> str | None:
        """The user name of `uid` now (its passwd entry alone; once per pass)."""
        memo = self._names
        if memo is None:
            return self.services.authorizer.user_name(uid)
        if uid not in memo:
            if uid == self.peer.uid and uid != 0:
                # The caller's own capsule: the decision reads their whole account anyway
                # (root's needs none), and its name is the same passwd entry's.
                memo[uid] = self.identity(uid).user
            else:
                memo[uid] = self.services.authorizer.user_name(uid)
        return memo[uid]

    def record_of(self, name: str) -> Record | None:
        try:
            return self.services.records.get(name)
        except CorruptRecord:
            # A record we did not write grants nothing: treat the capsule as unowned.
            return None

    async def authorize(
        self,
        action: str,
        name: str,
        *,
        interactive: object = False,  # the call's allowInteractiveAuthentication (absent: None)
        verb: str | None = None,
        unit: str | None = None,
        owner: int | None = None,
        signer: str | None = None,
    ) -> Record | None:
        """Allow the call or raise its refusal; returns the capsule's record.

        The one place a policy refusal becomes a wire error.

        Raises:
            NoSuchCapsule: the caller may not read the capsule (whether or not it exists).
            PermissionDenied, InteractiveAuthenticationRequired: it may read it, not do this.
        """
        pinned = owner is not None
        record = self.record_of(name)
        with self.one_pass():
            if owner is None:
                owner = self.owner_of(record)
            request = Request(
                action, name, owner, verb, unit, signer=signer, allow_interactive=bool(interactive)
            )
            await self._require(request)
        self._authorized.setdefault(name, []).append(_Authorization(request, pinned))
        return record

    async def _decide(self, request: Request) -> Verdict:
        verdict = await self.services.authorizer.decide(
            self.peer, request, lookup=self.identity, known_alive=self._alive
        )
        self._note_alive(verdict)
        return verdict

    def _note_alive(self, verdict: Verdict) -> None:
        if self._identities is not None and verdict.step != "peer-gone":
            self._alive = True  # the check ran (or was not needed: root) within this pass

    async def _require(self, request: Request) -> None:
        verdict = await self._decide(request)
        if verdict.decision is Decision.YES:
            return
        self.outcome = Outcome.DENIED
        # A refused read is the answer to may_read already: asking it again would only double
        # every refusal's cost in polkitd (issue 11, finding 8).
        if request.action == act.READ or (
            request.action != act.CREATE and not await self.may_read(request.capsule, request.owner)
        ):
            raise errors.NoSuchCapsule(name=request.capsule)
        if verdict.decision is Decision.AUTH_ADMIN:
            raise errors.InteractiveAuthenticationRequired()
        raise PermissionDenied()

    @contextlib.asynccontextmanager
    async def locked(self, name: str) -> AsyncIterator[None]:
        """Hold the capsule's lock; if its owner changed while we waited for it (removed and
        created again by someone else), decide again before anything happens."""
        async with self.services.locks.hold(name):
            allowed = self._authorized.get(name, [])
            owner = self.owner_of(self.record_of(name))
            for index, grant in enumerate(allowed):
                if not grant.pinned_owner and owner != grant.request.owner:
                    request = replace(grant.request, owner=owner)
                    await self._require(request)
                    allowed[index] = _Authorization(request, False)
            yield

    def authorized(self, name: str) -> Request | None:
        """The last request authorize() allowed on capsule `name` in this call, if any."""
        allowed = self._authorized.get(name)
        return allowed[-1].request if allowed else None

    async def require_systemd(self) -> None:
        """Refuse clearly on a PID 1 without capsules (SystemdTooOld), before any effect."""
        with backend_errors(""):
            await self.backend.check_version()

    async def existing(self, name: str, record: Record | None) -> CapsuleInfo | None:
        """systemd's view of the capsule; NoSuchCapsule if neither systemd nor we know it."""
        try:
            info = await self.backend.capsule_info(name)
        except sd.BackendError as exc:  # as backend_errors(name), without a block per Describe
            raise backend_error(exc, name) from exc
        if info is None and record is None:
            raise errors.NoSuchCapsule(name=name)
        return info

    async def may_read_many(self, rows: Sequence[tuple[str, int | None]]) -> list[bool]:
        """`may_read` for each (capsule, owner) of a List, decided together (within a pass:
        the engine's rows at once, polkit's in flight together; Authorizer.decide_many)."""
        requests = [Request(act.READ, name, owner) for name, owner in rows]
        verdicts = await self.services.authorizer.decide_many(
            self.peer, requests, lookup=self.identity, known_alive=self._alive
        )
        if verdicts:
            self._note_alive(verdicts[0])
        return [v.decision is Decision.YES for v in verdicts]

    async def may_read(self, name: str, owner: int | None) -> bool:
        """Whether the caller may read the capsule (never interactive: nobody is asked)."""
        verdict = await self._decide(Request(act.READ, name, owner))
        return verdict.decision is Decision.YES

    def audit(
        self, action: AuditAction, name: str | None, result: str, **fields: str | int | None
    ) -> None:
        self.outcome = Outcome.RECORDED
        self.services.audit.record(
            action,
            caller_uid=self.peer.uid,
            caller_pid=self.peer.pid,
            caller_unit=self.peer.unit,
            capsule=name,
            result=result,
            **fields,
        )


class _Pass:
    """CallContext.one_pass's block (a class, not a generator: every Describe enters two)."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: CallContext) -> None:
        self._ctx = ctx

    def __enter__(self) -> None:
        self._ctx._identities, self._ctx._names = {}, {}

    def __exit__(self, *exc: object) -> None:
        ctx = self._ctx
        ctx._identities = ctx._names = None
        ctx._alive = False


_NO_PASS: Final = contextlib.nullcontext()  # inside a pass already: the outer one lasts


def _capsule_running(exc: sd.BackendError, name: str) -> VarlinkError:
    return errors.CapsuleRunning(name=name)


def _capsule_not_running(exc: sd.BackendError, name: str) -> VarlinkError:
    return errors.CapsuleNotRunning(name=name)


def _too_old(exc: sd.BackendError, name: str) -> VarlinkError:
    assert isinstance(exc, sd.SystemdTooOld)  # the table's key says so
    return errors.SystemdTooOld(version=exc.version)


def _job_failed(exc: sd.BackendError, name: str) -> VarlinkError:
    assert isinstance(exc, sd.JobFailed)  # the table's key says so
    return errors.JobFailed(result=exc.result, unitResult=exc.unit_result)


def _invalid_value(exc: sd.BackendError, name: str) -> VarlinkError:
    assert isinstance(exc, sd.InvalidArgument)  # the table's key says so
    # systemd refused a value we passed on (e.g. a limit out of its range).
    return errors.InvalidValue(parameter="value", reason=exc.text)


# Backend errors -> Varlink errors, in one table (style: translate once per layer), looked up along
# the error's class hierarchy; anything not listed (BadReply, WatchOverflow, DBusCallFailed, ...)
# is our InternalError, its cause in the journal.
BACKEND_ERRORS: Mapping[type[sd.BackendError], Callable[[sd.BackendError, str], VarlinkError]] = {
    sd.NoSuchUnit: lambda exc, name: errors.NoSuchCapsule(name=name),
    sd.SystemdTooOld: _too_old,
    sd.SystemdUnavailable: lambda exc, name: errors.SystemdUnavailable(),
    sd.BackendTimeout: lambda exc, name: errors.SystemdUnavailable(),
    sd.JobFailed: _job_failed,
    sd.UnitBusy: _capsule_running,
    sd.ManagerUnavailable: _capsule_not_running,
    sd.AccessDenied: lambda exc, name: PermissionDenied(),
    sd.InvalidArgument: _invalid_value,
}


@contextlib.contextmanager
def backend_errors(name: str) -> Iterator[None]:
    """Turn a backend failure about capsule `name` into its Varlink error (BACKEND_ERRORS),
    chaining the cause for the journal."""
    try:
        yield
    except sd.BackendError as exc:
        raise backend_error(exc, name) from exc


def backend_error(exc: sd.BackendError, name: str) -> VarlinkError:
    """The Varlink error for a backend failure about capsule `name` (BACKEND_ERRORS)."""
    for cls in type(exc).__mro__:
        translate = BACKEND_ERRORS.get(cls)
        if translate is not None:
            return translate(exc, name)
    return errors.InternalError()
