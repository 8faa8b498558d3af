"""Pure D-Bus message builders and reply parsers for systemd (no I/O).

Builders return jeepney ``Message`` objects; ``bus.Link`` sends them. Parsers take a reply or
signal body as ``object`` (jeepney hands back whatever the peer sent, and a capsule's manager
is not a trusted peer) and either return typed values or raise ``BadReply``.

API reference: org.freedesktop.systemd1(5).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from jeepney import (
    DBusAddress,
    MatchRule,
    Message,
    new_method_call,
)

from .errors import BadReply
from .values import UINT64_MAX, Stdio

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
JOB_IFACE = "org.freedesktop.systemd1.Job"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
PEER_IFACE = "org.freedesktop.DBus.Peer"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"


MANAGER = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD_BUS_NAME, interface=MANAGER_IFACE)


# ---------------------------------------------------------------------------------------------
# Object paths


_PATH_SAFE = re.compile(r"[A-Za-z0-9]")


def unit_path(unit: str) -> str:
    """The object path of a unit, escaped like sd-bus's bus_label_escape()."""
    if not unit:
        return UNIT_PATH_PREFIX + "_"
    out = []
    for i, byte in enumerate(unit.encode()):
        char = chr(byte)
        # bus_label_escape: alnum stays, except a leading digit; everything else is _xx.
        if _PATH_SAFE.fullmatch(char) and not (i == 0 and char.isdigit()):
            out.append(char)
        else:
            out.append(f"_{byte:02x}")
    return UNIT_PATH_PREFIX + "".join(out)


def unit_from_path(path: str) -> str | None:
    """Inverse of unit_path(); None for paths outside /org/freedesktop/systemd1/unit/."""
    if not path.startswith(UNIT_PATH_PREFIX):
        return None
    label = path[len(UNIT_PATH_PREFIX) :]
    raw = bytearray()
    i = 0
    while i < len(label):
        if label[i] == "_":
            try:
                raw.append(int(label[i + 1 : i + 3], 16))
            except ValueError:
                return None
            i += 3
        else:
            raw.append(ord(label[i]))
            i += 1
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------------------------------------
# Match rules (the bus daemon's own calls, Hello and AddMatch, are capsuled.dbus's).
#
# On a bus, any client may broadcast a signal with any path and interface; only the
# sender field, which the bus daemon sets, tells PID 1's signals from forgeries. The bus daemon
# resolves a well-known sender name in AddMatch, but a message carries the sender's *unique*
# name, so local filtering needs that (GetNameOwner). On a peer-to-peer link there is no sender
# field at all: pass sender=None.


def job_removed_rule(sender: str | None = SYSTEMD_BUS_NAME) -> MatchRule:
    """Every JobRemoved signal of the manager.

    PID 1 sends JobRemoved to the bus when somebody is subscribed *or* the job was queued by a
    tracked client (foreach_job_bus() in src/core/dbus-job.c), so the client that queued a job
    gets it without Subscribe(); on a private (peer-to-peer) link it is always sent.
    """
    return MatchRule(type="signal", sender=sender, interface=MANAGER_IFACE, member="JobRemoved")


def manager_broadcast_rules() -> tuple[MatchRule, ...]:
    """What a service manager sends on a private link whether asked or not (bus_foreach_bus() in
    src/core/dbus.c: "Send to all direct buses, unconditionally"): its Manager signals (UnitNew,
    JobRemoved, Reloading, ...) and PropertiesChanged of itself, its units and its jobs."""
    return (
        MatchRule(type="signal", interface=MANAGER_IFACE, path=MANAGER_PATH),
        MatchRule(
            type="signal",
            interface=PROPERTIES_IFACE,
            member="PropertiesChanged",
            path_namespace=MANAGER_PATH,
        ),
    )


def unit_properties_changed_rule(
    path: str | None = None, sender: str | None = SYSTEMD_BUS_NAME
) -> MatchRule:
    """PropertiesChanged of one unit object (or of all units, path=None)."""
    if path is None:
        rule = MatchRule(
            type="signal",
            sender=sender,
            interface=PROPERTIES_IFACE,
            member="PropertiesChanged",
            path_namespace=UNIT_PATH_PREFIX.rstrip("/"),
        )
    else:
        rule = MatchRule(
            type="signal",
            sender=sender,
            interface=PROPERTIES_IFACE,
            member="PropertiesChanged",
            path=path,
        )
    return rule


# ---------------------------------------------------------------------------------------------
# Builders: properties


