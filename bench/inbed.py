"""The benchmarks' clients, run inside the testbed (`python3 /src/bench/inbed.py MODE JSON`).

Plain Python on both sides, so the figures compare the daemons rather than the clients: Varlink
is a raw socket with JSON + NUL, D-Bus is jeepney's blocking connection to the system bus (both
ship in the bed). Every mode prints one JSON document on stdout.

    rounds   sequential latencies of several operations, interleaved call by call
    clients  calls/s of C concurrent client processes, each on its own connection
    cold     socket activation to the first reply, next to `python3 -c pass`
    calls    many pipelined calls on one connection (the memory benchmark's load)

Only the standard library and jeepney: this file runs under the bed's Debian python3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable

SOCKET = "/run/capsuled/org.capsuled.Manager"
INTERFACE = "org.capsuled.Manager"


class Varlink:
    """One connection to capsuled; calls are JSON + NUL, replies read to their NUL."""

    def __init__(self, path: str = SOCKET) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""

    @staticmethod
    def message(method: str, params: dict[str, object]) -> bytes:
        return (
            json.dumps({"method": f"{INTERFACE}.{method}", "parameters": params}).encode() + b"\0"
        )

    def reply(self) -> dict[str, object]:
        while True:
            end = self.buf.find(b"\0")
            if end >= 0:
                raw, self.buf = self.buf[:end], self.buf[end + 1 :]
                reply: dict[str, object] = json.loads(raw)
                return reply
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise SystemExit("capsuled closed the connection")
            self.buf += chunk

    def caller(self, method: str, params: dict[str, object]) -> Callable[[], bool]:
        """A function making one call; returns whether it failed (an error reply)."""
        msg = self.message(method, params)

        def call() -> bool:
            self.sock.sendall(msg)
            return "error" in self.reply()

        return call


class Bus:
    """One system bus connection (jeepney, blocking)."""

    def __init__(self) -> None:
        from jeepney.io.blocking import open_dbus_connection

        self.conn = open_dbus_connection(bus="SYSTEM")

    def caller(self, spec: list[object]) -> Callable[[], bool]:
        """spec: [path, interface, member, signature, [args...]] of a method call on PID 1."""
        from jeepney import DBusAddress, MessageType, new_method_call

        path, interface, member, signature, args = spec
        address = DBusAddress(str(path), bus_name="org.freedesktop.systemd1", interface=interface)
        msg = new_method_call(address, str(member), str(signature), tuple(args))  # type: ignore[arg-type]

        def call() -> bool:
            reply = self.conn.send_and_get_reply(msg)
            return bool(reply.header.message_type == MessageType.error)

        return call


def make_caller(op: dict[str, object], cache: dict[str, object]) -> Callable[[], bool]:
    """An operation from its description: {"varlink": [method, params]} or {"dbus": spec}."""
    if "varlink" in op:
        method, params = op["varlink"]  # type: ignore[misc]
        conn = cache.setdefault("varlink", None) or Varlink()
        cache["varlink"] = conn
        return conn.caller(method, params)  # type: ignore[union-attr]
    conn = cache.setdefault("bus", None) or Bus()
    cache["bus"] = conn
    return conn.caller(op["dbus"])  # type: ignore[union-attr, arg-type]


def rounds(spec: dict[str, object]) -> dict[str, object]:
    """{"ops": {label: op}, "calls": k, "counts": {label: k'}} -> {label: [µs...], "errors"}.

    One warm-up call each, then round by round one call of every operation (an operation with
    a smaller count takes part in the first k' rounds only), so load hits them all alike.
    """
    ops: dict[str, dict[str, object]] = spec["ops"]  # type: ignore[assignment]
    calls = int(spec["calls"])  # type: ignore[call-overload]
    counts: dict[str, int] = spec.get("counts", {})  # type: ignore[assignment]
    cache: dict[str, object] = {}
    callers = {label: make_caller(op, cache) for label, op in ops.items()}
    times: dict[str, list[float]] = {label: [] for label in ops}
    errors = dict.fromkeys(ops, 0)
    for label, call in callers.items():
        errors[label] += call()
    for i in range(calls):
        for label, call in callers.items():
            if i >= counts.get(label, calls):
                continue
            start = time.perf_counter()
            errors[label] += call()
            times[label].append((time.perf_counter() - start) * 1e6)
    return {"times": times, "errors": errors}


def _client_process(op: dict[str, object], seconds: float, go: int, out: int) -> None:
    call = make_caller(op, {})
    call()  # connected and warm before the start
    os.write(out, b"r")
    os.read(go, 1)
    done = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        errors += call()
        done += 1
    os.write(out, json.dumps([done, errors]).encode() + b"\n")


def clients(spec: dict[str, object]) -> dict[str, object]:
    """{"op": op, "clients": C, "seconds": s} -> {"rate": calls/s in total, "errors": n}.

    C processes each connect and warm up, then start together and call as fast as replies come
    for s seconds.
    """
    count = int(spec["clients"])  # type: ignore[call-overload]
    seconds = float(spec["seconds"])  # type: ignore[arg-type]
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.close(out_r)
            try:
                _client_process(spec["op"], seconds, go_r, out_w)  # type: ignore[arg-type]
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(go_r)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as results:
        ready = 0
        while ready < count:
            ready += len(results.read(1))
        start = time.monotonic()
        os.write(go_w, b"g" * count)
        lines = [results.readline() for _ in range(count)]
        elapsed = time.monotonic() - start
    for pid in pids:
        os.waitpid(pid, 0)
    done = [json.loads(line) for line in lines if line.strip()]
    return {
        "rate": sum(d[0] for d in done) / max(elapsed, seconds),
        "errors": sum(d[1] for d in done),
        "reported": len(done),
    }


def cold(spec: dict[str, object]) -> dict[str, object]:
    """{"runs": n} -> µs lists: "cold" (capsuled stopped, connect + Info until the reply) and
    "python" (`python3 -c pass` as a child process), interleaved; as root."""
    runs = int(spec["runs"])  # type: ignore[call-overload]
    out: dict[str, list[float]] = {"cold": [], "python": []}
    errors = 0
    for i in range(runs + 1):
        subprocess.run(["systemctl", "stop", "capsuled.service"], check=True)
        start = time.perf_counter()
        conn = Varlink()
        errors += conn.caller("Info", {})()
        cold_us = (time.perf_counter() - start) * 1e6
        conn.sock.close()
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        python_us = (time.perf_counter() - start) * 1e6
        if i:  # the first round writes caches (.pyc, the page cache)
            out["cold"].append(cold_us)
            out["python"].append(python_us)
    return {"times": out, "errors": errors}


def calls(spec: dict[str, object]) -> dict[str, object]:
    """{"ops": [op...], "calls": n, "window": w}: n calls cycling through the Varlink ops,
    w written at once then their w replies read."""
    conn = Varlink()
    messages = [Varlink.message(m, p) for m, p in spec["ops"]]  # type: ignore[misc, attr-defined]
    total, window = int(spec["calls"]), int(spec["window"])  # type: ignore[call-overload]
    errors = sent = 0
    start = time.perf_counter()
    while sent < total:
        batch = [messages[(sent + i) % len(messages)] for i in range(min(window, total - sent))]
        conn.sock.sendall(b"".join(batch))
        for _ in batch:
            errors += "error" in conn.reply()
        sent += len(batch)
    return {"calls": sent, "errors": errors, "seconds": time.perf_counter() - start}


MODES = {"rounds": rounds, "clients": clients, "cold": cold, "calls": calls}

if __name__ == "__main__":
    print(json.dumps(MODES[sys.argv[1]](json.loads(sys.argv[2]))))
