"""capsuled.systemd.messages: builders produce the exact wire calls, parsers refuse bad shapes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jeepney import HeaderFields, Message, MessageType, new_signal
from jeepney.wrappers import DBusAddress

from capsuled import dbus
from capsuled.systemd import errors
from capsuled.systemd import messages as m
from capsuled.systemd.values import UINT64_MAX


def wire(msg: Message) -> Message:
    """Serialise and parse back, as the peer would see it."""
    return Message.from_buffer(msg.serialise(7))


def fields(msg: Message) -> dict[str, object]:
    return {k.name: v for k, v in wire(msg).header.fields.items()}


# -- object paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "path"),
    [
        # As bus_label_escape() does; all but "" checked with busctl LoadUnit/GetUnit on 257.
        ("capsule@foo.service", "/org/freedesktop/systemd1/unit/capsule_40foo_2eservice"),
        ("capsule@a-b_c.service", "/org/freedesktop/systemd1/unit/capsule_40a_2db_5fc_2eservice"),
        ("dbus.service", "/org/freedesktop/systemd1/unit/dbus_2eservice"),
        ("-.mount", "/org/freedesktop/systemd1/unit/_2d_2emount"),
        ("1x.service", "/org/freedesktop/systemd1/unit/_31x_2eservice"),
        ("", "/org/freedesktop/systemd1/unit/_"),
    ],
)
def test_unit_path_escapes_like_systemd(unit: str, path: str) -> None:
    assert m.unit_path(unit) == path


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), min_size=1))
def test_unit_path_round_trips(unit: str) -> None:
    path = m.unit_path(unit)
    assert m.unit_from_path(path) == unit
    # A D-Bus object path element is [A-Za-z0-9_]+ only.
    assert all(c.isascii() and (c.isalnum() or c == "_") for c in path[len(m.UNIT_PATH_PREFIX) :])


@pytest.mark.parametrize(
    "path", ["/org/freedesktop/systemd1/job/1", "/org/freedesktop/systemd1/unit/_zz", "/x"]
)
def test_unit_from_path_rejects_foreign_paths(path: str) -> None:
    assert m.unit_from_path(path) is None


# -- builders ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "member"),
    [(m.start_unit, "StartUnit"), (m.stop_unit, "StopUnit"), (m.restart_unit, "RestartUnit")],
)
def test_job_calls_address_pid1_manager(builder: object, member: str) -> None:
    msg = builder("capsule@x.service")  # type: ignore[operator]  # parametrized callables
    f = fields(msg)
    assert f["destination"] == "org.freedesktop.systemd1"
    assert f["path"] == "/org/freedesktop/systemd1"
    assert f["interface"] == "org.freedesktop.systemd1.Manager"
    assert f["member"] == member
    assert f["signature"] == "ss"
    assert wire(msg).body == ("capsule@x.service", "replace")


def test_clean_unit_sends_mask() -> None:
    msg = wire(m.clean_unit("capsule@x.service", ["all"]))
    assert msg.header.fields[HeaderFields.signature] == "sas"
    assert msg.body == ("capsule@x.service", ["all"])


def test_add_dependency_is_add_wants() -> None:
    msg = wire(m.add_dependency_unit_files(["capsule@x.service"], "multi-user.target", "Wants"))
    assert msg.header.fields[HeaderFields.member] == "AddDependencyUnitFiles"
    assert msg.body == (["capsule@x.service"], "multi-user.target", "Wants", False, False)


def test_set_unit_properties_encodes_uint64_variants() -> None:
    props: list[tuple[str, m.PropertyValue]] = [
        ("MemoryMax", ("t", 123)),
        ("TasksMax", ("t", UINT64_MAX)),
    ]
    msg = wire(m.set_unit_properties("capsule@x.service", False, props))
    assert msg.header.fields[HeaderFields.signature] == "sba(sv)"
    assert msg.body == ("capsule@x.service", False, props)


def test_get_all_targets_properties_interface_of_the_unit() -> None:
    f = fields(m.get_all_properties(m.unit_path("capsule@x.service"), ""))
    assert f["interface"] == "org.freedesktop.DBus.Properties"
    assert f["path"] == "/org/freedesktop/systemd1/unit/capsule_40x_2eservice"
    assert wire(m.get_all_properties("/a", "")).body == ("",)


def test_transient_service_properties_match_systemd_run() -> None:
    props = dict(
        m.transient_service_properties(["/bin/echo", "hi"], ["A=1"], "/tmp", description=None)
    )
    assert props["Type"] == ("s", "exec")
    assert props["ExecStartEx"] == (
        "a(sasas)",
        [("/bin/echo", ["/bin/echo", "hi"], ["no-env-expand"])],
    )
    assert props["Environment"] == ("as", ["A=1"])
    assert props["WorkingDirectory"] == ("s", "/tmp")
    assert "AddRef" not in props  # refused on a peer-to-peer link (no sender to track)
    msg = wire(m.start_transient_unit("run-x.service", list(props.items())))
    assert msg.header.fields[HeaderFields.signature] == "ssa(sv)a(sa(sv))"
    assert msg.body[0:2] == ("run-x.service", "fail")


def test_transient_service_needs_argv() -> None:
    with pytest.raises(ValueError, match="argv must not be empty"):
        m.transient_service_properties([])


def test_transient_without_optional_fields() -> None:
    names = [k for k, _ in m.transient_service_properties(["/bin/true"])]
    assert names == ["Description", "Type", "ExecStartEx", "CollectMode"]


# -- match rules -------------------------------------------------------------------------------


def _job_removed(sender: str | None, unit: str = "capsule@x.service") -> Message:
    emitter = DBusAddress(m.MANAGER_PATH, interface=m.MANAGER_IFACE)
    msg = new_signal(
        emitter, "JobRemoved", "uoss", (5, "/org/freedesktop/systemd1/job/5", unit, "done")
    )
    if sender is not None:
        msg.header.fields[HeaderFields.sender] = sender
    return msg


def test_job_removed_rule_serialises_for_add_match() -> None:
    assert m.job_removed_rule().serialise() == (
        "sender='org.freedesktop.systemd1',interface='org.freedesktop.systemd1.Manager',"
        "member='JobRemoved',type='signal'"
    )


def test_local_rule_refuses_forged_sender() -> None:
    """A local user may broadcast a JobRemoved; only PID 1's unique name counts."""
    rule = m.job_removed_rule(sender=":1.3")
    assert rule.matches(_job_removed(":1.3"))
    assert not rule.matches(_job_removed(":1.99"))


