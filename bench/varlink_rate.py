"""Raw Varlink speed of capsuled in the testbed, next to systemd's own D-Bus API.

Measured inside the testbed against the real, socket-activated capsuled (real SystemdBackend,
builtin policy), as alice. The client is a few lines of Python on a raw socket (JSON + NUL), so
the figures are the helper's and the kernel's, not capsulectl's. The systemd side is PID 1's
D-Bus API through the system bus, from Python (jeepney) on one connection the same way, and
`busctl` as a whole command next to `varlinkctl`.

Beside them, BARE_SERVER: the least a Python Varlink service can be (asyncio streams, json, one
canned reply the size of capsuled's Info), run in the bed as alice and called by the same client
on the same kind of socket, so that "Info at most 2x a bare asyncio server" is measured.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from _bed import Cmd, Comparison, compare
from _table import Pair, Side, pair_table
from scale import RACY_S

if TYPE_CHECKING:
    from testbed import Testbed

SOCKET = "/run/capsuled/org.capsuled.Manager"
BARE_SOCKET = "/tmp/capsuled-bench-bare.sock"  # the bed's /tmp; alice's own socket

# A bare asyncio Varlink server: what any Python service pays per call (event loop, stream
# reader, json both ways), and nothing else. Answers Info with a reply shaped like capsuled's.
BARE_SERVER = r"""
import asyncio, json, os, sys

path = sys.argv[1]
INFO = {"version": "0.0", "systemdVersion": 257, "policyBackend": "builtin", "callerUid": 0}
REPLY = json.dumps({"parameters": INFO}).encode() + b"\0"

async def serve(reader, writer):
    try:
        while True:
            call = json.loads((await reader.readuntil(b"\0"))[:-1])
            if call.get("method") == "org.capsuled.Manager.Info":
                writer.write(REPLY)
            else:
                error = {"error": "org.varlink.service.MethodNotFound",
                         "parameters": {"method": call.get("method")}}
                writer.write(json.dumps(error).encode() + b"\0")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.start_unix_server(serve, path)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""
BATCHES = 5  # throughput is measured in this many batches, for a median and a p90
# Calls in flight when pipelining: all under the system bus's ~128 pending replies; 32 is also
# under capsuled's 48 concurrent calls per uid, 100 is over it (the rest wait for a slot).
WINDOWS = (32, 100)

