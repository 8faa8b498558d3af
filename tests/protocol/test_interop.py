"""Interoperability with the reference client (the `varlink` package), as systemd checks its
servers against varlinkctl. The only test in the suite that uses a Varlink library."""

from __future__ import annotations

import pytest
import varlink

from protocol.harness import ThreadServer

T = "org.example.test"


def test_reference_client(server: ThreadServer) -> None:
    with varlink.Client(address=f"unix:{server.path}") as client:
        # open() fetches our description with GetInterfaceDescription and parses it.
        with client.open(T) as remote:
            assert remote.Ping("hello") == {"text": "hello"}
            assert list(remote.Stream(3, _more=True)) == [
                {"index": 0},
                {"index": 1},
                {"index": 2},
                {"index": 3},
            ]
            with pytest.raises(varlink.VarlinkError) as err:
                remote.Fail("declared")
            assert err.value.error() == f"{T}.TestFailed"
            assert err.value.parameters() == {"reason": "on purpose"}
            remote.Record("via-oneway", _oneway=True)
            assert remote.Notes() == {"notes": ["via-oneway"]}
        with client.open("org.varlink.service") as svc:
            info = svc.GetInfo()
            assert info["interfaces"] == ["org.varlink.service", T]
