"""A polkit rule some e2e tests install for a while: group `capsule` may read capsules named
shared-* (and is told a flat "no" for managing them), so a test can have a user who may see a
capsule but not act on it, or see one capsule and not another."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from testbed import Testbed

SHARED_PREFIX = "shared-"
RULES_FILE = "/etc/polkit-1/rules.d/40-capsuled-e2e.rules"
SHARED_RULES = """
polkit.addRule(function(action, subject) {
    var capsule = action.lookup("capsule") || "";
    if (capsule.indexOf("shared-") != 0 || !subject.isInGroup("capsule")) return;
    if (action.id == "org.capsuled.read") return polkit.Result.YES;
    if (action.id == "org.capsuled.manage") return polkit.Result.NO;
});
"""


@contextlib.contextmanager
def shared_read_rule(bed: Testbed, loaded: Callable[[], bool]) -> Iterator[None]:
    """Install the rule; return once `loaded()` says polkitd applies it (it re-reads its rules
    when the directory changes); remove it afterwards."""
    bed.as_root("sh", "-c", f"cat > {RULES_FILE}", input=SHARED_RULES).check()
    try:
        deadline = time.monotonic() + 30
        while not loaded():
            if time.monotonic() > deadline:
                raise AssertionError("polkitd never loaded the e2e rule")
            time.sleep(0.2)
        yield
    finally:
        bed.as_root("rm", "-f", RULES_FILE)
