"""capsuled.bundle: the file format, its caps, and every way a bundle is refused."""

from __future__ import annotations

import json
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from capsuled import bundle as fmt

UNIT = b"[Unit]\nDescription=web\n\n[Service]\nExecStart=/bin/sleep infinity\n"
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
TRUSTED = {fmt.key_id(KEY.public_key()): KEY.public_key()}


def entries(**extra: bytes) -> list[fmt.Entry]:
    found = [
        fmt.Entry("units/web.service", UNIT, 0o644),
        fmt.Entry("files/app/config.toml", b"port = 8080\n", 0o644),
        fmt.Entry("files/bin/run", b"#!/bin/sh\nexec true\n", 0o755),
    ]
    found += [fmt.Entry(path, data, 0o644) for path, data in extra.items()]
    return found


def unsigned(version: str = "1.2.0") -> bytes:
    return fmt.encode("web", version, ["web.service"], entries())


def signed(version: str = "1.2.0", key: Ed25519PrivateKey = KEY) -> bytes:
    return fmt.sign(unsigned(version), key)


def raw_bundle(manifest: object, content: bytes = b"") -> bytes:
    """A bundle with any manifest, framed correctly (what a hostile signer could sign)."""
    text = json.dumps(manifest).encode()
    header = struct.pack(">8sHHIQ", fmt.MAGIC, 1, 0, len(text), len(content))
    return header + text + content


def manifest(**overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "format": 1,
        "name": "web",
        "version": "1",
        "enable": [],
        "entries": [{"path": "units/web.service", "size": len(UNIT), "mode": "0644"}],
    }
    doc.update(overrides)
    return doc


def parse(data: bytes) -> fmt.Bundle:
    envelope = fmt.open_envelope(data)
    fmt.verify_signature(envelope, TRUSTED)
    return fmt.read_manifest(envelope)


# -- round trip ------------------------------------------------------------------------------


def test_a_signed_bundle_reads_back_as_built() -> None:
    parsed = parse(signed())
    assert (parsed.name, parsed.version, parsed.enable) == ("web", "1.2.0", ("web.service",))
    assert parsed.units["web.service"].data == UNIT
    assert {e.home_path: e.mode for e in parsed.files} == {
        ("app", "config.toml"): 0o644,
        ("bin", "run"): 0o755,
    }


def test_entries_are_sorted_so_a_tree_always_gives_the_same_bytes() -> None:
    assert fmt.encode("web", "1", [], list(reversed(entries()))) == fmt.encode(
        "web", "1", [], entries()
    )


def test_signing_again_replaces_the_signature() -> None:
    once = signed()
    twice = fmt.sign(once, OTHER)
    assert len(twice) == len(once)
    envelope = fmt.open_envelope(twice)
    other = {fmt.key_id(OTHER.public_key()): OTHER.public_key()}
    assert fmt.verify_signature(envelope, other) == fmt.key_id(OTHER.public_key())
    with pytest.raises(fmt.UntrustedKey):
        fmt.verify_signature(envelope, TRUSTED)


def test_the_signature_covers_a_digest_of_everything_before_it() -> None:
    data = signed()
    body = data[: -fmt.SIGNATURE_BLOCK_BYTES]
    import hashlib

    signature = data[-fmt.SIGNATURE_BYTES :]
    KEY.public_key().verify(signature, fmt.SIGNATURE_CONTEXT + hashlib.sha256(body).digest())


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [("1.2", "1.2.0", 0), ("1.10", "1.9", 1), ("1.2.3", "1.3", -1), ("2", "10", -1), ("0", "0", 0)],
)
def test_versions_compare_numerically(a: str, b: str, order: int) -> None:
    assert fmt.compare_versions(a, b) == order


# -- refused: framing ------------------------------------------------------------------------


def test_unsigned() -> None:
    with pytest.raises(fmt.Unsigned):
        parse(unsigned())


def test_untrusted_key() -> None:
    with pytest.raises(fmt.UntrustedKey) as info:
        parse(signed(key=OTHER))
    assert info.value.key_id == fmt.key_id(OTHER.public_key()).hex()


