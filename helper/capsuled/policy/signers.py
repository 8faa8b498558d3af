"""The keys trusted to sign deploy bundles: /etc/capsuled/trusted-keys.d/SIGNER.pub.

Each file holds one Ed25519 public key in PEM (SubjectPublicKeyInfo, what `capsulectl bundle
keygen` writes as KEY.pub and `openssl pkey -pubout` prints); the file name without ``.pub`` is
the signer's name, which Describe reports and `signers = [...]` rules (polkit detail
``signer``) match.  A bundle never names its signer: it names a key (by id), and the name comes
from the administrator's file, so a bundle cannot claim to be "release".

Read like the policy files (capsuled.policy.config: root-owned, not writable by group or others,
regular files, size-capped) and with it: at start-up and on every reload (SIGHUP), never per
call.  A directory or file that fails those checks refuses the *whole* key ring (logged), so no
bundle verifies until it is fixed: an unsafe file may have been planted, and trusting the rest
would make the outcome depend on which file an attacker chose.  A file that is safe but does not
hold an Ed25519 public key is skipped (logged) when the keys are first used.

Loading reads and checks the files only; the keys are parsed (which imports `cryptography`) the
first time a bundle is verified, so a daemon that never deploys does not pay that import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from capsuled.policy.config import ConfigError, open_checked_dir, read_checked_file

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["KEYS_DIR", "TrustedKeys", "load_trusted_keys"]

log = logging.getLogger(__name__)

KEYS_DIR: Final = "trusted-keys.d"
KEY_SUFFIX: Final = ".pub"
MAX_TRUSTED_KEYS: Final = 256
MAX_KEY_FILE_BYTES: Final = 4096  # a PEM Ed25519 public key is 113 bytes


@dataclass(slots=True)
class TrustedKeys:
    """Signer name -> PEM text, as read; `public_keys` parses them on first use."""

    pems: Mapping[str, str] = field(default_factory=dict)
    refused: str | None = None  # why the whole ring was refused, if it was
    _parsed: dict[bytes, tuple[str, Ed25519PublicKey]] | None = None

    def public_keys(self) -> dict[bytes, tuple[str, Ed25519PublicKey]]:
        """key id -> (signer, key); keys that do not parse are logged and left out."""
        if self._parsed is None:
            self._parsed = _parse(self.pems)
        return self._parsed

    def verifying_keys(self) -> dict[bytes, Ed25519PublicKey]:
        """key id -> key, for bundle.verify_signature."""
        return {kid: key for kid, (_, key) in self.public_keys().items()}

    def signer_of(self, kid: bytes) -> str:
        """The signer name of a trusted key id.

        Raises:
            KeyError: not a trusted key.
        """
        return self.public_keys()[kid][0]


def _parse(pems: Mapping[str, str]) -> dict[bytes, tuple[str, Ed25519PublicKey]]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from capsuled.bundle import key_id

    parsed: dict[bytes, tuple[str, Ed25519PublicKey]] = {}
    for signer in sorted(pems):
        try:
            key = load_pem_public_key(pems[signer].encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            log.error(
                "trusted key %s%s is not a PEM public key (%s); ignoring it",
                signer,
                KEY_SUFFIX,
                exc,
            )
            continue
        if not isinstance(key, Ed25519PublicKey):
            log.error("trusted key %s%s is not an Ed25519 key; ignoring it", signer, KEY_SUFFIX)
            continue
        kid = key_id(key)
        if kid in parsed:
            log.warning(
                "trusted key %s%s is the same key as %s%s; signer stays %s",
                signer,
                KEY_SUFFIX,
                parsed[kid][0],
                KEY_SUFFIX,
                parsed[kid][0],
            )
            continue
        parsed[kid] = (signer, key)
    return parsed


def load_trusted_keys(config_dir: Path) -> TrustedKeys:
    """The key ring under CONFIG_DIR/trusted-keys.d (empty if missing; refused if unsafe)."""
    where = config_dir / KEYS_DIR
    try:
        return TrustedKeys(_read_keys(where))
    except ConfigError as exc:
        log.error("trusted keys refused: %s; no deploy bundle verifies until it is fixed", exc)
        return TrustedKeys({}, refused=str(exc))


def _read_keys(where: Path) -> dict[str, str]:
    dir_fd = open_checked_dir(where)
    if dir_fd is None:
        return {}
    pems: dict[str, str] = {}
    try:
        names = sorted(n for n in os.listdir(dir_fd) if n.endswith(KEY_SUFFIX))
        for name in names:
            if name.startswith("."):
                continue
            signer = name.removesuffix(KEY_SUFFIX)
            # Here, not at start: with no key to read, a start never loads the bundle code.
            from capsuled.bundle import InvalidBundle, check_name

            try:
                check_name(signer, f"{where / name}: the signer name")
            except InvalidBundle as exc:
                raise ConfigError(exc.reason) from None
            if len(pems) >= MAX_TRUSTED_KEYS:
                raise ConfigError(f"{where}: more than {MAX_TRUSTED_KEYS} keys")
            text = read_checked_file(dir_fd, name, where / name, max_bytes=MAX_KEY_FILE_BYTES)
            if text is not None:
                pems[signer] = text
    finally:
        os.close(dir_fd)
    return pems
