"""How fast capsulectl answers, next to systemctl: wall time per command, as a table with ratios.

    python3 bench/cli_startup.py            # this host; `status` against an in-process fake
    python3 bench/cli_startup.py --testbed  # inside the systemd 257 testbed, real capsuled
    python3 bench/cli_startup.py -n 50 --imports
    python3 bench/cli_startup.py --testbed --before /tmp/main  # another checkout's client too

bench/run.py runs the testbed table below together with the other benchmarks.

On this host PID 1 is not systemd, so `systemctl status` cannot run and the capsulectl status
measured here is the client alone (the fake answers at once). In the testbed both talk to real
daemons; the cost of entering the container (nsenter + setpriv + env, measured with `true`) is
subtracted from every row. With --before CHECKOUT, that checkout's client (and the protocol
core it runs) is installed beside this one in the same bed, and its rows are measured in the
same interleaved rounds: a before/after that no difference between two boots can blur.
Benchmarks report; they never assert (design brief).
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
ENTRY = "from capsulectl.cli import exit_with, main; exit_with(main())"


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


BEFORE_INSIDE = "/opt/capsulectl-before"


def install_before(bed: Testbed, checkout: Path) -> str:
    """Put checkout's client and protocol core into the bed under BEFORE_INSIDE, byte-compiled
    as an installed wheel is; return a label naming its commit."""
    dest = bed.root_dir / BEFORE_INSIDE.lstrip("/")
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(checkout / "client" / "capsulectl", dest / "capsulectl", ignore=skip)
    shutil.copytree(checkout / "helper" / "capsuled", dest / "capsuled", ignore=skip)
    shutil.copy(checkout / "client" / "scripts" / "capsulectl", dest / "launcher")
    bed.as_root("python3", "-m", "compileall", "-q", BEFORE_INSIDE).check()
    bed.as_root("chmod", "-R", "a+rX", BEFORE_INSIDE).check()
    rev = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return rev or checkout.name


def testbed_table(bed: Testbed, n: int) -> None:
    """Client start-up inside a booted testbed (bench/run.py calls this with its own bed)."""
    startup_table(bed, n, None)


def startup_table(bed: Testbed, n: int, before: Path | None) -> None:
    """testbed_table(), and with before that checkout's client beside this one."""
    bed.as_user("alice", "capsulectl", "create", "bench", "--start").check()

    def inside(*argv: str) -> Callable[[], object]:
        return lambda: bed.run(*argv, user="alice")

    def inside_before(*argv: str) -> Callable[[], object]:
        launcher = ("python3", f"{BEFORE_INSIDE}/launcher", *argv)
        return lambda: bed.run(*launcher, user="alice", env={"PYTHONPATH": BEFORE_INSIDE})

    describe = [
        "varlinkctl",
        "call",
        "/run/capsuled/org.capsuled.Manager",
        "org.capsuled.Manager.Describe",
        '{"name":"bench"}',
    ]
    status_ref = "systemctl status capsule@bench.service"
    list_ref = "systemctl list-units capsule@*"
    extra: list[Spec] = []
    if before is not None:
        label = install_before(bed, before)
        extra = [
            (f"capsulectl --version ({label})", inside_before("--version"), "python3 -c pass"),
            (f"capsulectl status bench ({label})", inside_before("status", "bench"), status_ref),
            (f"capsulectl list ({label})", inside_before("list"), list_ref),
        ]
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
            (list_ref, inside("systemctl", "list-units", "capsule@*"), None),
            ("capsulectl list", inside("capsulectl", "list"), list_ref),
            *extra,
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


def run_testbed(n: int, before: Path | None = None) -> None:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "helper"), str(ROOT / "client")]
    from testbed import Testbed

    bed = Testbed.boot()
    try:
        startup_table(bed, n, before)
    finally:
        bed.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", type=int, default=20, help="runs per command (default 20)")
    p.add_argument("--testbed", action="store_true", help="measure inside the systemd testbed")
    p.add_argument("--imports", action="store_true", help="also print an import-time summary")
    p.add_argument(
        "--before",
        type=Path,
        metavar="CHECKOUT",
        help="with --testbed: also measure CHECKOUT's client in the same bed (a before/after)",
    )
    args = p.parse_args(argv)
    if args.before is not None and not args.testbed:
        p.error("--before needs --testbed")
    if args.testbed:
        run_testbed(args.n, args.before)
    else:
        run_host(args.n)
    if args.imports:
        import_summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
