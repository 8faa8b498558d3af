"""The Authorizer: capsuled's one entry point for policy (our bus-polkit.c).

`ctx.authorize(...)` in the methods calls `Authorizer.authorize`; `CheckAccess` calls
`Authorizer.check`. Behind them: root short-circuit, the peer's liveness, capsuled's own grants
(owner, creator groups; engine.grant), then the backend (builtin rules or polkitd), and the mapping
of a refusal to the Varlink error.

Decision -> outcome of `authorize`:
    yes         -> returns
    auth_admin  -> InteractionRequired (the methods answer org.capsuled.Manager.
                   InteractiveAuthenticationRequired; with polkit and allowInteractiveAuthentication
                   the agent was already asked, so this means nobody authenticated either)
    no          -> org.varlink.service.PermissionDenied
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from capsuled.peer import Peer, process_is_alive
from capsuled.policy import actions
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
from capsuled.policy.identity import lookup_identity
from capsuled.varlink.errors import PermissionDenied

if TYPE_CHECKING:
    from capsuled.dbus import SystemBus

__all__ = [
    "Authorizer",
    "Backend",
    "Decision",
    "InteractionRequired",
    "Quota",
    "actions",
    "polkit_available",
]

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR: Final = Path("/etc/capsuled")
# polkitd is usable when the bus can activate it and our actions are registered with it; without
# the .policy file every CheckAuthorization would fail ("action not registered") and deny.
POLKIT_SERVICE_FILE: Final = Path(
    "/usr/share/dbus-1/system-services/org.freedesktop.PolicyKit1.service"
)
POLKIT_ACTIONS_FILE: Final = Path("/usr/share/polkit-1/actions/org.capsuled.policy")


class InteractionRequired(Exception):
    """The action needs authentication (polkit challenge / builtin auth_admin)."""


class Backend(Protocol):
    """Step 4 of a decision: the builtin rules or polkitd."""

    name: str

    async def check(
        self, subject: Peer, identity: Identity, request: Request, allow_interactive: bool
    ) -> Decision: ...

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
        is_alive: Callable[[Peer], bool] = process_is_alive,
    ) -> None:
        self.config = config
        self._backend = backend
        self._lookup = lookup
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
        """Load /etc/capsuled (deny-all for non-root if refused) and pick the backend.

        `backend` overrides the config's `[policy] backend`; "auto" means polkit when polkitd is
        installed with our actions, else builtin. polkit talks over `system_bus` (the daemon's
        one connection) or, without it, a connection of its own.
        """
        config = load_config(config_dir)
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
            return cls(config, PolkitBackend(system_bus.connection if system_bus else None))
        if choice != "builtin":
            raise ValueError(f"unknown policy backend {choice!r}")
        return cls(config, BuiltinBackend(config))

    async def check(
        self,
        subject: Peer,
        action: str,
        *,
        capsule: str,
        owner: int | None,
        verb: str | None = None,
        unit: str | None = None,
        allow_interactive: bool = False,
    ) -> Decision:
        """The decision for `subject` doing `action` (id or short name) to `capsule`.

        Raises:
            ValueError: `action` is not one of ours (a bug in the caller, or CheckAccess input).
        """
        decision, _ = await self.explain(
            subject,
            action,
            capsule=capsule,
            owner=owner,
            verb=verb,
            unit=unit,
            allow_interactive=allow_interactive,
        )
        return decision

    async def explain(
        self,
        subject: Peer,
        action: str,
        *,
        capsule: str,
        owner: int | None,
        verb: str | None = None,
        unit: str | None = None,
        allow_interactive: bool = False,
    ) -> tuple[Decision, str]:
        """`check`, plus which step decided: root, peer-gone, owner, create-group,
        config-refused, or the backend's name (builtin, polkit). CheckAccess reports it."""
        request = Request(actions.resolve(action), capsule, owner, verb, unit)
        if subject.uid == 0:
            # As systemd's bus-polkit.c does for the daemon's own uid: no query, no liveness check.
            return Decision.YES, "root"
        if not self._is_alive(subject):
            log.info(
                "refusing %s on %s for uid %d: peer process %d exited before the check",
                request.action,
                capsule,
                subject.uid,
                subject.pid,
            )
            return Decision.NO, "peer-gone"
        identity = self._lookup(subject.uid)
        granted = grant(identity, request, self.config)
        if granted is not None:
            if self.config.deny_all:
                return granted, "config-refused"
            return granted, "create-group" if request.action == actions.CREATE else "owner"
        decision = await self._backend.check(subject, identity, request, allow_interactive)
        return decision, self._backend.name

    async def authorize(
        self,
        subject: Peer,
        action: str,
        *,
        capsule: str,
        owner: int | None,
        verb: str | None = None,
        unit: str | None = None,
        allow_interactive: bool = False,
    ) -> None:
        """Return if allowed.

        Raises:
            PermissionDenied: the policy says no.
            InteractionRequired: the policy wants authentication that did not happen.
        """
        decision = await self.check(
            subject,
            action,
            capsule=capsule,
            owner=owner,
            verb=verb,
            unit=unit,
            allow_interactive=allow_interactive,
        )
        if decision is Decision.YES:
            return
        if decision is Decision.AUTH_ADMIN:
            raise InteractionRequired(action)
        raise PermissionDenied()

    def quota(self, subject: Peer) -> Quota:
        """The subject's ceilings (capsule count, limits); root is unlimited."""
        if subject.uid == 0:
            return quota_for(Identity(0, "root", frozenset()), self.config)
        return quota_for(self._lookup(subject.uid), self.config)

    async def aclose(self) -> None:
        """Release the backend's connection (polkit), if any."""
        await self._backend.aclose()
