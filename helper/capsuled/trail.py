"""The verifiable audit trail: JSON lines under /var/log/capsuled/, hash-chained, signed.

Beside the journal (capsuled.audit's other sink, which any local process can imitate), every
record AuditLog writes is appended here as one JSON line (docs/AUDIT.md has the whole format)::

    {"action":"deploy","capsule":"web","details":{...},"pid":812,"prev":"<sha256>",
     "result":"ok","seq":17,"time":1767225600000000,"type":"record","uid":1000,"unit":null}

- ``prev`` is the SHA-256 (hex) of the previous line's bytes, so every record pins the whole
  history before it; the first record of the trail has 64 zeros.
- Every CHECKPOINT_EVERY records, at rotation and when the daemon exits, a ``checkpoint``
  record is signed with the helper's own Ed25519 key (AUDIT_KEY, root's alone: made by
  `capsuled install`, or by the daemon the first time it signs if missing): its signature
  covers its own ``prev``, hence everything before it. The latest checkpoint's seq and hash are
  also written to AUDIT_HEAD, outside the trail, so a trail cut short past it is noticed.
- Each file starts with a ``start`` record. At ROTATE_BYTES the file is checkpointed, renamed
  ``audit-<first seq>.jsonl`` and a new ``audit.jsonl`` continues the chain (its start record's
  ``prev`` is the checkpoint's hash); the oldest rotated files beyond MAX_ROTATED_FILES are
  deleted, and a verifier then says where the kept trail starts.
- A record is written (one write(2) of the whole line, O_APPEND) when AuditLog records it, and
  fsynced before the reply goes out (AuditLog.sync, from the method table's audit wrapper; one
  fsync covers every record written meanwhile). A line left half-written by a crash was never
  acknowledged: the next daemon cuts it off and records a ``recovered`` entry saying so.

capsuled.verify checks a list of files (pure: the caller reads them) and names the first bad
record: modified, deleted, inserted or reordered records, a checkpoint whose signature fails,
a file cut mid-record, and (given the head) a trail truncated past its last checkpoint. Records
after the last checkpoint are only hash-chained: someone who can write the files can rewrite
that tail consistently; checkpoints are frequent, and one is signed at every exit, to keep it
short. The signing key is readable by root: root can forge anything here, as with any log on
the same machine (ship checkpoints elsewhere for that threat).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from capsuled.statefiles import create_file, replace_file, sync_dir

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "AUDIT_DIR",
    "AUDIT_HEAD",
    "AUDIT_KEY",
    "Trail",
    "TrailError",
    "ensure_signing_key",
    "read_records",
    "trail_files",
]

log = logging.getLogger(__name__)

AUDIT_DIR: Final = Path("/var/log/capsuled")  # capsuled.service: LogsDirectory=capsuled
AUDIT_KEY: Final = Path("/var/lib/capsuled/audit-signing.key")  # StateDirectory=capsuled
AUDIT_HEAD: Final = Path("/var/lib/capsuled/audit-head.json")
CURRENT_FILE: Final = "audit.jsonl"
_ROTATED: Final = re.compile(r"audit-([0-9]{16})\.jsonl")
GENESIS: Final = "0" * 64
CHECKPOINT_CONTEXT: Final = b"capsuled-audit-checkpoint-v1\0"

CHECKPOINT_EVERY: Final = 64  # records between signed checkpoints, at most
ROTATE_BYTES: Final = 8 * 1024 * 1024
MAX_ROTATED_FILES: Final = 32
# A record's fields are bounded by capsuled.audit (4096 characters each, a few dozen fields):
# a line longer than this was not written by us.
MAX_LINE_BYTES: Final = 256 * 1024
MAX_KEY_FILE_BYTES: Final = 4096

TYPE_START: Final = "start"
TYPE_RECORD: Final = "record"
TYPE_CHECKPOINT: Final = "checkpoint"
TYPE_RECOVERED: Final = "recovered"


class TrailError(Exception):
    """The trail could not be written (disk full, I/O error, a file we did not write)."""


def canonical(record: Mapping[str, object]) -> bytes:
    """The bytes of a line: JSON with sorted keys, no spaces, UTF-8 (no newline)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def line_hash(line: bytes) -> str:
    """What the next record's ``prev`` holds: SHA-256 of a line's bytes, hex."""
    import hashlib  # here, not at start: it loads OpenSSL's libcrypto (issue 12, cold start)

    return hashlib.sha256(line).hexdigest()


