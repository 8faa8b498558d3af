"""`capsulectl bundle keygen|build|sign|verify`: signed deploy bundles, offline (no helper).

The file format and its rules are capsuled.bundle's, the same code the helper verifies with, so
what `build` accepts and `verify` passes is what Deploy accepts (docs/BUNDLE.md). A bundle tree:

    DIR/bundle.toml     name = "web"; version = "1.4.2"; enable = ["web.service"]
    DIR/units/NAME      unit files (installable unit names), into ~/.config/systemd/user/
    DIR/files/...       files placed under the capsule's home at the same relative path

Keys are Ed25519 in PEM: the private key PKCS#8 unencrypted (mode 0600), the public key
SubjectPublicKeyInfo (KEY.pub): the file an administrator installs as
/etc/capsuled/trusted-keys.d/SIGNER.pub. `openssl genpkey -algorithm ed25519` keys work too.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from capsuled import bundle as fmt

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = ["BundleToolError", "build", "keygen", "sign_file", "verify_file"]

MANIFEST_FILE = "bundle.toml"
_MANIFEST_KEYS = frozenset({"name", "version", "enable"})
_MAX_KEY_FILE_BYTES = 4096


class BundleToolError(Exception):
    """A reason to stop, printed as one line."""


# -- keys -------------------------------------------------------------------------------------


def keygen(key: Path) -> str:
    """Write a new Ed25519 key to KEY (0600) and KEY.pub (0644); return its key id (hex).

    Raises:
        BundleToolError: either file exists already, or cannot be written.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub = key.with_name(key.name + ".pub")
    for path in (key, pub):
        if os.path.lexists(path):
            raise BundleToolError(f"{path} exists already; refusing to overwrite a key")
    _create(key, pem, 0o600)
    _create(pub, public, 0o644)
    return fmt.key_id(private.public_key()).hex()


def _create(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
    except OSError as exc:
        raise BundleToolError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
    finally:
        os.close(fd)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file.

    Raises:
        BundleToolError: unreadable, encrypted, or not Ed25519.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(_read_small(path), password=None)
    except (ValueError, TypeError) as exc:
        raise BundleToolError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleToolError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (KEY.pub, a trusted-keys.d file).

    Raises:
        BundleToolError: unreadable, or not an Ed25519 public key.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(_read_small(path))
    except ValueError as exc:
        raise BundleToolError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleToolError(f"{path}: not an Ed25519 public key")
    return key


def _read_small(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise BundleToolError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise BundleToolError(f"{path}: larger than any key file")
    return data


# -- build ------------------------------------------------------------------------------------


def build(tree: Path) -> bytes:
    """An unsigned bundle of the tree (see the module docstring).

    Raises:
        BundleToolError: the tree breaks a rule (a symlink, a bad name, a cap...).
    """
    name, version, enable = _manifest(tree / MANIFEST_FILE)
    entries: list[fmt.Entry] = []
    units = tree / fmt.UNITS_DIR
    if units.exists():
        for path in sorted(_listing(units)):
            if not stat.S_ISREG(path.lstat().st_mode):
                raise BundleToolError(f"{path}: units/ holds regular files (unit files) only")
            entries.append(
                fmt.Entry(f"{fmt.UNITS_DIR}/{path.name}", _read(path), fmt.MODES["0644"])
            )
    files = tree / fmt.FILES_DIR
    if files.exists():
        entries.extend(_walk(files, fmt.FILES_DIR))
    if len(entries) > fmt.MAX_ENTRIES:
        raise BundleToolError(f"{tree}: more than {fmt.MAX_ENTRIES} files")
    try:
        return fmt.encode(name, version, enable, entries)
    except fmt.InvalidBundle as exc:
        raise BundleToolError(str(exc)) from None


def _manifest(path: Path) -> tuple[str, str, list[str]]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BundleToolError(f"cannot read {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleToolError(f"{path}: not UTF-8 TOML: {exc}") from exc
    unknown = sorted(set(doc) - _MANIFEST_KEYS)
    if unknown:
        raise BundleToolError(f"{path}: unknown key(s) {', '.join(unknown)}")
    enable = doc.get("enable", [])
    if not isinstance(enable, list) or not all(isinstance(u, str) for u in enable):
        raise BundleToolError(f"{path}: enable must be an array of unit names")
    try:
        name = fmt.check_name(doc.get("name"), "name")
        version = fmt.check_version(doc.get("version"))
    except fmt.InvalidBundle as exc:
        raise BundleToolError(f"{path}: {exc.reason}") from None
    return name, version, enable


def _listing(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError as exc:
        raise BundleToolError(f"cannot list {directory}: {exc.strerror}") from exc


def _walk(directory: Path, prefix: str) -> list[fmt.Entry]:
    entries: list[fmt.Entry] = []
    for path in sorted(_listing(directory)):
        mode = path.lstat().st_mode
        rel = f"{prefix}/{path.name}"
        if stat.S_ISLNK(mode):
            # The helper never writes a link from a bundle; a tree with one is a mistake.
            raise BundleToolError(f"{path}: a symlink; a bundle holds regular files only")
        if stat.S_ISDIR(mode):
            entries.extend(_walk(path, rel))
        elif stat.S_ISREG(mode):
            executable = mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            entries.append(fmt.Entry(rel, _read(path), fmt.MODES["0755" if executable else "0644"]))
        else:
            raise BundleToolError(f"{path}: not a regular file or directory")
    return entries


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(fmt.MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        raise BundleToolError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > fmt.MAX_BUNDLE_BYTES:
        raise BundleToolError(f"{path}: larger than a bundle may be ({fmt.MAX_BUNDLE_BYTES} bytes)")
    return data


# -- sign and verify ---------------------------------------------------------------------------


def read_bundle(path: Path) -> bytes:
    """A bundle file's bytes, refusing one over the cap before reading it all.

    Raises:
        BundleToolError: unreadable, or over the cap.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(fmt.MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        raise BundleToolError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > fmt.MAX_BUNDLE_BYTES:
        raise BundleToolError(f"{path}: larger than {fmt.MAX_BUNDLE_BYTES} bytes")
    return data


def write_file(path: Path, data: bytes) -> None:
    """Replace `path` atomically (temp file + rename in its directory), mode 0644.

    Raises:
        BundleToolError: it cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise BundleToolError(f"cannot write {path}: {exc.strerror}") from exc


def sign_file(path: Path, key: Path) -> str:
    """Add (or replace) FILE's signature with KEY, in place; return the key id (hex).

    Raises:
        BundleToolError: FILE is not a bundle, or KEY not an Ed25519 private key.
    """
    data = read_bundle(path)
    private = load_private_key(key)
    try:
        signed = fmt.sign(data, private)
    except fmt.InvalidBundle as exc:
        raise BundleToolError(f"{path}: {exc}") from None
    write_file(path, signed)
    return fmt.key_id(private.public_key()).hex()


def verify_file(path: Path, pubkey: Path) -> fmt.Bundle:
    """Check FILE as the helper does, with PUB as the only trusted key; the parsed bundle.

    Raises:
        BundleToolError: why it would be refused.
    """
    data = read_bundle(path)
    public = load_public_key(pubkey)
    try:
        envelope = fmt.open_envelope(data)
        fmt.verify_signature(envelope, {fmt.key_id(public): public})
        return fmt.read_manifest(envelope)
    except fmt.BundleError as exc:
        raise BundleToolError(f"{path}: {exc}") from None
