"""How fast capsulectl answers, next to systemctl: wall time per command, as a table with ratios.

    python3 bench/cli_startup.py            # this host; `status` against an in-process fake
    python3 bench/cli_startup.py --testbed  # inside the systemd 257 testbed, real capsuled
    python3 bench/cli_startup.py -n 50 --imports

bench/run.py runs the testbed table below together with the other benchmarks.

On this host PID 1 is not systemd, so `systemctl status` cannot run and the capsulectl status
measured here is the client alone (the fake answers at once). In the testbed both talk to real
daemons; the cost of entering the container (nsenter + setpriv + env, measured with `true`) is
subtracted from every row. Benchmarks report; they never assert (design brief).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from _table import Spec, measure, table

if TYPE_CHECKING:
    from testbed import Testbed

ROOT = Path(__file__).resolve().parents[1]
# What the installed launcher (client/scripts/capsulectl) runs.
ENTRY = "import sys; from capsulectl.cli import main; sys.exit(main())"


def host_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT / 'helper'}:{ROOT / 'client'}"
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed wheel has its .pyc files
    return env


def run_host(n: int) -> None:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "helper"), str(ROOT / "client")]
    # The unit tests' scripted server (tests/ is put on sys.path just above).
    from doubles.scripted_capsuled import FakeCapsuled, capsule, ok

    env = host_env()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        fake = FakeCapsuled(Path(tmp) / "s")
        fake.on("Describe", ok(capsule=capsule()))
        fake.on("List", ok(capsules=[capsule(f"c{i}") for i in range(20)]))
        address = fake.address

        def cmd(*argv: str) -> Callable[[], object]:
            return lambda: subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=False)

        ref = "systemctl --version" if shutil.which("systemctl") else None
        specs: list[Spec] = [
            ("python3 -S -c pass (interpreter floor)", cmd(py, "-S", "-c", "pass"), None),
            ("python3 -c pass (with site)", cmd(py, "-c", "pass"), None),
        ]
        if ref is not None:
            specs.append(("systemctl --version", cmd("systemctl", "--version"), None))
        specs += [
            ("capsulectl --version", cmd(py, "-c", ENTRY, "--version"), ref),
            ("capsulectl --help", cmd(py, "-c", ENTRY, "--help"), ref),
            (
                "capsulectl status web (fake capsuled)",
                cmd(py, "-c", ENTRY, "--address", address, "status", "web"),
                ref,
            ),
            (
                "capsulectl --json list (fake, 20 capsules)",
                cmd(py, "-c", ENTRY, "--address", address, "--json", "list"),
                ref,
            ),
        ]
        if Path("/run/systemd/system").exists():
            specs.append(
                ("systemctl status capsule@web.service", cmd("systemctl", "status", "x"), None)
            )
        rows = measure(specs, n)
        fake.close()
    table(rows, 0.0)


IMPORT_RUNS = 7


def _import_rows(stderr: str) -> dict[str, tuple[int, int]]:
    """{indented module name: (cumulative us, self us)} for imports after site finished."""
    rows: dict[str, tuple[int, int]] = {}
    after_site = False
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        parts = line.split("|")
        self_us, cumulative_us, name = int(parts[0].split(":")[1]), int(parts[1]), parts[2].rstrip()
        if after_site:
            rows[name] = (cumulative_us, self_us)
        if name.strip() == "site":
            after_site = True
    return rows


def import_summary() -> None:
    """The modules a `status` call loads, costliest first (python -X importtime).

    Each figure is the minimum over IMPORT_RUNS runs: on a busy machine single runs vary by
    several times, and the minimum is the closest to the cost itself.
    """
    with tempfile.TemporaryDirectory() as tmp:
        sys.path[:0] = [str(ROOT / "tests")]
        from doubles.scripted_capsuled import FakeCapsuled, capsule, ok

        fake = FakeCapsuled(Path(tmp) / "s")
        fake.on("Describe", ok(capsule=capsule()))
        code = (
            f"from capsulectl.cli import main; main(['--address', {fake.address!r}, "
            "'status', 'web'])"
        )
        best: dict[str, tuple[int, int]] = {}
        for i in range(IMPORT_RUNS + 1):  # the first run writes .pyc files
            done = subprocess.run(
                [sys.executable, "-X", "importtime", "-c", code],
                env=host_env(),
                capture_output=True,
                text=True,
                check=False,
            )
            if i == 0:
                continue
            for name, (cumulative, self_time) in _import_rows(done.stderr).items():
                old = best.get(name)
                best[name] = (
                    (cumulative, self_time)
                    if old is None
                    else (min(old[0], cumulative), min(old[1], self_time))
                )
        fake.close()
    print(
        "\nimports of `capsulectl status` after site (python -X importtime, min of "
        f"{IMPORT_RUNS}), top 15 cumulative:"
    )
    print(f"{'cumulative ms':>13} {'self ms':>8}  module")
    ranked = sorted(((c, s, n) for n, (c, s) in best.items()), reverse=True)
    for cumulative, self_time, name in ranked[:15]:
        print(f"{cumulative / 1000:13.1f} {self_time / 1000:8.1f} {name}")
    top = [c for c, _, n in ranked if not n[1:].startswith(" ")]  # depth shows as indentation
    print(f"total (top-level imports): {sum(top) / 1000:.1f} ms")


def testbed_table(bed: Testbed, n: int) -> None:
    """Client start-up inside a booted testbed (bench/run.py calls this with its own bed)."""
    bed.as_user("alice", "capsulectl", "create", "bench", "--start").check()

    def inside(*argv: str) -> Callable[[], object]:
        return lambda: bed.run(*argv, user="alice")

    describe = [
        "varlinkctl",
        "call",
        "/run/capsuled/org.capsuled.Manager",
        "org.capsuled.Manager.Describe",
        '{"name":"bench"}',
    ]
    status_ref = "systemctl status capsule@bench.service"
    rows = measure(
        [
            ("true (cost of entering the container)", inside("true"), None),
            ("python3 -S -c pass", inside("python3", "-S", "-c", "pass"), None),
            ("python3 -c pass", inside("python3", "-c", "pass"), None),
            ("systemctl --version", inside("systemctl", "--version"), None),
            # issue 12's target is against the interpreter's own start-up, not systemctl's.
            ("capsulectl --version", inside("capsulectl", "--version"), "python3 -c pass"),
            (status_ref, inside("systemctl", "status", "capsule@bench.service"), None),
            ("varlinkctl call ... Describe bench", inside(*describe), status_ref),
            ("capsulectl status bench", inside("capsulectl", "status", "bench"), status_ref),
            ("capsulectl list", inside("capsulectl", "list"), status_ref),
        ],
        n,
    )
    offset = statistics.median(rows[0][1])
    rows = rows[1:]
    print(
        f"inside {bed.machine} (systemd 257, real capsuled, all as alice); entering it costs "
        f"{offset:.1f} ms, subtracted"
    )
    table(rows, offset)


def run_testbed(n: int) -> None:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "helper"), str(ROOT / "client")]
    from testbed import Testbed

    bed = Testbed.boot()
    try:
        testbed_table(bed, n)
    finally:
        bed.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", type=int, default=20, help="runs per command (default 20)")
    p.add_argument("--testbed", action="store_true", help="measure inside the systemd testbed")
    p.add_argument("--imports", action="store_true", help="also print an import-time summary")
    args = p.parse_args(argv)
    if args.testbed:
        run_testbed(args.n)
    else:
        run_host(args.n)
    if args.imports:
        import_summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
