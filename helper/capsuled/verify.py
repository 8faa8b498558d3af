"""Checking the audit trail (capsuled.trail): `verify_trail`, pure over the files' bytes, and
`capsuled audit verify [FILE...]`, which names the first bad record.

Without FILE it checks the whole trail, /var/log/capsuled/audit-*.jsonl then audit.jsonl, and
also that it reaches the last checkpoint the helper signed (the audit head in
/var/lib/capsuled), so a trail cut short past that checkpoint fails too. With FILEs, those files
in the order given (rotated ones first, as the chain runs), and the head only with --head.
Exit status 0: the trail holds; 1: it does not (the first bad record is named); 2: usage.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from capsuled.trail import (
    AUDIT_DIR,
    AUDIT_HEAD,
    AUDIT_KEY,
    GENESIS,
    TYPE_CHECKPOINT,
    TYPE_START,
    TrailError,
    iter_file_contents,
    key_id_hex,
    line_hash,
    load_public_key,
    parse_line,
    read_head,
    signed_part,
    trail_files,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["TrailReport", "main_audit", "verify_trail"]


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a trail file, where it is."""

    file: str
    number: int  # 1-based
    raw: bytes

    @property
    def where(self) -> str:
        return f"{self.file}:{self.number}"


@dataclass(slots=True)
class TrailReport:
    """What verify_trail found: the first problem (None: none), and what it checked."""

    problem: str | None = None
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_checkpoint: int | None = None
    unsigned_tail: int = 0  # records after the last checkpoint
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def split_lines(name: str, data: bytes) -> tuple[list[Line], str | None]:
    """The complete lines of a file, and a problem if its end is a torn line."""
    parts = data.split(b"\n")
    lines = [Line(name, i, raw) for i, raw in enumerate(parts[:-1], start=1)]
    if parts[-1]:
        return lines, (
            f"{name}:{len(parts)}: the last record is incomplete "
            f"({len(parts[-1])} bytes without an end of line): the file was cut"
        )
    return lines, None


def verify_trail(
    files: Iterable[tuple[str, bytes]],
    public_key: Ed25519PublicKey,
    *,
    head: Mapping[str, object] | None = None,
) -> TrailReport:
    """Check the files (name, content) in chain order; see the module docstring."""
    report = TrailReport()
    lines: list[Line] = []
    for name, data in files:
        found, torn = split_lines(name, data)
        lines.extend(found)
        if torn is not None:
            report.problem = torn
            return report
    records = [parse_line(line.raw) for line in lines]
    checker = _Checker(lines, records, key_id_hex(public_key), public_key)
    report.problem = checker.run()
    report.records = len(lines)
    if lines and report.problem is None:
        report.first_seq, report.last_seq = checker.seq_of(0), checker.seq_of(len(lines) - 1)
        report.last_checkpoint = checker.last_checkpoint
        report.unsigned_tail = checker.since_checkpoint
        if report.first_seq != 1:
            report.notes.append(
                f"the trail given starts at seq {report.first_seq}: the records before it "
                "are in older files (rotated away, or not given)"
            )
        if head is not None:
            report.problem = _check_head(lines, checker, head)
    return report


def _check_head(lines: Sequence[Line], checker: _Checker, head: Mapping[str, object]) -> str | None:
    seq, digest = head.get("seq"), head.get("hash")
    if not isinstance(seq, int) or not isinstance(digest, str):
        return "the audit head is not one of ours"
    for index, line in enumerate(lines):
        if checker.seq_of(index) == seq:
            if line_hash(line.raw) != digest:
                return f"{line.where}: record seq {seq} is not the checkpoint the audit head names"
            return None
    last = checker.seq_of(len(lines) - 1) if lines else 0
    return (
        f"the trail ends at seq {last}, but the helper signed a checkpoint at seq {seq} "
        "(audit head): records were cut off the end"
    )