# Runs inside the bed as the calling user; prints one JSON object of results.
CLIENT = r"""
import json, socket, subprocess, sys, time
from jeepney import DBusAddress, new_method_call, MessageType
from jeepney.io.blocking import open_dbus_connection

path, name, k, batches, windows, bare_path, bare_src = json.loads(sys.argv[1])

class Varlink:
    def __init__(self, path=path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""
    def send(self, method, params):
        self.s.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
    def send_many(self, method, params, count):
        one = json.dumps({"method": method, "parameters": params}).encode() + b"\0"
        self.s.sendall(one * count)
    def reply(self):
        while True:
            i = self.buf.find(b"\0")
            if i >= 0:
                raw, self.buf = self.buf[:i], self.buf[i + 1:]
                return json.loads(raw)
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise SystemExit("capsuled closed the connection")
            self.buf += chunk

class Bus:
    def __init__(self):
        self.c = open_dbus_connection(bus="SYSTEM")
    def send_many(self, msg, count):
        for _ in range(count):
            self.c.send(msg)
    def reply(self):
        while True:
            m = self.c.receive()
            if m.header.message_type in (MessageType.method_return, MessageType.error):
                return m.header.message_type == MessageType.error

def seq(call, count):
    out, errors = [], 0
    for _ in range(count):
        t = time.perf_counter()
        errors += call()
        out.append((time.perf_counter() - t) * 1e6)
    return out, errors

def pipelined(send_many, reply, count, window):
    rates, errors = [], 0
    per = max(1, count // batches)
    for _ in range(batches):
        t = time.perf_counter()
        left = per
        while left:
            w = min(window, left)
            send_many(w)
            for _ in range(w):
                errors += reply()
            left -= w
        rates.append(per / (time.perf_counter() - t))
    return rates, errors

v = Varlink()
bare_proc = subprocess.Popen([sys.executable, "-c", bare_src, bare_path], stdout=subprocess.PIPE)
assert bare_proc.stdout.readline() == b"ready\n"
bare = Varlink(bare_path)
def vcall(method, params, v=v):
    def call():
        v.send(method, params)
        return "error" in v.reply()
    return call
def vreply(v=v):
    return "error" in v.reply()

bus = Bus()
unit = "capsule@" + name + ".service"
esc = "".join(c if c.isalnum() else "_%02x" % ord(c) for c in unit)
props = "org.freedesktop.DBus.Properties"
manager = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1",
                      interface=props)
unit_addr = DBusAddress("/org/freedesktop/systemd1/unit/" + esc,
                        bus_name="org.freedesktop.systemd1", interface=props)
version = new_method_call(manager, "Get", "ss", ("org.freedesktop.systemd1.Manager", "Version"))
state = new_method_call(unit_addr, "Get", "ss", ("org.freedesktop.systemd1.Unit", "ActiveState"))
get_all = new_method_call(unit_addr, "GetAll", "s", ("",))
def bcall(msg):
    def call():
        return bus.c.send_and_get_reply(msg).header.message_type == MessageType.error
    return call

res = {}
for key, call in [
    ("info", vcall("org.capsuled.Manager.Info", {})),
    ("bare_info", vcall("org.capsuled.Manager.Info", {}, bare)),
    ("describe", vcall("org.capsuled.Manager.Describe", {"name": name})),
    ("version", bcall(version)),
    ("state", bcall(state)),
    ("get_all", bcall(get_all)),
]:
    seq(call, min(k, 50))  # warm-up
    res[key] = seq(call, k)
info = {"method": "org.capsuled.Manager.Info", "parameters": {}}
for window in windows:
    res["info_pipe%d" % window] = pipelined(
        lambda w: v.send_many("org.capsuled.Manager.Info", {}, w), vreply, k, window)
    res["version_pipe%d" % window] = pipelined(
        lambda w: bus.send_many(version, w), bus.reply, k, window)
    res["bare_pipe%d" % window] = pipelined(
        lambda w: bare.send_many("org.capsuled.Manager.Info", {}, w),
        lambda: vreply(bare), k, window)
bare_proc.kill()
print(json.dumps(res))
"""


