"""The helper's memory in the testbed: VmRSS of capsuled.service's MainPID, next to systemd's own
small system daemons (systemd-logind, systemd-machined) as a reference for "a resident helper".
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from _bed import inbed, main_pid, vm_kib
from _table import Pair, Side, pair_table

if TYPE_CHECKING:
    from testbed import Testbed

SOCKET = "/run/capsuled/org.capsuled.Manager"
CONNECTIONS = 100
# Capsuled allows one account 1/16 of its 512 connections (transport.Limits): the hundred come
# from four users at once, 25 each. Only alice owns the capsule; the others Describe nothing.
USERS = ("alice", "bob", "carol", "mallory")
# Small resident system daemons of systemd's own, compared row by row.
REFERENCES = ("systemd-logind.service", "systemd-machined.service", "systemd-journald.service")
# Printed for context only: other daemons a capsuled host runs.
CONTEXT = ("dbus.service", "polkit.service")

# Opens `count` connections at once (as the calling user), makes three calls on each, then
# closes them all: the helper holds them all at the same time, which is what VmHWM shows.
CLIENT = r"""
import json, socket, sys
path, name, count = json.loads(sys.argv[1])
calls = [("Info", {}), ("List", {}), ("Describe", {"name": name}) if name else ("Info", {})]
conns = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    conns.append([s, b""])
errors = {}
for method, params in calls:
    msg = json.dumps({"method": "org.capsuled.Manager." + method, "parameters": params})
    for c in conns:
        c[0].sendall(msg.encode() + b"\0")
    for c in conns:
        while b"\0" not in c[1]:
            chunk = c[0].recv(1 << 16)
            if not chunk:
                raise SystemExit("connection closed by capsuled")
            c[1] += chunk
        raw, _, c[1] = c[1].partition(b"\0")
        error = json.loads(raw).get("error")
        if error:
            key = method + ": " + error
            errors[key] = errors.get(key, 0) + 1
for c in conns:
    c[0].close()
print(json.dumps({"errors": errors}))
"""


def mib(kib: int) -> float:
    return kib / 1024


def run(bed: Testbed, name: str) -> None:
    # A fresh activation: stop the service (the socket stays), then one call starts it.
    bed.as_root("systemctl", "stop", "capsuled.service").check()
    one = json.dumps([SOCKET, name, 1])
    bed.run("python3", "-c", CLIENT, one, user="alice").check()
    pid = main_pid(bed, "capsuled.service")
    idle = vm_kib(bed, pid)

    share = CONNECTIONS // len(USERS)

    def client(user: str) -> dict[str, int]:
        spec = json.dumps([SOCKET, name if user == "alice" else None, share])
        done = bed.run("python3", "-c", CLIENT, spec, user=user, timeout=300).check()
        found: dict[str, int] = json.loads(done.stdout)["errors"]
        return {f"{user} {kind}": n for kind, n in found.items()}

    with ThreadPoolExecutor(len(USERS)) as pool:
        by_kind = {k: n for found in pool.map(client, USERS) for k, n in found.items()}
    errors = sum(by_kind.values())
    same_pid = main_pid(bed, "capsuled.service") == pid
    after = vm_kib(bed, pid)

    # polkitd is bus-activated and the builtin policy never asks it: one call starts it, for the
    # context line. (systemd-machined is not in the testbed: it comes with systemd-container.)
    bed.as_root(
        "busctl",
        "get-property",
        "org.freedesktop.PolicyKit1",
        "/org/freedesktop/PolicyKit1/Authority",
        "org.freedesktop.PolicyKit1.Authority",
        "BackendName",
    )
    refs: dict[str, dict[str, int]] = {}
    for unit in (*REFERENCES, *CONTEXT):
        ref_pid = main_pid(bed, unit)
        if ref_pid:
            refs[unit] = vm_kib(bed, ref_pid)

    ours = [
        ("capsuled idle, just activated", idle["VmRSS"]),
        (f"capsuled after {CONNECTIONS} connections", after["VmRSS"]),
    ]
    pairs = [
        Pair(
            f"{label} / {unit.split('.')[0]}",
            Side(f"VmRSS of capsuled.service's MainPID {pid}", [mib(kib)]),
            Side(f"VmRSS of {unit}'s MainPID", [mib(ref["VmRSS"])]),
        )
        for label, kib in ours
        for unit, ref in refs.items()
        if unit in REFERENCES
    ]
    context = ", ".join(
        f"{unit.split('.')[0]} {mib(ref['VmRSS']):.1f} MiB"
        for unit, ref in refs.items()
        if unit in CONTEXT
    )
    missing = [unit for unit in REFERENCES if unit not in refs]
    pair_table(
        "Memory in the testbed, MiB (VmRSS from /proc/PID/status; one reading, no p90)",
        pairs,
        unit="MiB",
        footnotes=[
            f"capsuled peak (VmHWM) after {CONNECTIONS} connections from {len(USERS)} users at "
            f"once, 3 calls each (Info, List, Describe or Info): {mib(after['VmHWM']):.1f} MiB; "
            f"{errors} error replies"
            + (
                f" ({', '.join(f'{k} x{n}' for k, n in sorted(by_kind.items()))})"
                if by_kind
                else ""
            )
            + ("" if same_pid else "; NOTE: capsuled restarted in between (MainPID changed)"),
            f"for context, VmRSS: {context or 'none running'}",
            *([f"not running in the testbed: {', '.join(missing)}"] if missing else []),
            "RSS counts shared pages (libpython, libc) in full for every process.",
        ],
        show_commands=False,
    )


SOAK_CHUNKS = 10


def soak(bed: Testbed, name: str, calls: int) -> None:
    """VmRSS while `calls` calls (Describe and Info, pipelined 32 at a time) go through one
    connection after another: does the helper grow with the number of calls it served?"""
    ops = [["Describe", {"name": name}], ["Info", {}]]
    inbed(bed, "alice", "calls", {"ops": ops, "calls": 100, "window": 32})
    pid = main_pid(bed, "capsuled.service")
    readings: list[tuple[int, int]] = [(0, vm_kib(bed, pid)["VmRSS"])]
    errors = done = 0
    chunk = max(1, calls // SOAK_CHUNKS)
    while done < calls:
        out = inbed(bed, "alice", "calls", {"ops": ops, "calls": chunk, "window": 32})
        done += out["calls"]
        errors += out["errors"]
        readings.append((done, vm_kib(bed, pid)["VmRSS"]))
    same_pid = main_pid(bed, "capsuled.service") == pid
    first, last = readings[1][1], readings[-1][1]
    print(f"\n== Memory over {done} calls (Describe and Info, 32 in flight), VmRSS of capsuled")
    print(f"{'calls served':>14} {'VmRSS MiB':>10}")
    for n, kib in readings:
        print(f"{n:>14} {mib(kib):>10.1f}")
    print(
        f"growth from the first reading under load ({readings[1][0]} calls) to the last: "
        f"{mib(last - first):+.2f} MiB; {errors} error replies"
        + ("" if same_pid else "; NOTE: capsuled restarted in between (MainPID changed)")
    )
