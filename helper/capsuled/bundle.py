"""Signed deploy bundles: the one file format, pure (bytes in, values out; docs/BUNDLE.md).

A bundle is one file: a fixed header, a JSON manifest, the content (every entry's bytes, in
manifest order) and, once signed, a signature block over the SHA-256 of everything before it::

    offset  size  field (integers big-endian)
    0       8     magic "CPSLBNDL"
    8       2     format version, 1
    10      2     flags, 0 (reserved)
    12      4     manifest length M, 2 .. MAX_MANIFEST_BYTES
    16      8     content length C, 0 .. MAX_BUNDLE_BYTES
    24      M     manifest (UTF-8 JSON object)
    24+M    C     content
    ---- the body ends here: 24 + M + C bytes ----
    optional, exactly 104 bytes:
            8     magic "CPSLSIG1"
            32    key id: SHA-256 of the signer's raw 32-byte Ed25519 public key
            64    Ed25519 signature of SIGNATURE_CONTEXT + SHA-256(body)

Reading order (`open_envelope`, `verify_signature`, `read_manifest`) is the order of trust:
the size cap, then the fixed-size header (the lengths must add up to the file's size exactly,
so a truncated or padded file is refused before anything else is looked at), then the signature
(checked against keys the caller trusts, before a byte of the manifest is parsed), and only
then the manifest, itself parsed with caps on every size and count.  Nothing here trusts a
length it has not checked against the bytes it has.

The crypto is `cryptography`'s Ed25519 and hashlib's SHA-256 (no home-made crypto); it is
imported only by the functions that sign or verify, so that parsing a bundle's header costs no
import of it.  The signed message starts with a context string so that a key used for bundles
can never be tricked into signing something else that verifies as a bundle (or vice versa).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from capsuled.names import INSTALLABLE_UNIT_TYPES, unit_name_problem

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "MAX_BUNDLE_BYTES",
    "BadSignature",
    "Bundle",
    "BundleError",
    "Entry",
    "Envelope",
    "InvalidBundle",
    "Unsigned",
    "UntrustedKey",
    "compare_versions",
    "encode",
    "is_signer_name",
    "key_id",
    "open_envelope",
    "read_manifest",
    "sign",
    "verify_signature",
]

MAGIC: Final = b"CPSLBNDL"
SIGNATURE_MAGIC: Final = b"CPSLSIG1"
FORMAT_VERSION: Final = 1
_HEADER: Final = struct.Struct(">8sHHIQ")
HEADER_BYTES: Final = _HEADER.size  # 24
KEY_ID_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
SIGNATURE_BLOCK_BYTES: Final = len(SIGNATURE_MAGIC) + KEY_ID_BYTES + SIGNATURE_BYTES  # 104
# What an Ed25519 key signs: this context, then the body's SHA-256 (docs/BUNDLE.md).
SIGNATURE_CONTEXT: Final = b"capsuled-bundle-v1\0"

# The whole file, signed. It reaches the helper inline in one Varlink call (base64: 4/3 of this,
# 699052 characters, plus a little JSON), which must fit the transport's 1 MiB cap on a call; a
# bundle carries unit files and configuration, not a capsule's data.
MAX_BUNDLE_BYTES: Final = 512 * 1024
MAX_MANIFEST_BYTES: Final = 256 * 1024
MAX_ENTRIES: Final = 256
MAX_PATH_CHARS: Final = 1024
MAX_PATH_DEPTH: Final = 16
MAX_NAME_CHARS: Final = 64
MAX_VERSION_PARTS: Final = 8
MAX_VERSION_PART_DIGITS: Final = 9

UNITS_DIR: Final = "units"
FILES_DIR: Final = "files"
# The file modes an entry may carry: plain files and executables, nothing setuid or writable by
# others (safefs masks modes again when it writes).
MODES: Final = {"0644": 0o644, "0755": 0o755}
# Where units live in a capsule's home: files/ may not write there, units/ is the only way in
# (so every unit file passes the unit checks and `enable` means what it says).
RESERVED_HOME_PREFIX: Final = (".config", "systemd")

_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_VERSION_PART: Final = re.compile(r"[0-9]+")
_MANIFEST_KEYS: Final = frozenset({"format", "name", "version", "enable", "entries"})
_ENTRY_KEYS: Final = frozenset({"path", "size", "mode"})


class BundleError(Exception):
    """A bundle refused; ``reason`` says why for a human, ``path`` names the entry if one."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.reason = reason
        self.path = path