@pytest.mark.parametrize("where", ["header", "manifest", "content", "last content byte"])
def test_one_flipped_bit_breaks_the_signature(where: str) -> None:
    data = bytearray(signed())
    manifest_len = struct.unpack_from(">I", data, 12)[0]
    body_len = len(data) - fmt.SIGNATURE_BLOCK_BYTES
    offset = {
        "header": 11,  # the flags' low byte: the framing check would catch it first...
        "manifest": fmt.HEADER_BYTES + 5,
        "content": fmt.HEADER_BYTES + manifest_len + 3,
        "last content byte": body_len - 1,
    }[where]
    data[offset] ^= 0x01
    if where == "header":
        with pytest.raises(fmt.InvalidBundle, match="flags"):  # ...and it does
            parse(bytes(data))
        return
    with pytest.raises(fmt.BadSignature):
        parse(bytes(data))


def test_a_flipped_signature_byte_is_a_bad_signature() -> None:
    data = bytearray(signed())
    data[-1] ^= 0x80
    with pytest.raises(fmt.BadSignature):
        parse(bytes(data))


def test_a_flipped_key_id_byte_is_an_untrusted_key() -> None:
    data = bytearray(signed())
    data[-fmt.SIGNATURE_BYTES - 1] ^= 0x80
    with pytest.raises(fmt.UntrustedKey):
        parse(bytes(data))


@pytest.mark.parametrize(
    "cut", [1, fmt.SIGNATURE_BLOCK_BYTES - 1, fmt.SIGNATURE_BLOCK_BYTES + 1, 200]
)
def test_truncated(cut: int) -> None:
    data = signed()[:-cut]
    with pytest.raises(fmt.InvalidBundle, match=r"truncated|corrupted"):
        parse(data)


def test_cut_exactly_at_the_signature_it_is_unsigned() -> None:
    with pytest.raises(fmt.Unsigned):
        parse(signed()[: -fmt.SIGNATURE_BLOCK_BYTES])


def test_truncated_inside_the_header() -> None:
    with pytest.raises(fmt.InvalidBundle, match="truncated"):
        parse(signed()[:10])


def test_bytes_appended_are_refused() -> None:
    with pytest.raises(fmt.InvalidBundle, match="corrupted"):
        parse(signed() + b"x")


def test_not_a_bundle() -> None:
    with pytest.raises(fmt.InvalidBundle, match="magic"):
        parse(b"PK\x03\x04" + bytes(100))


def test_over_the_cap_is_refused_before_anything_is_read() -> None:
    with pytest.raises(fmt.InvalidBundle, match="larger than"):
        fmt.open_envelope(bytes(fmt.MAX_BUNDLE_BYTES + 1))


def test_a_header_declaring_more_than_the_cap_is_refused() -> None:
    header = struct.pack(">8sHHIQ", fmt.MAGIC, 1, 0, 10, 1 << 40)
    with pytest.raises(fmt.InvalidBundle, match="declares"):
        fmt.open_envelope(header + bytes(10))


def test_building_over_the_cap_is_refused() -> None:
    big = fmt.Entry("files/big", bytes(fmt.MAX_BUNDLE_BYTES), 0o644)
    with pytest.raises(fmt.InvalidBundle, match="once signed"):
        fmt.encode("web", "1", [], [big])


# -- refused: the manifest (even when correctly signed) -------------------------------------


