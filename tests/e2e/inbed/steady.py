"""A well-behaved client for the load proof (tests/e2e/test_load.py), as whichever user runs it.

    python3 -m e2e.inbed.steady '{"seconds": S, "capsule": NAME, "pause_s": P}'

For S seconds, over and over: a fresh connection (as every capsulectl command makes), one call
(Info, Describe of its own capsule NAME, List, in turn), its reply, close; then P seconds of
pause, as a person or a script between commands. Prints one JSON object: the number of calls,
every failure (an error reply, a closed or refused connection, a timeout) with what it was, the
latencies in milliseconds, sorted, and the worst one of each method.
"""

from __future__ import annotations

import json
import sys
import time

from e2e.inbed.wire import Closed, Connection

CALL_TIMEOUT_S = 30.0


def one_call(method: str, params: dict[str, object]) -> str | None:
    """Make the call on a fresh connection; None if it succeeded, else what went wrong."""
    try:
        with Connection(timeout_s=CALL_TIMEOUT_S) as conn:
            reply = conn.call(method, params)
    except Closed:
        return f"{method}: connection closed by the helper"
    except OSError as exc:
        return f"{method}: {exc!r}"
    if "error" in reply:
        return f"{method}: {reply['error']}"
    return None


def main(config: dict[str, object]) -> dict[str, object]:
    seconds = float(str(config["seconds"]))
    pause_s = float(str(config.get("pause_s", 0.02)))
    calls = [
        ("Info", {}),
        ("Describe", {"name": config["capsule"]}),
        ("List", {}),
    ]
    latencies_ms: list[float] = []
    by_method: dict[str, list[float]] = {method: [] for method, _ in calls}
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        method, params = calls[i % len(calls)]
        i += 1
        started = time.monotonic()
        failure = one_call(method, params)
        latencies_ms.append((time.monotonic() - started) * 1000)
        by_method[method].append(latencies_ms[-1])
        if failure is not None:
            failures.append(failure)
        time.sleep(pause_s)
    worst = {m: round(max(v), 1) for m, v in by_method.items() if v}
    return {
        "calls": len(latencies_ms),
        "failures": failures,
        "latencies_ms": sorted(latencies_ms),
        "worst_ms_by_method": worst,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
