"""A policy-matrix client: one user's process, started by policy_driver.py (as that user).

    python3 -m e2e.inbed.policy_child direct PATH   # connect to PATH, then hold it open
    python3 -m e2e.inbed.policy_child varlink       # relay calls: a line of JSON in, its reply out

Prints "ready" once connected. `direct` keeps the connection until stdin closes (the driver
reads the peer's credentials from its end). `varlink` sends each stdin line to capsuled as one
message and prints the reply's JSON text on one line ({"closed": true} if capsuled closed).
"""

from __future__ import annotations

import json
import socket
import sys

from e2e.inbed.wire import Closed, Connection

TIMEOUT_S = 120.0


def hold(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        print("ready", flush=True)
        sys.stdin.read()


def relay() -> None:
    with Connection(timeout_s=TIMEOUT_S) as conn:
        print("ready", flush=True)
        for line in sys.stdin:
            conn.send_text(line.strip())
            try:
                print(conn.read_text(), flush=True)
            except Closed:
                print(json.dumps({"closed": True}), flush=True)
                return


def main(argv: list[str]) -> int:
    mode, *args = argv[1:]
    if mode == "direct":
        hold(*args)
    elif mode == "varlink":
        relay()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