class InvalidBundle(BundleError):
    """Not a bundle, truncated, corrupted, over a cap, or a manifest breaking a rule."""


class Unsigned(BundleError):
    """The bundle carries no signature block."""


class UntrustedKey(BundleError):
    """The bundle is signed by a key the verifier does not trust; ``key_id`` is its id (hex)."""

    def __init__(self, key_id_hex: str) -> None:
        super().__init__(f"signed by an untrusted key (key id {key_id_hex})")
        self.key_id = key_id_hex


class BadSignature(BundleError):
    """The signature does not match the bundle for the key it names: modified after signing."""

    def __init__(self, key_id_hex: str) -> None:
        super().__init__(f"the signature does not match the content (key id {key_id_hex})")
        self.key_id = key_id_hex


@dataclass(frozen=True, slots=True)
class Signature:
    """A bundle's signature block."""

    key_id: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    """A bundle whose framing holds: the body (header, manifest, content) and its signature."""

    body: bytes
    manifest_bytes: int
    signature: Signature | None

    @property
    def digest(self) -> bytes:
        """SHA-256 of the body: what the signature is over."""
        import hashlib  # here, not at start: it loads OpenSSL's libcrypto (issue 12, cold start)

        return hashlib.sha256(self.body).digest()


@dataclass(frozen=True, slots=True)
class Entry:
    """One file of a bundle: ``path`` as in the manifest ("units/x.service", "files/a/b")."""

    path: str
    data: bytes
    mode: int

    @property
    def unit(self) -> str | None:
        """The unit name of a units/ entry."""
        top, _, rest = self.path.partition("/")
        return rest if top == UNITS_DIR else None

    @property
    def home_path(self) -> tuple[str, ...] | None:
        """Where a files/ entry goes under the capsule's home, component by component."""
        top, _, rest = self.path.partition("/")
        return tuple(rest.split("/")) if top == FILES_DIR else None


@dataclass(frozen=True, slots=True)
class Bundle:
    """A parsed manifest with its entries."""

    name: str
    version: str
    enable: tuple[str, ...]
    entries: tuple[Entry, ...]

    @property
    def units(self) -> dict[str, Entry]:
        """unit name -> its entry."""
        return {e.unit: e for e in self.entries if e.unit is not None}

    @property
    def files(self) -> list[Entry]:
        """The files/ entries."""
        return [e for e in self.entries if e.home_path is not None]


# -- reading ----------------------------------------------------------------------------------


