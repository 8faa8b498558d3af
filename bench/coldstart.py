"""Cold activation: from connecting to capsuled's socket while the service is stopped to the
first reply (systemd starts capsuled.service, capsuled imports what it needs, answers Info),
next to starting `python3 -c pass` from the same process, in the same rounds.

A second row is the floor: the same measurement with bench/bare_server.py (a bare asyncio
responder, from the checkout bound at /src) as the unit's ExecStart=, through a runtime drop-in
removed afterwards. It is what the unit's sandbox, Python and asyncio cost before any of
capsuled's own code, so "capsuled / floor" is what capsuled itself adds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from _bed import inbed
from _table import Pair, Side, pair_table

if TYPE_CHECKING:
    from testbed import Testbed

DROP_IN_DIR = "/run/systemd/system/capsuled.service.d"
DROP_IN = f"{DROP_IN_DIR}/90-bench-floor.conf"
FLOOR = "[Service]\nExecStart=\nExecStart=/usr/bin/python3 /src/bench/bare_server.py\n"


def floor_times(bed: Testbed, n: int) -> dict[str, list[float]]:
    """inbed's cold measurement with the bare server in capsuled's place; ms lists."""
    bed.as_root("mkdir", "-p", DROP_IN_DIR).check()
    bed.as_root("sh", "-c", f"printf '{FLOOR}' > {DROP_IN}").check()
    try:
        bed.as_root("systemctl", "daemon-reload").check()
        out = inbed(bed, "root", "cold", {"runs": n})
    finally:
        bed.as_root("rm", "-f", DROP_IN).check()
        bed.as_root("systemctl", "daemon-reload").check()
        bed.as_root("systemctl", "stop", "capsuled.service").check()
    return {k: [t / 1000 for t in v] for k, v in out["times"].items()}


def run(bed: Testbed, n: int) -> None:
    out = inbed(bed, "root", "cold", {"runs": n})
    times = {k: [t / 1000 for t in v] for k, v in out["times"].items()}
    floor = floor_times(bed, n)
    pair_table(
        f"Cold activation in the testbed, n={n}, ms",
        [
            Pair(
                "socket activation to first reply",
                Side("connect + Info with capsuled.service stopped", times["cold"]),
                Side("python3 -c pass (fork, exec, exit)", times["python"]),
            ),
            Pair(
                "the floor: a bare asyncio server as the unit",
                Side("connect + a call, bench/bare_server.py as ExecStart=", floor["cold"]),
                Side("python3 -c pass (fork, exec, exit)", floor["python"]),
            ),
            Pair(
                "capsuled / the floor",
                Side("connect + Info with capsuled.service stopped", times["cold"]),
                Side("the bare asyncio server in the same unit", floor["cold"]),
            ),
        ],
        footnotes=[f"  ! {out['errors']} error replies"] if out["errors"] else [],
    )
