"""One Varlink call, made as whichever user runs this (e2e/vcall.py runs it in the bed).

    python3 -m e2e.inbed.vcall '[METHOD, PARAMS, MORE, LIMIT, TIMEOUT_S, SOCKET]'
    python3 -m e2e.inbed.vcall - < CALL.json    (the same on standard input: large calls)

Prints each reply as one JSON line, up to the final one (or LIMIT replies, if not 0); prints
{"closed": true} and exits 0 if the helper closes the connection instead.
"""

from __future__ import annotations

import json
import sys

from e2e.inbed.wire import Closed, Connection


def main(argv: list[str]) -> int:
    arg = sys.stdin.read() if argv[1] == "-" else argv[1]
    method, params, more, limit, timeout_s, path = json.loads(arg)
    with Connection(path, timeout_s) as conn:
        conn.send(method, params, more=more)
        n = 0
        while True:
            try:
                reply = conn.read()
            except Closed:
                print(json.dumps({"closed": True}), flush=True)
                return 0
            print(json.dumps(reply), flush=True)
            n += 1
            if not reply.get("continues") or (limit and n >= limit):
                return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