def open_envelope(data: bytes, *, max_bytes: int = MAX_BUNDLE_BYTES) -> Envelope:
    """Check the framing: size cap, header, lengths adding up, signature block if any.

    Raises:
        InvalidBundle: over the cap, not a bundle, truncated, or bytes beyond the declared ones.
    """
    if len(data) > max_bytes:
        raise InvalidBundle(f"larger than {max_bytes} bytes")
    if len(data) < HEADER_BYTES:
        raise InvalidBundle(f"truncated: {len(data)} bytes, shorter than the header")
    magic, version, flags, manifest_len, content_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise InvalidBundle("not a capsuled bundle (bad magic)")
    if version != FORMAT_VERSION:
        raise InvalidBundle(f"unknown bundle format version {version}")
    if flags != 0:
        raise InvalidBundle(f"unknown header flags {flags:#x}")
    if not 2 <= manifest_len <= MAX_MANIFEST_BYTES:
        raise InvalidBundle(f"manifest length {manifest_len} outside 2..{MAX_MANIFEST_BYTES}")
    body_len = HEADER_BYTES + manifest_len + content_len
    if body_len > max_bytes:
        raise InvalidBundle(f"declares {body_len} bytes, more than {max_bytes}")
    if len(data) < body_len:
        raise InvalidBundle(f"truncated: {len(data)} bytes of the {body_len} its header declares")
    if len(data) == body_len:
        return Envelope(data, manifest_len, None)
    block = data[body_len:]
    if len(block) != SIGNATURE_BLOCK_BYTES or not block.startswith(SIGNATURE_MAGIC):
        raise InvalidBundle(
            f"corrupted: {len(block)} bytes after the content are not a signature block"
        )
    offset = len(SIGNATURE_MAGIC)
    key = block[offset : offset + KEY_ID_BYTES]
    signature = block[offset + KEY_ID_BYTES :]
    return Envelope(data[:body_len], manifest_len, Signature(key, signature))


def key_id(public_key: Ed25519PublicKey) -> bytes:
    """A key's id: SHA-256 of its raw 32-byte public key."""
    import hashlib  # with cryptography: neither is loaded at start unless a key is trusted

    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()


def verify_signature(envelope: Envelope, trusted: Mapping[bytes, Ed25519PublicKey]) -> bytes:
    """Check the signature against the trusted keys (key id -> key); returns the key id used.

    Raises:
        Unsigned: no signature block.
        UntrustedKey: the key it names is not among `trusted`.
        BadSignature: it does not verify (the body changed after signing, or a forged block).
    """
    from cryptography.exceptions import InvalidSignature

    signature = envelope.signature
    if signature is None:
        raise Unsigned("not signed")
    public_key = trusted.get(signature.key_id)
    if public_key is None:
        raise UntrustedKey(signature.key_id.hex())
    try:
        public_key.verify(signature.signature, SIGNATURE_CONTEXT + envelope.digest)
    except InvalidSignature:
        raise BadSignature(signature.key_id.hex()) from None
    return signature.key_id


