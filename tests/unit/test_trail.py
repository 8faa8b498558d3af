"""The audit trail (capsuled.trail): writing, resuming, rotating, and capsuled.verify naming the
record at fault for every kind of tampering the issue lists."""

from __future__ import annotations

import itertools
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from capsuled import trail as tr
from capsuled.verify import TrailReport, main_audit, verify_trail


class Bed:
    """A trail in a temp dir, with its key and head there too."""

    def __init__(self, root: Path, *, checkpoint_every: int = 4, rotate_bytes: int = 1 << 20):
        self.dir = root / "log"
        self.key = root / "state" / "audit-signing.key"
        self.head = root / "state" / "audit-head.json"
        self.checkpoint_every = checkpoint_every
        self.rotate_bytes = rotate_bytes
        self.clock = iter(range(1_000_000, 10**12))

    def trail(self) -> tr.Trail:
        return tr.Trail(
            self.dir,
            key_path=self.key,
            head_path=self.head,
            checkpoint_every=self.checkpoint_every,
            rotate_bytes=self.rotate_bytes,
            clock=lambda: next(self.clock),
        )

    def write(self, n: int, trail: tr.Trail | None = None, capsule: str = "web") -> tr.Trail:
        t = trail or self.trail()
        for i in range(n):
            t.append(event(i, capsule))
        return t

    def files(self) -> list[Path]:
        return tr.trail_files(self.dir)

    def verify(self, *, head: bool = True) -> TrailReport:
        public = tr.load_public_key(Path(f"{self.key}.pub"))
        return verify_trail(
            tr.iter_file_contents(self.files()),
            public,
            head=tr.read_head(self.head) if head else None,
        )

    def lines(self) -> list[bytes]:
        return (self.dir / tr.CURRENT_FILE).read_bytes().splitlines()

    def rewrite(self, lines: list[bytes]) -> None:
        (self.dir / tr.CURRENT_FILE).write_bytes(b"".join(line + b"\n" for line in lines))


def event(i: int, capsule: str = "web") -> dict[str, object]:
    return {
        "time": 1_700_000_000_000_000 + i,
        "uid": 1000,
        "pid": 4242,
        "unit": "session-3.scope",
        "action": "start",
        "capsule": capsule,
        "result": "ok",
        "details": {"n": str(i)},
    }


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    return Bed(tmp_path)


def records(lines: list[bytes]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines]


# -- writing ---------------------------------------------------------------------------------


def test_records_chain_and_checkpoints_are_signed(bed: Bed) -> None:
    t = bed.write(9)
    t.close()
    docs = records(bed.lines())
    assert [d["seq"] for d in docs] == list(range(1, len(docs) + 1))
    assert docs[0]["type"] == "start"
    assert docs[0]["prev"] == tr.GENESIS
    kinds = [d["type"] for d in docs]
    assert kinds.count("record") == 9
    # every 4 records a checkpoint, and one more at close for what came after the last one
    assert kinds.count("checkpoint") == 3
    assert kinds[-1] == "checkpoint"
    lines = bed.lines()
    for before, line in itertools.pairwise(lines):
        assert json.loads(line)["prev"] == tr.line_hash(before)
    report = bed.verify()
    assert report.ok, report.problem
    assert (report.records, report.unsigned_tail) == (len(docs), 0)


def test_the_key_is_made_root_only_and_the_head_names_the_last_checkpoint(bed: Bed) -> None:
    bed.write(4).close()
    assert stat.S_IMODE(bed.key.stat().st_mode) == 0o600
    head = tr.read_head(bed.head)
    assert head is not None
    last = bed.lines()[-1]
    assert head["seq"] == json.loads(last)["seq"]
    assert head["hash"] == tr.line_hash(last)


def test_a_key_readable_by_others_is_refused(bed: Bed) -> None:
    bed.write(1).close()
    os.chmod(bed.key, 0o644)
    with pytest.raises(tr.TrailError, match="mode 0600"):
        tr.ensure_signing_key(bed.key)


def test_sync_covers_what_was_written(bed: Bed) -> None:
    t = bed.write(2)
    assert t.synced_seq < t.written_seq
    t.sync()
    assert t.synced_seq == t.written_seq


def test_a_new_process_continues_the_chain(bed: Bed) -> None:
    bed.write(3).close()
    bed.write(2).close()  # another daemon run
    report = bed.verify()
    assert report.ok, report.problem
    docs = records(bed.lines())
    assert [d["type"] for d in docs].count("start") == 1


def crash(trail: tr.Trail) -> None:
    """What a killed daemon leaves: the file closed by the kernel, no last checkpoint."""
    assert trail._open is not None
    os.close(trail._open.fd)
    trail._open = None


