"""FakePID1: the bus daemon and systemd's manager in one, at the far end of a socketpair.

For capsuled.systemd.model's protocol tests (tests/protocol/test_model.py): it speaks real D-Bus
to a real capsuled.dbus connection, answers what the model asks (AddMatch, GetNameOwner,
Subscribe, Properties.Get, ListUnitsByPatterns, Peer.Ping) from a table of units, and sends the
signals a test tells it to, with any sender: on a peer-to-peer link nothing checks that field,
so a test can forge another client's signal as easily as send PID 1's.

What it copies from systemd 257 (seen in the testbed; see model.py): a Get of a unit that is
not loaded loads it (a fresh unit: inactive, dead) and sends UnitNew after the reply, and, with
`gc_after_get`, UnitRemoved right after, as PID 1 unloads a unit nobody holds; a second
Subscribe from the same client is AlreadySubscribed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from jeepney import (
    DBusAddress,
    HeaderFields,
    Message,
    MessageType,
    Parser,
    new_error,
    new_method_return,
    new_signal,
)

from capsuled.systemd import messages as m

AUTH_OK = b"OK 0123456789abcdef0123456789abcdef\r\nAGREE_UNIX_FD\r\n"
PID1 = ":1.6"
UNIT_IFACE, SERVICE_IFACE = m.UNIT_IFACE, m.SERVICE_IFACE
UINT64_MAX = 2**64 - 1

# Properties of a freshly loaded capsule unit, per interface.
FRESH: dict[str, dict[str, tuple[str, object]]] = {
    UNIT_IFACE: {
        "ActiveState": ("s", "inactive"),
        "SubState": ("s", "dead"),
        "StateChangeTimestamp": ("t", 0),
        "NeedDaemonReload": ("b", False),
    },
    SERVICE_IFACE: {
        "Result": ("s", "success"),
        "ExecMainPID": ("u", 0),
        "ControlGroup": ("s", ""),
        "CPUUsageNSec": ("t", UINT64_MAX),
        "MemoryMax": ("t", UINT64_MAX),
        "TasksMax": ("t", UINT64_MAX),
        "CPUWeight": ("t", UINT64_MAX),
        "MemoryAccounting": ("b", True),
        "TasksAccounting": ("b", True),
        "CPUAccounting": ("b", True),
    },
}

# What a fresh load resets (the rest is configuration, from the unit's files).
RUNTIME: dict[str, dict[str, tuple[str, object]]] = {
    UNIT_IFACE: {
        k: FRESH[UNIT_IFACE][k] for k in ("ActiveState", "SubState", "StateChangeTimestamp")
    },
    SERVICE_IFACE: {
        k: FRESH[SERVICE_IFACE][k]
        for k in ("Result", "ExecMainPID", "ControlGroup", "CPUUsageNSec")
    },
}


@dataclass
class FakeUnit:
    """One capsule@NAME.service in the fake's table."""

    props: dict[str, dict[str, tuple[str, object]]] = field(
        default_factory=lambda: {iface: dict(p) for iface, p in FRESH.items()}
    )
    loaded: bool = False

    def get(self, iface: str, prop: str) -> tuple[str, object] | None:
        return self.props.get(iface, {}).get(prop)

    def reset(self) -> None:
        """The runtime state of a fresh load; the configuration stays."""
        for iface, props in RUNTIME.items():
            self.props[iface].update(props)


