"""Running timed commands inside the testbed, with the cost of entering it taken out.

Every command runs through nsenter (+ setpriv + env for a non-root user), which costs a few ms
that neither capsulectl nor systemctl would pay on a real host. That cost is measured the same way
with `true`, per user, in the same interleaved rounds, and its median is subtracted.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from _table import Pair, Side, measure

if TYPE_CHECKING:
    from testbed import Testbed


@dataclass
class Cmd:
    """A command run as user inside the bed; failures are counted, not raised (a benchmark
    reports), and the first one's stderr is kept for the footnote."""

    bed: Testbed
    user: str
    argv: tuple[str, ...]
    failures: int = 0
    first_error: str = ""

    def __call__(self) -> None:
        result = self.bed.run(*self.argv, user=self.user, timeout=120)
        if result.returncode != 0:
            self.failures += 1
            if not self.first_error:
                lines = (result.stderr or result.stdout).strip().splitlines()
                self.first_error = f"exit {result.returncode}: {lines[-1] if lines else ''}"

    @property
    def text(self) -> str:
        who = "" if self.user == "root" else f"{self.user}$ "
        shown = " ".join(a if a and " " not in a else repr(a) for a in self.argv)
        return f"{'root# ' if self.user == 'root' else who}{shown}"


@dataclass
class Comparison:
    """An operation: the capsuled command and the systemd command doing the same."""

    operation: str
    ours: Cmd
    theirs: Cmd | None
    note: str = ""


@dataclass
class Report:
    pairs: list[Pair]
    entry_ms: dict[str, float]
    failures: list[str] = field(default_factory=list)


def compare(
    bed: Testbed,
    comparisons: Sequence[Comparison],
    n: int,
    order: Sequence[tuple[int, str]] | None = None,
) -> Report:
    """Run every comparison n times, interleaved, and subtract the per-user entry cost.

    order: the run order within a round as (index, "ours" | "theirs"), for commands that change
    state; default each comparison's two commands back to back.
    """
    users = sorted(
        {c.ours.user for c in comparisons}
        | {c.theirs.user for c in comparisons if c.theirs is not None}
    )
    entry = {user: Cmd(bed, user, ("true",)) for user in users}
    specs: list[tuple[str, Callable[[], object], str | None]] = [
        (f"entry/{user}", cmd, None) for user, cmd in entry.items()
    ]
    if order is None:
        order = [(i, side) for i, c in enumerate(comparisons) for side in ("ours", "theirs")]
    for i, which in order:
        cmd = comparisons[i].ours if which == "ours" else comparisons[i].theirs
        if cmd is not None:
            specs.append((f"{i}/{which}", cmd, None))
    times = {label: t for label, t, _ in measure(specs, n)}
    entry_ms = {user: statistics.median(times[f"entry/{user}"]) for user in users}

    def side(cmd: Cmd, label: str) -> Side:
        return Side(cmd.text, [t - entry_ms[cmd.user] for t in times[label]])

    pairs: list[Pair] = []
    failures: list[str] = []
    for i, c in enumerate(comparisons):
        theirs = side(c.theirs, f"{i}/theirs") if c.theirs is not None else None
        pairs.append(Pair(c.operation, side(c.ours, f"{i}/ours"), theirs, c.note))
        for cmd in (c.ours, c.theirs):
            if cmd is not None and cmd.failures:
                failures.append(
                    f"  ! {cmd.text}: {cmd.failures} of {n + 1} runs failed ({cmd.first_error})"
                )
    return Report(pairs, entry_ms, failures)


INBED = "/src/bench/inbed.py"  # bench/inbed.py, as the bed sees the checkout (bound at /src)


def inbed(bed: Testbed, user: str, mode: str, spec: object, timeout: float = 600) -> Any:
    """Run one mode of bench/inbed.py inside the bed as user; its JSON result."""
    result = bed.run("python3", INBED, mode, json.dumps(spec), user=user, timeout=timeout)
    return json.loads(result.check().stdout)


def unit_path(unit: str) -> str:
    """PID 1's object path of a unit (sd_bus_path_encode)."""
    return "/org/freedesktop/systemd1/unit/" + "".join(
        c if c.isalnum() else f"_{ord(c):02x}" for c in unit
    )


def main_pid(bed: Testbed, unit: str) -> int:
    """The unit's MainPID inside the bed (0: not running)."""
    out = bed.as_root("systemctl", "show", "-p", "MainPID", "--value", unit).check().stdout
    return int(out.strip() or 0)


def vm_kib(bed: Testbed, pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of pid, in KiB, from /proc/PID/status inside the bed."""
    out = bed.as_root("cat", f"/proc/{pid}/status").check().stdout
    fields: dict[str, int] = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields
