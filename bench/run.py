"""Every benchmark, one table each: capsuled next to the systemd command doing the same thing.

    python3 bench/run.py            # n=20 runs per command, 2000 Varlink calls per figure
    python3 bench/run.py --quick    # n=5, 500 calls: a first look in about a minute
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("lifecycle", "varlink", "memory", "startup")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="n=5 and 500 calls (default n=20, 2000)")
    p.add_argument("-n", type=int, help="runs per command (overrides --quick)")
    p.add_argument("--calls", type=int, help="Varlink/D-Bus calls per throughput figure")
    p.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {','.join(BENCHMARKS)}",
    )
    args = p.parse_args(argv)
    n = args.n or (5 if args.quick else 20)
    calls = args.calls or (500 if args.quick else 2000)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")

    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "helper"), str(ROOT / "client")]
    import cli_startup
    import lifecycle
    import memory
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
    finally:
        bed.close()
    print(f"\n(all benchmarks: {time.monotonic() - started:.0f} s including the boot)")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
