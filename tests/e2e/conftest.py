"""Fixtures for end-to-end tests against real systemd in the testbed.

`bed` is one container per flavour and test run, and every test that takes it runs once on each
flavour `--bed` names (default: trixie with systemd 257, then forky with the newest systemd
Debian has); pytest groups the tests by flavour, so one bed runs at a time. Isolation between
tests is a fresh capsule name per test (`capsule_name`) that is cleaned up afterwards whatever
the test did. `old_bed` is Debian bookworm with systemd 252 (older than capsules), booted only
when a test asks for it.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator, Iterator

import pytest

from testbed import Testbed, TestbedError, TestbedUnavailable, install_signal_handlers
from testbed.bed import Timings
from testbed.ci import unavailable
from testbed.rootfs import BED_FLAVOURS, root_spec

_timings: list[tuple[str, Timings]] = []


def _booted(suite: str, run_install: bool) -> Iterator[Testbed]:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the fixture's teardown runs in every case; an
    # atexit hook in testbed.bed and PR_SET_PDEATHSIG on nspawn cover the rest.
    install_signal_handlers()
    try:
        testbed = Testbed.boot(spec=root_spec(suite), run_install=run_install)
    except TestbedUnavailable as exc:
        unavailable(f"systemd testbed ({suite}) unavailable: {exc}")
    _timings.append((testbed.machine, testbed.timings))
    try:
        yield testbed
    finally:
        testbed.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that uses `bed` on each flavour --bed names."""
    if "bed" in metafunc.fixturenames:
        option = str(metafunc.config.getoption("--bed"))
        flavours = [f.strip() for f in option.split(",") if f.strip()]
        unknown = sorted(set(flavours) - set(BED_FLAVOURS))
        if unknown or not flavours:
            raise pytest.UsageError(f"--bed {option}: choose from {', '.join(BED_FLAVOURS)}")
        metafunc.parametrize("bed", flavours, indirect=True, scope="session")


@pytest.fixture(scope="session")
def bed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    """The booted testbed with capsuled installed and users alice, bob, carol, mallory."""
    yield from _booted(request.param, run_install=True)


@pytest.fixture(scope="session")
def old_bed() -> Iterator[Testbed]:
    """Bookworm, systemd 252: capsuled's wheel pip-installed, `capsuled install` NOT run.

    The same users as `bed` (the group `capsule` made by groupadd, since install refuses here).
    """
    yield from _booted("bookworm", run_install=False)


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
    if not report.failed:
        return report
    funcargs = getattr(item, "funcargs", {})
    for fixture in ("bed", "old_bed"):
        testbed = funcargs.get(fixture)
        if not isinstance(testbed, Testbed) or not testbed.leader:
            continue
        try:
            journal = testbed.as_root(
                "journalctl",
                "--no-pager",
                "--output=short-precise",
                f"--lines={JOURNAL_LINES_ON_FAILURE}",
                "--unit=capsuled.service",
                "--unit=capsuled.socket",
                # old_bed runs the daemon by hand in transient units named capsuled-*.
                "--unit=capsuled-*.service",
                timeout=15,
            ).stdout
        except TestbedError as exc:  # the container may be what broke
            journal = f"(could not read the journal: {exc})"
        report.sections.append((f"capsuled journal ({fixture}: {testbed.machine})", journal))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how long the testbed took to come up (cold and warm cache are reported apart)."""
    for machine, timings in _timings:
        terminalreporter.write_sep("-", "testbed")
        terminalreporter.write_line(f"{machine}: {timings.summary()}")