def get_property(path: str, interface: str, name: str) -> Message:
    """org.freedesktop.DBus.Properties.Get(interface, name) on a systemd object."""
    addr = DBusAddress(path, bus_name=SYSTEMD_BUS_NAME, interface=PROPERTIES_IFACE)
    return new_method_call(addr, "Get", "ss", (interface, name))


def get_all_properties(path: str, interface: str) -> Message:
    """org.freedesktop.DBus.Properties.GetAll(interface) on a systemd object."""
    addr = DBusAddress(path, bus_name=SYSTEMD_BUS_NAME, interface=PROPERTIES_IFACE)
    return new_method_call(addr, "GetAll", "s", (interface,))


def ping() -> Message:
    """org.freedesktop.DBus.Peer.Ping on PID 1: answered after every signal PID 1 queued before
    it read the Ping (the manager flushes its D-Bus queue before each message it dispatches)."""
    addr = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD_BUS_NAME, interface=PEER_IFACE)
    return new_method_call(addr, "Ping")


def manager_version() -> Message:
    """The manager's Version property (e.g. "257.9-1")."""
    return get_property(MANAGER_PATH, MANAGER_IFACE, "Version")


# ---------------------------------------------------------------------------------------------
# Builders: org.freedesktop.systemd1.Manager


def _manager_call(
    method: str, signature: str | None = None, body: tuple[object, ...] = ()
) -> Message:
    return new_method_call(MANAGER, method, signature, body)


def subscribe() -> Message:
    """Manager.Subscribe(): ask PID 1 to broadcast unit/job signals (counted per client)."""
    return _manager_call("Subscribe")


def unsubscribe() -> Message:
    """Manager.Unsubscribe()."""
    return _manager_call("Unsubscribe")


def list_units() -> Message:
    """Manager.ListUnits() -> a(ssssssouso)."""
    return _manager_call("ListUnits")


def list_units_by_patterns(states: Sequence[str], patterns: Sequence[str]) -> Message:
    """Manager.ListUnitsByPatterns(states, patterns) -> a(ssssssouso)."""
    return _manager_call("ListUnitsByPatterns", "asas", (list(states), list(patterns)))


def list_unit_files() -> Message:
    """Manager.ListUnitFiles() -> a(ss) (path, state)."""
    return _manager_call("ListUnitFiles")


def start_unit(unit: str, mode: str = "replace") -> Message:
    """Manager.StartUnit(name, mode) -> job path."""
    return _manager_call("StartUnit", "ss", (unit, mode))


def stop_unit(unit: str, mode: str = "replace") -> Message:
    """Manager.StopUnit(name, mode) -> job path."""
    return _manager_call("StopUnit", "ss", (unit, mode))


def restart_unit(unit: str, mode: str = "replace") -> Message:
    """Manager.RestartUnit(name, mode) -> job path."""
    return _manager_call("RestartUnit", "ss", (unit, mode))


def reset_failed_unit(unit: str) -> Message:
    """Manager.ResetFailedUnit(name)."""
    return _manager_call("ResetFailedUnit", "s", (unit,))


def clean_unit(unit: str, what: Sequence[str]) -> Message:
    """Manager.CleanUnit(name, mask): remove the unit's runtime/state/cache/logs/... dirs."""
    return _manager_call("CleanUnit", "sas", (unit, list(what)))


def add_dependency_unit_files(
    files: Sequence[str], target: str, dep_type: str, runtime: bool = False, force: bool = False
) -> Message:
    """Manager.AddDependencyUnitFiles(files, target, type, runtime, force) -> a(sss) changes.

    This is `systemctl add-wants TARGET UNIT`: a symlink in TARGET.wants/, no [Install] needed.
    """
    return _manager_call(
        "AddDependencyUnitFiles", "asssbb", (list(files), target, dep_type, runtime, force)
    )


def disable_unit_files_with_flags(files: Sequence[str], flags: int = 0) -> Message:
    """Manager.DisableUnitFilesWithFlags(files, flags) -> a(sss) changes."""
    return _manager_call("DisableUnitFilesWithFlags", "ast", (list(files), flags))


def reload() -> Message:
    """Manager.Reload(): daemon-reload."""
    return _manager_call("Reload")


PropertyValue = tuple[str, object]  # (D-Bus signature, value) as jeepney encodes a variant


def set_unit_properties(
    unit: str, runtime: bool, properties: Sequence[tuple[str, PropertyValue]]
) -> Message:
    """Manager.SetUnitProperties(name, runtime, a(sv)): `systemctl set-property`."""
    return _manager_call("SetUnitProperties", "sba(sv)", (unit, runtime, list(properties)))