def test_a_crashed_run_is_signed_by_the_next(bed: Bed) -> None:
    crash(bed.write(6))  # the tail after the checkpoint at record 4 is unsigned
    assert bed.verify(head=False).unsigned_tail > 0
    t = bed.write(1)
    docs = records(bed.lines())
    assert docs[-1]["type"] == "checkpoint"  # signed at the first append after the crash
    t.close()
    assert bed.verify().ok


def test_a_torn_last_line_is_cut_and_recorded(bed: Bed) -> None:
    bed.write(2).close()
    with open(bed.dir / tr.CURRENT_FILE, "ab") as f:
        f.write(b'{"seq": 99, "half')
    bed.write(1).close()
    docs = records(bed.lines())
    recovered = [d for d in docs if d["type"] == "recovered"]
    assert recovered
    assert recovered[0]["dropped_bytes"] == len(b'{"seq": 99, "half')
    assert bed.verify().ok


def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    bed = Bed(tmp_path, checkpoint_every=100, rotate_bytes=2000)
    bed.write(30).close()
    files = bed.files()
    assert len(files) > 2
    assert files[-1].name == tr.CURRENT_FILE
    for path in files[:-1]:
        last = json.loads(path.read_bytes().splitlines()[-1])
        assert (last["type"], last["reason"]) == ("checkpoint", "rotation")
    report = bed.verify()
    assert report.ok, report.problem
    assert report.first_seq == 1


def test_old_rotated_files_are_pruned_and_the_rest_still_verifies(tmp_path: Path) -> None:
    bed = Bed(tmp_path, checkpoint_every=100, rotate_bytes=1500)
    t = bed.trail()
    t._max_rotated = 2  # a small cap, to reach it quickly
    bed.write(40, t).close()
    rotated = [p for p in bed.files() if p.name != tr.CURRENT_FILE]
    assert len(rotated) == 2
    report = bed.verify()
    assert report.ok, report.problem
    assert report.first_seq != 1
    assert report.notes  # says where the kept trail starts


def test_read_records_filters_limits_and_keeps_order(bed: Bed) -> None:
    t = bed.write(5, capsule="web")
    bed.write(3, t, capsule="db")
    bed.write(2, t, capsule="web")
    got = tr.read_records(bed.files(), lambda r: r.get("capsule") == "web", 4, 1 << 20)
    assert [r["details"] for r in got] == [{"n": str(i)} for i in (3, 4, 0, 1)]
    assert tr.read_records(bed.files(), lambda r: True, 0, 1 << 20) == []


def test_read_records_skips_a_line_being_written(bed: Bed) -> None:
    bed.write(2).close()
    with open(bed.dir / tr.CURRENT_FILE, "ab") as f:
        f.write(b'{"type":"record","capsule":"web"')
    got = tr.read_records(bed.files(), lambda r: True, 10, 1 << 20)
    assert len(got) == 2


# -- verifying: every kind of tampering names its record -----------------------------------


def seq_at(bed: Bed, index: int) -> int:
    value = json.loads(bed.lines()[index])["seq"]
    assert isinstance(value, int)
    return value


@pytest.fixture
def written(bed: Bed) -> Bed:
    bed.write(10).close()
    return bed


@pytest.mark.parametrize("field", ["details", "action", "uid", "prev", "seq"])
def test_a_one_byte_edit_names_the_record(written: Bed, field: str) -> None:
    lines = written.lines()
    index = 5
    assert json.loads(lines[index])["type"] == "record"
    seq = seq_at(written, index)
    doc = json.loads(lines[index])
    raw = lines[index]
    # One byte of the field's value, changed in place.
    key = f'"{field}":'.encode()
    at = raw.index(key) + len(key)
    while raw[at : at + 1] in (b'"', b"{", b"[", b" "):
        at += 1
        if raw[at - 1 : at] == b"{":
            at = raw.index(b":", at) + 1
    new = bytes([raw[at] ^ 0x01]) if raw[at : at + 1].isalnum() else b"x"
    lines[index] = raw[:at] + new + raw[at + 1 :]
    assert lines[index] != raw, doc
    assert len(lines[index]) == len(raw), doc
    written.rewrite(lines)
    report = written.verify()
    assert not report.ok
    problem = str(report.problem)
    assert f"{tr.CURRENT_FILE}:{index + 1}:" in problem  # the file's line of that record
    if field == "seq":
        assert f"after seq {seq - 1}" in problem
        assert "modified" in problem
    else:
        assert f"seq {seq} was modified" in problem or "not a record" in problem


def test_an_edit_that_breaks_the_json_names_the_line(written: Bed) -> None:
    lines = written.lines()
    lines[3] = lines[3][:-1] + b"]"
    written.rewrite(lines)
    report = written.verify()
    assert f"{tr.CURRENT_FILE}:4: not a record" in str(report.problem)


def test_a_deleted_record(written: Bed) -> None:
    lines = written.lines()
    seq = seq_at(written, 4)
    del lines[4]
    written.rewrite(lines)
    report = written.verify()
    assert f"records seq {seq}..{seq} are missing" in str(report.problem)


