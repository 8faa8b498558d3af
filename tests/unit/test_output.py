"""capsulectl's output formats (capsulectl/output.py): sizes, time spans and glyphs as systemctl
prints them."""

from __future__ import annotations

import pytest

from capsulectl import output

# --- output formats -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1.0K"),
        (4_404_019, "4.1M"),
        (4_404_224, "4.2M"),
        (512 * 1024**2, "512.0M"),
        (3 * 1024**3 + 1, "3.0G"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert output.format_bytes(n) == text


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0"),
        (123_456_789, "123ms"),
        (1_500_000_000, "1.5s"),
        (62_345_000_000, "1min 2.345s"),
        (3_600_000_000_000, "1h"),
    ],
)
def test_format_timespan(ns: int, text: str) -> None:
    assert output.format_timespan_ns(ns) == text


@pytest.mark.parametrize(
    ("ago_s", "text"),
    [
        (0, "now"),
        (3, "3s ago"),
        (90, "1min 30s ago"),
        (300, "5min ago"),
        (3700, "1h 1min ago"),
        (7 * 3600, "7h ago"),
        (26 * 3600, "1 day 2h ago"),
        (3 * 86400, "3 days ago"),
    ],
)
def test_format_relative(ago_s: int, text: str) -> None:
    now = 10**16
    assert output.format_relative(now - ago_s * 1_000_000, now) == text


def test_ascii_terminal_gets_ascii_glyphs() -> None:
    style = output.Style(colour=False, encoding="ascii")
    assert (style.dot, style.cross) == ("*", "x")
