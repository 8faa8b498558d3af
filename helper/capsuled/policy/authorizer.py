"""The Authorizer: the one decision function behind `ctx.authorize` and `CheckAccess`.

`decide(peer, request)` runs the whole decision in order and says which step took it:

    root          uid 0: yes, without a query (as systemd's bus-polkit.c does for its own uid)
    peer-gone     the peer exited (or its pid was reused) before the check: no
    config-refused  a refused configuration: no, for everybody but root
    owner         capsuled's owner grants (engine.grant)
    create-group  capsuled's creator groups (engine.grant)
    builtin|polkit  the backend: the config's [[rule]]s, or polkitd

It never raises a refusal: turning a decision into the wire's answer (NoSuchCapsule for a
caller who may not even read the capsule, PermissionDenied, InteractiveAuthenticationRequired)
is the caller's one job, done in capsuled.methods.context.CallContext.authorize.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from capsuled.peer import Peer, process_is_alive
from capsuled.policy import actions
from capsuled.policy.accounts import AccountCache
from capsuled.policy.builtin import BuiltinBackend
from capsuled.policy.config import load_config
from capsuled.policy.engine import (
    Decision,
    Identity,
    PolicyConfig,
    Quota,
    Request,
    grant,
    quota_for,
)
from capsuled.policy.identity import lookup_identity, user_name
from capsuled.policy.signers import TrustedKeys, load_trusted_keys

if TYPE_CHECKING:
    from capsuled.dbus import SystemBus

__all__ = ["DEFAULT_CONFIG_DIR", "Authorizer", "Backend", "Verdict", "polkit_available"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR: Final = Path("/etc/capsuled")
# polkitd is usable when the bus can activate it and our actions are registered with it; without
# the .policy file every CheckAuthorization would fail ("action not registered") and deny.
POLKIT_SERVICE_FILE: Final = Path(
    "/usr/share/dbus-1/system-services/org.freedesktop.PolicyKit1.service"
)
POLKIT_ACTIONS_FILE: Final = Path("/usr/share/polkit-1/actions/org.capsuled.policy")
# How many of a List's rows are with the backend at once: polkit's per-caller slots
# (polkit.MAX_IN_FLIGHT_PER_UID; a test keeps them equal, this module does not import polkit's).
# More would only wait in its queue, each as a task of its own.
ROWS_CHECKED_AT_ONCE: Final = 2


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision and the step that took it (CheckAccess reports the step as its reason)."""

    decision: Decision
    step: str


class Backend(Protocol):
    """The last step of a decision: the builtin rules or polkitd."""

    name: str

    async def check(self, peer: Peer, identity: Identity, request: Request) -> Decision: ...

    async def aclose(self) -> None: ...


def polkit_available(
    service_file: Path = POLKIT_SERVICE_FILE, actions_file: Path = POLKIT_ACTIONS_FILE
) -> bool:
    """True if polkitd can be activated on the system bus and knows our actions."""
    return service_file.is_file() and actions_file.is_file()


