"""Cold activation: from connecting to capsuled's socket while the service is stopped to the
first reply (systemd starts capsuled.service, capsuled imports what it needs, answers Info),
next to starting `python3 -c pass` from the same process, in the same rounds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from _bed import inbed
from _table import Pair, Side, pair_table

if TYPE_CHECKING:
    from testbed import Testbed


def run(bed: Testbed, n: int) -> None:
    out = inbed(bed, "root", "cold", {"runs": n})
    times = {k: [t / 1000 for t in v] for k, v in out["times"].items()}
    pair_table(
        f"Cold activation in the testbed, n={n}, ms",
        [
            Pair(
                "socket activation to first reply",
                Side("connect + Info with capsuled.service stopped", times["cold"]),
                Side("python3 -c pass (fork, exec, exit)", times["python"]),
            )
        ],
        footnotes=[f"  ! {out['errors']} error replies"] if out["errors"] else [],
    )