def signed_part(checkpoint: Mapping[str, object]) -> bytes:
    return CHECKPOINT_CONTEXT + canonical({k: v for k, v in checkpoint.items() if k != "sig"})


def key_id_hex(public_key: Ed25519PublicKey) -> str:
    from capsuled.bundle import key_id

    return key_id(public_key).hex()


# -- the signing key ------------------------------------------------------------------------


def ensure_signing_key(path: Path = AUDIT_KEY) -> tuple[Ed25519PrivateKey, bool]:
    """The helper's audit key from `path` (PEM PKCS#8, mode 0600), made if missing; and whether
    it was made now. The public key is written beside it as PATH.pub (0644) for verifiers.

    Raises:
        TrailError: the file is not root's 0600 Ed25519 key, or cannot be made.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return _make_key(path), True
    except OSError as exc:
        raise TrailError(f"{path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise TrailError(f"{path}: must be owned by uid {os.geteuid()} with mode 0600")
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TrailError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise TrailError(f"{path}: not an Ed25519 key")
    return key, False


def _make_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: never overwrite a key; a race with another creator loses cleanly.
        create_file(path, pem, 0o600)
        replace_file(path.with_name(path.name + ".pub"), public, 0o644)
    except OSError as exc:
        raise TrailError(f"cannot create the audit signing key {path}: {exc}") from exc
    log.info(
        "created the audit trail's signing key %s (key id %s)", path, key_id_hex(key.public_key())
    )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (the AUDIT_KEY.pub a verifier is given).

    Raises:
        TrailError: unreadable, or not such a key.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
        key = load_pem_public_key(data)
    except (OSError, ValueError) as exc:
        raise TrailError(f"{path}: not a readable PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise TrailError(f"{path}: not an Ed25519 public key")
    return key


# -- writing ----------------------------------------------------------------------------------


def _now_usec() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class _Open:
    """The current file while we append to it."""

    fd: int
    size: int
    seq: int  # the last record's
    prev: str  # its line hash
    first_seq: int  # of this file
    since_checkpoint: int


class Trail:
    """Appends records to the trail; thread-safe; opens the files on first use."""

    def __init__(
        self,
        directory: Path = AUDIT_DIR,
        *,
        key_path: Path = AUDIT_KEY,
        head_path: Path = AUDIT_HEAD,
        checkpoint_every: int = CHECKPOINT_EVERY,
        rotate_bytes: int = ROTATE_BYTES,
        max_rotated: int = MAX_ROTATED_FILES,
        clock: Callable[[], int] = _now_usec,
    ) -> None:
        self.directory = directory
        self._key_path = key_path
        self._head_path = head_path
        self._checkpoint_every = checkpoint_every
        self._rotate_bytes = rotate_bytes
        self._max_rotated = max_rotated
        self._clock = clock
        self._lock = threading.Lock()
        self._open: _Open | None = None
        self._key: Ed25519PrivateKey | None = None
        self._appended = 0  # records this process wrote, for close()
        self.written_seq = 0
        self.synced_seq = 0

    def append(self, event: Mapping[str, object]) -> int:
        """Write one record (``type`` "record"); returns its seq. Not yet fsynced: `sync`.

        Raises:
            TrailError: it could not be written.
        """
        with self._lock:
            try:
                current = self._current()
                seq = self._write(current, {**event, "type": TYPE_RECORD})
                self._appended += 1
                if current.since_checkpoint >= self._checkpoint_every:
                    self._checkpoint(current, "every")
                if current.size >= self._rotate_bytes:
                    self._rotate(current)
            except OSError as exc:
                raise TrailError(
                    f"cannot write the audit trail in {self.directory}: {exc}"
                ) from exc
            return seq

    def sync(self) -> None:
        """fsync what was written so far (blocking: AuditLog calls it in a worker thread).

        Raises:
            TrailError: fsync failed.
        """
        with self._lock:
            if self._open is None:
                return
            target = self.written_seq
            fd = os.dup(self._open.fd)  # a rotation may close the original meanwhile
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise TrailError(f"cannot sync the audit trail: {exc}") from exc
        finally:
            os.close(fd)
        with self._lock:
            self.synced_seq = max(self.synced_seq, target)

    def close(self) -> None:
        """Sign a checkpoint over what this process wrote (if anything), sync, close."""
        with self._lock:
            current = self._open
            if current is None:
                return
            try:
                if current.since_checkpoint > 0 and self._appended:
                    self._checkpoint(current, "shutdown")
                os.fsync(current.fd)
                self.synced_seq = self.written_seq
            except (OSError, TrailError) as exc:
                log.error("cannot close the audit trail cleanly: %s", exc)
            finally:
                os.close(current.fd)
                self._open = None

    # -- under the lock ---------------------------------------------------------------------

    def _current(self) -> _Open:
        if self._open is None:
            self._open = self._open_current()
        return self._open

    def _open_current(self) -> _Open:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / CURRENT_FILE
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            # One writer: a second daemon (there should never be one) fails here, not silently.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            current = self._resume(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return current

    def _resume(self, fd: int, path: Path) -> _Open:
        """Continue the chain from the file's last complete line (or from the newest rotated
        file's, or from the start); cut a torn last line and say so."""
        size = os.fstat(fd).st_size
        last, complete_size = _last_line(fd, size)
        if complete_size != size:
            os.ftruncate(fd, complete_size)
            log.warning(
                "audit trail %s: cut %d bytes of a record never acknowledged",
                path,
                size - complete_size,
            )
        if last is None:
            seq, prev = self._predecessor()
            current = _Open(fd, 0, seq, prev, seq + 1, 0)
            self._write(current, {"type": TYPE_START, "time": self._clock()})
        else:
            record = parse_line(last) or {}
            last_seq = record.get("seq")
            if not isinstance(last_seq, int):
                raise TrailError(f"{path}: the last line is not one of our records")
            # A tail not ending in a checkpoint (the last daemon crashed) is signed at the
            # next append.
            ended_signed = record.get("type") == TYPE_CHECKPOINT
            unsigned = 0 if ended_signed else self._checkpoint_every
            first = _first_seq(fd) or last_seq
            current = _Open(fd, complete_size, last_seq, line_hash(last), first, unsigned)
            self.written_seq = last_seq
        if complete_size != size:
            self._write(
                current,
                {
                    "type": TYPE_RECOVERED,
                    "time": self._clock(),
                    "dropped_bytes": size - complete_size,
                },
            )
        return current

    def _predecessor(self) -> tuple[int, str]:
        """(seq, line hash) of the newest rotated file's last line, or the trail's start."""
        rotated = sorted(p for p in self.directory.iterdir() if _ROTATED.fullmatch(p.name))
        if not rotated:
            return 0, GENESIS
        fd = os.open(rotated[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            last, _ = _last_line(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        record = parse_line(last) if last is not None else None
        if record is None or not isinstance(record.get("seq"), int):
            raise TrailError(f"{rotated[-1]}: its last line is not one of our records")
        seq = record["seq"]
        assert isinstance(seq, int)  # just checked
        assert last is not None
        return seq, line_hash(last)

    def _write(self, current: _Open, body: Mapping[str, object]) -> int:
        seq = current.seq + 1
        line = canonical({**body, "seq": seq, "prev": current.prev})
        if len(line) > MAX_LINE_BYTES:
            raise TrailError(f"record {seq} would be {len(line)} bytes, over {MAX_LINE_BYTES}")
        data = line + b"\n"
        written = os.write(current.fd, data)
        if written != len(data):
            # O_APPEND on a local file writes all or fails (ENOSPC); anything else must not
            # leave half a line for the next record to chain to.
            os.ftruncate(current.fd, current.size)
            raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)")
        current.size += len(data)
        current.seq, current.prev = seq, line_hash(line)
        current.since_checkpoint += 1
        self.written_seq = seq
        return seq

    def _checkpoint(self, current: _Open, reason: str) -> None:
        key = self._signing_key()
        body: dict[str, object] = {
            "type": TYPE_CHECKPOINT,
            "time": self._clock(),
            "reason": reason,
            "key": key_id_hex(key.public_key()),
            "seq": current.seq + 1,
            "prev": current.prev,
        }
        body["sig"] = base64.b64encode(key.sign(signed_part(body))).decode()
        self._write(current, body)
        current.since_checkpoint = 0
        os.fsync(current.fd)
        self.synced_seq = self.written_seq
        head = {"seq": current.seq, "hash": current.prev, "key": body["key"]}
        replace_file(self._head_path, canonical(head) + b"\n", 0o600)

    def _signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            self._key, _ = ensure_signing_key(self._key_path)
        return self._key

    def _rotate(self, current: _Open) -> None:
        self._checkpoint(current, "rotation")
        rotated = self.directory / f"audit-{current.first_seq:016d}.jsonl"
        os.rename(self.directory / CURRENT_FILE, rotated)
        sync_dir(self.directory)
        os.close(current.fd)
        self._open = None
        self._open = self._open_current()  # starts with a start record chained to the checkpoint
        self._prune()

    def _prune(self) -> None:
        rotated = sorted(p for p in self.directory.iterdir() if _ROTATED.fullmatch(p.name))
        for old in rotated[: max(0, len(rotated) - self._max_rotated)]:
            log.info("audit trail: deleting the oldest rotated file %s", old)
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def _last_line(fd: int, size: int) -> tuple[bytes | None, int]:
    """The file's last complete line (without its newline) and the size up to its end."""
    if size == 0:
        return None, 0
    window = min(size, MAX_LINE_BYTES + 1)
    tail = os.pread(fd, window, size - window)
    end = tail.rfind(b"\n")
    if end < 0:
        return None, 0 if window == size else size  # no newline: all torn (or not ours)
    complete = size - window + end + 1
    start = tail.rfind(b"\n", 0, end) + 1
    if start == 0 and window < size:
        raise TrailError("the last line of the audit trail is longer than any record")
    return tail[start:end], complete


def _first_seq(fd: int) -> int | None:
    head = os.pread(fd, MAX_LINE_BYTES, 0)
    record = parse_line(head.partition(b"\n")[0])
    seq = record.get("seq") if record is not None else None
    return seq if isinstance(seq, int) else None


def parse_line(line: bytes) -> dict[str, object] | None:
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# -- reading ----------------------------------------------------------------------------------


def trail_files(directory: Path = AUDIT_DIR) -> list[Path]:
    """The trail's files in chain order: the rotated ones by first seq, then the current."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    rotated = sorted(directory / n for n in names if _ROTATED.fullmatch(n))
    current = [directory / CURRENT_FILE] if CURRENT_FILE in names else []
    return rotated + current


def read_records(
    files: Sequence[Path], wanted: Callable[[dict[str, object]], bool], limit: int, budget: int
) -> list[dict[str, object]]:
    """The last `limit` records (type "record") for which `wanted` holds, oldest first,
    reading the files newest first and at most `budget` bytes of them (a read-only method's
    bound). A line being written (no newline yet) is skipped."""
    found: list[dict[str, object]] = []
    if limit <= 0:
        return found
    for path in reversed(files):
        if budget <= 0 or len(found) >= limit:
            break
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start = max(0, size - budget)
                f.seek(start)
                data = f.read(size - start)
        except FileNotFoundError:
            continue  # rotated away meanwhile
        budget -= len(data)
        lines = data.split(b"\n")
        lines = lines[1:-1] if start > 0 else lines[:-1]  # a partial first line, the torn last
        batch = []
        for line in lines:
            record = parse_line(line)
            if record is not None and record.get("type") == TYPE_RECORD and wanted(record):
                batch.append(record)
        found = batch[-(limit - len(found)) :] + found if batch else found
    return found[-limit:]


def read_head(path: Path = AUDIT_HEAD) -> dict[str, object] | None:
    """The audit head (the last signed checkpoint's seq and hash), or None if there is none.

    Raises:
        TrailError: unreadable or not ours.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TrailError(f"{path}: {exc.strerror}") from exc
    head = parse_line(data.strip())
    if head is None:
        raise TrailError(f"{path}: not an audit head")
    return head


def iter_file_contents(paths: Iterable[Path]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each file, for verify_trail.

    Raises:
        TrailError: one cannot be read.
    """
    for path in paths:
        try:
            yield str(path), path.read_bytes()
        except OSError as exc:
            raise TrailError(f"{path}: {exc.strerror}") from exc