@pytest.mark.parametrize(
    ("doc", "content", "message"),
    [
        (manifest(entries=[{"path": "units/../x", "size": 0, "mode": "0644"}]), b"", "plain"),
        (manifest(entries=[{"path": "/etc/passwd", "size": 0, "mode": "0644"}]), b"", "plain"),
        (manifest(entries=[{"path": "files/../../x", "size": 0, "mode": "0644"}]), b"", "plain"),
        (manifest(entries=[{"path": "files", "size": 0, "mode": "0644"}]), b"", "under"),
        (manifest(entries=[{"path": "etc/x", "size": 0, "mode": "0644"}]), b"", "under"),
        (
            manifest(
                entries=[
                    {"path": "files/.config/systemd/user/x.service", "size": 0, "mode": "0644"}
                ]
            ),
            b"",
            "reserved",
        ),
        (
            manifest(entries=[{"path": "units/a/b.service", "size": 0, "mode": "0644"}]),
            b"",
            "no directories",
        ),
        (manifest(entries=[{"path": "units/web", "size": 0, "mode": "0644"}]), b"", "unit name"),
        (
            manifest(entries=[{"path": "units/x.mount", "size": 0, "mode": "0644"}]),
            b"",
            "unit name",
        ),
        (
            manifest(entries=[{"path": "units/x.service", "size": 4, "mode": "0644"}]),
            b"junk",
            "unit file",
        ),
        (manifest(entries=[{"path": "files/x", "size": 1, "mode": "4755"}]), b"x", "mode"),
        (manifest(entries=[{"path": "files/x\x1b", "size": 1, "mode": "0644"}]), b"x", "control"),
        (manifest(enable=["other.service"]), UNIT, "enabled but not"),
        (manifest(enable=["web.service", "web.service"]), UNIT, "twice"),
        (manifest(version="1.x"), UNIT, "version"),
        (manifest(version=""), UNIT, "version"),
        (manifest(name="../web"), UNIT, "name"),
        (manifest(format=2), UNIT, "format"),
        (manifest(extra=1), UNIT, "unknown manifest key"),
        (
            manifest(
                entries=[{"path": "units/web.service", "size": len(UNIT) + 1, "mode": "0644"}]
            ),
            UNIT,
            "size",
        ),
        (manifest(), UNIT + b"trailing", "cover"),
        (
            manifest(
                entries=[
                    {"path": "files/b", "size": 0, "mode": "0644"},
                    {"path": "files/a", "size": 0, "mode": "0644"},
                ]
            ),
            b"",
            "sorted",
        ),
        (
            manifest(
                entries=[
                    {"path": "files/a", "size": 0, "mode": "0644"},
                    {"path": "files/a", "size": 0, "mode": "0644"},
                ]
            ),
            b"",
            "sorted",
        ),
        (
            manifest(
                entries=[
                    {"path": "files/a", "size": 0, "mode": "0644"},
                    {"path": "files/a/b", "size": 0, "mode": "0644"},
                ]
            ),
            b"",
            "also a directory",
        ),
        (manifest(entries=[{"path": "files/x", "size": True, "mode": "0644"}]), b"", "size"),
    ],
)
def test_manifest_rules(doc: object, content: bytes, message: str) -> None:
    data = fmt.sign(raw_bundle(doc, content), KEY)
    with pytest.raises(fmt.InvalidBundle, match=message):
        parse(data)


def test_too_many_entries() -> None:
    many = [{"path": f"files/f{i:04d}", "size": 0, "mode": "0644"} for i in range(257)]
    with pytest.raises(fmt.InvalidBundle, match="more than 256"):
        parse(fmt.sign(raw_bundle(manifest(entries=many)), KEY))


def test_a_manifest_that_is_not_json() -> None:
    header = struct.pack(">8sHHIQ", fmt.MAGIC, 1, 0, 4, 0)
    with pytest.raises(fmt.InvalidBundle, match="JSON"):
        parse(fmt.sign(header + b"{no}", KEY))


def test_the_signature_is_checked_before_the_manifest_is_parsed() -> None:
    # A manifest no parser should see from an untrusted key: the key is refused first.
    header = struct.pack(">8sHHIQ", fmt.MAGIC, 1, 0, 4, 0)
    with pytest.raises(fmt.UntrustedKey):
        parse(fmt.sign(header + b"{no}", OTHER))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_mutation_is_refused_cleanly(data: st.DataObject) -> None:
    """Random byte changes, cuts and insertions: a BundleError, never another exception."""
    original = bytearray(signed())
    kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    at = data.draw(st.integers(0, len(original) - 1))
    if kind == "flip":
        original[at] ^= data.draw(st.integers(1, 255))
    elif kind == "cut":
        del original[at : at + data.draw(st.integers(1, 64))]
    else:
        original[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    with pytest.raises(fmt.BundleError):
        parse(bytes(original))
