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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from capsuled import errors
from capsuled.audit import AuditLog
from capsuled.peer import Peer
from capsuled.policy import Authorizer, Decision, InteractionRequired
from capsuled.policy import actions as act
from capsuled.records import CorruptRecord, Record, RecordStore
from capsuled.systemd import errors as sd
from capsuled.systemd.backend import SystemdBackend
from capsuled.varlink.errors import PermissionDenied, VarlinkError

Notify = Callable[[dict[str, object]], Awaitable[None]]


class CapsuleLocks:
    """One asyncio.Lock per capsule name: calls on one capsule run one at a time,
    calls on different capsules in parallel. Entries go away when unused, so the
    table is bounded by the calls in flight, not by every name ever asked for."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


@dataclass(slots=True)
class Services:
    """The long-lived objects handlers use; built once, in daemon.py."""

    backend: SystemdBackend
    authorizer: Authorizer
    records: RecordStore
    audit: AuditLog
    version: str
    capsules_root: str = "/var/lib/private/capsules"
    locks: CapsuleLocks = field(default_factory=CapsuleLocks)
    # Logs calls following the journal right now, per caller uid.
    followers: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Authorization:
    """What authorize() allowed, so `locked` can tell if the owner changed meanwhile."""

    action: str
    owner: int | None
    interactive: bool
    verb: str | None
    unit: str | None
    pinned_owner: bool  # the owner was given by the caller (Create), not read from records


@dataclass(slots=True)
class CallContext:
    peer: Peer
    more: bool
    notify: Notify
    services: Services
    # Set by audit() and authorize(): the method table's audit wrapper writes a record for a
    # mutating call only if the handler did not, and says "denied" for a refusal.
    audited: bool = False
    denied: bool = False
    _authorized: dict[str, _Authorization] = field(default_factory=dict)

    @property
    def backend(self) -> SystemdBackend:
        return self.services.backend

    @property
    def records(self) -> RecordStore:
        return self.services.records

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
    ) -> Record | None:
        """Allow the call or raise its refusal; returns the capsule's record.

        Raises:
            NoSuchCapsule: the caller may not read the capsule (whether or not it exists).
            PermissionDenied, InteractiveAuthenticationRequired: it may read it, not do this.
        """
        pinned = owner is not None
        record = self.record_of(name)
        if owner is None and record is not None:
            owner = record.owner
        try:
            await self.services.authorizer.authorize(
                self.peer,
                action,
                capsule=name,
                owner=owner,
                verb=verb,
                unit=unit,
                allow_interactive=bool(interactive),
            )
        except (PermissionDenied, InteractionRequired) as refusal:
            self.denied = True
            if action != act.CREATE and not await self.may_read(name, owner):
                raise errors.NoSuchCapsule(name=name) from None
            if isinstance(refusal, InteractionRequired):
                raise errors.InteractiveAuthenticationRequired() from None
            raise
        self._authorized[name] = _Authorization(
            action, owner, bool(interactive), verb, unit, pinned
        )
        return record

    @contextlib.asynccontextmanager
    async def locked(self, name: str) -> AsyncIterator[None]:
        """Hold the capsule's lock; if its owner changed while we waited for it (removed and
        created again by someone else), decide again before anything happens."""
        async with self.services.locks.hold(name):
            allowed = self._authorized.get(name)
            if allowed is not None and not allowed.pinned_owner:
                record = self.record_of(name)
                owner = record.owner if record is not None else None
                if owner != allowed.owner:
                    await self.authorize(
                        allowed.action,
                        name,
                        interactive=allowed.interactive,
                        verb=allowed.verb,
                        unit=allowed.unit,
                    )
            yield

    async def may_read(self, name: str, owner: int | None) -> bool:
        decision = await self.services.authorizer.check(
            self.peer, act.READ, capsule=name, owner=owner
        )
        return decision is Decision.YES

    def audit(self, action: str, name: str | None, result: str, **fields: str | int | None) -> None:
        self.audited = True
        self.services.audit.record(
            action, caller_uid=self.peer.uid, capsule=name, result=result, **fields
        )


# Backend errors -> Varlink errors, in one table (style: translate once per layer).
def varlink_error_for(exc: sd.BackendError, name: str) -> VarlinkError:
    if isinstance(exc, sd.SystemdTooOld):
        return errors.SystemdTooOld(version=exc.version)
    if isinstance(exc, sd.SystemdUnavailable | sd.BackendTimeout):
        return errors.SystemdUnavailable()
    if isinstance(exc, sd.JobFailed):
        return errors.JobFailed(result=exc.result, unitResult=exc.unit_result)
    if isinstance(exc, sd.UnitBusy):
        return errors.CapsuleRunning(name=name)
    if isinstance(exc, sd.ManagerUnavailable):
        return errors.CapsuleNotRunning(name=name)
    if isinstance(exc, sd.AccessDenied):
        return PermissionDenied()
    if isinstance(exc, sd.InvalidArgument):
        # systemd refused a value we passed on (e.g. a limit out of its range).
        return errors.InvalidValue(parameter="value", reason=exc.text)
    return errors.InternalError()


@contextlib.contextmanager
def backend_errors(name: str) -> Iterator[None]:
    """Turn a backend failure into its Varlink error, chaining the cause for the journal."""
    try:
        yield
    except sd.NoSuchUnit as exc:
        raise errors.NoSuchCapsule(name=name) from exc
    except sd.BackendError as exc:
        raise varlink_error_for(exc, name) from exc