def test_peer_rule_matches_without_sender() -> None:
    rule = m.job_removed_rule(sender=None)
    rule.add_arg_condition(2, "capsule@x.service")
    assert rule.matches(_job_removed(None))
    assert not rule.matches(_job_removed(None, unit="capsule@y.service"))


def test_properties_changed_rule_for_all_units_uses_path_namespace() -> None:
    text = m.unit_properties_changed_rule().serialise()
    assert "path_namespace='/org/freedesktop/systemd1/unit'" in text
    assert "path=" not in text.replace("path_namespace", "")


# -- parsers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "major"), [("257.9-1", 257), ("256", 256), ("v256~rc3", 256), (" 258.1 ", 258)]
)
def test_parse_version(text: str, major: int) -> None:
    assert m.parse_version(text) == major


@pytest.mark.parametrize("value", ["", "systemd", 257, None, b"257"])
def test_parse_version_refuses(value: object) -> None:
    with pytest.raises(errors.BadReply):
        m.parse_version(value)


ROW = (
    "capsule@a.service",
    "Capsule Service Manager for a",
    "loaded",
    "active",
    "running",
    "",
    "/org/freedesktop/systemd1/unit/capsule_40a_2eservice",
    0,
    "",
    "/",
)


def test_parse_unit_list() -> None:
    (entry,) = m.parse_unit_list(([ROW],))
    assert entry == m.UnitListEntry(
        "capsule@a.service",
        "Capsule Service Manager for a",
        "loaded",
        "active",
        "running",
        "/org/freedesktop/systemd1/unit/capsule_40a_2eservice",
    )


@pytest.mark.parametrize(
    "body",
    [(), ("x",), ([ROW[:9]],), ([(1, *ROW[1:])],), ([ROW], "extra"), ({"a": 1},)],
)
def test_parse_unit_list_refuses_bad_shapes(body: object) -> None:
    with pytest.raises(errors.BadReply):
        m.parse_unit_list(body)


def test_parse_properties_unwraps_variants() -> None:
    props = m.parse_properties(({"ActiveState": ("s", "active"), "MemoryMax": ("t", 5)},))
    assert props == {"ActiveState": "active", "MemoryMax": 5}
    with pytest.raises(errors.BadReply):
        m.parse_properties(({"ActiveState": "active"},))
    with pytest.raises(errors.BadReply):
        m.parse_properties(({1: ("s", "x")},))


