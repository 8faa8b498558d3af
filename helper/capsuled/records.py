"""The helper's own records of the capsules it created: who owns each one.

systemd knows which capsules exist (state directories, loaded units) but not
who asked for them, so the owner is the one fact only we keep. Each record is
one small JSON file, /var/lib/capsuled/capsules/NAME.json, replaced atomically
(temp file + fsync + rename + fsync of the directory): a crash at any instant
leaves either the old record or the new one, never a torn one.

A record carries a `phase` so that an operation killed half-way can be
finished by a retry (invariant 5): Create writes "creating" before touching
systemd and "ready" after; Remove writes "removing" before touching systemd
and deletes the record last - or, with keepData, leaves it in phase "kept":
a kept home stays its owner's (it counts against their quota, nobody else may
create the name, and the owner may create it again to take the data back, or
remove it for good). Everything else is re-derived from systemd.

The owner is a uid *and* the user name it had at creation (`owner_name`): a
uid freed by a deleted account and given to a new one does not inherit the
old account's capsules. When the names differ (or the uid has no name any
more) the record has no owner for every grant (`is_owner`), so only root and
the policy's rules reach the capsule. Linux keeps no account creation time, so
the name is the second fact we can bind to. Records written before the name
was kept (no `owner_name`), and records of creators that had no user name,
bind the uid only.

This directory is root's alone (mode 0700 under StateDirectory=capsuled); no
capsule or caller can reach it, so plain paths are safe here, unlike in
capsule homes (see safefs).

The disk stays the truth at every read; memory only saves the parsing. Each
record read is kept with its file's stat (inode, size, mtime, ctime), and a
later read that stats the same file unchanged gets it from memory: one stat
instead of an open, a read and a JSON parse, and a record an administrator
edits or deletes by hand counts at the next read, as before. File times move
in clock ticks, so an edit in place that keeps the size could keep all four
within a tick of the last change; as git does with its index ("racy git"), a
file changed less than RACY_NS before it was read is not kept, and is parsed
again at each read until it is older. Any later change then sets a ctime the
cached stat cannot have (ctime is always the time of the change; utimensat
cannot set it). The cache holds one entry per record file (a few hundred
bytes each), no more.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Self

from .statefiles import replace_file, sync_dir

DEFAULT_STATE_DIR = Path("/var/lib/capsuled")
RECORD_FORMAT = 1
# A record is a few hundred bytes; anything larger was not written by us.
MAX_RECORD_BYTES = 64 * 1024


class Phase(StrEnum):
    CREATING = "creating"
    READY = "ready"
    REMOVING = "removing"
    KEPT = "kept"  # removed with keepData: systemd forgot it, its home and owner stay


class CorruptRecord(Exception):
    """A record file exists but is not one we wrote; it is left in place for an admin."""


class RecordsUnwritable(Exception):
    """A record could not be written or removed (the directory is full, read-only, failing).

    Nothing is half written: a put either replaced the record or left the old one."""


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    owner: int
    phase: Phase
    created_usec: int
    # The owner's user name at creation; None: not recorded (older record, nameless creator).
    owner_name: str | None = None

    def to_json(self) -> bytes:
        doc: dict[str, object] = {
            "format": RECORD_FORMAT,
            "name": self.name,
            "owner": self.owner,
            "phase": str(self.phase),
            "created": self.created_usec,
        }
        if self.owner_name is not None:
            doc["owner_name"] = self.owner_name
        return json.dumps(doc, sort_keys=True).encode() + b"\n"

    def is_owner(self, uid: int, user: str | None) -> bool:
        """Whether the account that is `uid` now (named `user`) is the one that created this."""
        return uid == self.owner and (self.owner_name is None or self.owner_name == user)

    @classmethod
    def from_json(cls, raw: bytes, *, expected_name: str) -> Self:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptRecord(f"{expected_name}: not JSON") from exc
        if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
            raise CorruptRecord(f"{expected_name}: unknown record format")
        name, owner, phase, created = (doc.get(k) for k in ("name", "owner", "phase", "created"))
        if name != expected_name:
            raise CorruptRecord(f"{expected_name}: record names {name!r}")
        if type(owner) is not int or owner < 0 or type(created) is not int:
            raise CorruptRecord(f"{expected_name}: bad owner or creation time")
        owner_name = doc.get("owner_name")
        if owner_name is not None and (not isinstance(owner_name, str) or not owner_name):
            raise CorruptRecord(f"{expected_name}: bad owner name")
        try:
            return cls(name, owner, Phase(str(phase)), created, owner_name)
        except ValueError as exc:
            raise CorruptRecord(f"{expected_name}: unknown phase {phase!r}") from exc

    def with_phase(self, phase: Phase) -> Record:
        return replace(self, phase=phase)


# What tells one version of a record file from another (module docstring).
_Stamp = tuple[int, int, int, int]
# A file changed this recently may change again within the same timestamp tick (module
# docstring): far above any tick a Linux file system keeps (a jiffy; 1-2 s on the coarsest).
RACY_NS = 3_000_000_000


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class RecordStore:
    """Owner records, one file per capsule, written atomically."""

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self._dir = state_dir / "capsules"
        # The same as text: reads build their path with one concatenation (a pathlib join and
        # its __fspath__ cost more than the stat they lead to, at every Describe and List row).
        self._prefix = f"{self._dir}/"
        # name -> (the file's stamp when read, its record or why it is corrupt)
        self._cache: dict[str, tuple[_Stamp, Record | CorruptRecord]] = {}

    def _ensure_dir(self) -> None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return Path(self._file(name))

    def _file(self, name: str) -> str:
        # Names reach us validated (names.capsule_name_problem): no "/" or "..".
        return self._prefix + name + ".json"

    def get(self, name: str) -> Record | None:
        """The record of NAME, or None. Raises CorruptRecord for a file we did not write."""
        try:
            st = os.stat(self._file(name))
        except FileNotFoundError:
            self._cache.pop(name, None)
            return None
        return self._read(name, _stamp(st))

    def _read(self, name: str, stamp: _Stamp) -> Record | None:
        cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            found = cached[1]
        else:
            parsed = self._parse(name)
            if parsed is None:
                self._cache.pop(name, None)
                return None
            found = parsed
            if stamp[3] < time.time_ns() - RACY_NS:  # ctime: see the module docstring
                self._cache[name] = (stamp, found)
            else:
                self._cache.pop(name, None)
        if isinstance(found, CorruptRecord):
            raise CorruptRecord(*found.args)
        return found

    def _parse(self, name: str) -> Record | CorruptRecord | None:
        try:
            with open(self._file(name), "rb") as f:
                raw = f.read(MAX_RECORD_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(raw) > MAX_RECORD_BYTES:
            return CorruptRecord(f"{name}: record too large")
        try:
            return Record.from_json(raw, expected_name=name)
        except CorruptRecord as exc:
            return exc

    def all(self) -> Iterator[Record]:
        """Every readable record; corrupt ones are skipped (they stay on disk for an admin)."""
        # Listed through an fd of the directory, so that each entry's stat is an fstatat
        # relative to it rather than a walk of the whole path again (a List stats every
        # record: that walk was a quarter of the stat's cost on the testbed's overlay root).
        try:
            fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._cache.clear()
            return
        stamped: list[tuple[str, _Stamp]] = []
        try:
            with os.scandir(fd) as it:
                entries = {e.name: e for e in it if e.name.endswith(".json") and e.name[0] != "."}
            for filename in sorted(entries):
                # try, not contextlib.suppress: that is three calls more at every List row.
                try:
                    stamped.append((filename[:-5], _stamp(entries[filename].stat())))
                except FileNotFoundError:  # gone since the listing
                    continue
        finally:
            os.close(fd)
        for gone in self._cache.keys() - {name for name, _ in stamped}:
            del self._cache[gone]
        for name, stamp in stamped:
            try:
                record = self._read(name, stamp)
            except CorruptRecord:
                continue
            if record is not None:
                yield record

    def put(self, record: Record) -> None:
        """Replace NAME's record atomically and durably.

        Raises:
            RecordsUnwritable: it could not be written; the old record (if any) is left.
        """
        try:
            self._ensure_dir()
            self._put(record)
        except OSError as exc:
            raise RecordsUnwritable(f"{record.name}: {exc.strerror or exc}") from exc

    def _put(self, record: Record) -> None:
        replace_file(self._path(record.name), record.to_json())
        # Just written, so too recent to keep (module docstring): the next read parses it.
        self._cache.pop(record.name, None)

    def delete(self, name: str) -> None:
        """Forget NAME; a missing record is not an error (Remove may be retried).

        Raises:
            RecordsUnwritable: it could not be removed.
        """
        self._cache.pop(name, None)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(name))
                sync_dir(self._dir)
        except OSError as exc:
            raise RecordsUnwritable(f"{name}: {exc.strerror or exc}") from exc

    def owned_by(self, uid: int, user: str | None) -> list[Record]:
        """The records whose owner is the account that is `uid` (named `user`) now."""
        return [r for r in self.all() if r.is_owner(uid, user)]


def new_record(name: str, owner: int, owner_name: str | None) -> Record:
    """A record in phase "creating", made now, owned by `owner` (named `owner_name`)."""
    return Record(name, owner, Phase.CREATING, time.time_ns() // 1000, owner_name)
