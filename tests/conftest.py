"""Settings shared by every test directory (kept small: each layer has its own conftest)."""

from __future__ import annotations

from testbed.ci import in_ci


def pytest_report_header() -> str:
    """Say up front whether a missing testbed will skip or fail the e2e tests."""
    if in_ci():
        return "CI=true: e2e tests FAIL if the systemd testbed cannot run"
    return "CI unset: e2e tests are skipped if the systemd testbed cannot run"
