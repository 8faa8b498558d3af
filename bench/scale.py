"""Reads as capsules grow: Describe and List at 10, 100 and 1,000 capsules, next to PID 1.

The capsules beyond lifecycle's ten running ones are made the fast way, in one Python process
inside the bed: a state directory under /var/lib/private/capsules (what systemd's StateDirectory=
leaves behind, and what capsuled's listing finds; systemd/hostfs.py) and an owner record for
alice in /var/lib/capsuled/capsules, then capsuled is stopped so the next call starts it with
the new records on disk. They never ran, so PID 1 has not loaded their units: that is what a
host with many stopped capsules looks like (PID 1 unloads an inactive unit nobody references).

Per size, one connection each, call by call interleaved: Describe of lifecycle's running capsule
next to one Properties.Get of its ActiveState, and List (alice owns every capsule) next to PID
1's ListUnitsByPatterns(capsule@*.service) (which lists only the loaded ones). The Watch event
source and Describe share capsuled's capsule model; List is the whole model plus the policy.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from _bed import inbed, main_pid, unit_path, vm_kib
from _table import Pair, Side, pair_table
from lifecycle import NAME, OTHERS

if TYPE_CHECKING:
    from testbed import Testbed

SIZES = (10, 100, 1000)
PREFIX = "s"  # the generated capsules: s0011 ... s1000
# A record or capsule directory changed less than 3 s before it is read is read again at every
# call (records.py RACY_NS, systemd/hostfs.py UnitFileCounts: timestamps move in ticks). The
# capsules made here are seconds old, a host's are not: the table waits that window out, so it
# shows the steady state (the first seconds after making 1,000 capsules cost more).
RACY_S = 3.5

POPULATE = r"""
import json, os, pwd, sys, time
first, last = int(sys.argv[1]), int(sys.argv[2])
alice = pwd.getpwnam("alice").pw_uid
os.makedirs("/var/lib/capsuled/capsules", mode=0o700, exist_ok=True)
os.makedirs("/var/lib/private/capsules", mode=0o700, exist_ok=True)
now = time.time_ns() // 1000
for i in range(first, last + 1):
    name = "%s%04d" % (sys.argv[3], i)
    os.makedirs("/var/lib/private/capsules/" + name, exist_ok=True)
    record = {"created": now, "format": 1, "name": name, "owner": alice,
              "owner_name": "alice", "phase": "ready"}
    with open("/var/lib/capsuled/capsules/%s.json" % name, "w") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
"""


def populate(bed: Testbed, total: int) -> None:
    """Make the bed hold `total` capsules (lifecycle's ten plus generated ones), then stop
    capsuled so that its next activation reads the records from disk."""
    base = 1 + len(OTHERS)
    if total > base:
        bed.as_root("python3", "-c", POPULATE, str(base + 1), str(total), PREFIX).check()
        time.sleep(RACY_S)
    bed.as_root("systemctl", "stop", "capsuled.service").check()


def run(bed: Testbed, calls: int, sizes: tuple[int, ...] = SIZES) -> None:
    unit = f"capsule@{NAME}.service"
    state = [unit_path(unit), "org.freedesktop.DBus.Properties", "Get", "ss"]
    state.append(["org.freedesktop.systemd1.Unit", "ActiveState"])
    by_pattern = ["/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager"]
    by_pattern += ["ListUnitsByPatterns", "asas", [[], ["capsule@*.service"]]]
    pairs: list[Pair] = []
    errors: list[str] = []
    rss: dict[int, int] = {}
    for size in sizes:
        populate(bed, size)
        # A List first: capsuled is activated and has every capsule in view before timing.
        inbed(bed, "alice", "rounds", {"ops": {"list": {"varlink": ["List", {}]}}, "calls": 0})
        list_calls = max(5, calls // 10) if size >= 1000 else max(5, calls // 2)
        result = inbed(
            bed,
            "alice",
            "rounds",
            {
                "ops": {
                    "describe": {"varlink": ["Describe", {"name": NAME}]},
                    "state": {"dbus": state},
                    "list": {"varlink": ["List", {}]},
                    "by_pattern": {"dbus": by_pattern},
                },
                "calls": calls,
                "counts": {"list": list_calls, "by_pattern": list_calls},
            },
            timeout=1800,
        )
        times, errs = result["times"], result["errors"]
        errors += [f"  ! {size} capsules, {k}: {n} error replies" for k, n in errs.items() if n]
        ms = {k: [t / 1000 for t in v] for k, v in times.items()}
        pairs.append(
            Pair(
                f"Describe, {size} capsules",
                Side(f"Varlink Describe {NAME}", ms["describe"]),
                Side(f"D-Bus Properties.Get {unit} ActiveState", ms["state"]),
            )
        )
        pairs.append(
            Pair(
                f"List, {size} capsules",
                Side("Varlink List (alice owns all)", ms["list"]),
                Side("D-Bus ListUnitsByPatterns capsule@*.service", ms["by_pattern"]),
                "a",
            )
        )
        pid = main_pid(bed, "capsuled.service")
        if pid:
            rss[size] = vm_kib(bed, pid)["VmRSS"]
    describe = [p for p in pairs if p.operation.startswith("Describe")]
    flat = max(p.capsuled.median for p in describe) / min(p.capsuled.median for p in describe)
    pair_table(
        f"Reads by number of capsules, as alice, {calls} Describe calls per size, ms per call",
        pairs,
        footnotes=[
            "[a] ListUnitsByPatterns lists only the units PID 1 has loaded (the running ones);",
            "    capsuled's List reports every capsule, loaded or not.",
            f"the generated capsules are {RACY_S} s old when timed (steady state, RACY_S).",
            f"Describe's largest median over its smallest across sizes: {flat:.2f}x",
            "capsuled VmRSS after those calls: "
            + ", ".join(f"{s} capsules {kib / 1024:.1f} MiB" for s, kib in rss.items()),
            *errors,
        ],
        show_commands=False,
    )
