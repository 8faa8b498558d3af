"""`python3 -m testbed build|boot|demo|shell` (as root; PYTHONPATH=tests:helper:client).

    build   build (or check) the cached root filesystem, print how long it took
            (--suite bookworm: the systemd 252 tree of the "too old" tests; forky: the
            newest systemd; trixie-deb: the Debian package's build root)
    boot    boot a testbed with capsuled installed, reboot it once, print the times, tear down
    demo    the narrated walkthrough of demo.toml (what `make demo` runs)
    shell   an interactive login shell inside a fresh testbed (default user: alice)
    deb     build the Debian package into dist/ (what `make deb` runs): on Debian 13 here,
            elsewhere inside a trixie container with the build dependencies

Every testbed is thrown away when the command ends, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from testbed.bed import USERS, Testbed, install_signal_handlers
from testbed.demo import DEFAULT_STEPS, StepError, load_steps, run_demo
from testbed.errors import TestbedError
from testbed.rootfs import FLAVOURS, SUITE, ensure_root, root_spec

SHELL_BANNER = """\
You are {user} inside a throwaway Debian trixie container running systemd 257, with capsuled
installed as on a real host. Users: alice, bob, carol (group 'capsule'), mallory (not).
Try:
    capsulectl create mine --start
    capsulectl run mine --wait -- /bin/sh -c 'id; echo hello'
    capsulectl status mine
    capsulectl logs mine -n 20
    capsulectl remove mine
Become someone else with `exit` and `make shell AS=bob`. Leaving this shell deletes the
container and everything done in it.
"""


def _build(suite: str) -> int:
    root = ensure_root(root_spec(suite))
    try:
        state = f"built in {root.build_seconds:.1f} s" if root.built_now else "already cached"
        print(f"root filesystem {root.key}: {root.path} ({state})")
    finally:
        root.release()
    return 0


def _boot() -> int:
    with Testbed.boot() as bed:
        bed.reboot()
        print(f"{bed.machine}: {bed.timings.summary()}")
    return 0


def _demo(steps_file: Path) -> int:
    steps = load_steps(steps_file)  # fail on a bad file before booting anything
    with Testbed.boot() as bed:
        print(f"testbed {bed.machine} is up: {bed.timings.summary()}")
        return run_demo(bed, steps)


def _shell(user: str) -> int:
    with Testbed.boot() as bed:
        print(f"testbed {bed.machine} is up: {bed.timings.summary()}\n")
        print(SHELL_BANNER.format(user=user))
        sys.stdout.flush()
        bed.interactive("bash", "--login", user=user)
    return 0


def _deb(out: Path, in_testbed: bool | None) -> int:
    from testbed.deb import build_deb

    built = build_deb(out, in_testbed=in_testbed)
    print(built.lintian, end="")
    print(f"{built.deb} (built in {built.seconds:.1f} s, {built.where})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python3 -m testbed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build or check the cached root filesystem")
    build.add_argument("--suite", default=SUITE, choices=FLAVOURS)
    sub.add_parser("boot", help="boot, reboot once, print the times")
    demo = sub.add_parser("demo", help="the narrated walkthrough")
    demo.add_argument("--steps", type=Path, default=DEFAULT_STEPS, help="steps file (TOML)")
    shell = sub.add_parser("shell", help="an interactive shell inside the testbed")
    shell.add_argument("--user", default="alice", choices=[*USERS, "root"])
    deb = sub.add_parser("deb", help="build the Debian package")
    deb.add_argument("--out", type=Path, default=Path("dist"), help="where the .deb goes")
    deb.add_argument(
        "--in-testbed",
        action="store_true",
        default=None,
        help="build in the trixie container even on Debian 13",
    )
    args = parser.parse_args(argv)
    install_signal_handlers()
    try:
        if args.command == "build":
            return _build(args.suite)
        if args.command == "boot":
            return _boot()
        if args.command == "demo":
            return _demo(args.steps)
        if args.command == "deb":
            return _deb(args.out, args.in_testbed)
        return _shell(args.user)
    except (TestbedError, StepError) as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; the testbed has been torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
