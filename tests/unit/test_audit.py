"""Audit records: fields, redaction, bounds, the hash chain, and delivery fallbacks."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from capsuled import audit
from capsuled.audit import REDACTED, AuditAction, AuditLog, Sensitive, verify_chain
from capsuled.trail import Trail, TrailError, read_records, trail_files


def make_log() -> tuple[AuditLog, list[dict[str, str]]]:
    written: list[dict[str, str]] = []
    return AuditLog(written.append), written


def test_record_has_the_structured_fields() -> None:
    log, written = make_log()
    log.record("create", caller_uid=1000, capsule="web", result="ok", pid=4242, note=None)
    (entry,) = written
    assert entry["CAPSULE"] == "web"
    assert entry["CAPSULED_ACTION"] == "create"
    assert entry["CAPSULED_CALLER_UID"] == "1000"
    assert entry["CAPSULED_RESULT"] == "ok"
    assert entry["CAPSULED_PID"] == "4242"
    assert "CAPSULED_NOTE" not in entry  # None values are left out
    assert entry["MESSAGE_ID"] == audit.MESSAGE_IDS[AuditAction.CREATE]
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "capsuled"
    assert entry["MESSAGE"] == "create of capsule web by uid 1000: ok"


def test_capsule_none_omits_the_field_and_unknown_action_gets_generic_id() -> None:
    log, written = make_log()
    log.record("reload-policy", caller_uid=0, capsule=None, result="ok")
    assert "CAPSULE" not in written[0]
    assert written[0]["MESSAGE_ID"] == audit.MESSAGE_ID_OTHER


@pytest.mark.parametrize(
    ("result", "priority"),
    [
        ("ok", "6"),
        ("started", "6"),
        ("denied", "5"),
        ("failed", "4"),
        ("org.capsuled.Manager.JobFailed", "4"),
    ],
)
def test_priority_follows_result(result: str, priority: str) -> None:
    log, written = make_log()
    log.record("stop", caller_uid=1, capsule="a", result=result)
    assert written[0]["PRIORITY"] == priority


def test_sensitive_values_never_reach_the_sink() -> None:
    log, written = make_log()
    secret = "API_TOKEN=hunter2-very-secret"
    entry = log.record(
        "run", caller_uid=1000, capsule="a", result="ok", environment=Sensitive([secret])
    )
    assert written[0]["CAPSULED_ENVIRONMENT"] == audit.REDACTED
    assert all("hunter2" not in v for v in written[0].values())
    assert "hunter2" not in repr(Sensitive(secret))
    assert entry == written[0]


def test_values_are_bounded() -> None:
    log, written = make_log()
    log.record("run", caller_uid=1, capsule="a", result="ok", command="x" * 100_000)
    value = written[0]["CAPSULED_COMMAND"]
    assert len(value) == audit.MAX_FIELD_CHARS
    assert value.endswith("\u2026")


@pytest.mark.parametrize("name", ["bad-name", "with space", "x" * 60, "chain", "chain_seq"])
def test_bad_or_reserved_field_names_are_refused(name: str) -> None:
    log, written = make_log()
    extra: dict[str, Any] = {name: "v"}  # any keyword, as a caller bug would pass it
    with pytest.raises(ValueError, match=r"journal field name|reserved"):
        log.record("stop", caller_uid=1, capsule="a", result="ok", **extra)
    assert written == []


def test_message_ids_are_unique_128_bit_and_cover_every_action() -> None:
    ids = [*audit.MESSAGE_IDS.values(), audit.MESSAGE_ID_OTHER]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert set(audit.MESSAGE_IDS) == set(AuditAction)


# --- the hash chain ------------------------------------------------------------------------------


def three_records() -> list[dict[str, str]]:
    log, written = make_log()
    for action in ("create", "start", "stop"):
        log.record(action, caller_uid=1000, capsule="a", result="ok")
    return written


def test_chain_verifies() -> None:
    records = three_records()
    assert [r["CAPSULED_CHAIN_SEQ"] for r in records] == ["1", "2", "3"]
    assert len({r["CAPSULED_CHAIN_ID"] for r in records}) == 1
    assert verify_chain(records) is None


def test_chain_ignores_fields_journald_adds() -> None:
    records = [
        {**r, "_PID": "60", "__CURSOR": "s=1", "CODE_LINE": "0", "_SOURCE_REALTIME_TIMESTAMP": "1"}
        for r in three_records()
    ]
    assert verify_chain(records) is None


def test_chain_detects_an_edited_record() -> None:
    records = three_records()
    records[1] = {**records[1], "CAPSULED_RESULT": "denied"}
    assert verify_chain(records) == 2


def test_chain_detects_a_deleted_record() -> None:
    records = three_records()
    del records[1]
    assert verify_chain(records) == 2


def test_chain_detects_a_recomputed_record_downstream() -> None:
    """Editing record 2 and fixing its own hash still breaks record 3."""
    records = three_records()
    forged = {**records[1], "CAPSULED_RESULT": "denied"}
    forged["CAPSULED_CHAIN"] = audit.chain_hash(records[0]["CAPSULED_CHAIN"], forged)
    records[1] = forged
    assert verify_chain(records) == 3


def test_chain_detects_records_from_another_run() -> None:
    records = three_records()
    other = three_records()
    assert verify_chain([records[0], other[1]]) == 2


# --- delivery -----------------------------------------------------------------------------------


def test_journal_sink_uses_systemd_journal_send(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, object]]] = []

    def fake_send(message: str, **kwargs: object) -> None:
        calls.append((message, kwargs))

    fake_journal = ModuleType("systemd.journal")
    fake_journal.send = fake_send  # type: ignore[attr-defined]  # a stand-in module
    fake_systemd = ModuleType("systemd")
    fake_systemd.journal = fake_journal  # type: ignore[attr-defined]  # a stand-in module
    monkeypatch.setitem(sys.modules, "systemd", fake_systemd)
    monkeypatch.setitem(sys.modules, "systemd.journal", fake_journal)
    log = AuditLog()
    log.record("start", caller_uid=7, capsule="a", result="ok")
    ((message, kwargs),) = calls
    assert message == "start of capsule a by uid 7: ok"
    assert kwargs["MESSAGE_ID"] == audit.MESSAGE_IDS[AuditAction.START]
    assert kwargs["CAPSULE"] == "a"
    assert kwargs["CAPSULED_CALLER_UID"] == "7"
    assert "MESSAGE" not in kwargs


def test_without_systemd_python_records_go_to_logging(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "systemd", None)  # import fails
    caplog.set_level(logging.INFO, logger="capsuled.audit")
    AuditLog().record("stop", caller_uid=7, capsule="a", result="ok")
    assert "stop of capsule a by uid 7: ok" in caplog.text
    assert 'CAPSULE="a"' in caplog.text


def test_a_failing_sink_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    def broken(fields: dict[str, str]) -> None:
        raise ConnectionRefusedError("journald is gone")

    caplog.set_level(logging.INFO, logger="capsuled.audit")
    log = AuditLog(broken)
    log.record("remove", caller_uid=7, capsule="a", result="failed")
    assert "cannot write audit record" in caplog.text
    assert "remove of capsule a by uid 7: failed" in caplog.text


# --- the trail sink ------------------------------------------------------------------------------


def test_both_sinks_get_the_same_record_with_the_callers_pid_and_unit(tmp_path: Path) -> None:
    written: list[dict[str, str]] = []
    trail = Trail(tmp_path / "log", key_path=tmp_path / "k", head_path=tmp_path / "h")
    log = AuditLog(sink=written.append, trail=trail)
    log.record(
        "deploy",
        caller_uid=64000,
        caller_pid=77,
        caller_unit="deploy-bot.service",
        capsule="web",
        result="ok",
        version="1.2",
        secret=Sensitive("s3cr3t"),
    )
    asyncio.run(log.sync())
    assert trail.synced_seq == trail.written_seq
    (entry,) = written
    assert (entry["CAPSULED_CALLER_PID"], entry["CAPSULED_CALLER_UNIT"]) == (
        "77",
        "deploy-bot.service",
    )
    (record,) = read_records(trail_files(tmp_path / "log"), lambda r: True, 10, 1 << 20)
    assert (record["uid"], record["pid"], record["unit"]) == (64000, 77, "deploy-bot.service")
    assert record["details"] == {"version": "1.2", "secret": REDACTED}
    assert "s3cr3t" not in (tmp_path / "log" / "audit.jsonl").read_text()


def test_a_trail_that_cannot_be_written_fails_the_record(tmp_path: Path) -> None:
    (tmp_path / "log").write_text("a file where the directory should be")
    written: list[dict[str, str]] = []
    trail = Trail(tmp_path / "log", key_path=tmp_path / "k", head_path=tmp_path / "h")
    log = AuditLog(sink=written.append, trail=trail)
    with pytest.raises(TrailError):
        log.record("stop", caller_uid=1, capsule="a", result="ok")
    assert len(written) == 1  # the journal has it all the same