def test_prop_helpers() -> None:
    props: dict[str, object] = {"A": "x", "N": 3, "U": UINT64_MAX, "B": True}
    assert m.prop_str(props, "A") == "x"
    assert m.prop_str(props, "missing", "d") == "d"
    assert m.prop_int(props, "N") == 3
    assert m.prop_int(props, "missing") is None
    assert m.prop_u64(props, "U") is None  # systemd's "unset"/"infinity"
    assert m.prop_u64(props, "N") == 3
    with pytest.raises(errors.BadReply):
        m.prop_int(props, "B")  # a bool is not an integer
    with pytest.raises(errors.BadReply):
        m.prop_str(props, "N")


def test_parse_job_removed() -> None:
    ev = m.parse_job_removed(_job_removed(":1.1").body)
    assert ev == m.JobRemoved(5, "/org/freedesktop/systemd1/job/5", "capsule@x.service", "done")
    with pytest.raises(errors.BadReply):
        m.parse_job_removed((5, "/j", "u"))
    with pytest.raises(errors.BadReply):
        m.parse_job_removed(("5", "/j", "u", "done"))


def test_parse_properties_changed() -> None:
    body = ("org.freedesktop.systemd1.Unit", {"ActiveState": ("s", "failed")}, ["Foo"])
    change = m.parse_properties_changed(body)
    assert change == m.PropertiesChanged(
        "org.freedesktop.systemd1.Unit", {"ActiveState": "failed"}, ["Foo"]
    )
    with pytest.raises(errors.BadReply):
        m.parse_properties_changed(("i", {}, [1]))


def test_parse_changes_and_file_list() -> None:
    body = ([("symlink", "/etc/a", "/usr/b")],)
    assert m.parse_changes(body) == [m.UnitFileChange("symlink", "/etc/a", "/usr/b")]
    assert m.parse_changes((True, [])) == []  # EnableUnitFiles: (b carries_install_info, a(sss))
    with pytest.raises(errors.BadReply):
        m.parse_changes(([("symlink", "/etc/a")],))
    assert m.parse_unit_file_list(([("/x/a.service", "enabled")],)) == [("/x/a.service", "enabled")]
    with pytest.raises(errors.BadReply):
        m.parse_unit_file_list(([("/x/a.service", 1)],))


def test_parse_object_path_and_get_property() -> None:
    assert (
        m.parse_object_path(("/org/freedesktop/systemd1/job/1",))
        == "/org/freedesktop/systemd1/job/1"
    )
    assert m.parse_get_property((("s", "257.9-1"),)) == "257.9-1"
    with pytest.raises(errors.BadReply):
        m.parse_object_path((1,))
    with pytest.raises(errors.BadReply):
        m.parse_get_property(("257",))


def test_reply_types_are_method_calls() -> None:
    for msg in (dbus.hello(), m.subscribe(), m.reload(), m.list_units(), m.manager_version()):
        assert wire(msg).header.message_type is MessageType.method_call


# -- error table -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("org.freedesktop.systemd1.NoSuchUnit", errors.NoSuchUnit),
        ("org.freedesktop.systemd1.UnitBusy", errors.UnitBusy),
        ("org.freedesktop.DBus.Error.AccessDenied", errors.AccessDenied),
        ("org.freedesktop.DBus.Error.InteractiveAuthorizationRequired", errors.AccessDenied),
        ("org.freedesktop.DBus.Error.ServiceUnknown", errors.SystemdUnavailable),
        ("org.freedesktop.DBus.Error.NoReply", errors.BackendTimeout),
        ("org.freedesktop.DBus.Error.InvalidArgs", errors.InvalidArgument),
        ("org.example.Whatever", errors.DBusCallFailed),
    ],
)
def test_error_table(name: str, cls: type[errors.BackendError]) -> None:
    err = errors.error_from_dbus(name, "text", "capsule@x.service")
    assert type(err) is cls
    assert isinstance(err, errors.BackendError)


def test_error_carries_unit_and_name() -> None:
    err = errors.error_from_dbus("org.freedesktop.systemd1.NoSuchUnit", "t", "capsule@x.service")
    assert isinstance(err, errors.NoSuchUnit)
    assert err.unit == "capsule@x.service"
    other = errors.error_from_dbus("org.example.E", "boom")
    assert isinstance(other, errors.DBusCallFailed)
    assert other.name == "org.example.E"
    assert errors.JobFailed("failed", "exit-code").unit_result == "exit-code"
    assert errors.SystemdTooOld(255).version == 255
