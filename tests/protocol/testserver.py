"""Run the daemon (capsuled.daemon.run) with the org.example.test dispatcher, for subprocess tests.

    python3 tests/protocol/testserver.py [--listen PATH] [--idle-exit-sec N]

Needs PYTHONPATH=helper:tests (the protocol tests set it).
"""

from __future__ import annotations

import argparse
import sys

from capsuled.daemon import Options, Wiring, run, setup_logging
from protocol.harness import ERRORS, State, build_dispatcher


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--listen")
    p.add_argument("--idle-exit-sec", type=float)
    args = p.parse_args()
    setup_logging(debug=True)
    options = Options(listen=args.listen, idle_exit_s=args.idle_exit_sec, validate_replies=True)
    return run(options, Wiring(build_dispatcher(State()).handle, ERRORS))


if __name__ == "__main__":
    sys.exit(main())
