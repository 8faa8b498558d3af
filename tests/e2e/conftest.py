"""Fixtures for end-to-end tests against real systemd 257 in the testbed.

One container per test run (session fixture `bed`), isolation between tests by a fresh capsule
name per test (`capsule_name`) that is cleaned up afterwards whatever the test did.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator, Iterator

import pytest

from testbed import Testbed, TestbedError, TestbedUnavailable, install_signal_handlers
from testbed.bed import Timings
from testbed.ci import unavailable

_timings: list[tuple[str, Timings]] = []


@pytest.fixture(scope="session")
def bed() -> Iterator[Testbed]:
    """The booted testbed with capsuled installed and users alice, bob, carol, mallory."""
    # SIGTERM/SIGHUP unwind like Ctrl-C, so this fixture's teardown runs in every case; an
    # atexit hook in testbed.bed and PR_SET_PDEATHSIG on nspawn cover the rest.
    install_signal_handlers()
    try:
        testbed = Testbed.boot()
    except TestbedUnavailable as exc:
        unavailable(f"systemd testbed unavailable: {exc}")
    _timings.append((testbed.machine, testbed.timings))
    try:
        yield testbed
    finally:
        testbed.close()


def remove_capsule(bed: Testbed, name: str) -> None:
    """Stop a capsule and delete everything systemd and capsuled keep about it (as root)."""
    unit = f"capsule@{name}.service"
    bed.as_root("systemctl", "stop", unit, timeout=120)
    # clean refuses while the capsule runs, hence after stop; both are no-ops for a name that
    # never existed. revert drops limits/autostart that SetUnitProperties left in /etc.
    bed.as_root("systemctl", "clean", "--what=all", unit)
    bed.as_root("systemctl", "revert", unit)
    bed.as_root("systemctl", "reset-failed", unit)
    bed.as_root("rm", "-f", f"/var/lib/capsuled/capsules/{name}.json")


@pytest.fixture
def capsule_name(bed: Testbed) -> Iterator[str]:
    """A fresh valid capsule name (t-XXXXXXXX, well under systemd's 29 characters)."""
    name = f"t-{secrets.token_hex(4)}"
    yield name
    if bed.leader:
        remove_capsule(bed, name)


JOURNAL_LINES_ON_FAILURE = 80


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed e2e test, attach capsuled's recent journal: tracebacks live only there."""
    report = yield
    bed_fixture = getattr(item, "funcargs", {}).get("bed")
    if report.failed and isinstance(bed_fixture, Testbed) and bed_fixture.leader:
        try:
            journal = bed_fixture.as_root(
                "journalctl",
                "--no-pager",
                "--output=short-precise",
                f"--lines={JOURNAL_LINES_ON_FAILURE}",
                "--unit=capsuled.service",
                "--unit=capsuled.socket",
                timeout=15,
            ).stdout
        except TestbedError as exc:  # the container may be what broke
            journal = f"(could not read the journal: {exc})"
        report.sections.append(("capsuled journal (testbed)", journal))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how long the testbed took to come up (cold and warm cache are reported apart)."""
    for machine, timings in _timings:
        terminalreporter.write_sep("-", "testbed")
        terminalreporter.write_line(f"{machine}: {timings.summary()}")
