"""Exact replies for well-formed calls: lookup errors, validation, org.varlink.service."""

from __future__ import annotations

import json

import pytest

from protocol.harness import IDL_TEXT, RawClient, ThreadServer

T = "org.example.test"
SVC = "org.varlink.service"

EVERYTHING = {
    "b": True,
    "i": -3,
    "f": 1.5,
    "s": "ü",
    "o": {"any": [1, None]},
    "a": [1, 2],
    "d": {"k": False},
    "n": {"name": "n"},
    "e": "two",
    "anon": {"x": 1},
    "colour": "green",
}


def test_get_info(client: RawClient) -> None:
    assert client.call(f"{SVC}.GetInfo") == {
        "parameters": {
            "vendor": "capsuled",
            "product": "test",
            "version": "1",
            "url": "https://example.org/",
            "interfaces": [SVC, T],
        }
    }


def test_interface_description_is_the_file_verbatim(client: RawClient) -> None:
    reply = client.call(f"{SVC}.GetInterfaceDescription", interface=T)
    assert reply == {"parameters": {"description": IDL_TEXT}}
    assert "# A test interface" in IDL_TEXT  # comments are part of what is served


def test_service_description_and_unknown_interface(client: RawClient) -> None:
    reply = client.call(f"{SVC}.GetInterfaceDescription", interface=SVC)
    desc = reply["parameters"]
    assert isinstance(desc, dict)
    assert "interface org.varlink.service" in desc["description"]
    assert client.call(f"{SVC}.GetInterfaceDescription", interface="org.nope") == {
        "error": f"{SVC}.InterfaceNotFound",
        "parameters": {"interface": "org.nope"},
    }
    assert client.call(f"{SVC}.GetInterfaceDescription") == {
        "error": f"{SVC}.InvalidParameter",
        "parameters": {"parameter": "interface"},
    }


@pytest.mark.parametrize(
    ("method", "error", "params"),
    [
        ("org.nope.Method", "InterfaceNotFound", {"interface": "org.nope"}),
        (f"{T}.Nope", "MethodNotFound", {"method": f"{T}.Nope"}),
        (f"{SVC}.Nope", "MethodNotFound", {"method": f"{SVC}.Nope"}),
        (f"{T}.Unimplemented", "MethodNotImplemented", {"method": f"{T}.Unimplemented"}),
        (f"{T}.StreamOnly", "InvalidParameter", {"parameter": "count"}),
    ],
)
def test_lookup_errors(client: RawClient, method: str, error: str, params: object) -> None:
    assert client.call(method) == {"error": f"{SVC}.{error}", "parameters": params}


def test_expected_more(client: RawClient) -> None:
    assert client.call(f"{T}.StreamOnly", count=1) == {
        "error": f"{SVC}.ExpectedMore",
        "parameters": {},
    }


def test_upgrade_is_refused_with_invalid_parameter(client: RawClient) -> None:
    client.send({"method": f"{T}.Ping", "upgrade": True})
    assert client.recv() == {
        "error": f"{SVC}.InvalidParameter",
        "parameters": {"parameter": "upgrade"},
    }
    assert client.call(f"{T}.Ping", text="still") == {"parameters": {"text": "still"}}


def test_echo_everything_and_null_equals_absent(client: RawClient) -> None:
    expected = dict(EVERYTHING, m=None, nested=None)
    expected["n"] = {"name": "n", "count": None}
    expected["anon"] = {"x": 1, "y": None}
    assert client.call(f"{T}.Echo", value=EVERYTHING) == {"parameters": {"value": expected}}
    with_nulls = dict(EVERYTHING, m=None, nested=[None, {"k": {"name": "x", "count": 2}}])
    reply = client.call(f"{T}.Echo", value=with_nulls)
    value = reply["parameters"]
    assert isinstance(value, dict)
    assert value["value"]["nested"] == [None, {"k": {"name": "x", "count": 2}}]
    assert client.call(f"{T}.Ping") == {"parameters": {"text": None}}
    assert client.call(f"{T}.Ping", text=None) == {"parameters": {"text": None}}


def test_float_accepts_integers(client: RawClient) -> None:
    reply = client.call(f"{T}.Echo", value=dict(EVERYTHING, f=2))
    assert json.dumps(reply).count('"f": 2.0') == 1


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        ({"i": True}, "value.i"),  # a bool is not an int
        ({"i": 1.0}, "value.i"),  # a float is not an int
        ({"i": "1"}, "value.i"),
        ({"i": 2**64}, "value.i"),
        ({"f": True}, "value.f"),
        ({"f": "1.5"}, "value.f"),
        ({"b": 1}, "value.b"),
        ({"b": None}, "value.b"),
        ({"s": 1}, "value.s"),
        ({"o": []}, "value.o"),
        ({"m": 1}, "value.m"),
        ({"a": [1, "2"]}, "value.a.1"),
        ({"a": {}}, "value.a"),
        ({"d": {"k": 0}}, "value.d.k"),
        ({"d": []}, "value.d"),
        ({"n": {"name": "x", "extra": 1}}, "value.n.extra"),
        ({"n": {}}, "value.n.name"),
        ({"n": {"name": "x", "count": 1.5}}, "value.n.count"),
        ({"e": "four"}, "value.e"),
        ({"e": 1}, "value.e"),
        ({"anon": {"x": 1, "y": [1]}}, "value.anon.y.0"),
        ({"colour": "blue"}, "value.colour"),
        ({"nested": [{"k": {"name": 1}}]}, "value.nested.0.k.name"),
        ({"unknown": 1}, "value.unknown"),
    ],
)
def test_invalid_parameter_names_the_dotted_path(
    client: RawClient, patch: dict[str, object], path: str
) -> None:
    assert client.call(f"{T}.Echo", value=dict(EVERYTHING, **patch)) == {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": path},
    }


def test_missing_and_unknown_top_level_parameters(client: RawClient) -> None:
    missing = client.call(f"{T}.Echo")
    assert missing["parameters"] == {"parameter": "value"}
    unknown = client.call(f"{T}.Ping", text="a", extra=1)
    assert unknown["parameters"] == {"parameter": "extra"}


def test_missing_field_of_a_nested_struct(client: RawClient) -> None:
    value = {k: v for k, v in EVERYTHING.items() if k != "b"}
    assert client.call(f"{T}.Echo", value=value)["parameters"] == {"parameter": "value.b"}


def test_declared_error_is_interface_scoped(client: RawClient) -> None:
    assert client.call(f"{T}.Fail", kind="declared") == {
        "error": f"{T}.TestFailed",
        "parameters": {"reason": "on purpose"},
    }


def test_peer_credentials(client: RawClient) -> None:
    import os

    reply = client.call(f"{T}.WhoAmI")
    assert reply == {
        "parameters": {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(), "hasPidfd": True}
    }


def test_server_stays_up_across_many_connections(server: ThreadServer) -> None:
    for i in range(50):
        with RawClient(server.path) as c:
            assert c.call(f"{T}.Ping", text=str(i)) == {"parameters": {"text": str(i)}}
    server.wait_connections(0)
