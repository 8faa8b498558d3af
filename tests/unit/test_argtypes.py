"""Values on capsulectl's command line (capsulectl/argtypes.py): sizes and journalctl-style
times."""

from __future__ import annotations

import pytest

from capsulectl import argtypes


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512", 512),
        ("4K", 4096),
        ("2m", 2 * 1024**2),
        ("1.5G", 1610612736),
        ("1T", 1024**4),
        ("infinity", -1),
        ("default", -1),
        ("10KB", 10240),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert argtypes.parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "expected_s"),
    [
        ("@100", 100),
        ("-1h", 1_000_000 - 3600),
        ("5min ago", 1_000_000 - 300),
        ("2025-11-25 12:00:00+00:00", 1_764_072_000),
    ],
)
def test_parse_since(text: str, expected_s: int) -> None:
    assert argtypes.parse_since(text, 1_000_000 * 1_000_000) == expected_s * 1_000_000
