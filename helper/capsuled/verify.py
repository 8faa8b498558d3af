"""`capsuled audit verify [FILE...]`: check the audit trail (capsuled.trail), name the bad record.

Without FILE it checks the whole trail, /var/log/capsuled/audit-*.jsonl then audit.jsonl, and
also that it reaches the last checkpoint the helper signed (the audit head in
/var/lib/capsuled), so a trail cut short past that checkpoint fails too. With FILEs, those files
in the order given (rotated ones first, as the chain runs), and the head only with --head.
Exit status 0: the trail holds; 1: it does not (the first bad record is named); 2: usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capsuled.trail import (
    AUDIT_DIR,
    AUDIT_HEAD,
    AUDIT_KEY,
    TrailError,
    iter_file_contents,
    load_public_key,
    read_head,
    trail_files,
    verify_trail,
)

__all__ = ["main_audit"]


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
