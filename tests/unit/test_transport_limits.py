"""The transport's limits held to what org.capsuled.Manager needs, and the accounts that share
them (issue 11, findings 3 and 8)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from capsuled import daemon, wire
from capsuled.bundle import MAX_BUNDLE_BYTES
from capsuled.methods import OPEN_STREAMS, REQUIRES_MORE
from capsuled.methods.deploy import MAX_BUNDLE_BASE64_CHARS
from capsuled.methods.inside import MAX_RUN_ARGS, MAX_RUN_ENV
from capsuled.methods.streams import MAX_WATCH_NAMES
from capsuled.names import CAPSULE_NAME_MAX
from capsuled.records import RecordStore, new_record
from capsuled.safefs import DYNAMIC_UID_MAX, DYNAMIC_UID_MIN
from capsuled.transport import MAX_CALL_BYTES, MAX_CALL_DEPTH, MAX_CALL_VALUES, Limits
from capsuled.unitfile import UNIT_FILE_MAX_BYTES
from capsuled.varlink.messages import Call, encode, parse_call

INTERFACE = "org.capsuled.Manager"


def _wire(method: str, params: dict[str, object], *, ensure_ascii: bool) -> bytes:
    """The call as a client would send it (Python's json escapes non-ASCII by default)."""
    return json.dumps(
        {"method": f"{INTERFACE}.{method}", "parameters": params}, ensure_ascii=ensure_ascii
    ).encode()


def _fits(raw: bytes) -> None:
    assert len(raw) <= MAX_CALL_BYTES, f"{len(raw)} bytes"
    parse_call(raw, max_depth=MAX_CALL_DEPTH, max_values=MAX_CALL_VALUES)


# The largest InstallUnit content in each way JSON can inflate it: control characters become
# \u00XX (6 bytes for 1), escaped non-ASCII \uXXXX (6 for 2-3) or a surrogate pair (12 for 4).
@pytest.mark.parametrize("char", ["\x01", "\u00e9", "\u4e00", "\U0001f600", '"'])
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_the_largest_install_unit_fits_the_call_cap(char: str, ensure_ascii: bool) -> None:
    content = char * (UNIT_FILE_MAX_BYTES // len(char.encode()))
    assert len(content.encode()) <= UNIT_FILE_MAX_BYTES
    params: dict[str, object] = {
        "name": "n" * CAPSULE_NAME_MAX,
        "unit": "u" * 200 + ".service",
        "content": content,
        "enable": True,
        "start": True,
        "allowInteractiveAuthentication": True,
    }
    raw = _wire("InstallUnit", params, ensure_ascii=ensure_ascii)
    _fits(raw)
    # Margin: the worst case uses less than half of the cap.
    assert len(raw) * 2 < MAX_CALL_BYTES


def test_the_largest_run_fits_the_call_cap() -> None:
    params: dict[str, object] = {
        "name": "n" * CAPSULE_NAME_MAX,
        "command": ["/usr/bin/x"] + ["-v"] * (MAX_RUN_ARGS - 1),
        "unit": "u" * 200 + ".service",
        "environment": [f"K{i}=v" for i in range(MAX_RUN_ENV)],
        "workingDirectory": "/" + "d" * 200,
        "allowInteractiveAuthentication": False,
    }
    _fits(_wire("Run", params, ensure_ascii=True))


def test_the_largest_watch_fits_the_call_cap() -> None:
    names = [f"{i:0{CAPSULE_NAME_MAX}d}" for i in range(MAX_WATCH_NAMES)]
    _fits(_wire("Watch", {"names": names}, ensure_ascii=True))


# The largest Deploy: a bundle of MAX_BUNDLE_BYTES in base64, the most the method accepts. Base64's
# alphabet needs no JSON escaping, so random content is the worst case a client sends ("/" left
# as is, as Python's json and systemd's sd-json write it); the pre-scan sees one string.
@pytest.mark.parametrize("content", ["random", "slashes"])
def test_the_largest_deploy_fits_the_call_cap_and_the_json_pre_scan(content: str) -> None:
    raw_bundle = os.urandom(MAX_BUNDLE_BYTES) if content == "random" else b"\xff" * MAX_BUNDLE_BYTES
    bundle = base64.b64encode(raw_bundle).decode()
    assert len(bundle) == MAX_BUNDLE_BASE64_CHARS
    params: dict[str, object] = {
        "name": "n" * CAPSULE_NAME_MAX,
        "bundle": bundle,
        "allowDowngrade": True,
        "allowInteractiveAuthentication": True,
    }
    for ensure_ascii in (True, False):
        raw = _wire("Deploy", params, ensure_ascii=ensure_ascii)
        _fits(raw)
        # Margin for a client that escapes more than it must (~340 KiB of the cap are left).
        assert MAX_CALL_BYTES - len(raw) > 320 * 1024


def test_the_server_caps_calls_well_below_the_clients_reply_cap() -> None:
    # Replies (Logs: up to 4 MiB of text) are read by the client with the core's 16 MiB default;
    # calls are what any local user sends us, so their cap is ours.
    from capsuled.varlink.framing import MAX_MESSAGE_BYTES

    assert Limits().max_message_bytes == MAX_CALL_BYTES < MAX_MESSAGE_BYTES
    assert Limits().max_buffered_bytes >= 32 * MAX_CALL_BYTES
    assert len(encode(Call(f"{INTERFACE}.Info"))) < MAX_CALL_BYTES


def test_per_account_shares_leave_most_to_the_others() -> None:
    # Three hostile accounts together hold at most a fifth of the connections and of the call
    # slots; it takes sixteen to fill either (the transport docstring says why these numbers).
    lim = Limits()
    assert 3 * lim.connections_per_uid <= lim.max_connections // 5
    assert 3 * lim.inflight_calls_per_uid <= lim.max_inflight_calls // 5
    assert lim.max_connections // lim.connections_per_uid == 16
    assert lim.max_inflight_calls // lim.inflight_calls_per_uid == 16
    assert 3 * lim.max_open_streams_per_uid < lim.max_open_streams
    assert lim.max_open_streams <= lim.max_streams // 8
    assert 3 * lim.max_waiting_calls_per_uid < lim.max_waiting_calls


def test_open_streams_are_the_streaming_methods_that_authorize_nothing() -> None:
    assert REQUIRES_MORE <= OPEN_STREAMS
    assert {"Watch", "List"} == OPEN_STREAMS
    assert wire.WatchParams.__required_keys__ | wire.WatchParams.__optional_keys__ == {"names"}


# -- accounts: a capsule's processes count against its owner ---------------------------------

ALICE = 1000


# What NSS (nss-systemd) answers for the dynamic uids in these tests.
DYNAMIC_USERS = {64616: "c-web", 64617: "someservice", 64620: "c-orphan", 64621: "c-a.b"}


def test_capsule_processes_count_against_the_owner(tmp_path: Path) -> None:
    records = RecordStore(tmp_path / "state")
    records.put(new_record("web", ALICE, "alice"))
    account = daemon.capsule_owner_account(records, DYNAMIC_USERS.get)
    assert account(64616) == ALICE  # alice's capsule
    assert account(64617) == 64617  # a DynamicUser= service's, not a capsule's
    assert account(64618) == 64618  # nobody's
    assert account(64620) == 64620  # no record: its own uid (made by root)
    assert account(64621) == 64621  # not a capsule name
    assert account(ALICE) == ALICE
    assert account(0) == 0


def test_only_dynamic_uids_are_looked_up(tmp_path: Path) -> None:
    asked: list[int] = []

    def lookup(uid: int) -> str | None:
        asked.append(uid)
        return "c-web"

    account = daemon.capsule_owner_account(RecordStore(tmp_path / "state"), lookup)
    for uid in (0, ALICE, DYNAMIC_UID_MIN - 1, DYNAMIC_UID_MAX + 1, DYNAMIC_UID_MIN):
        account(uid)
    assert asked == [DYNAMIC_UID_MIN]
