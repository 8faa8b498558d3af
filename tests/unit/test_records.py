"""Owner records: atomic, durable, and refusing files we did not write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from capsuled import records
from capsuled.records import (
    CorruptRecord,
    Phase,
    Record,
    RecordStore,
    RecordsUnwritable,
    new_record,
)


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


# -- the cache: memory saves the parsing, the disk stays the truth -----------------------------


def _edit(path: Path, text: bytes) -> None:
    """An administrator's edit in place (same inode), as `printf > file` does."""
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(text)


def test_an_edit_that_keeps_inode_and_size_counts_at_the_next_read(tmp_path: Path) -> None:
    # Within one timestamp tick of the last change, inode, size, mtime and ctime can all stay
    # the same: the store must not have kept what it read then (records.RACY_NS). Kernels
    # from 6.13 on give a change right after a stat a fine-grained time (multigrain
    # timestamps), so there this passes even without the guard; on 6.12 it does not.
    store = RecordStore(tmp_path)
    store.put(new_record("web", 1000, "alice"))
    assert [r.owner for r in store.all()] == [1000]
    path = tmp_path / "capsules" / "web.json"
    raw = path.read_bytes()
    edited = raw.replace(b'"owner": 1000', b'"owner": 1001')
    assert len(edited) == len(raw)
    assert edited != raw
    _edit(path, edited)
    record = store.get("web")
    assert record is not None
    assert record.owner == 1001
    assert [r.owner for r in store.all()] == [1001]


def test_a_record_changed_or_removed_by_hand_counts_at_the_next_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every file counts as old enough to keep: what is kept must still be checked by its stat.
    monkeypatch.setattr(records, "RACY_NS", -(10**18))
    store = RecordStore(tmp_path)
    store.put(new_record("web", 1000, "alice"))
    assert store.get("web") is not None
    path = tmp_path / "capsules" / "web.json"
    doc = json.loads(path.read_text())
    doc["owner"] = 1001
    _edit(path, json.dumps(doc).encode())  # not our formatting: another size
    record = store.get("web")
    assert record is not None
    assert record.owner == 1001
    assert [r.owner for r in store.all()] == [1001]
    _edit(path, b"not json")
    with pytest.raises(CorruptRecord):
        store.get("web")
    assert list(store.all()) == []
    path.unlink()
    assert store.get("web") is None
    (tmp_path / "capsules" / "new.json").write_text(
        json.dumps({"format": 1, "name": "new", "owner": 7, "phase": "ready", "created": 1})
    )
    assert [r.name for r in store.all()] == ["new"]
    os.rename(tmp_path / "capsules" / "new.json", tmp_path / "capsules" / "web.json")
    assert list(store.all()) == []  # a file named for another capsule is corrupt
    assert store.get("new") is None


def test_an_unchanged_record_is_not_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RecordStore(tmp_path)
    for name in ("a", "b"):
        store.put(new_record(name, 1000, "alice"))
    parsed: list[str] = []
    real = Record.from_json.__func__  # type: ignore[attr-defined]  # the classmethod's function

    def counting(cls: type[Record], raw: bytes, *, expected_name: str) -> Record:
        parsed.append(expected_name)
        return real(cls, raw, expected_name=expected_name)  # type: ignore[no-any-return]

    monkeypatch.setattr(Record, "from_json", classmethod(counting))
    assert [r.name for r in store.all()] == ["a", "b"]
    assert store.get("a") is not None
    assert parsed == ["a", "b", "a"]  # just written: too recent to keep
    parsed.clear()
    monkeypatch.setattr(records, "RACY_NS", -(10**18))  # as if they were older now
    assert [r.name for r in store.all()] == ["a", "b"]
    for _ in range(3):
        assert store.get("a") is not None
        assert [r.name for r in store.all()] == ["a", "b"]
    assert parsed == ["a", "b"]  # once each, then from memory
    RecordStore(tmp_path).get("a")
    assert parsed == ["a", "b", "a"]  # a new store reads the disk