def start_transient_unit(
    unit: str, properties: Sequence[tuple[str, PropertyValue]], mode: str = "fail"
) -> Message:
    """Manager.StartTransientUnit(name, mode, properties, aux=[]) -> job path."""
    return _manager_call(
        "StartTransientUnit", "ssa(sv)a(sa(sv))", (unit, mode, list(properties), [])
    )


def transient_service_properties(
    argv: Sequence[str],
    environment: Sequence[str] = (),
    working_directory: str | None = None,
    description: str | None = None,
    stdio: Stdio | None = None,
) -> list[tuple[str, PropertyValue]]:
    """Properties for a transient Type=exec service, as `systemd-run` builds them.

    Type=exec: the start job fails when execve() does (missing binary), instead of "done".
    ExecStartEx needs systemd >= 243.
    No AddRef: a peer-to-peer link has no sender name to track, and the capsule manager
    answers AddRef with InvalidArgs there (verified on 257); exit status is read from the
    PropertiesChanged signals instead.
    """
    if not argv:
        raise ValueError("argv must not be empty")
    props: list[tuple[str, PropertyValue]] = [
        # Only the executable, never the arguments (unlike systemd-run): the Description is
        # shown by ListUnits to everyone who may read the capsule and logged by the manager
        # ("Started ... - DESCRIPTION."), and arguments may carry secrets (issue 11, item 13).
        ("Description", ("s", description or argv[0])),
        ("Type", ("s", "exec")),
        # ExecStartEx with "no-env-expand" (the ":" prefix): argv reaches execve() verbatim.
        # Plain ExecStart would expand "$FOO" and turn "$$" into "$" (systemd.service(5)
        # "Command lines"), which a caller passing a list of arguments does not expect.
        ("ExecStartEx", ("a(sasas)", [(argv[0], list(argv), ["no-env-expand"])])),
    ]
    # CollectMode=inactive-or-failed (systemd-run --collect): a failed run does not linger and
    # block its name; its exit status travels in the PropertiesChanged signals, its output in
    # the journal.
    props.append(("CollectMode", ("s", "inactive-or-failed")))
    if environment:
        props.append(("Environment", ("as", list(environment))))
    if working_directory is not None:
        props.append(("WorkingDirectory", ("s", working_directory)))
    if stdio is not None:
        # As run.c: TTYPath= first for a pty, then the three fds (the link must have
        # negotiated unix fds), and SIGPIPE as an interactive command expects it.
        if stdio.tty_path is not None:
            props.append(("TTYPath", ("s", stdio.tty_path)))
        props += [
            ("StandardInputFileDescriptor", ("h", stdio.stdin)),
            ("StandardOutputFileDescriptor", ("h", stdio.stdout)),
            ("StandardErrorFileDescriptor", ("h", stdio.stderr)),
            ("IgnoreSIGPIPE", ("b", False)),
        ]
    return props


# ---------------------------------------------------------------------------------------------
# Parsers


def parse_version(value: object) -> int:
    """Manager.Version -> major number: "257.9-1" -> 257, "v256~rc3" -> 256."""
    if not isinstance(value, str):
        raise BadReply(f"Version is not a string: {value!r}")
    match = re.match(r"v?(\d+)", value.strip())
    if match is None:
        raise BadReply(f"unparsable systemd version {value!r}")
    return int(match.group(1))


def unwrap_variant(value: object) -> object:
    """jeepney decodes a variant as (signature, value); return the value."""
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)):
        raise BadReply(f"not a variant: {value!r}")
    return value[1]


def parse_properties(body: object) -> dict[str, object]:
    """GetAll reply body (a{sv},) -> {name: value}."""
    if not (isinstance(body, tuple) and len(body) == 1 and isinstance(body[0], dict)):
        raise BadReply("GetAll reply is not (a{sv})")
    return _parse_prop_dict(body[0])


def _parse_prop_dict(raw: Mapping[object, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise BadReply(f"property name is not a string: {key!r}")
        out[key] = unwrap_variant(value)
    return out


def parse_get_property(body: object) -> object:
    """Get reply body (v,) -> the value."""
    if not (isinstance(body, tuple) and len(body) == 1):
        raise BadReply("Get reply is not (v)")
    return unwrap_variant(body[0])


def parse_object_path(body: object) -> str:
    """A reply of one object path (StartUnit, StopUnit, GetUnit ...)."""
    if not (isinstance(body, tuple) and len(body) == 1 and isinstance(body[0], str)):
        raise BadReply("reply is not (o)")
    return body[0]


@dataclass(frozen=True, slots=True)
class UnitListEntry:
    """One row of ListUnits / ListUnitsByPatterns."""

    name: str
    description: str
    load_state: str
    active_state: str
    sub_state: str
    path: str


def parse_unit_list(body: object) -> list[UnitListEntry]:
    """ListUnits reply body (a(ssssssouso),) -> entries."""
    if not (isinstance(body, tuple) and len(body) == 1 and isinstance(body[0], list)):
        raise BadReply("ListUnits reply is not (a(ssssssouso))")
    out = []
    for row in body[0]:
        if not (isinstance(row, tuple) and len(row) == 10):
            raise BadReply(f"bad ListUnits row {row!r}")
        name, description, load, active, sub, _following, path = row[:7]
        fields = (name, description, load, active, sub, path)
        if not all(isinstance(f, str) for f in fields):
            raise BadReply(f"bad ListUnits row {row!r}")
        out.append(
            UnitListEntry(str(name), str(description), str(load), str(active), str(sub), str(path))
        )
    return out


def parse_unit_file_list(body: object) -> list[tuple[str, str]]:
    """ListUnitFiles reply body (a(ss),) -> [(path, state)]."""
    if not (isinstance(body, tuple) and len(body) == 1 and isinstance(body[0], list)):
        raise BadReply("ListUnitFiles reply is not (a(ss))")
    out = []
    for row in body[0]:
        if not (
            isinstance(row, tuple)
            and len(row) == 2
            and isinstance(row[0], str)
            and isinstance(row[1], str)
        ):
            raise BadReply(f"bad ListUnitFiles row {row!r}")
        out.append((row[0], row[1]))
    return out


@dataclass(frozen=True, slots=True)
class UnitFileChange:
    """One (type, file, destination) row of an Enable/Disable/AddDependency reply."""

    change: str  # "symlink" or "unlink" (and a few rarer kinds)
    file: str
    destination: str


def parse_changes(body: object) -> list[UnitFileChange]:
    """The a(sss) changes list at the end of unit-file method replies."""
    if not (isinstance(body, tuple) and body and isinstance(body[-1], list)):
        raise BadReply("reply has no a(sss) change list")
    out = []
    for row in body[-1]:
        if not (isinstance(row, tuple) and len(row) == 3 and all(isinstance(f, str) for f in row)):
            raise BadReply(f"bad change row {row!r}")
        out.append(UnitFileChange(str(row[0]), str(row[1]), str(row[2])))
    return out


@dataclass(frozen=True, slots=True)
class JobRemoved:
    """Manager.JobRemoved(u id, o job, s unit, s result)."""

    job_id: int
    job: str
    unit: str
    result: str


def parse_job_removed(body: object) -> JobRemoved:
    """JobRemoved signal body -> JobRemoved."""
    if not (
        isinstance(body, tuple)
        and len(body) == 4
        and isinstance(body[0], int)
        and isinstance(body[1], str)
        and isinstance(body[2], str)
        and isinstance(body[3], str)
    ):
        raise BadReply(f"bad JobRemoved body {body!r}")
    return JobRemoved(body[0], body[1], body[2], body[3])


@dataclass(frozen=True, slots=True)
class PropertiesChanged:
    """org.freedesktop.DBus.Properties.PropertiesChanged(s, a{sv}, as)."""

    interface: str
    changed: dict[str, object]
    invalidated: list[str]


def parse_properties_changed(body: object) -> PropertiesChanged:
    """PropertiesChanged signal body -> PropertiesChanged."""
    if not (
        isinstance(body, tuple)
        and len(body) == 3
        and isinstance(body[0], str)
        and isinstance(body[1], dict)
        and isinstance(body[2], list)
        and all(isinstance(x, str) for x in body[2])
    ):
        raise BadReply("bad PropertiesChanged body")
    return PropertiesChanged(body[0], _parse_prop_dict(body[1]), [str(x) for x in body[2]])


def prop_str(props: Mapping[str, object], name: str, default: str = "") -> str:
    """A string property, or default when absent; BadReply when of the wrong type."""
    value = props.get(name, default)
    if not isinstance(value, str):
        raise BadReply(f"property {name} is not a string")
    return value


def prop_int(props: Mapping[str, object], name: str) -> int | None:
    """An integer property; None when absent."""
    value = props.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadReply(f"property {name} is not an integer")
    return value


def prop_u64(props: Mapping[str, object], name: str) -> int | None:
    """A uint64 property where UINT64_MAX means unset/infinity -> None."""
    value = prop_int(props, name)
    if value is None or value == UINT64_MAX:
        return None
    return value