def read_manifest(envelope: Envelope) -> Bundle:
    """Parse and check the manifest, and cut the content into its entries.

    Raises:
        InvalidBundle: the manifest is not JSON, breaks a rule, or disagrees with the content.
    """
    raw = envelope.body[HEADER_BYTES : HEADER_BYTES + envelope.manifest_bytes]
    content = memoryview(envelope.body)[HEADER_BYTES + envelope.manifest_bytes :]
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidBundle(f"the manifest is not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidBundle("the manifest is not a JSON object")
    unknown = sorted(set(doc) - _MANIFEST_KEYS)
    if unknown:
        raise InvalidBundle(f"unknown manifest key(s) {', '.join(unknown)}")
    if doc.get("format") != FORMAT_VERSION or type(doc.get("format")) is not int:
        raise InvalidBundle(f"manifest format must be {FORMAT_VERSION}")
    name = check_name(doc.get("name"), "name")
    version = check_version(doc.get("version"))
    entries = _entries(doc.get("entries"), content)
    units = {e.unit for e in entries if e.unit is not None}
    for entry in entries:
        if entry.unit is not None:
            _check_unit_file(entry)
    enable = _enable(doc.get("enable"), units)
    return Bundle(name, version, enable, entries)


def _entries(value: object, content: memoryview) -> tuple[Entry, ...]:
    if not isinstance(value, list):
        raise InvalidBundle("manifest entries must be an array")
    if len(value) > MAX_ENTRIES:
        raise InvalidBundle(f"more than {MAX_ENTRIES} entries")
    entries: list[Entry] = []
    offset = 0
    previous = ""
    for item in value:
        if not isinstance(item, dict) or set(item) != _ENTRY_KEYS:
            raise InvalidBundle(f"an entry must be an object with exactly {sorted(_ENTRY_KEYS)}")
        path, size, mode = item["path"], item["size"], item["mode"]
        if not isinstance(path, str):
            raise InvalidBundle("an entry's path must be a string")
        check_path(path)
        # Sorted, hence unique and deterministic: the same tree always gives the same bundle.
        if path <= previous:
            raise InvalidBundle("entries must be sorted by path, each path once", path)
        previous = path
        if type(size) is not int or not 0 <= size <= len(content) - offset:
            raise InvalidBundle("size outside the content", path)
        if not isinstance(mode, str) or mode not in MODES:
            raise InvalidBundle(f"mode must be one of {', '.join(MODES)}", path)
        entries.append(Entry(path, bytes(content[offset : offset + size]), MODES[mode]))
        offset += size
    if offset != len(content):
        raise InvalidBundle(f"the entries cover {offset} of {len(content)} content bytes")
    _check_no_file_is_a_directory(entries)
    return tuple(entries)


def _check_unit_file(entry: Entry) -> None:
    # The same checks as InstallUnit's: a unit that systemd would half-ignore is refused here.
    # Imported here: the trusted keys (policy.signers) need this module at start, the unit
    # file checker only a Deploy does (issue 12: cold activation).
    from capsuled.unitfile import InvalidUnitFile, check_unit_file

    try:
        check_unit_file(entry.data, unit_name=entry.unit)
    except InvalidUnitFile as exc:
        where = f" (line {exc.line})" if exc.line is not None else ""
        raise InvalidBundle(
            f"not an acceptable unit file{where}: {exc.reason}", entry.path
        ) from None


def _check_no_file_is_a_directory(entries: Sequence[Entry]) -> None:
    paths = {e.path for e in entries}
    for entry in entries:
        parts = entry.path.split("/")
        for depth in range(2, len(parts)):
            if "/".join(parts[:depth]) in paths:
                raise InvalidBundle("a file of the bundle is also a directory of it", entry.path)


def _enable(value: object, units: set[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
        raise InvalidBundle("manifest enable must be an array of unit names")
    if len(value) > MAX_ENTRIES or len(set(value)) != len(value):
        raise InvalidBundle("manifest enable lists a unit twice, or too many")
    for unit in value:
        if unit not in units:
            raise InvalidBundle("enabled but not in units/", f"{UNITS_DIR}/{unit}")
    return tuple(value)


def check_name(value: object, what: str) -> str:
    """A bundle or signer name: 1..64 of [A-Za-z0-9_.-], not starting with '.' or '-'.

    Raises:
        InvalidBundle: it is not one.
    """
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS or not _NAME.fullmatch(value):
        raise InvalidBundle(
            f"{what} must be 1..{MAX_NAME_CHARS} characters of [A-Za-z0-9_.-], "
            "not starting with '.' or '-'"
        )
    return value


def is_signer_name(value: str) -> bool:
    """Whether `value` can be a signer (a trusted key file's name without .pub)."""
    return len(value) <= MAX_NAME_CHARS and _NAME.fullmatch(value) is not None


def check_version(value: object) -> str:
    """Dotted decimal numbers, "1", "1.4.2", at most 8 parts of at most 9 digits.

    Raises:
        InvalidBundle: it is not one.
    """
    if isinstance(value, str):
        parts = value.split(".")
        if len(parts) <= MAX_VERSION_PARTS and all(
            _VERSION_PART.fullmatch(p) and len(p) <= MAX_VERSION_PART_DIGITS for p in parts
        ):
            return value
    raise InvalidBundle(
        f"version must be dotted numbers (e.g. 1.4.2), at most {MAX_VERSION_PARTS} parts"
    )


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version a is lower than, equal to or higher than b; numerically, part by
    part, missing parts being 0 ("1.2" == "1.2.0" < "1.10")."""
    pa, pb = [int(p) for p in a.split(".")], [int(p) for p in b.split(".")]
    width = max(len(pa), len(pb))
    ta, tb = pa + [0] * (width - len(pa)), pb + [0] * (width - len(pb))
    return (ta > tb) - (ta < tb)


def check_path(path: str) -> None:
    """An entry path: units/UNIT (an installable unit name), or files/REL under the home.

    Raises:
        InvalidBundle: anything that could leave the home, hide, or bypass units/.
    """
    if len(path) > MAX_PATH_CHARS:
        raise InvalidBundle(f"longer than {MAX_PATH_CHARS} characters", path[:64] + "...")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\0" in part or len(part.encode("utf-8")) > 255:
            raise InvalidBundle("not a relative path of plain names (no '', '.', '..')", path)
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            raise InvalidBundle("control characters in a path", path)
    top = parts[0]
    if top == UNITS_DIR:
        if len(parts) != 2:
            raise InvalidBundle("units/ holds unit files only, no directories", path)
        problem = unit_name_problem(parts[1], types=INSTALLABLE_UNIT_TYPES)
        if problem is not None:
            raise InvalidBundle(f"not an installable unit name: {problem}", path)
        return
    if top != FILES_DIR or len(parts) < 2:
        raise InvalidBundle(f"must be under {UNITS_DIR}/ or {FILES_DIR}/", path)
    if len(parts) - 1 > MAX_PATH_DEPTH:
        raise InvalidBundle(f"deeper than {MAX_PATH_DEPTH} directories", path)
    rel = tuple(parts[1:])
    if rel[: len(RESERVED_HOME_PREFIX)] == RESERVED_HOME_PREFIX:
        raise InvalidBundle("files/.config/systemd/ is reserved: put units in units/", path)
    if rel[-1].startswith(".#capsuled."):
        raise InvalidBundle("names starting with .#capsuled. are capsuled's temporary files", path)


# -- writing ----------------------------------------------------------------------------------


def encode(name: str, version: str, enable: Sequence[str], entries: Sequence[Entry]) -> bytes:
    """An unsigned bundle of these entries (sorted here); checked as the helper will check it.

    Raises:
        InvalidBundle: the result would break a rule (read_manifest's or a cap).
    """
    ordered = sorted(entries, key=lambda e: e.path)
    reverse_modes = {mode: text for text, mode in MODES.items()}
    manifest = {
        "format": FORMAT_VERSION,
        "name": name,
        "version": version,
        "enable": list(enable),
        "entries": [
            {"path": e.path, "size": len(e.data), "mode": reverse_modes.get(e.mode, "")}
            for e in ordered
        ],
    }
    raw = json.dumps(manifest, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    content = b"".join(e.data for e in ordered)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidBundle(f"the manifest would exceed {MAX_MANIFEST_BYTES} bytes")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(raw), len(content))
    data = header + raw + content
    if len(data) + SIGNATURE_BLOCK_BYTES > MAX_BUNDLE_BYTES:
        raise InvalidBundle(
            f"{len(data) + SIGNATURE_BLOCK_BYTES} bytes once signed, more than {MAX_BUNDLE_BYTES}"
        )
    read_manifest(open_envelope(data))  # the rules in one place: refuse what the helper would
    return data


def sign(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The bundle with its signature block added, or replaced, for this key.

    Raises:
        InvalidBundle: `data` is not a well-framed bundle.
    """
    body = open_envelope(data).body
    if len(body) + SIGNATURE_BLOCK_BYTES > MAX_BUNDLE_BYTES:
        raise InvalidBundle(f"more than {MAX_BUNDLE_BYTES} bytes once signed")
    import hashlib  # here, not at start: it loads OpenSSL's libcrypto (issue 12, cold start)

    digest = hashlib.sha256(body).digest()
    signature = private_key.sign(SIGNATURE_CONTEXT + digest)
    return body + SIGNATURE_MAGIC + key_id(private_key.public_key()) + signature
