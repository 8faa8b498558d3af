"""Owner records: atomic, durable, and refusing files we did not write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capsuled.records import CorruptRecord, Phase, RecordStore, RecordsUnwritable, new_record


def test_round_trip_and_phases(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    assert store.get("web") is None
    record = new_record("web", 1000)
    store.put(record)
    assert store.get("web") == record
    store.put(record.with_phase(Phase.READY))
    got = store.get("web")
    assert got is not None
    assert got.phase is Phase.READY
    assert got.owner == 1000
    assert [r.name for r in store.owned_by(1000)] == ["web"]
    assert store.owned_by(1001) == []


def test_put_leaves_no_temp_files_and_is_private(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.put(new_record("a", 1))
    store.put(new_record("b", 2))
    directory = tmp_path / "capsules"
    assert sorted(os.listdir(directory)) == ["a.json", "b.json"]
    assert (directory.stat().st_mode & 0o777) == 0o700
    assert ((directory / "a.json").stat().st_mode & 0o777) == 0o600


def test_delete_is_idempotent(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.put(new_record("a", 1))
    store.delete("a")
    store.delete("a")
    assert store.get("a") is None
    assert list(store.all()) == []


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"format": 2, "name": "a", "owner": 1, "phase": "ready", "created": 1}',
        b'{"format": 1, "name": "b", "owner": 1, "phase": "ready", "created": 1}',
        b'{"format": 1, "name": "a", "owner": true, "phase": "ready", "created": 1}',
        b'{"format": 1, "name": "a", "owner": -1, "phase": "ready", "created": 1}',
        b'{"format": 1, "name": "a", "owner": 1, "phase": "gone", "created": 1}',
        b" " * (64 * 1024 + 1),
    ],
)
def test_corrupt_records_are_refused_not_trusted(tmp_path: Path, content: bytes) -> None:
    store = RecordStore(tmp_path)
    store.put(new_record("ok", 5))
    (tmp_path / "capsules" / "a.json").write_bytes(content)
    with pytest.raises(CorruptRecord):
        store.get("a")
    # One bad file must not hide the others.
    assert [r.name for r in store.all()] == ["ok"]


def test_a_write_that_fails_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    # records.py translates its OSError once: the methods answer RecordsUnwritable.
    blocked = tmp_path / "state"
    blocked.write_text("a file where the directory should be")
    store = RecordStore(blocked)
    with pytest.raises(RecordsUnwritable, match="web: "):
        store.put(new_record("web", 1000))
    with pytest.raises(RecordsUnwritable):
        store.delete("web")
    assert blocked.read_text() == "a file where the directory should be"
