"""PID 1 and capsule managers over capsuled.dbus: systemd's errors, the trusted sender, the caps.

A ``Link`` is a `capsuled.dbus.DBusConnection` as the systemd backend uses it: every call's
D-Bus error becomes a BackendError (``errors.error_from_dbus``; ``unit`` names the unit in
NoSuchUnit/UnitBusy), a lost link SystemdUnavailable, a missing reply BackendTimeout. This is the
one place those are translated. ``signal_sender`` is whose signals we believe: on the system
bus PID 1's well-known name (the bus daemon checks who owns it; capsuled.dbus.header_matches),
None on a peer-to-peer link, where only the peer can send.

A capsule's manager (``open_capsule_manager``) is a peer-to-peer link to
``/run/capsules/NAME/systemd/private``. As root we authenticate as uid 0; claiming the capsule's
uid from a root process gets the connection reset (verified on systemd 257). Anything inside the
capsule runs as the capsule's uid, so it can bind its own socket there and pass the ownership
pinning: its messages are capped at ``MAX_PEER_MESSAGE_BYTES`` (1 MiB, a stall of well under half
a second of parsing) and its signals lower still (``MAX_PEER_SIGNAL_BYTES``), and the link is
closed on anything a manager would not send (``close_on_unsolicited``): a reply nobody waits
for, a method call, a signal that is not one of a manager's broadcasts, or more of those
broadcasts than ``MAX_PEER_SKIPPED_PER_S`` a second beyond the ones we follow. The system bus
carries PID 1, which we trust, and any client's signals, which are skipped on their header
(capsuled.dbus.SYSTEM_BUS_LIMITS).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Final

from jeepney import MatchRule, Message

from .. import dbus
from . import messages as m
from .errors import (
    BackendError,
    BackendTimeout,
    BadReply,
    SystemdUnavailable,
    WatchOverflow,
    error_from_dbus,
)

# A capsule's manager link: the peer may be any process in the capsule (see the module
# docstring). 1 MiB is ample: a user manager's ListUnits is tens of KiB (~200 bytes per unit;
# a capsule would need ~5000 loaded units to come near), ListUnitFiles is smaller, and the
# signals we consume (JobRemoved, PropertiesChanged) are a few KiB.
MAX_PEER_MESSAGE_BYTES: Final = 1024 * 1024
# Signals nobody asked for arrive unprompted, so they get a lower cap on a peer link: a
# PropertiesChanged of a unit or a JobRemoved is a few KiB.
MAX_PEER_SIGNAL_BYTES: Final = 128 * 1024
# A capsule's manager is no reason to keep more calls waiting than PID 1's own share.
MAX_PEER_IN_FLIGHT_CALLS: Final = 64
# A manager broadcasts every change of every unit to each private link; we follow only some.
# A unit restarting ten times a second makes a few dozen such signals a second; a fake manager
# flooding us makes tens of thousands, and is cut off after about a second's worth of these.
MAX_PEER_SKIPPED_PER_S: Final = 1000
CAPSULE_MANAGER_LIMITS: Final = dbus.BusLimits(
    max_message_bytes=MAX_PEER_MESSAGE_BYTES,
    max_signal_bytes=MAX_PEER_SIGNAL_BYTES,
    max_in_flight_calls=MAX_PEER_IN_FLIGHT_CALLS,
    close_on_unsolicited=True,
    broadcasts=m.manager_broadcast_rules(),
    max_skipped_per_s=MAX_PEER_SKIPPED_PER_S,
)


def _unavailable(error: dbus.BusClosed) -> BackendError:
    return SystemdUnavailable(str(error))


class Link:
    """A D-Bus connection speaking systemd's errors (see the module docstring)."""

    def __init__(self, conn: dbus.DBusConnection, signal_sender: str | None = None) -> None:
        self.conn = conn
        self.signal_sender = signal_sender

    @property
    def closed(self) -> bool:
        """True once the link is gone; every later call raises SystemdUnavailable."""
        return self.conn.closed

    async def close(self) -> None:
        """Close the underlying connection (only for links we opened: a capsule's manager)."""
        await self.conn.close()

    async def call(
        self, msg: Message, *, unit: str = "", timeout_s: float | None = None
    ) -> tuple[object, ...]:
        """Send a method call and return the reply body.

        Raises:
            BackendError subclasses: D-Bus error replies via errors.error_from_dbus (``unit``
            names the unit in NoSuchUnit/UnitBusy), BackendTimeout, SystemdUnavailable.
        """
        try:
            return await self.conn.call(msg, timeout_s=timeout_s)
        except dbus.ErrorReply as exc:
            raise error_from_dbus(exc.name, exc.text, unit) from exc
        except dbus.BusTimeout as exc:
            raise BackendTimeout(str(exc)) from exc
        except dbus.BusClosed as exc:
            raise SystemdUnavailable(str(exc)) from exc
        except dbus.ReplyTooLarge as exc:
            raise BadReply(str(exc)) from exc

    def signals(
        self,
        rule: MatchRule,
        maxsize: int = dbus.DEFAULT_SIGNAL_QUEUE,
        overflow_error: BackendError | None = None,
    ) -> contextlib.AbstractContextManager[dbus.SignalQueue]:
        """The connection's signal queue; get() raises WatchOverflow or SystemdUnavailable."""
        return self.conn.signals(
            rule,
            maxsize,
            overflow_error=overflow_error or WatchOverflow("signal queue full"),
            closed_error=_unavailable,
        )

    @contextlib.asynccontextmanager
    async def match(self, rule: MatchRule) -> AsyncIterator[None]:
        """AddMatch for the duration of the block (bus connections only)."""
        await self.add_match(rule)
        try:
            yield
        finally:
            if not self.closed:
                # The bus forgets our matches with the connection anyway.
                with contextlib.suppress(BackendError):
                    await self.call(dbus.remove_match(rule))

    async def add_match(self, rule: MatchRule) -> None:
        """Ask the bus daemon to route matching signals to us (until RemoveMatch or the end)."""
        await self.call(dbus.add_match(rule))


async def open_peer(
    sock: socket.socket,
    *,
    uid: int | None = None,
    limits: dbus.BusLimits = CAPSULE_MANAGER_LIMITS,
    name: str = "a capsule's manager",
) -> Link:
    """Authenticate on an already connected socket and return a peer-to-peer Link (no Hello).

    Takes ownership of ``sock``. ``limits`` defaults to the untrusted-peer caps; a message over
    them closes the link (calls waiting on it raise SystemdUnavailable) and nothing else.

    Raises:
        SystemdUnavailable: the peer refused authentication or hung up.
    """
    try:
        conn = await dbus.open_peer(sock, limits, uid=uid, name=name)
    except dbus.BusClosed as exc:
        raise SystemdUnavailable(str(exc)) from exc
    return Link(conn)
