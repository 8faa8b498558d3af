"""The fuzz proof's generator and judge (tests/e2e/test_fuzz.py), run inside the testbed as a
user who owns nothing (mallory).

    python3 -m e2e.inbed.fuzz '{"messages": N, "seed": S, "targets": [NAME, ...], "workers": W}'

Sends N generated messages to the live helper, W connections at a time, in batches: a few
messages the helper must answer, then perhaps one that ends the batch (a malformed one, after
which the helper must close the connection without a word, or one asking for `more`). What is
generated (seeded, so a run can be repeated):

- structure-aware (about two thirds): a method of org.capsuled.Manager (from the installed IDL)
  or org.varlink.service, or a name that is not one, with parameters built from the IDL's types
  and then mutated (a field dropped, an unknown one added, a value of the wrong type, boundary
  numbers, hostile strings: the target capsules' names, traversal, control characters, long
  text), and any of the call flags, sometimes two of them or a non-boolean;
- byte-level (the rest): a serialised call with bytes flipped, inserted, deleted, truncated,
  duplicated keys, NaN, deep nesting, invalid UTF-8, an embedded NUL.

Whether a message is well formed is judged here independently of capsuled (UAPI.20's rules as
the design brief states them, plus the helper's documented limits: 1 MiB, 16 levels, 8192
values). Prints one JSON report: messages by kind, replies, replies to malformed messages (must
be 0), well-formed calls left unanswered (must be 0), and the error names seen.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import re
import sys
from typing import Any

from capsuled.daemon import load_interface
from capsuled.varlink.interface import (
    Array,
    Dict,
    Enum,
    Interface,
    Maybe,
    Named,
    Primitive,
    Struct,
    VarlinkType,
)
from e2e.inbed.wire import SOCKET

# The helper's documented limits for a call (README "Limits", capsuled serve --help).
MAX_CALL_BYTES = 1024 * 1024
MAX_DEPTH = 16
MAX_VALUES = 8192
CALL_KEYS = frozenset({"method", "parameters", "oneway", "more", "upgrade"})
# UAPI.20: interface.Member.
_INTERFACE = r"[A-Za-z](?:-*[A-Za-z0-9])*(?:\.[A-Za-z0-9](?:-*[A-Za-z0-9])*)+"
METHOD_NAME = re.compile(rf"{_INTERFACE}\.[A-Z][A-Za-z0-9]*", re.ASCII)
BATCH = 12
REPLY_TIMEOUT_S = 60.0
STREAM_WAIT_S = 0.3
SERVICE_METHODS = ("org.varlink.service.GetInfo", "org.varlink.service.GetInterfaceDescription")

Message = dict[str, Any]


# -- is it well formed? (independent of capsuled) ---------------------------------------------


class _Malformed(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise _Malformed("duplicate key")
    return dict(pairs)


def _refuse(_: str) -> object:
    raise _Malformed("NaN or Infinity")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Malformed("out of range")
    return value


def _shape(value: object, depth: int = 1) -> tuple[int, int]:
    """(deepest nesting, values) with an empty container counted as two values; refuses a lone
    UTF-16 surrogate in any string, keys included (not JSON text, RFC 8259)."""
    if isinstance(value, (dict, list)):
        if isinstance(value, dict):
            for key in value:
                _shape(key)
        children = list(value.values()) if isinstance(value, dict) else value
        if not children:
            return depth, 2
        shapes = [_shape(c, depth + 1) for c in children]
        return max(s[0] for s in shapes), 1 + sum(s[1] for s in shapes)
    if isinstance(value, str) and any("\ud800" <= ch <= "\udfff" for ch in value):
        raise _Malformed("lone surrogate")
    return depth - 1, 1


def well_formed(raw: bytes) -> Message | None:
    """The call if `raw` (one message, no NUL) is a well-formed Varlink call, else None."""
    if len(raw) > MAX_CALL_BYTES:
        return None
    try:
        obj = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_refuse,
            parse_float=_finite,
        )
        if not isinstance(obj, dict):
            return None
        depth, values = _shape(obj)
    except (UnicodeDecodeError, ValueError, RecursionError, _Malformed):
        return None
    if depth > MAX_DEPTH or values > MAX_VALUES or not obj.keys() <= CALL_KEYS:
        return None
    method = obj.get("method")
    if not isinstance(method, str) or METHOD_NAME.fullmatch(method) is None:
        return None
    if not isinstance(obj.get("parameters", {}), dict):
        return None
    flags = [obj.get(f, False) for f in ("oneway", "more", "upgrade")]
    if not all(isinstance(f, bool) for f in flags) or sum(flags) > 1:
        return None
    return obj


# -- generating ---------------------------------------------------------------------------------


class Generator:
    def __init__(self, rng: random.Random, interface: Interface, targets: list[str]) -> None:
        self.rng = rng
        self.iface = interface
        self.targets = targets or ["nobody"]

    def string(self) -> str:
        rng = self.rng
        choice = rng.randrange(14)
        if choice < 4:
            return rng.choice(self.targets)
        if choice == 4:
            return f"x{rng.randrange(10**6)}"
        if choice == 5:
            return rng.choice(["web.service", "app.socket", "a@.service", "x.timer"])
        if choice == 6:
            return "../" * rng.randrange(1, 4) + "etc/passwd"
        if choice == 7:
            return "".join(chr(rng.randrange(0, 32)) for _ in range(rng.randrange(1, 8)))
        if choice == 8:
            return "\u00e9\u4e00\U0001f600" * rng.randrange(1, 4)
        if choice == 9:
            return ""
        if choice == 10:
            return "a" * rng.choice([30, 255, 4096])
        if choice == 11:
            return f"K{rng.randrange(100)}=v"
        if choice == 12:
            return "/bin/" + rng.choice(["sh", "true", "sleep"])
        return "[Service]\nExecStart=/bin/sh -c 'id'\n"

    def number(self) -> int | float:
        return self.rng.choice(
            [0, 1, -1, 2, 100, 10001, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30,
             self.rng.randrange(-1000, 1000), 0.5, -1e300, 1e-300]
        )  # fmt: skip

    def anything(self, depth: int = 0) -> object:
        kind = self.rng.randrange(7 if depth < 3 else 5)
        if kind == 0:
            return None
        if kind == 1:
            return self.rng.random() < 0.5
        if kind == 2:
            return self.number()
        if kind == 3:
            return self.string()
        if kind == 4:
            return self.rng.random()
        if kind == 5:
            return [self.anything(depth + 1) for _ in range(self.rng.randrange(4))]
        return {self.string(): self.anything(depth + 1) for _ in range(self.rng.randrange(4))}

    def primitive(self, kind: str) -> object:
        rng = self.rng
        if kind == "bool":
            return rng.random() < 0.5
        if kind == "int":
            return self.number()
        if kind == "float":
            return rng.choice([0.0, 1.5, -2.5, 1e308])
        if kind == "string":
            return self.string()
        return {self.string(): self.anything()}

    def value(self, t: VarlinkType, depth: int = 0) -> object:
        rng = self.rng
        if rng.random() < 0.04 or depth > 6:
            return self.anything()  # the wrong type, now and then
        if isinstance(t, Primitive):
            return self.primitive(t.kind)
        if isinstance(t, Maybe):
            return None if rng.random() < 0.3 else self.value(t.inner, depth + 1)
        if isinstance(t, Array):
            count = rng.choice([0, 1, 2, 3, rng.randrange(50)])
            return [self.value(t.inner, depth + 1) for _ in range(count)]
        if isinstance(t, Dict):
            return {self.string(): self.value(t.inner, depth + 1) for _ in range(rng.randrange(4))}
        if isinstance(t, Named):
            return self.value(self.iface.types[t.name], depth + 1)
        if isinstance(t, Enum):
            return rng.choice([*t.values, self.string()])
        return self.struct(t, depth)

    def struct(self, t: Struct, depth: int = 0) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, ftype in t.fields:
            if isinstance(ftype, Maybe) and self.rng.random() < 0.3:
                continue
            out[name] = self.value(ftype, depth + 1)
        rng = self.rng
        if out and rng.random() < 0.1:
            del out[rng.choice(list(out))]  # a required field missing, maybe
        if rng.random() < 0.1:
            out[rng.choice(["bogus", "name2", "Name", "parameters"])] = self.anything()
        return out

    def call(self) -> Message:
        rng = self.rng
        pick = rng.random()
        if pick < 0.85:
            method = rng.choice(sorted(self.iface.methods))
            name = f"{self.iface.name}.{method}"
            params = self.struct(self.iface.methods[method].parameters)
        elif pick < 0.93:
            name = rng.choice(SERVICE_METHODS)
            params = {"interface": rng.choice([self.iface.name, "org.varlink.service", "x.y"])}
        else:
            name = rng.choice(["org.capsuled.Nope.X", "org.capsuled.Manager.Nope", "a.b.C"])
            params = {}
        msg: Message = {"method": name}
        if rng.random() < 0.95:
            msg["parameters"] = params
        flag = rng.random()
        if flag < 0.08:
            msg["oneway"] = True
        elif flag < 0.14:
            msg["more"] = True
        elif flag < 0.17:
            msg["upgrade"] = True
        elif flag < 0.19:
            msg["oneway"] = msg["more"] = True  # malformed: two flags
        elif flag < 0.21:
            msg[rng.choice(["oneway", "more"])] = rng.choice([1, "true", None])  # malformed
        return msg

    def mutated_bytes(self) -> bytes:
        rng = self.rng
        raw = bytearray(json.dumps(self.call()).encode())
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(9)
            at = rng.randrange(len(raw) + 1)
            if op == 0 and raw:
                raw[min(at, len(raw) - 1)] ^= 1 << rng.randrange(8)
            elif op == 1:
                raw[at:at] = bytes([rng.randrange(1, 256)])
            elif op == 2 and raw:
                del raw[min(at, len(raw) - 1)]
            elif op == 3:
                del raw[at:]
            elif op == 4:
                raw[at:at] = b'"method":"x.y.Z",'  # a duplicate key, or noise
            elif op == 5:
                raw = bytearray(raw.replace(b"0", b"NaN", 1))
            elif op == 6:
                depth = rng.choice([10, 20, 1000])
                raw[at:at] = b"[" * depth + b"]" * depth
            elif op == 7:
                raw[at:at] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\ud800"])
            else:
                raw[at:at] = b"\0"  # splits it: two messages, each judged on its own
        return bytes(raw).replace(b"\0\0", b"\0")


# -- sending and judging --------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []

    def violation(self, what: str, message: bytes) -> None:
        self.counts[what] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{what}: {message[:300]!r}")


class Reader:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = b""
        self.closed = False  # the helper closed the connection (not merely silent)

    async def next(self, timeout: float) -> bytes | None:
        """The next message, or None at the end of the stream or after `timeout`."""
        while b"\0" not in self.buf:
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
            except TimeoutError:
                return None
            except ConnectionError:
                data = b""
            if not data:
                self.closed = True
                return None
            self.buf += data
        msg, _, self.buf = self.buf.partition(b"\0")
        return msg


async def run_batch(batch: list[bytes], tally: Tally) -> None:
    """Send one batch on a fresh connection and judge every answer."""
    expected: list[tuple[bytes, Message | None]] = []
    for payload in batch:
        for part in payload.split(b"\0"):
            expected.append((part, well_formed(part)))
    try:
        reader, writer = await asyncio.open_unix_connection(SOCKET)
    except OSError:
        tally.counts["connect-failed"] += 1
        return
    try:
        writer.write(b"".join(payload + b"\0" for payload in batch))
        await writer.drain()
    except ConnectionError:
        pass  # closed early (a malformed one): the replies already sent are still readable
    replies = Reader(reader)
    try:
        await judge(expected, replies, tally)
    finally:
        writer.transport.abort()


async def judge(
    expected: list[tuple[bytes, Message | None]], replies: Reader, tally: Tally
) -> None:
    for raw, call in expected:
        tally.counts["messages"] += 1
        if call is None:
            tally.counts["malformed"] += 1
            extra = await replies.next(REPLY_TIMEOUT_S)
            if extra is not None:
                tally.violation("replies_to_malformed", raw)
            elif not replies.closed:
                tally.violation("malformed_not_closed", raw)
            return  # the helper closes here: nothing after it is read
        tally.counts["well_formed"] += 1
        if call.get("oneway"):
            tally.counts["oneway"] += 1
            continue
        if call.get("more"):
            # A stream may say nothing until something happens (Watch of nothing mallory may
            # see) and go on for ever: take what comes quickly, then hang up.
            tally.counts["streams"] += 1
            await stream(replies, tally, raw)
            return
        reply = await replies.next(REPLY_TIMEOUT_S)
        if reply is None:
            tally.violation("unanswered", raw)
            return
        tally.counts["replies"] += 1
        tally.errors[str(json.loads(reply).get("error", "ok"))] += 1


async def stream(replies: Reader, tally: Tally, raw: bytes) -> None:
    while (reply := await replies.next(STREAM_WAIT_S)) is not None:
        tally.counts["replies"] += 1
        answer = json.loads(reply)
        if not answer.get("continues"):
            tally.errors[str(answer.get("error", "ok"))] += 1
            return
    if replies.closed:
        tally.violation("stream_closed_without_reply", raw)


async def worker(gen: Generator, quota: list[int], tally: Tally) -> None:
    rng = gen.rng
    while quota[0] > 0:
        batch: list[bytes] = []
        for _ in range(rng.randrange(1, BATCH)):
            raw = gen.mutated_bytes() if rng.random() < 0.35 else json.dumps(gen.call()).encode()
            batch.append(raw)
            ends = False
            for part in raw.split(b"\0"):
                quota[0] -= 1  # judged: the parts up to the first that ends the batch
                call = well_formed(part)
                if call is None or call.get("more"):
                    ends = True  # malformed, or a stream: nothing after it is answered
                    break
            if ends or quota[0] <= 0:
                break
        await run_batch(batch, tally)


async def main(config: dict[str, Any]) -> dict[str, object]:
    interface = load_interface()
    seed = int(config["seed"])
    tally = Tally()
    quota = [int(config["messages"])]
    targets = list(config["targets"])
    workers = [
        worker(Generator(random.Random(f"{seed}-{w}"), interface, targets), quota, tally)
        for w in range(int(config.get("workers", 4)))
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*workers)
    seconds = loop.time() - started
    return {
        "seed": seed,
        "seconds": round(seconds, 1),
        "per_second": round(tally.counts["messages"] / seconds, 1),
        "counts": dict(tally.counts),
        "replies_to_malformed": tally.counts["replies_to_malformed"],
        "malformed_not_closed": tally.counts["malformed_not_closed"],
        "unanswered": tally.counts["unanswered"],
        "stream_closed_without_reply": tally.counts["stream_closed_without_reply"],
        "errors": dict(tally.errors.most_common()),
        "examples": tally.examples,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))), flush=True)