class _Checker:
    """The chain walk: one problem at most, naming the record to blame."""

    def __init__(
        self,
        lines: Sequence[Line],
        records: Sequence[dict[str, object] | None],
        key: str,
        public_key: Ed25519PublicKey,
    ) -> None:
        self.lines = lines
        self.records = records
        self.key = key
        self.public_key = public_key
        self.hashes = [line_hash(line.raw) for line in lines]
        self.index_of_hash = {h: i for i, h in enumerate(self.hashes)}
        self.last_checkpoint: int | None = None
        self.since_checkpoint = 0

    def seq_of(self, index: int) -> int | None:
        record = self.records[index]
        seq = record.get("seq") if record is not None else None
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    def prev_of(self, index: int) -> str | None:
        record = self.records[index]
        prev = record.get("prev") if record is not None else None
        return prev if isinstance(prev, str) else None

    def _links_to(self, index: int) -> int | None:
        """The line the record at `index` links to (None: none, or past the end)."""
        if index >= len(self.lines):
            return None
        return self.index_of_hash.get(self.prev_of(index) or "")

    def run(self) -> str | None:
        for index, line in enumerate(self.lines):
            problem = self._check(index, line)
            if problem is not None:
                return problem
        return None

    def _check(self, index: int, line: Line) -> str | None:
        record = self.records[index]
        seq = self.seq_of(index)
        if record is None or seq is None or self.prev_of(index) is None:
            return f"{line.where}: not a record of the trail (modified)"
        if index == 0:
            if record.get("type") != TYPE_START:
                return (
                    f"{line.where}: record seq {seq}: the trail does not begin with a start "
                    "record (records deleted at its beginning)"
                )
            if seq == 1 and self.prev_of(0) != GENESIS:
                return f"{line.where}: record seq 1 is not the trail's first (modified)"
        else:
            problem = self._link(index, line, seq)
            if problem is not None:
                return problem
        if record.get("type") == TYPE_CHECKPOINT:
            return self._checkpoint(line, record, seq)
        self.since_checkpoint += 1
        return None

    def _checkpoint(self, line: Line, record: Mapping[str, object], seq: int) -> str | None:
        from cryptography.exceptions import InvalidSignature

        if record.get("key") != self.key:
            return (
                f"{line.where}: checkpoint seq {seq} is signed by key {record.get('key')}, "
                f"not the helper's key {self.key}"
            )
        try:
            signature = base64.b64decode(str(record.get("sig")), validate=True)
            self.public_key.verify(signature, signed_part(record))
        except (InvalidSignature, ValueError):
            return f"{line.where}: checkpoint seq {seq}: the signature does not match (modified)"
        self.last_checkpoint = seq
        self.since_checkpoint = 0
        return None

    def _link(self, index: int, line: Line, seq: int) -> str | None:
        before = self.lines[index - 1]
        before_seq = self.seq_of(index - 1)
        assert before_seq is not None  # checked when that line was
        prev = self.prev_of(index)
        linked = prev == self.hashes[index - 1]
        if linked and seq == before_seq + 1:
            return None
        if linked:
            return (
                f"{line.where}: the record after seq {before_seq} says seq {seq}: it was modified"
            )
        target = self.index_of_hash.get(prev or "")
        if target is not None and target < index - 1:
            if self._links_to(index + 1) == index - 1:
                # The chain goes on from the line before: this one is the intruder.
                return f"{line.where}: record seq {seq} was inserted (nothing links to it)"
            first = self.lines[target + 1]
            return (
                f"{first.where}: record seq {self.seq_of(target + 1)} was inserted: "
                f"{line.where} links to {self.lines[target].where}, before it"
            )
        if target is not None and target >= index:
            return f"{line.where}: record seq {seq} is out of order (reordered)"
        if seq > before_seq + 1:
            return (
                f"{line.where}: records seq {before_seq + 1}..{seq - 1} are missing before "
                f"record seq {seq} (deleted)"
            )
        if seq == before_seq + 1:
            after_ok = index + 1 >= len(self.lines) or self.prev_of(index + 1) == self.hashes[index]
            if after_ok:
                return f"{before.where}: record seq {before_seq} was modified"
            return f"{line.where}: record seq {seq} was modified"
        return f"{line.where}: record seq {seq} after seq {before_seq} (reordered or modified)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capsuled audit",
        description="Check the audit trail under /var/log/capsuled: hash chain, signed "
        "checkpoints, and that nothing was cut off its end.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verify = sub.add_parser("verify", help="check the trail (default: all of it)")
    verify.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        type=Path,
        help=f"trail files in chain order (default: every file in {AUDIT_DIR})",
    )
    verify.add_argument(
        "--pubkey",
        metavar="PUB",
        type=Path,
        default=Path(f"{AUDIT_KEY}.pub"),
        help="the helper's public key (default: %(default)s)",
    )
    verify.add_argument(
        "--head",
        metavar="FILE",
        type=Path,
        help=f"check that the trail reaches this audit head (default: {AUDIT_HEAD} when "
        "checking the whole trail, none with FILEs)",
    )
    return p


def main_audit(argv: list[str]) -> int:
    """`capsuled audit ...`; returns the exit status."""
    args = _parser().parse_args(argv)
    files = list(args.files) or trail_files()
    head_path = args.head if args.head is not None else (None if args.files else AUDIT_HEAD)
    try:
        if not files:
            raise TrailError(f"no audit trail in {AUDIT_DIR}")
        public_key = load_public_key(args.pubkey)
        head = read_head(head_path) if head_path is not None else None
        report = verify_trail(iter_file_contents(files), public_key, head=head)
    except TrailError as exc:
        print(f"capsuled audit verify: {exc}", file=sys.stderr)
        return 1
    if report.ok and head_path is not None and head is None and report.last_checkpoint is not None:
        # The helper writes the head at every checkpoint: a trail with checkpoints and no head
        # lost it, and with it the proof of where the trail ends.
        report.problem = f"{head_path} is missing, but the trail has signed checkpoints"
    if not report.ok:
        print(f"capsuled audit verify: FAILED: {report.problem}", file=sys.stderr)
        return 1
    checkpoint = (
        f"last checkpoint at seq {report.last_checkpoint}"
        if report.last_checkpoint is not None
        else "no checkpoint yet"
    )
    print(
        f"audit trail OK: {report.records} records (seq {report.first_seq}..{report.last_seq}) "
        f"in {len(files)} file(s), {checkpoint}, {report.unsigned_tail} record(s) after it"
    )
    for note in report.notes:
        print(f"note: {note}")
    if head_path is not None and head is None:
        print(f"note: no audit head at {head_path}: nothing was signed yet")
    return 0