def batch_rates(latencies_us: list[float]) -> list[float]:
    """Calls/s of each of BATCHES consecutive slices of sequential call latencies."""
    size = max(1, len(latencies_us) // BATCHES)
    chunks = [latencies_us[i : i + size] for i in range(0, size * BATCHES, size)]
    return [len(c) * 1e6 / sum(c) for c in chunks if c]


def run(bed: Testbed, name: str, n: int, calls: int) -> None:
    # lifecycle made the capsule a moment ago: wait out the racy-timestamp window (scale.RACY_S)
    # so that Describe is timed as on a host, not in the seconds after a Create.
    time.sleep(RACY_S)
    arg = json.dumps([SOCKET, name, calls, BATCHES, WINDOWS, BARE_SOCKET, BARE_SERVER])
    result = bed.run("python3", "-c", CLIENT, arg, user="alice", timeout=600).check()
    res: dict[str, tuple[list[float], int]] = {
        k: (list(v[0]), int(v[1])) for k, v in json.loads(result.stdout).items()
    }
    errors = [f"  ! {k}: {e} error replies" for k, (_, e) in res.items() if e]
    unit = f"capsule@{name}.service"
    path = "/org/freedesktop/systemd1/unit/" + "".join(
        c if c.isalnum() else f"_{ord(c):02x}" for c in unit
    )

    def side(key: str, text: str) -> Side:
        return Side(text, res[key][0])

    latency = [
        Pair(
            "Info, sequential",
            side("info", "Varlink org.capsuled.Manager.Info"),
            side("version", "D-Bus Properties.Get Manager.Version on PID 1"),
        ),
        Pair(
            "Info vs a bare asyncio Varlink server",
            side("info", "Varlink org.capsuled.Manager.Info"),
            side("bare_info", "the same call to BARE_SERVER (asyncio, json, a canned reply)"),
            "b",
        ),
        Pair(
            "Describe, sequential",
            side("describe", f"Varlink org.capsuled.Manager.Describe {name}"),
            side("state", f"D-Bus Properties.Get {unit} ActiveState"),
            "c",
        ),
        Pair(
            "Describe vs what it asked PID 1 before the model",
            side("describe", f"Varlink org.capsuled.Manager.Describe {name}"),
            side("get_all", f'D-Bus Properties.GetAll("") of {unit} (before the model)'),
            "c",
        ),
    ]
    pair_table(
        f"Round trips on one connection, as alice, {calls} calls each, µs per call",
        latency,
        unit="µs",
        footnotes=[
            "both clients are plain Python in the bed (raw socket + json; jeepney for D-Bus);",
            "D-Bus calls pass through the bus daemon; Varlink calls go straight to the helper",
            "[c] Describe does more than one property read: the policy check (owner record, the",
            "    caller's groups from NSS), the capsule from capsuled's live model of PID 1 (no",
            "    round trip), its state dir, autostart link and cgroup files, the reply. Before",
            '    the model it asked PID 1 for GetAll("") (~450 properties), the last row.',
            f"    Timed {RACY_S} s after the capsule was made (scale.RACY_S: steady state).",
            "[b] the systemd column is a 30-line asyncio Varlink server in the bed (run as alice,",
            "    same client, same kind of socket): what any Python service pays per call",
            *errors,
        ],
    )
    rate = [
        Pair(
            "Info, sequential",
            Side("", batch_rates(res["info"][0])),
            Side("", batch_rates(res["version"][0])),
        ),
        *(
            Pair(
                f"Info, pipelined ({window} in flight)",
                side(f"info_pipe{window}", ""),
                side(f"version_pipe{window}", ""),
            )
            for window in WINDOWS
        ),
        Pair(
            "Info, sequential, vs the bare asyncio server",
            Side("", batch_rates(res["info"][0])),
            Side("", batch_rates(res["bare_info"][0])),
            "b",
        ),
        *(
            Pair(
                f"Info, pipelined ({window} in flight), vs the bare asyncio server",
                side(f"info_pipe{window}", ""),
                side(f"bare_pipe{window}", ""),
                "b",
            )
            for window in WINDOWS
        ),
    ]
    pair_table(
        f"Throughput on one connection, as alice, calls/s (higher is better; {BATCHES} batches)",
        rate,
        unit="calls/s",
        footnotes=[
            "sequential: one call, wait for its reply, next (the latencies above, in batches);",
            "pipelined: W calls written at once, then their W replies read, until all are done;",
            "the systemd column is Properties.Get Manager.Version on the system bus the same way",
            "[b] the systemd column is BARE_SERVER (see the latencies' footnote)",
        ],
        show_commands=False,
    )

    # The same one round trip as whole commands: systemd's own clients, both written in C.
    cmds = compare(
        bed,
        [
            Comparison(
                "one Describe / ActiveState",
                Cmd(
                    bed,
                    "alice",
                    (
                        "varlinkctl",
                        "call",
                        SOCKET,
                        "org.capsuled.Manager.Describe",
                        json.dumps({"name": name}),
                    ),
                ),
                Cmd(
                    bed,
                    "alice",
                    (
                        "busctl",
                        "get-property",
                        "org.freedesktop.systemd1",
                        path,
                        "org.freedesktop.systemd1.Unit",
                        "ActiveState",
                    ),
                ),
            )
        ],
        n,
    )
    entry = ", ".join(f"{u} {ms:.1f} ms" for u, ms in sorted(cmds.entry_ms.items()))
    pair_table(
        f"One round trip as a whole command (both clients are systemd's, in C), n={n}, ms",
        cmds.pairs,
        footnotes=[f"entering the container subtracted: {entry}", *cmds.failures],
    )
