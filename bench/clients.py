"""Throughput with many clients: Describe calls/s from 1, 16 and 64 concurrent clients, each
a process with its own connection, next to PID 1 answering Properties.Get to as many clients.

Under the builtin policy alice reads her own capsule (the owner grant decides, no polkit); under
polkit bob reads it, allowed by a polkit rule the bench installs, so that every Describe is one
CheckAuthorization round trip to polkitd (the cost polkit adds, reported beside the builtin one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from _bed import inbed, unit_path
from _table import Pair, Side, pair_table
from lifecycle import NAME

if TYPE_CHECKING:
    from testbed import Testbed

CLIENTS = (1, 16, 64)
BUILTIN_DROP_IN = "/etc/capsuled/capsuled.toml.d/60-bench-builtin.toml"
POLKIT_RULE = "/etc/polkit-1/rules.d/50-capsuled-bench.rules"
# One account may hold 1/16 of capsuled's connections (32) and calls in flight (4) by default
# (transport.Limits, issue 11): 64 clients of one user need more, for the benchmark only.
LIMITS_DROP_IN = "/etc/systemd/system/capsuled.service.d/60-bench-clients.conf"
LIMITS_ARGS = (
    "--max-connections-per-uid 96 --max-inflight-calls 128 --max-inflight-calls-per-uid 96"
)
RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.capsuled.read" && subject.user == "bob") {
        return polkit.Result.YES;
    }
});
"""


def _policy(bed: Testbed, backend: str) -> None:
    if backend == "builtin":
        text = '[policy]\nbackend = "builtin"\n'
        bed.as_root("sh", "-c", f"umask 022; cat > {BUILTIN_DROP_IN}", input=text).check()
    else:
        bed.as_root("rm", "-f", BUILTIN_DROP_IN).check()
        bed.as_root("sh", "-c", f"umask 022; cat > {POLKIT_RULE}", input=RULE).check()
    bed.as_root("systemctl", "stop", "capsuled.service").check()  # read the policy anew
    info = inbed(bed, "alice", "rounds", {"ops": {"i": {"varlink": ["Info", {}]}}, "calls": 1})
    if info["errors"]["i"]:
        raise RuntimeError("capsuled did not answer Info after the policy change")


def run(bed: Testbed, seconds: float, counts: tuple[int, ...] = CLIENTS) -> None:
    unit = f"capsule@{NAME}.service"
    get = [unit_path(unit), "org.freedesktop.DBus.Properties", "Get", "ss"]
    get.append(["org.freedesktop.systemd1.Unit", "ActiveState"])
    describe = {"varlink": ["Describe", {"name": NAME}]}
    rates: dict[tuple[str, int], list[float]] = {}
    notes: list[str] = []

    def measure(label: str, user: str, op: dict[str, object], n: int) -> None:
        out = inbed(bed, user, "clients", {"op": op, "clients": n, "seconds": seconds})
        rates[(label, n)] = [out["rate"]]
        if out["errors"] or out["reported"] != n:
            notes.append(f"  ! {label}, {n} clients: {out['errors']} errors, {out['reported']} ran")

    exe = bed.as_root("sh", "-c", "command -v capsuled").check().stdout.strip()
    conf = f"[Service]\nExecStart=\nExecStart={exe} {LIMITS_ARGS}\n"
    bed.as_root("mkdir", "-p", LIMITS_DROP_IN.rsplit("/", 1)[0]).check()
    bed.as_root("sh", "-c", f"umask 022; cat > {LIMITS_DROP_IN}", input=conf).check()
    bed.as_root("systemctl", "daemon-reload").check()
    try:
        _policy(bed, "builtin")
        for n in counts:
            measure("builtin", "alice", describe, n)
            measure("dbus", "alice", {"dbus": get}, n)
        _policy(bed, "polkit")
        for n in counts:
            measure("polkit", "bob", describe, n)
    finally:
        bed.as_root("rm", "-f", BUILTIN_DROP_IN, POLKIT_RULE, LIMITS_DROP_IN)
        bed.as_root("systemctl", "daemon-reload")
        bed.as_root("systemctl", "stop", "capsuled.service")
    pairs = [
        Pair(
            f"Describe, {n} client{'s' if n > 1 else ''}, {policy}",
            Side("", rates[(policy, n)]),
            Side("", rates[("dbus", n)]),
        )
        for policy in ("builtin", "polkit")
        for n in counts
    ]
    pair_table(
        f"Throughput by clients, calls/s in total over {seconds:.0f} s (higher is better)",
        pairs,
        unit="calls/s",
        footnotes=[
            f"capsuled: Varlink Describe {NAME}; builtin: alice reads her own capsule (the",
            "owner grant decides); polkit: bob reads it, allowed by a polkit rule (one",
            f"CheckAuthorization per call). systemd: D-Bus Properties.Get {unit} ActiveState",
            "as alice, through the bus daemon. Every client is a process of its own on its own",
            "connection. capsuled runs with its per-account limits raised for this table",
            f"({LIMITS_ARGS}): by default one account gets 32 connections, 4 calls in flight.",
            *notes,
        ],
        show_commands=False,
    )