class Authorizer:
    """Decides whether a socket peer may do an action to a capsule."""

    def __init__(
        self,
        config: PolicyConfig,
        backend: Backend,
        *,
        lookup: Callable[[int], Identity] = lookup_identity,
        name_of: Callable[[int], str | None] | None = None,
        is_alive: Callable[[Peer], bool] = process_is_alive,
        trusted_keys: TrustedKeys | None = None,
    ) -> None:
        self.config = config
        # The keys trusted to sign deploy bundles: read with the policy, reloaded with it.
        self.trusted_keys = trusted_keys if trusted_keys is not None else TrustedKeys()
        self._backend = backend
        # The user database itself is read through a cache with a stated bound (policy/
        # accounts.py: a change of its files at the next call, anything else within 1 s).
        # A user name alone needs no groups: the passwd entry (another `lookup` says both).
        if lookup is lookup_identity and name_of is None:
            self.accounts: AccountCache | None = AccountCache()
            lookup, name_of = self.accounts.identity, self.accounts.user_name
        else:
            self.accounts = None
        if name_of is None:
            name_of = user_name if lookup is lookup_identity else lambda uid: lookup(uid).user
        self._lookup = lookup
        self._name_of = name_of
        self._is_alive = is_alive

    @property
    def backend_name(self) -> str:
        """ "builtin" or "polkit", for Info."""
        return self._backend.name

    @classmethod
    def from_config(
        cls,
        config_dir: Path = DEFAULT_CONFIG_DIR,
        backend: str | None = None,
        *,
        system_bus: SystemBus | None = None,
    ) -> Authorizer:
        """Load /etc/capsuled (deny-all for non-root if refused) and its trusted keys, and pick
        the backend.

        `backend` overrides the config's `[policy] backend`; "auto" means polkit when polkitd is
        installed with our actions, else builtin. polkit talks over `system_bus` (the daemon's
        one connection) or, without it, a connection of its own.
        """
        config = load_config(config_dir)
        keys = load_trusted_keys(config_dir)
        choice = backend if backend is not None else config.backend
        if choice == "auto":
            choice = "polkit" if polkit_available() else "builtin"
        if choice == "polkit":
            # Imported here: the builtin backend must not need jeepney's import time.
            from capsuled.policy.polkit import PolkitBackend

            if config.rules:
                log.warning(
                    "policy backend is polkit: the [[rule]] entries in %s are ignored "
                    "(write polkit rules instead; see polkit/*.rules.example)",
                    config_dir,
                )
            polkit = PolkitBackend(system_bus.connection if system_bus else None)
            return cls(config, polkit, trusted_keys=keys)
        if choice != "builtin":
            raise ValueError(f"unknown policy backend {choice!r}")
        return cls(config, BuiltinBackend(config), trusted_keys=keys)

    async def decide(
        self,
        peer: Peer,
        request: Request,
        *,
        lookup: Callable[[int], Identity] | None = None,
        known_alive: bool = False,
    ) -> Verdict:
        """The decision for `peer` asking `request`, and which step took it.

        `lookup`: how to read the peer's account (default: the user database now); a caller
        deciding many requests in one pass (a List's rows) reads it once for all of them.
        `known_alive`: an earlier decision of the same pass found the peer alive (a List's
        later rows), so its liveness is not checked again.

        Raises:
            ValueError: `request.action` is not one of ours (a bug in the caller).
        """
        if request.action not in actions.ALL:
            raise ValueError(f"unknown action {request.action!r}")
        if peer.uid == 0:
            # As systemd's bus-polkit.c does for the daemon's own uid: no query, no liveness check.
            return Verdict(Decision.YES, "root")
        if not known_alive and not self._is_alive(peer):
            # Debug only: any caller can make this happen at will (send, then exit), and one
            # journal line each would be a way around the audit's refusal aggregation; the
            # refusal itself is audited (aggregated per uid).
            log.debug(
                "refusing %s on %s for uid %d: peer process %d exited before the check",
                request.action,
                request.capsule,
                peer.uid,
                peer.pid,
            )
            return Verdict(Decision.NO, "peer-gone")
        identity = self._caller(peer, lookup)
        verdict = self._engine_verdict(identity, request)
        if verdict is not None:
            return verdict
        decision = await self._backend.check(peer, identity, request)
        return Verdict(decision, self._backend.name)

    def _caller(self, peer: Peer, lookup: Callable[[int], Identity] | None) -> Identity:
        """The peer's account, with the unit it runs in."""
        # The unit comes from the socket peer (its cgroup), like the uid: never from parameters.
        identity = (lookup or self._lookup)(peer.uid)
        if identity.unit != peer.unit:
            identity = replace(identity, unit=peer.unit)
        return identity

    def _engine_verdict(self, identity: Identity, request: Request) -> Verdict | None:
        """The engine's own answer (owner and group grants, deny_all), None: the backend's."""
        granted = grant(identity, request, self.config)
        if granted is None:
            return None
        if self.config.deny_all:
            return Verdict(granted, "config-refused")
        return Verdict(granted, "create-group" if request.action == actions.CREATE else "owner")

    async def decide_many(
        self,
        peer: Peer,
        requests: Sequence[Request],
        *,
        lookup: Callable[[int], Identity] | None = None,
        known_alive: bool = False,
    ) -> list[Verdict]:
        """`decide` for each of `requests` (a List's rows), in order: the engine decides every
        row it can first, in one go; the rows left go to the backend ROWS_CHECKED_AT_ONCE at a
        time (polkit's per-caller slots) instead of one round trip after the other. The
        builtin rules answer without waiting, so they are asked one by one (a task per row
        would cost more than the rule)."""
        if not requests:
            return []
        first = await self.decide(peer, requests[0], lookup=lookup, known_alive=known_alive)
        if first.step in ("root", "peer-gone"):
            return [first] * len(requests)  # neither depends on the request
        verdicts: list[Verdict | None] = [first]
        identity = self._caller(peer, lookup)
        left = []
        for index, request in enumerate(requests[1:], start=1):
            if request.action not in actions.ALL:
                raise ValueError(f"unknown action {request.action!r}")
            verdict = self._engine_verdict(identity, request)
            if verdict is None:
                left.append(index)
            verdicts.append(verdict)
        backend = self._backend
        if isinstance(backend, BuiltinBackend) or len(left) < 2:
            decisions = [await backend.check(peer, identity, requests[i]) for i in left]
        else:
            decisions = await _check_rows(backend, peer, identity, [requests[i] for i in left])
        for index, decision in zip(left, decisions, strict=True):
            verdicts[index] = Verdict(decision, backend.name)
        return [v for v in verdicts if v is not None]

    def identity(self, uid: int) -> Identity:
        """The account that is `uid` now, as the user database says (an owner's, say)."""
        return self._lookup(uid)

    def user_name(self, uid: int) -> str | None:
        """The user name of `uid` now (None: no passwd entry), without its groups."""
        return self._name_of(uid)

    def quota(self, peer: Peer) -> Quota:
        """The peer's ceilings (capsule count, limits); root is unlimited."""
        if peer.uid == 0:
            return quota_for(Identity(0, "root", frozenset()), self.config)
        return quota_for(self._lookup(peer.uid), self.config)

    async def aclose(self) -> None:
        """Release what the backend holds (polkit's pending cancellations), if anything."""
        await self._backend.aclose()


async def _check_rows(
    backend: Backend, peer: Peer, identity: Identity, requests: Sequence[Request]
) -> list[Decision]:
    """backend.check for each request, ROWS_CHECKED_AT_ONCE in flight: a List of 1,000 rows
    nobody owns is two waiting checks, not a task per row (~2 KiB each, times every List in
    flight). The first failure stops the others (cancelled and collected, none left running)."""
    decisions: list[Decision | None] = [None] * len(requests)
    pending = iter(range(len(requests)))

    async def worker() -> None:
        for k in pending:  # one iterator shared: each row is taken by one worker
            decisions[k] = await backend.check(peer, identity, requests[k])

    workers = [asyncio.ensure_future(worker()) for _ in range(ROWS_CHECKED_AT_ONCE)]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    return [d for d in decisions if d is not None]
