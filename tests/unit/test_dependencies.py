"""The wheel's runtime dependencies are exactly the third-party modules helper/ and client/ import.

A dependency nothing imports makes every host install it for nothing; an import without a
dependency breaks `pip install capsuled` on a clean host. Test-only packages belong in the
`test` extra.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("helper", "client")
OURS = frozenset({"capsuled", "capsulectl"})

# Import name -> distribution name on PyPI, for every third-party module we know of.
DISTRIBUTION = {
    "jeepney": "jeepney",
    "systemd": "systemd-python",
    "varlink": "varlink",
    "cryptography": "cryptography",
}


def imported_top_level(root: Path) -> set[str]:
    """Top-level names of the absolute imports in every .py file under root."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names


def third_party_imports() -> set[str]:
    found = set().union(*(imported_top_level(ROOT / tree) for tree in PRODUCT))
    return {name for name in found if name not in sys.stdlib_module_names and name not in OURS}


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return match.group(0).lower()


def project() -> dict[str, object]:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert isinstance(table, dict)
    return table


def test_every_product_import_is_a_known_distribution() -> None:
    assert third_party_imports() <= set(DISTRIBUTION)


def test_runtime_dependencies_are_exactly_what_the_product_imports() -> None:
    dependencies = project()["dependencies"]
    assert isinstance(dependencies, list)
    declared = {requirement_name(r) for r in dependencies}
    assert declared == {DISTRIBUTION[name] for name in third_party_imports()}


def test_the_test_extra_has_what_the_tests_import() -> None:
    extras = project()["optional-dependencies"]
    assert isinstance(extras, dict)
    test_extra = {requirement_name(r) for r in extras["test"]}
    used = imported_top_level(ROOT / "tests") & set(DISTRIBUTION)
    runtime = {DISTRIBUTION[name] for name in third_party_imports()}
    assert {DISTRIBUTION[name] for name in used} - runtime <= test_extra


def test_the_import_scan_sees_imports() -> None:
    # Guard against a scan that finds nothing (and so agrees with an empty list).
    assert {"jeepney", "systemd"} <= third_party_imports()
    assert "varlink" in imported_top_level(ROOT / "tests")
