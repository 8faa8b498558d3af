"""Measurement and table helpers shared by the benchmarks in bench/.

Benchmarks report; they never assert (design brief). Every timing here is wall time of whole
runs, interleaved round by round so a busy spell of the machine hits all commands alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Spec = tuple[str, Callable[[], object], str | None]  # label, one run, label to compare with


def measure(specs: Sequence[Spec], n: int) -> list[tuple[str, list[float], str | None]]:
    """Wall times in ms of n runs of each command, interleaved round by round.

    Interleaving spreads the load of a busy machine over all commands alike, instead of letting
    one command's runs all land in a busy spell. One warm-up each first (it also writes .pyc).
    Specs run in the given order every round, so commands that change state (stop, then start)
    keep a consistent state from round to round.
    """
    for _, run, _ in specs:
        run()
    times: dict[str, list[float]] = {label: [] for label, _, _ in specs}
    for _ in range(n):
        for label, run, _ in specs:
            start = time.perf_counter()
            run()
            times[label].append((time.perf_counter() - start) * 1000)
    return [(label, times[label], versus) for label, _, versus in specs]


def p90(values: Sequence[float]) -> float:
    """The 90th percentile by rank (no interpolation: with n=5 it is the largest run)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


def table(rows: Sequence[tuple[str, list[float], str | None]], offset_ms: float) -> None:
    """One row per command: median, min, p90 and the ratio of medians to the compared row."""
    medians = {label: statistics.median(t) - offset_ms for label, t, _ in rows}
    print(f"{'command':58} {'median':>8} {'min':>8} {'p90':>8}  ratio (of medians)")
    for label, times, versus in rows:
        t = sorted(x - offset_ms for x in times)
        ratio = ""
        if versus is not None and medians.get(versus, 0) > 0:
            ratio = f"{medians[label] / medians[versus]:5.1f}x {versus}"
        print(f"{label:58} {medians[label]:8.1f} {t[0]:8.1f} {p90(t):8.1f}  {ratio}")
    print("(milliseconds of wall time" + (f", minus {offset_ms:.1f} ms" if offset_ms else "") + ")")


@dataclass(frozen=True)
class Side:
    """One side of a comparison: what ran and its times in ms (the entry cost already removed)."""

    command: str
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p90(self) -> float:
        return p90(self.times)


@dataclass(frozen=True)
class Pair:
    """One operation done by capsuled and by the systemd command that does the same thing."""

    operation: str
    capsuled: Side
    systemd: Side | None
    note: str = ""  # footnote marker(s), e.g. "a"


def ratio(ours: float, theirs: float) -> str:
    """ours / theirs as text; "-" when the reference is too small to divide by meaningfully."""
    if theirs <= 0.05:  # below the resolution left after subtracting the entry cost
        return "-"
    return f"{ours / theirs:.2f}x"


def pair_table(
    title: str,
    pairs: Sequence[Pair],
    unit: str = "ms",
    footnotes: Sequence[str] = (),
    show_commands: bool = True,
) -> None:
    """The runner's table: operation, capsuled median (p90), systemd median (p90), ratio."""
    print(f"\n== {title}")
    labels = [p.operation + (f" [{p.note}]" if p.note else "") for p in pairs]
    width = max(30, *(len(label) for label in labels))
    ours_head, theirs_head = f"capsuled {unit} med (p90)", f"systemd {unit} med (p90)"
    cols = max(22, len(ours_head) + 1, len(theirs_head) + 1)
    head = f"{'operation':{width}} {ours_head:>{cols}} {theirs_head:>{cols}} {'ratio':>7}"
    print(head)
    print("-" * len(head))
    for p, op in zip(pairs, labels, strict=True):
        ours = f"{p.capsuled.median:8.1f} ({p.capsuled.p90:7.1f})"
        if p.systemd is None:
            theirs, r = f"{'-':>18}", "-"
        else:
            theirs = f"{p.systemd.median:8.1f} ({p.systemd.p90:7.1f})"
            r = ratio(p.capsuled.median, p.systemd.median)
        print(f"{op:{width}} {ours:>{cols}} {theirs:>{cols}} {r:>7}")
    if show_commands:
        print("commands compared:")
    for p in pairs if show_commands else ():
        against = f"\n      vs {p.systemd.command}" if p.systemd is not None else ""
        print(f"  {p.operation}: {p.capsuled.command}{against}")
    for line in footnotes:
        print(line)
