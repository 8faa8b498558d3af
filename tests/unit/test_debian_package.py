"""debian/ against the rest of the tree: versions, dependencies, the build root's packages.

What the package does when installed is tested for real in tests/e2e/test_deb.py.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from testbed import rootfs

CHECKOUT = Path(__file__).resolve().parents[2]
DEBIAN = CHECKOUT / "debian"

# Build-Depends that are virtual packages, and the real package in the build root providing them.
PROVIDED_BY = {
    "debhelper-compat": "debhelper",
    "dh-sequence-python3": "dh-python",
    "dh-sequence-installsysusers": "debhelper",
}


def control_field(paragraph: int, name: str) -> list[str]:
    """The comma-separated names of a field (no versions) in paragraph N of debian/control."""
    paragraphs = (DEBIAN / "control").read_text().split("\n\n")
    match = re.search(rf"^{name}:((?:.*\n?)(?:[ \t].*\n?)*)", paragraphs[paragraph], re.M)
    assert match, name
    return [
        re.sub(r"\s*\(.*?\)", "", item).strip()
        for item in match.group(1).replace("\n", " ").split(",")
        if item.strip()
    ]


def test_the_changelog_version_is_the_project_version() -> None:
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]["version"]
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"capsuled \(([^)]+)\) ", first)
    assert match, first
    # A native package: the Debian version is the project's, so the file is capsuled_0.1.0_all.deb.
    assert match.group(1) == project
    assert (DEBIAN / "source/format").read_text().strip() == "3.0 (native)"


def test_the_build_root_has_every_build_dependency() -> None:
    # The trixie-deb container has no network: what debian/control needs must be in its tree.
    wanted = {PROVIDED_BY.get(dep, dep) for dep in control_field(0, "Build-Depends")}
    assert wanted <= set(rootfs.DEB_BUILD_PACKAGES)


# The Debian package of each runtime dependency in pyproject.toml (dh-python's own mapping,
# /usr/share/dh-python/dist/cpython3_fallback, says the same).
DEBIAN_PACKAGE = {
    "systemd-python": "python3-systemd",
    "jeepney": "python3-jeepney",
    "cryptography": "python3-cryptography",
    "varlink": "python3-varlink",
}


def test_run_time_dependencies_are_debians_packages_of_the_wheels() -> None:
    # Exactly what the wheel depends on (which is what helper/ and client/ import, see
    # test_dependencies.py), as Debian's packages: none missing, none installed for nothing.
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]
    wheel = {
        re.split(r"[^A-Za-z0-9._-]", r, maxsplit=1)[0].lower() for r in project["dependencies"]
    }
    python_depends = {d for d in control_field(1, "Depends") if d.startswith("python3-")}
    assert python_depends == {DEBIAN_PACKAGE[name] for name in wheel}
    assert control_field(1, "Recommends") == ["polkitd"]


def test_rules_and_scripts_are_executable() -> None:
    for path in (DEBIAN / "rules", CHECKOUT / "tools/build-deb.sh"):
        assert os.access(path, os.X_OK), path
