"""Every benchmark, one table each: capsuled next to the systemd command doing the same thing.

    python3 bench/run.py            # the full table (bench/RESULTS.md): n=20, 2000 calls per figure
    python3 bench/run.py --quick    # n=5, fewer calls: a first look in a few minutes
    python3 bench/run.py --ci       # the smallest run of every benchmark (`make test` runs it)
    python3 bench/run.py --only lifecycle,memory

Boots the systemd 257 testbed (tests/testbed, needs root) and measures there, against the real
socket-activated capsuled installed from the wheel:

  lifecycle  capsulectl start/stop/restart/status/list/logs/run as the owner (alice) vs
             systemctl / journalctl / systemd-run --capsule as root   (bench/lifecycle.py)
  varlink    raw Varlink round trips and calls/s on one connection vs PID 1's D-Bus API, and
             varlinkctl vs busctl for one round trip                 (bench/varlink_rate.py)
  memory     capsuled's VmRSS idle and after 100 connections vs systemd-logind/-machined
                                                                     (bench/memory.py)
  startup    client start-up inside the bed (bench/cli_startup.py --testbed's table)
  scale      Describe and List at 10, 100 and 1,000 capsules vs PID 1's Get and
             ListUnitsByPatterns, capsuled's RSS at each size          (bench/scale.py)
  clients    Describe calls/s from 1, 16 and 64 clients, builtin and polkit policy, vs
             PID 1's Get to as many clients                           (bench/clients.py)
  cold       socket activation to the first reply vs `python3 -c pass` (bench/coldstart.py)
  soak       capsuled's RSS over 100,000 calls                        (bench/memory.py)

The clients inside the bed are bench/inbed.py (plain Python, jeepney for D-Bus).

Times are wall milliseconds of whole commands, interleaved round by round after one warm-up,
with the cost of entering the container (the same command path running `true`) subtracted.
Ratios are capsuled / systemd: above 1 capsuled is slower (or, for memory, bigger); for calls/s
above 1 it is faster. Benchmarks report; nothing here asserts on a timing (design brief).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("lifecycle", "varlink", "memory", "startup", "scale", "clients", "cold", "soak")


@dataclass(frozen=True)
class Plan:
    """How much of each benchmark to run."""

    n: int  # runs per whole command
    calls: int  # Varlink/D-Bus calls per latency figure
    seconds: float  # per throughput figure
    soak_calls: int
    sizes: tuple[int, ...] = (10, 100, 1000)


PLANS = {
    "full": Plan(n=20, calls=2000, seconds=5.0, soak_calls=100_000),
    "quick": Plan(n=5, calls=500, seconds=2.0, soak_calls=20_000),
    # `make test`: every benchmark runs, so none can rot; the figures are only a glance.
    "ci": Plan(n=2, calls=50, seconds=0.5, soak_calls=2_000, sizes=(10, 1000)),
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="n=5 and 500 calls (default n=20, 2000)")
    p.add_argument("--ci", action="store_true", help="the smallest run of everything (make test)")
    p.add_argument("-n", type=int, help="runs per command (overrides --quick)")
    p.add_argument("--calls", type=int, help="Varlink/D-Bus calls per throughput figure")
    p.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {','.join(BENCHMARKS)}",
    )
    args = p.parse_args(argv)
    plan = PLANS["ci" if args.ci else "quick" if args.quick else "full"]
    n = args.n or plan.n
    calls = args.calls or plan.calls
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")

    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "helper"), str(ROOT / "client")]
    import cli_startup
    import clients
    import coldstart
    import lifecycle
    import memory
    import scale
    import varlink_rate

    from testbed import Testbed, install_signal_handlers

    install_signal_handlers()  # Ctrl-C still tears the container down
    started = time.monotonic()
    bed = Testbed.boot()
    try:
        info = bed.as_root("systemctl", "--version").stdout.splitlines()[0]
        print(
            f"capsuled benchmarks: testbed {bed.machine} ({info}); host {platform.node()} "
            f"kernel {platform.release()}, {_cpus()} CPUs; n={n}, calls={calls}"
        )
        # lifecycle creates the capsules the others use (lifecycle.NAME, running).
        if "lifecycle" in only:
            lifecycle.run(bed, n)
        else:
            lifecycle.setup(bed)
        if "varlink" in only:
            varlink_rate.run(bed, lifecycle.NAME, n, calls)
        if "memory" in only:
            memory.run(bed, lifecycle.NAME)
        if "startup" in only:
            print(f"\n== Client start-up in the testbed, n={n}, wall ms per command")
            cli_startup.testbed_table(bed, n)
        if "cold" in only:
            coldstart.run(bed, n)
        if "clients" in only:
            clients.run(bed, plan.seconds)
        if "scale" in only:  # last but one: it leaves the bed with 1,000 capsules
            scale.run(bed, calls, plan.sizes)
        if "soak" in only:
            memory.soak(bed, lifecycle.NAME, plan.soak_calls)
    finally:
        bed.close()
    print(f"\n(all benchmarks: {time.monotonic() - started:.0f} s including the boot)")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
