"""Settings shared by every test directory (kept small: each layer has its own conftest)."""

from __future__ import annotations

import pytest

from testbed.ci import in_ci
from testbed.rootfs import BED_FLAVOURS


def pytest_addoption(parser: pytest.Parser) -> None:
    """--bed: which testbeds the e2e tests run on (here, not in tests/e2e: options must be known
    before pytest reads the conftest files below the root)."""
    parser.addoption(
        "--bed",
        default=",".join(BED_FLAVOURS),
        help="comma-separated testbeds the e2e tests run on, each in turn "
        f"(default: %(default)s; from {', '.join(BED_FLAVOURS)})",
    )


def pytest_report_header() -> str:
    """Say up front whether a missing testbed will skip or fail the e2e tests."""
    if in_ci():
        return "CI=true: e2e tests FAIL if the systemd testbed cannot run"
    return "CI unset: e2e tests are skipped if the systemd testbed cannot run"