class FakePID1:
    """The peer end; every Get and what it asked for is logged in `gets`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = Parser()
        self.units: dict[str, FakeUnit] = {}  # by capsule name
        self.owner = PID1
        self.version = "257.9-1"
        self.unit_path: list[str] = []
        self.subscribed = False
        self.gc_after_get = False
        self.gets: list[tuple[str, str, str]] = []  # (capsule, interface, property)
        self.calls: list[str] = []  # member names, in order
        # A test may hold the reply to a call: hooks[member] is awaited before answering.
        self.hooks: dict[str, Callable[[Message], asyncio.Future[None] | None]] = {}
        self._serial = 5000
        self._task = asyncio.create_task(self._serve())

    @classmethod
    async def connected(cls) -> tuple[FakePID1, socket.socket]:
        """A fake on one end of a socketpair; the other end is for capsuled.dbus.open_peer."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=theirs)
        fake = cls(reader, writer)
        return fake, ours

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.writer.close()

    def hang_up(self) -> None:
        """Close the connection from this end (the bus went away)."""
        self.writer.transport.abort()

    # -- the table -----------------------------------------------------------------------------

    def unit(self, name: str) -> FakeUnit:
        return self.units.setdefault(name, FakeUnit())

    def load(self, name: str, **props: tuple[str, object]) -> FakeUnit:
        """A unit loaded before the model looks (no signal), with these properties."""
        unit = self.unit(name)
        unit.loaded = True
        for prop, value in props.items():
            iface = UNIT_IFACE if prop in FRESH[UNIT_IFACE] else SERVICE_IFACE
            unit.props[iface][prop] = value
        return unit

    # -- signals ---------------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        self._serial += 1
        self.writer.write(msg.serialise(self._serial))

    def signal(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: tuple[object, ...],
        sender: str | None = None,
    ) -> None:
        msg = new_signal(DBusAddress(path, interface=interface), member, signature, body)
        msg.header.fields[HeaderFields.sender] = self.owner if sender is None else sender
        self._send(msg)

    def properties_changed(
        self, name: str, interface: str, sender: str | None = None, **props: tuple[str, object]
    ) -> None:
        """Change a loaded unit's properties and say so (PropertiesChanged)."""
        unit = self.unit(name)
        unit.loaded = True
        if sender is None:
            unit.props[interface].update(props)
        path = m.unit_path(f"capsule@{name}.service")
        body: tuple[object, ...] = (interface, dict(props), [])
        self.signal(path, m.PROPERTIES_IFACE, "PropertiesChanged", "sa{sv}as", body, sender)

    def set_state(self, name: str, state: str, sub: str, since: int = 1) -> None:
        self.properties_changed(
            name,
            UNIT_IFACE,
            ActiveState=("s", state),
            SubState=("s", sub),
            StateChangeTimestamp=("t", since),
        )

    def unit_new(self, name: str) -> None:
        """PID 1 loaded the unit (fresh: inactive, dead) and says so."""
        unit = self.unit(name)
        unit.reset()
        unit.loaded = True
        self._manager_signal("UnitNew", name)

    def unit_removed(self, name: str) -> None:
        """PID 1 unloaded the unit (its configuration stays: it is in its files)."""
        unit = self.unit(name)
        unit.reset()
        unit.loaded = False
        self._manager_signal("UnitRemoved", name)

    def _manager_signal(self, member: str, name: str, sender: str | None = None) -> None:
        unit = f"capsule@{name}.service"
        body = (unit, m.unit_path(unit))
        self.signal(m.MANAGER_PATH, m.MANAGER_IFACE, member, "so", body, sender)

    def reloading(self, active: bool) -> None:
        self.signal(m.MANAGER_PATH, m.MANAGER_IFACE, "Reloading", "b", (active,))

    def leave_bus(self) -> None:
        """PID 1 re-executes: it has left the bus; until new_owner(), calls to its name fail as
        the bus daemon fails them (ServiceUnknown; GetNameOwner: NameHasNoOwner)."""
        self.new_owner("")

    def new_owner(self, owner: str) -> None:
        """PID 1 re-executed: the bus daemon says it owns the name under a new unique name."""
        old, self.owner = self.owner, owner
        body = (m.SYSTEMD_BUS_NAME, old, owner)
        self.signal(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameOwnerChanged",
            "sss",
            body,
            sender="org.freedesktop.DBus",
        )

    async def flush(self) -> None:
        await self.writer.drain()

    # -- answering -------------------------------------------------------------------------

    async def _serve(self) -> None:
        data = await self.reader.readuntil(b"BEGIN\r\n")
        del data
        self.writer.write(AUTH_OK)
        while True:
            msg = self.parser.get_next_message()
            if msg is None:
                chunk = await self.reader.read(65536)
                if not chunk:
                    return
                self.parser.add_data(chunk)
                continue
            if msg.header.message_type is MessageType.method_call:
                await self._answer(msg)

    async def _answer(self, msg: Message) -> None:
        member = str(msg.header.fields.get(HeaderFields.member))
        self.calls.append(member)
        hook = self.hooks.get(member)
        if hook is not None:
            waiting = hook(msg)
            if waiting is not None:
                await waiting
        path = str(msg.header.fields.get(HeaderFields.path))
        if member in ("AddMatch", "RemoveMatch", "Ping", "Hello"):
            self._send(new_method_return(msg))
        elif not self.owner:
            error = "org.freedesktop.DBus.Error." + (
                "NameHasNoOwner" if member == "GetNameOwner" else "ServiceUnknown"
            )
            self._send(new_error(msg, error, "s", ("not on the bus",)))
        elif member == "GetNameOwner":
            self._send(new_method_return(msg, "s", (self.owner,)))
        elif member == "Subscribe":
            if self.subscribed:
                name = "org.freedesktop.systemd1.AlreadySubscribed"
                self._send(new_error(msg, name, "s", ("Client is already subscribed.",)))
            else:
                self.subscribed = True
                self._send(new_method_return(msg))
        elif member == "ListUnitsByPatterns":
            rows = [
                (
                    f"capsule@{name}.service",
                    "",
                    "loaded",
                    str(u.props[UNIT_IFACE]["ActiveState"][1]),
                    str(u.props[UNIT_IFACE]["SubState"][1]),
                    "",
                    m.unit_path(f"capsule@{name}.service"),
                    0,
                    "",
                    "/",
                )
                for name, u in sorted(self.units.items())
                if u.loaded
            ]
            self._send(new_method_return(msg, "a(ssssssouso)", (rows,)))
        elif member == "Get" and path == m.MANAGER_PATH:
            _iface, prop = msg.body
            value: tuple[str, object] = (
                ("s", self.version) if prop == "Version" else ("as", list(self.unit_path))
            )
            self._send(new_method_return(msg, "v", (value,)))
        elif member == "Get":
            self._get(msg, path)
        else:
            self._send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (member,)))

    def _get(self, msg: Message, path: str) -> None:
        iface, prop = msg.body
        unit_name = m.unit_from_path(path) or ""
        name = unit_name.removeprefix("capsule@").removesuffix(".service")
        self.gets.append((name, iface, prop))
        unit = self.unit(name)
        fresh_load = not unit.loaded
        unit.loaded = True
        value = unit.get(iface, prop)
        if value is None:
            error = "org.freedesktop.DBus.Error.UnknownProperty"
            self._send(new_error(msg, error, "s", (prop,)))
            return
        self._send(new_method_return(msg, "v", (value,)))
        if fresh_load:  # PID 1 announces the unit it just loaded after answering
            self._manager_signal("UnitNew", name)
            if self.gc_after_get:
                unit.reset()
                unit.loaded = False
                self._manager_signal("UnitRemoved", name)
