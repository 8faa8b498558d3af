"""Owner records: atomic, durable, and refusing files we did not write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capsuled.records import CorruptRecord, Phase, RecordStore, RecordsUnwritable, new_record


def test_round_trip_and_phases(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    assert store.get("web") is None
    record = new_record("web", 1000, "alice")
    store.put(record)
    assert store.get("web") == record
    store.put(record.with_phase(Phase.READY))
    got = store.get("web")
    assert got is not None
    assert got.phase is Phase.READY
    assert got.owner == 1000
    assert [r.name for r in store.owned_by(1000, "alice")] == ["web"]
    assert store.owned_by(1001, "bob") == []


def test_put_leaves_no_temp_files_and_is_private(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.put(new_record("a", 1, None))
    store.put(new_record("b", 2, None))
    directory = tmp_path / "capsules"
    assert sorted(os.listdir(directory)) == ["a.json", "b.json"]
    assert (directory.stat().st_mode & 0o777) == 0o700
    assert ((directory / "a.json").stat().st_mode & 0o777) == 0o600


def test_delete_is_idempotent(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.put(new_record("a", 1, None))
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
        b'{"format": 1, "name": "a", "owner": 1, "phase": "ready", "created": 1, "owner_name": 7}',
        b'{"format": 1, "name": "a", "owner": 1, "phase": "ready", "created": 1, "owner_name": ""}',
        b" " * (64 * 1024 + 1),
    ],
)
def test_corrupt_records_are_refused_not_trusted(tmp_path: Path, content: bytes) -> None:
    store = RecordStore(tmp_path)
    store.put(new_record("ok", 5, None))
    (tmp_path / "capsules" / "a.json").write_bytes(content)
    with pytest.raises(CorruptRecord):
        store.get("a")
    # One bad file must not hide the others.
    assert [r.name for r in store.all()] == ["ok"]


def test_a_reused_uid_does_not_own_the_old_accounts_records(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.put(new_record("web", 1000, "alice"))
    # alice's account was deleted; uid 1000 now belongs to "dave".
    assert store.owned_by(1000, "dave") == []
    record = store.get("web")
    assert record is not None
    assert not record.is_owner(1000, "dave")
    assert not record.is_owner(1000, None)  # the uid has no name any more
    assert record.is_owner(1000, "alice")


def test_records_without_an_owner_name_bind_the_uid_only(tmp_path: Path) -> None:
    old = b'{"format": 1, "name": "a", "owner": 1, "phase": "ready", "created": 1}'
    (tmp_path / "capsules").mkdir()
    (tmp_path / "capsules" / "a.json").write_bytes(old)
    record = RecordStore(tmp_path).get("a")
    assert record is not None
    assert record.owner_name is None
    assert record.is_owner(1, "anyone")


def test_a_kept_record_round_trips(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    record = new_record("web", 1000, "alice").with_phase(Phase.KEPT)
    store.put(record)
    assert store.get("web") == record


def test_a_write_that_fails_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    # records.py translates its OSError once: the methods answer RecordsUnwritable.
    blocked = tmp_path / "state"
    blocked.write_text("a file where the directory should be")
    store = RecordStore(blocked)
    with pytest.raises(RecordsUnwritable, match="web: "):
        store.put(new_record("web", 1000, "alice"))
    with pytest.raises(RecordsUnwritable):
        store.delete("web")
    assert blocked.read_text() == "a file where the directory should be"
