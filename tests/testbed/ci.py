"""CI semantics (design brief, "Conventions").

Under CI=true a test that needs the testbed and cannot run is a failure, never a skip; outside
CI it is skipped with one clear reason.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True when running under CI (CI=true, as .ci/run is started)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Fail under CI, skip elsewhere: the one way a missing prerequisite is reported."""
    if in_ci():
        pytest.fail(f"prerequisite missing under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)