def test_an_inserted_record(written: Bed) -> None:
    lines = written.lines()
    forged = dict(json.loads(lines[3]))
    forged["details"] = {"n": "forged"}
    lines.insert(4, tr.canonical(forged))
    written.rewrite(lines)
    report = written.verify()
    assert f"{tr.CURRENT_FILE}:5:" in str(report.problem)
    assert "inserted" in str(report.problem)


def test_a_cleverly_inserted_record_with_a_right_prev_is_caught(written: Bed) -> None:
    # The forger links the new record to its predecessor and numbers it on: the next record's
    # link to the real predecessor gives it away.
    lines = written.lines()
    forged = dict(json.loads(lines[3]))
    forged.update(seq=json.loads(lines[3])["seq"] + 1, prev=tr.line_hash(lines[3]))
    lines.insert(4, tr.canonical(forged))
    written.rewrite(lines)
    report = written.verify()
    assert f"{tr.CURRENT_FILE}:5:" in str(report.problem)
    assert "inserted" in str(report.problem)


def test_reordered_records(written: Bed) -> None:
    lines = written.lines()
    lines[4], lines[5] = lines[5], lines[4]
    written.rewrite(lines)
    report = written.verify()
    assert f"{tr.CURRENT_FILE}:5:" in str(report.problem)
    assert "order" in str(report.problem)


def test_a_forged_checkpoint_signature(written: Bed) -> None:
    lines = written.lines()
    index = next(i for i, raw in enumerate(lines) if json.loads(raw)["type"] == "checkpoint")
    doc = json.loads(lines[index])
    other = Ed25519PrivateKey.generate()
    import base64

    unsigned = {k: v for k, v in doc.items() if k != "sig"}
    doc["sig"] = base64.b64encode(
        other.sign(tr.CHECKPOINT_CONTEXT + tr.canonical(unsigned))
    ).decode()
    lines[index] = tr.canonical(doc)
    written.rewrite(lines)
    report = written.verify()
    assert f"{tr.CURRENT_FILE}:{index + 1}: checkpoint" in str(report.problem)
    assert "signature" in str(report.problem)


def test_a_rewritten_chain_fails_at_the_first_checkpoint_after_the_edit(written: Bed) -> None:
    # Recomputing every later hash makes the chain consistent again; the signed checkpoint
    # after the edit no longer matches.
    lines = written.lines()
    docs = records(lines)
    docs[2]["details"] = {"n": "rewritten"}
    out = [tr.canonical(docs[0])]
    for doc in docs[1:]:
        doc["prev"] = tr.line_hash(out[-1])
        out.append(tr.canonical(doc))
    written.rewrite(out)
    report = written.verify()
    assert "checkpoint" in str(report.problem)
    assert "signature" in str(report.problem)


def test_a_tail_cut_past_the_last_checkpoint(written: Bed) -> None:
    lines = written.lines()
    last_checkpoint = max(
        i for i, raw in enumerate(lines) if json.loads(raw)["type"] == "checkpoint"
    )
    written.rewrite(lines[:last_checkpoint])
    report = written.verify()
    assert "cut off the end" in str(report.problem)
    # Without the head, such a cut cannot be seen: that is what the head is for.
    assert written.verify(head=False).ok


def test_a_file_cut_mid_record(written: Bed) -> None:
    path = written.dir / tr.CURRENT_FILE
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    report = written.verify()
    assert "incomplete" in str(report.problem)


def test_records_deleted_at_the_start(written: Bed) -> None:
    lines = written.lines()
    written.rewrite(lines[2:])
    report = written.verify()
    assert "does not begin with a start record" in str(report.problem)


def test_a_rotated_file_deleted_in_the_middle(tmp_path: Path) -> None:
    bed = Bed(tmp_path, checkpoint_every=100, rotate_bytes=1500)
    bed.write(30).close()
    files = bed.files()
    assert len(files) >= 3
    files[1].unlink()
    report = bed.verify()
    assert "missing" in str(report.problem)


# -- the command --------------------------------------------------------------------------------


def test_capsuled_audit_verify_reports_ok_and_names_the_bad_record(
    written: Bed, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["verify", "--pubkey", f"{written.key}.pub", "--head", str(written.head)]
    files = [str(p) for p in written.files()]
    assert main_audit([*args, *files]) == 0
    assert "audit trail OK" in capsys.readouterr().out
    lines = written.lines()
    raw = lines[6]
    lines[6] = raw.replace(b'"ok"', b'"oK"')
    assert lines[6] != raw
    written.rewrite(lines)
    assert main_audit([*args, *files]) == 1
    err = capsys.readouterr().err
    assert f"{tr.CURRENT_FILE}:7: record seq {json.loads(raw)['seq']} was modified" in err
