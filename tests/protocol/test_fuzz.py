"""A seeded 10,000-case fuzz run of random and mutated messages against the real server.

For every case the suite decides with its own oracle (written independently of
capsuled.varlink) whether the bytes are a well-formed Varlink call, sends them followed by a
sentinel call, and checks:
- malformed -> the connection is closed without one byte of reply (the sentinel is not answered);
- well-formed oneway -> the first reply is the sentinel's;
- well-formed otherwise -> the first message is a reply (a Varlink reply object).
Throughout, a separate long-lived connection keeps getting answers, and the server never logs an
asyncio error or a protocol misuse of its own.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time

import pytest

from protocol.harness import Closed, RawClient, ThreadServer

SEED = 20261125
CASES = 10_000
T = "org.example.test"
SENTINEL = json.dumps({"method": f"{T}.Ping", "parameters": {"text": "sentinel"}}).encode()
SENTINEL_REPLY = {"parameters": {"text": "sentinel"}}

BASE_CALLS: list[dict[str, object]] = [
    {"method": f"{T}.Ping", "parameters": {"text": "hi"}},
    {"method": f"{T}.Ping"},
    {"method": f"{T}.Ping", "parameters": {"text": None}, "oneway": True},
    {"method": f"{T}.Echo", "parameters": {"value": {"b": True, "i": 1, "f": 1.5, "s": "s"}}},
    {"method": f"{T}.Stream", "parameters": {"count": 2}, "more": True},
    {"method": f"{T}.StreamOnly", "parameters": {"count": 1}},
    {"method": f"{T}.Record", "parameters": {"note": "n"}, "oneway": True},
    {"method": f"{T}.Fail", "parameters": {"kind": "declared"}},
    {"method": f"{T}.Fail", "parameters": {"kind": "internal"}},
    {"method": f"{T}.Unimplemented"},
    {"method": f"{T}.Nope", "parameters": {}},
    {"method": "org.varlink.service.GetInfo"},
    {"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": T}},
    {"method": "org.nope.Nope", "upgrade": True},
]
TOKENS = [
    b"{", b"}", b"[", b"]", b":", b",", b'"method"', b'"parameters"', b'"oneway"', b'"more"',
    b'"upgrade"', b"true", b"false", b"null", b"0", b"-1", b"1.5", b"1e400", b'"x"', b" ",
    b'"org.example.test.Ping"', b'"text"', b"NaN", b'"\\ud800"', b'"\\u00e9"', b"\xff", b"\xc3",
]  # fmt: skip
VALUES: list[object] = [None, True, False, 0, -1, 2**70, 1.5, "", "x", [], {}, [1, "a"], {"k": 1}]

# ---- the oracle: UAPI.20 rules, written here independently of capsuled.varlink ----------------

_METHOD = re.compile(
    r"[A-Za-z](-*[A-Za-z0-9])*(\.[A-Za-z0-9](-*[A-Za-z0-9])*)+\.[A-Z][A-Za-z0-9]*", re.ASCII
)


class _Bad(Exception):
    pass


def _no_dupes(pairs: list[tuple[str, object]]) -> dict[str, object]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise _Bad
    return dict(pairs)


def _bad_constant(_: str) -> object:
    raise _Bad


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Bad
    return value


def _strings_ok(v: object) -> bool:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(v, list):
        return all(_strings_ok(x) for x in v)
    if isinstance(v, dict):
        return all(_strings_ok(k) and _strings_ok(x) for k, x in v.items())
    return True


def well_formed(raw: bytes) -> tuple[bool, bool]:
    """(is a well-formed call, is oneway)."""
    try:
        obj = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_dupes,
            parse_constant=_bad_constant,
            parse_float=_finite,
        )
    except (_Bad, ValueError, RecursionError):
        return False, False
    if not isinstance(obj, dict) or not _strings_ok(obj):
        return False, False
    if set(obj) - {"method", "parameters", "oneway", "more", "upgrade"}:
        return False, False
    method = obj.get("method")
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        return False, False
    if not isinstance(obj.get("parameters", {}), dict):
        return False, False
    flags = [obj.get(k, False) for k in ("oneway", "more", "upgrade")]
    if not all(isinstance(f, bool) for f in flags) or sum(flags) > 1:
        return False, False
    return True, bool(flags[0])


# ---- generators --------------------------------------------------------------------------------


def _mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[min(pos, len(b) - 1)]
        elif op == 2:
            b[pos:pos] = bytes([rng.randrange(256)])
        elif op == 3:
            b[pos:pos] = rng.choice(TOKENS)
        elif op == 4 and b:
            b = b[: rng.randrange(len(b))]
        elif op == 5 and b:
            start = rng.randrange(len(b))
            b[pos:pos] = b[start : start + rng.randint(1, 8)]
    return bytes(b)


def _mutate_structure(rng: random.Random, call: dict[str, object]) -> bytes:
    obj = dict(call)
    params = dict(obj.get("parameters", {}))  # type: ignore[call-overload]
    op = rng.randrange(6)
    if op == 0:
        obj[rng.choice(["method", "parameters", "oneway", "more", "upgrade", "extra"])] = (
            rng.choice(VALUES)
        )
    elif op == 1:
        obj.pop(rng.choice(list(obj)), None)
    elif op == 2:
        params[rng.choice(["text", "value", "count", "kind", "interface", "zzz"])] = rng.choice(
            VALUES
        )
        obj["parameters"] = params
    elif op == 3:
        obj[rng.choice(["oneway", "more", "upgrade"])] = True
    elif op == 4:
        method = str(obj["method"])
        cut = rng.randrange(len(method) + 1)
        obj["method"] = method[:cut] + rng.choice(["", ".", "-", "X", "x", " ", "é"]) + method[cut:]
    else:
        obj["parameters"] = {
            "value": {"n": {"name": rng.choice(VALUES), "count": rng.choice(VALUES)}}
        }
        obj["method"] = f"{T}.Echo"
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()


def generate(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    elif kind == 1:
        raw = b"".join(rng.choice(TOKENS) for _ in range(rng.randrange(1, 16)))
    elif kind in (2, 3, 4, 5):
        raw = _mutate_bytes(rng, json.dumps(rng.choice(BASE_CALLS)).encode())
    elif kind in (6, 7, 8):
        raw = _mutate_structure(rng, rng.choice(BASE_CALLS))
    else:
        raw = json.dumps(rng.choice(BASE_CALLS)).encode()
    return raw.replace(b"\0", b"\x01")  # a NUL would split the case into two messages


def _run_case(path: str, raw: bytes) -> str:
    good, oneway = well_formed(raw)
    with RawClient(path) as c:
        c.send_raw(raw + b"\0" + SENTINEL + b"\0")
        if not good:
            c.expect_closed()
            return "malformed"
        first = c.recv()
        if oneway:
            assert first == SENTINEL_REPLY, (raw, first)
            return "oneway"
        assert set(first) <= {"parameters", "continues", "error"}, (raw, first)
        assert first != SENTINEL_REPLY, (raw, first)
        return "error" if "error" in first else "reply"


def test_fuzz(server: ThreadServer, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(SEED)
    counts: dict[str, int] = {}
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), RawClient(server.path) as keeper:
        for i in range(CASES):
            raw = generate(rng)
            try:
                outcome = _run_case(server.path, raw)
            except Closed as exc:
                raise AssertionError(f"case {i}: {raw!r} closed early: {exc}") from None
            counts[outcome] = counts.get(outcome, 0) + 1
            if i % 500 == 0:
                assert keeper.call(f"{T}.Ping", text=str(i)) == {"parameters": {"text": str(i)}}
        assert keeper.call(f"{T}.Ping", text="end") == {"parameters": {"text": "end"}}
    elapsed = time.monotonic() - started
    assert server.thread.is_alive()
    assert not [r for r in caplog.records if r.name == "asyncio"]
    assert not [r for r in caplog.records if "protocol misuse" in r.getMessage()]
    # The generator must exercise both sides of the oracle substantially.
    assert counts["malformed"] > CASES // 4, counts
    assert counts.get("reply", 0) > CASES // 20, counts
    print(f"\nfuzz: {CASES} cases in {elapsed:.1f} s: {counts}")
