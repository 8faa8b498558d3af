"""`make deb`: the Debian package, built on Debian 13, in a container where the host is older.

tools/build-deb.sh builds dist/capsuled_VERSION_all.deb on a Debian 13 (or newer) system,
installing the build dependencies it lacks, and fails on lintian errors. On an older host (the
build machines run Debian 12) it runs inside a testbed booted from the trixie-deb root, trixie
with the build dependencies already in (the containers have no network), with the checkout
bind-mounted read-only at /src; the package is copied out of the container's tree.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.bed import CHECKOUT, SOURCE_INSIDE, Testbed
from testbed.errors import TestbedError
from testbed.rootfs import root_spec

BUILD_FLAVOUR = "trixie-deb"
OUT_INSIDE = "/var/tmp/capsuled-deb-out"
BUILD_TIMEOUT_S = 900.0
OS_RELEASE = Path("/etc/os-release")


@dataclass(frozen=True, slots=True)
class DebBuild:
    """A built package and how it came about."""

    deb: Path
    lintian: str  # lintian's report (empty when it found nothing)
    seconds: float  # the whole build, container boot included
    where: str  # "host", or the machine name of the build container


def host_builds_debs(os_release: Path = OS_RELEASE) -> bool:
    """True on Debian 13 or newer, where build-deb.sh runs on the host itself."""
    try:
        lines = os_release.read_text().splitlines()
    except OSError:
        return False
    fields = dict(line.split("=", 1) for line in lines if "=" in line)
    values = {k: v.strip().strip('"') for k, v in fields.items()}
    if values.get("ID") != "debian":
        return False
    version = values.get("VERSION_ID", "")
    # Testing and unstable have no VERSION_ID: they are newer than any release.
    return not version or int(version.split(".")[0]) >= 13


def _collect(out_dir: Path, found: Path) -> tuple[Path, str]:
    debs = sorted(found.glob("capsuled_*_all.deb"))
    if len(debs) != 1:
        raise TestbedError(f"expected one capsuled_*_all.deb in {found}, found {debs}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if found != out_dir:
        for path in (debs[0], found / "lintian.log"):
            shutil.copy2(path, out_dir / path.name)
    return out_dir / debs[0].name, (out_dir / "lintian.log").read_text()


def build_deb(
    out_dir: Path, checkout: Path = CHECKOUT, *, in_testbed: bool | None = None
) -> DebBuild:
    """Build the package into out_dir: here on Debian 13, else in a trixie container.

    Raises:
        TestbedUnavailable: the build container cannot be had (not root, no nspawn, ...).
        TestbedError: the build or lintian failed (the output is in the message).
    """
    started = time.monotonic()
    if in_testbed is None:
        in_testbed = not host_builds_debs()
    script = "tools/build-deb.sh"
    if not in_testbed:
        proc = subprocess.run(
            [str(checkout / script), str(out_dir)],
            capture_output=True,
            text=True,
            check=False,
            timeout=BUILD_TIMEOUT_S,
        )
        if proc.returncode != 0:
            raise TestbedError(f"{script} failed:\n{proc.stdout}\n{proc.stderr}")
        deb, lintian = _collect(out_dir, out_dir)
        return DebBuild(deb, lintian, time.monotonic() - started, "host")
    with Testbed.boot(checkout, install=False, spec=root_spec(BUILD_FLAVOUR)) as bed:
        bed.as_root(f"{SOURCE_INSIDE}/{script}", OUT_INSIDE, timeout=BUILD_TIMEOUT_S).check()
        deb, lintian = _collect(out_dir, bed.root_dir / OUT_INSIDE.lstrip("/"))
        return DebBuild(deb, lintian, time.monotonic() - started, bed.machine)
