"""The polkit backend: org.freedesktop.PolicyKit1.Authority.CheckAuthorization over the system bus.

The subject is ("unix-process", {pid, start-time, uid, pidfd}): polkitd >= 124 identifies the
process by the pidfd (no pid-reuse race); 122 needs pid + start-time (field 22 of /proc/PID/stat).
The start time is the one read when the connection was accepted (capsuled.peer.Peer), never at
check time: by then the pid may belong to another process, and its start time would make polkitd
judge that process. The uid is SO_PEERCRED's: polkitd believes the uid a root caller passes, so it
must never come from parameters.

Details (a{ss}) for rules files (`action.lookup("capsule")`):
    capsule      the capsule name
    owner        the owner's user name, or the decimal uid if it has none; see below
    owner-uid    the owner's decimal uid; see below
    verb         for org.capsuled.manage / manage-units / deploy, when given
    unit         for org.capsuled.manage-units, when given
    signer       for org.capsuled.deploy: the name of the trusted key that signed the bundle
    caller_unit  the system unit the calling process runs in (capsuled.peer: from its cgroup),
                 e.g. "deploy-bot.service"; absent for a process outside any unit. The way to
                 name a DynamicUser= service, whose uid changes at every start

Owner details are sent only where they tell the caller nothing it may not know (design brief: a
caller who may not read a capsule gets the same answer whether it exists or not):
    - org.capsuled.read: never. The read decision is what hides a capsule's existence (the
      methods answer NoSuchCapsule to whoever it refuses), so no rule may key it on the owner:
      "owner absent" would mean "does not exist". polkitd also hands the details to the caller's
      own authentication agent, which would show the owner's name. Grant read by capsule name,
      user or group instead; owners read their capsules through capsuled's owner grants anyway.
    - org.capsuled.create: the caller (who would become the owner);
    - any other action: when the capsule has an owner and the caller is that owner, or polkitd says
      yes to org.capsuled.read for this capsule without interaction (asked first, without owner
      details). So an owner-keyed rule ("group X may manage capsules of members of X") works for
      callers who may read the capsule, and never reveals who owns the others.

Answers: authorized -> yes; challenge -> auth_admin; otherwise -> no. polkitd missing, failing, slow
or answering an error (e.g. our .policy not installed) -> no, logged: never allow by accident.
The checks travel on the daemon's one system bus connection (capsuled.dbus.SystemBus), beside PID
1's calls; at most MAX_IN_FLIGHT of them wait at once, so PID 1 keeps its share of the ~128
pending replies the bus allows one connection (capsuled.dbus.SYSTEM_BUS_LIMITS), and few of
them are one uid's, so that no caller queues polkitd full for the others (see
MAX_QUICK_IN_FLIGHT). A caller
cancelled while waiting (its client disconnected) cancels the check in polkitd with
CancelCheckAuthorization, so no agent dialog stays up for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from itertools import count
from typing import Final, Protocol

from jeepney import DBusAddress, HeaderFields, Message, MessageType, new_method_call

from capsuled import callslot, dbus
from capsuled.fairslots import FairSlots
from capsuled.peer import Peer, process_is_alive
from capsuled.policy import actions
from capsuled.policy.engine import Decision, Identity, Request
from capsuled.policy.identity import user_name

log = logging.getLogger(__name__)

AUTHORITY: Final = DBusAddress(
    "/org/freedesktop/PolicyKit1/Authority",
    bus_name="org.freedesktop.PolicyKit1",
    interface="org.freedesktop.PolicyKit1.Authority",
)
MAX_IN_FLIGHT: Final = 64
# polkitd answers checks one after another, each a run of its JavaScript rules (10-20 ms of its
# CPU in the testbed under load): a check waits behind every check queued there before it. So
# at most MAX_QUICK_IN_FLIGHT checks that ask nobody wait there at once, at most
# MAX_IN_FLIGHT_PER_UID of them one uid's, and free places go to the uids in turn
# (capsuled.fairslots): ten uids flooding keep eight queued, not sixty-four, and anybody else's
# check is next in line (issue 11, finding 8). Interactive checks wait for a human, not for
# polkitd, so they have the rest of MAX_IN_FLIGHT to themselves, under the same per-uid bound.
MAX_QUICK_IN_FLIGHT: Final = 8
MAX_IN_FLIGHT_PER_UID: Final = 2
# polkitd answers a non-interactive check in milliseconds; an interactive one waits for a human.
CHECK_TIMEOUT_S: Final = 25.0
INTERACTIVE_CHECK_TIMEOUT_S: Final = 300.0
# CheckAuthorizationFlags (polkit's org.freedesktop.PolicyKit1.Authority.xml)
ALLOW_USER_INTERACTION: Final = 0x1


def polkit_details(
    request: Request,
    owner_name: str | None,
    *,
    owner_visible: bool = True,
    caller_unit: str | None = None,
) -> dict[str, str]:
    """The a{ss} details polkit rules see (see the module docstring).

    `owner_visible` False leaves the owner out (PolkitBackend decides; org.capsuled.read never
    carries it whatever is passed). `caller_unit` is the peer's (capsuled.peer.Peer.unit).
    """
    details = {"capsule": request.capsule}
    if request.owner is not None and owner_visible and request.action != actions.READ:
        details["owner"] = owner_name if owner_name is not None else str(request.owner)
        details["owner-uid"] = str(request.owner)
    if request.verb is not None:
        details["verb"] = request.verb
    if request.unit is not None:
        details["unit"] = request.unit
    if request.signer is not None:
        details["signer"] = request.signer
    if caller_unit is not None:
        details["caller_unit"] = caller_unit
    return details


def check_authorization(
    *,
    pid: int,
    start_time: int,
    uid: int,
    pidfd: int | None,
    action: str,
    details: dict[str, str],
    allow_interactive: bool,
    cancellation_id: str,
) -> Message:
    """The CheckAuthorization call; pure (the pidfd is only referenced until sent)."""
    subject: dict[str, tuple[str, object]] = {
        "pid": ("u", pid),
        "start-time": ("t", start_time),
        "uid": ("i", uid),
    }
    if pidfd is not None:
        subject["pidfd"] = ("h", pidfd)
    flags = ALLOW_USER_INTERACTION if allow_interactive else 0
    return new_method_call(
        AUTHORITY,
        "CheckAuthorization",
        "(sa{sv})sa{ss}us",
        (("unix-process", subject), action, details, flags, cancellation_id),
    )


def cancel_check_authorization(cancellation_id: str) -> Message:
    """The CancelCheckAuthorization call for a pending check of this connection."""
    return new_method_call(AUTHORITY, "CancelCheckAuthorization", "s", (cancellation_id,))


def decision_from_reply(reply: Message) -> Decision:
    """(is_authorized, is_challenge, details) -> yes / auth_admin / no.

    Raises:
        ValueError: the reply is an error or malformed.
    """
    if reply.header.message_type is not MessageType.method_return:
        name = reply.header.fields.get(HeaderFields.error_name)
        raise ValueError(f"polkitd answered {name}: {reply.body!r}")
    try:
        ((is_authorized, is_challenge, _details),) = reply.body
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unexpected CheckAuthorization reply {reply.body!r}") from exc
    if is_authorized is True:
        return Decision.YES
    if is_challenge is True:
        return Decision.AUTH_ADMIN
    return Decision.NO


class BusLink(Protocol):
    """What the backend needs of the bus (capsuled.dbus.DBusConnection; a fake in tests)."""

    async def call_raw(self, message: Message, *, timeout_s: float | None = None) -> Message: ...


Connect = Callable[[], Awaitable[BusLink]]


class _Refused(Exception):
    """polkitd gave no usable answer; the whole check is a refusal (nothing more is asked)."""


class PolkitBackend:
    """The last step of a decision from polkitd."""

    name = "polkit"

    def __init__(
        self,
        connect: Connect | None = None,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_quick_in_flight: int = MAX_QUICK_IN_FLIGHT,
        max_in_flight_per_uid: int = MAX_IN_FLIGHT_PER_UID,
        timeout_s: float = CHECK_TIMEOUT_S,
        interactive_timeout_s: float = INTERACTIVE_CHECK_TIMEOUT_S,
    ) -> None:
        # `connect` hands out the daemon's shared system bus connection (dbus.SystemBus, which
        # reopens it when lost); without one (a test, a one-off script), a bus of our own.
        self._own_bus: dbus.SystemBus | None = None
        if connect is None:
            self._own_bus = dbus.SystemBus()
            connect = self._own_bus.connection
        self._connect = connect
        self._quick = FairSlots(max_quick_in_flight, max_in_flight_per_uid)
        self._interactive = FairSlots(max_in_flight - max_quick_in_flight, max_in_flight_per_uid)
        self._timeout_s = timeout_s
        self._interactive_timeout_s = interactive_timeout_s
        self._ids = count(1)
        self._cancels: set[asyncio.Task[None]] = set()

    async def check(self, peer: Peer, identity: Identity, request: Request) -> Decision:
        """Ask polkitd; any failure is a refusal."""
        if peer.start_time is None:
            # peer_credentials found no process to record: it was gone before the check.
            # Debug only: a caller can make this happen at will (see authorizer.decide).
            log.debug("polkit: peer process %d is gone; refusing", peer.pid)
            return Decision.NO
        try:
            owner_visible = await self._owner_visible(peer, request)
            return await self._ask(peer, request, owner_visible)
        except _Refused:
            return Decision.NO

    async def _owner_visible(self, peer: Peer, request: Request) -> bool:
        """Whether the owner details may go to polkitd with this request (module docstring)."""
        if request.owner is None or request.action == actions.READ:
            return False
        if request.action == actions.CREATE or request.owner == peer.uid:
            return True  # the owner is the caller itself
        # Never interactive: no dialog for the probe.
        read = Request(actions.READ, request.capsule, None)
        return await self._ask(peer, read, False) is Decision.YES

    async def _ask(self, peer: Peer, request: Request, owner_visible: bool) -> Decision:
        """One CheckAuthorization.

        Raises:
            _Refused: polkitd could not answer (already logged).
        """
        assert peer.start_time is not None  # check() refused the peer otherwise
        slots = self._interactive if request.allow_interactive else self._quick
        async with slots.held(peer.uid):
            owner_name = None
            if owner_visible and request.owner is not None:
                owner_name = user_name(request.owner)
            cancellation_id = f"capsuled-{os.getpid()}-{next(self._ids)}"
            message = check_authorization(
                pid=peer.pid,
                start_time=peer.start_time,
                uid=peer.uid,
                pidfd=peer.pidfd,
                action=request.action,
                details=polkit_details(
                    request, owner_name, owner_visible=owner_visible, caller_unit=peer.unit
                ),
                allow_interactive=request.allow_interactive,
                cancellation_id=cancellation_id,
            )
            interactive = request.allow_interactive
            timeout_s = self._interactive_timeout_s if interactive else self._timeout_s
            try:
                conn = await self._connect()
            except (OSError, TimeoutError) as exc:  # dbus.BusClosed is an OSError
                log.error("polkit: cannot reach the system bus (%s); refusing", exc)
                raise _Refused from None
            try:
                # A human may take minutes to answer the agent's dialog, or never answer: the
                # call waits without its call slot meanwhile (capsuled.callslot; Busy if too
                # many already wait), so unanswered dialogs cannot pin the slots.
                waiting: contextlib.AbstractAsyncContextManager[None] = (
                    callslot.released() if interactive else contextlib.nullcontext()
                )
                async with waiting, asyncio.timeout(timeout_s):
                    # The bus connection's own call timeout is PID 1's (25 s): an interactive
                    # check waits for a human, so it gets this one.
                    reply = await conn.call_raw(message, timeout_s=timeout_s)
            except asyncio.CancelledError:
                self._cancel_later(conn, cancellation_id)
                raise
            except TimeoutError:
                self._cancel_later(conn, cancellation_id)
                log.error("polkit: no answer for %s in %ss; refusing", request.action, timeout_s)
                raise _Refused from None
            except (dbus.BusClosed, dbus.ReplyTooLarge) as exc:
                log.error("polkit: %s; refusing", exc)
                raise _Refused from None
            try:
                return decision_from_reply(reply)
            except ValueError as exc:
                # polkitd fails a check whose subject is gone ("Process not found"): that is the
                # caller's doing, and any local user can do it at will, so not an error of ours.
                level = logging.ERROR if process_is_alive(peer) else logging.DEBUG
                log.log(level, "polkit: %s; refusing %s", exc, request.action)
                raise _Refused from None

    def _cancel_later(self, conn: BusLink, cancellation_id: str) -> None:
        # From a task of its own: the awaiting task is being cancelled and must not block on this.
        # Only the connection that started the check may cancel it (polkitd matches the sender).
        async def cancel() -> None:
            try:
                async with asyncio.timeout(self._timeout_s):
                    await conn.call_raw(cancel_check_authorization(cancellation_id))
            except (TimeoutError, OSError) as exc:  # dbus.BusClosed, dbus.BusTimeout included
                log.debug("polkit: CancelCheckAuthorization(%s) failed: %s", cancellation_id, exc)

        task = asyncio.create_task(cancel(), name=f"capsuled-polkit-cancel-{cancellation_id}")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def aclose(self) -> None:
        """Wait for pending cancellations; close the bus connection if it is our own (a shared
        one belongs to the daemon, and PID 1's calls go on using it)."""
        if self._cancels:
            await asyncio.gather(*self._cancels, return_exceptions=True)
        if self._own_bus is not None:
            await self._own_bus.close()
