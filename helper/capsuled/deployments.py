"""What the helper deployed into each capsule: the current bundle, the one kept for Rollback.

Per capsule, a directory /var/lib/capsuled/bundles/NAME/ (root's, like the owner records:
mode 0700 under StateDirectory=capsuled, so plain paths are safe here, unlike in capsule homes)::

    state.json          which bundle is current, previous and pending, with what we recorded
    SHA256.bundle       the bundle files themselves, verbatim (signed), named by their digest

`state.json` is replaced atomically (temp + fsync + rename + fsync of the directory), so a
crash leaves the old state or the new one. A Deploy writes the new bundle's file and marks it
``pending`` *before* it touches the capsule's home, and makes it ``current`` (the old current
becoming ``previous``) only after the home and the units are in place: a helper killed in the
middle leaves ``pending`` set, Describe shows it (unfinishedVersion), and the next Deploy or
Rollback counts the pending version's files among those it replaces. Bundle files no state
names any more are deleted after each switch.

Bundles are kept verbatim so that Rollback re-checks the signature against the trusted keys of
the day, and so that what is on disk can be verified by anyone with `capsulectl bundle verify`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Final, Self

from capsuled.statefiles import replace_file

__all__ = ["CorruptDeployment", "Deployed", "Deployment", "DeploymentStore"]

DEFAULT_STATE_DIR: Final = Path("/var/lib/capsuled")
STATE_FORMAT: Final = 1
MAX_STATE_BYTES: Final = 64 * 1024
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_FIELDS: Final = (
    "name",
    "version",
    "signer",
    "key_id",
    "sha256",
    "deployed_usec",
    "deployed_by",
    "paths",
    "enable",
)


class CorruptDeployment(Exception):
    """A state file or bundle we did not write; left in place for an admin."""


@dataclass(frozen=True, slots=True)
class Deployed:
    """One bundle version as it was put in place."""

    name: str  # the bundle's name
    version: str
    signer: str
    key_id: str  # hex
    sha256: str  # hex, of the whole bundle file: also its file name here
    deployed_usec: int
    deployed_by: int  # uid
    # What it put into the home (component tuples joined with "/") and which units it enabled:
    # the next Deploy removes what the new version lacks, without reading the old bundle.
    paths: tuple[str, ...]
    enable: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc["paths"], doc["enable"] = list(self.paths), list(self.enable)
        return doc

    @classmethod
    def from_json(cls, doc: object, where: str) -> Self:
        if not isinstance(doc, dict) or set(doc) != set(_FIELDS):
            raise CorruptDeployment(f"{where}: not a deployment record")
        strings = ("name", "version", "signer", "key_id", "sha256")
        if not all(isinstance(doc[k], str) for k in strings):
            raise CorruptDeployment(f"{where}: bad field types")
        if not all(type(doc[k]) is int for k in ("deployed_usec", "deployed_by")):
            raise CorruptDeployment(f"{where}: bad field types")
        if not _SHA256_HEX.fullmatch(doc["sha256"]):
            raise CorruptDeployment(f"{where}: bad sha256")
        for key in ("paths", "enable"):
            if not isinstance(doc[key], list) or not all(isinstance(p, str) for p in doc[key]):
                raise CorruptDeployment(f"{where}: bad {key}")
        return cls(
            doc["name"],
            doc["version"],
            doc["signer"],
            doc["key_id"],
            doc["sha256"],
            doc["deployed_usec"],
            doc["deployed_by"],
            tuple(doc["paths"]),
            tuple(doc["enable"]),
        )


@dataclass(frozen=True, slots=True)
class Deployment:
    """A capsule's deployment state."""

    current: Deployed | None = None
    previous: Deployed | None = None
    pending: Deployed | None = None

    def to_json(self) -> bytes:
        doc = {
            "format": STATE_FORMAT,
            "current": self.current.to_json() if self.current else None,
            "previous": self.previous.to_json() if self.previous else None,
            "pending": self.pending.to_json() if self.pending else None,
        }
        return json.dumps(doc, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Self:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptDeployment(f"{where}: not JSON") from exc
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise CorruptDeployment(f"{where}: unknown format")
        slots = {}
        for key in ("current", "previous", "pending"):
            value = doc.get(key)
            slots[key] = None if value is None else Deployed.from_json(value, f"{where} {key}")
        return cls(**slots)

    def begin(self, new: Deployed) -> Deployment:
        """The state while `new` is being put in place."""
        return replace(self, pending=new)

    def finish(self, new: Deployed, kept: Deployed | None) -> Deployment:
        """`new` in place; `kept` is what Rollback returns to."""
        return Deployment(current=new, previous=kept, pending=None)

    def abandon(self) -> Deployment:
        """The pending version was taken out again (the call failed and put things back)."""
        return replace(self, pending=None)

    def referenced(self) -> set[str]:
        return {d.sha256 for d in (self.current, self.previous, self.pending) if d is not None}


class DeploymentStore:
    """Deployment state and kept bundles, per capsule, under STATE_DIR/bundles/."""

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self._dir = state_dir / "bundles"
        self._prefix = f"{self._dir}/"  # for reads: one concatenation, no pathlib (records.py)

    def _capsule_dir(self, name: str) -> Path:
        # Names reach us validated (names.capsule_name_problem): no "/" or "..".
        return self._dir / name

    def names(self) -> set[str]:
        """The capsules with a directory here: every other one's state is empty (one listing
        instead of an open per capsule, for List)."""
        try:
            with os.scandir(self._dir) as it:
                return {e.name for e in it if not e.name.startswith(".")}
        except FileNotFoundError:
            return set()

    def get(self, name: str) -> Deployment:
        """NAME's state (empty if it never had a bundle).

        Raises:
            CorruptDeployment: a state file we did not write.
        """
        # Names reach us validated (names.capsule_name_problem): no "/" or "..".
        path = self._prefix + name + "/state.json"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return Deployment()  # most capsules: no bundle ever; one failed open, no file object
        try:
            raw = os.read(fd, MAX_STATE_BYTES + 1)
        finally:
            os.close(fd)
        if len(raw) > MAX_STATE_BYTES:
            raise CorruptDeployment(f"{path}: too large")
        return Deployment.from_json(raw, path)

    def put(self, name: str, state: Deployment) -> None:
        """Replace NAME's state atomically and durably; then drop unreferenced bundle files."""
        directory = self._capsule_dir(name)
        self._write(directory, "state.json", state.to_json())
        keep = {f"{digest}.bundle" for digest in state.referenced()}
        for entry in os.listdir(directory):
            if entry.endswith(".bundle") and entry not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / entry)

    def store_bundle(self, name: str, sha256: str, data: bytes) -> None:
        """Keep a bundle file (verbatim) under its digest."""
        self._write(self._capsule_dir(name), f"{sha256}.bundle", data)

    def load_bundle(self, name: str, sha256: str) -> bytes:
        """A kept bundle file.

        Raises:
            CorruptDeployment: missing, too large, or not what its name says.
        """
        import hashlib

        # Here, not at start: the bundle code is loaded by the first call that reads one.
        from capsuled.bundle import MAX_BUNDLE_BYTES

        path = self._capsule_dir(name) / f"{sha256}.bundle"
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BUNDLE_BYTES + 1)
        except FileNotFoundError as exc:
            raise CorruptDeployment(f"{path}: missing") from exc
        if len(data) > MAX_BUNDLE_BYTES or hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptDeployment(f"{path}: not the bundle it is named after")
        return data

    def forget(self, name: str) -> None:
        """Remove NAME's state and bundles (Remove of the capsule); nothing there is fine."""
        import shutil  # here, not at start: it imports bz2 and lzma

        shutil.rmtree(self._capsule_dir(name), ignore_errors=True)

    def _write(self, directory: Path, filename: str, data: bytes) -> None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        replace_file(directory / filename, data, 0o600)
