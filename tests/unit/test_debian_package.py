"""debian/ against the rest of the tree: versions, dependencies, the build root's packages.

What the package does when installed is tested for real in tests/e2e/test_deb.py.
"""

from __future__ import annotations

import ast
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


def test_run_time_dependencies_are_debians_own() -> None:
    depends = control_field(1, "Depends")
    for package in ("python3-jeepney", "python3-systemd", "python3-cryptography"):
        assert package in depends
    assert control_field(1, "Recommends") == ["polkitd"]


def test_varlink_is_left_out_because_nothing_installed_imports_it() -> None:
    assert (DEBIAN / "py3dist-overrides").read_text().splitlines()[-1] == "varlink"
    for tree in ("helper", "client"):
        for path in (CHECKOUT / tree).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                assert not any(n == "varlink" or n.startswith("varlink.") for n in names), path


def test_rules_and_scripts_are_executable() -> None:
    for path in (DEBIAN / "rules", CHECKOUT / "tools/build-deb.sh"):
        assert os.access(path, os.X_OK), path
