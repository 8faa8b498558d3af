"""capsuled.varlink resolves its public names on first use (PEP 562), and only then loads them.

The import checks run in a fresh interpreter: this test process has long since loaded everything.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import capsuled.varlink as package

HELPER = Path(__file__).resolve().parents[2] / "helper"


def loaded_after(code: str) -> list[str]:
    """The capsuled.varlink submodules loaded after running `code` in a fresh interpreter."""
    script = (
        f"import sys\nsys.path.insert(0, {str(HELPER)!r})\n{code}\n"
        "import json\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith('capsuled.varlink.'))))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return list(json.loads(done.stdout.splitlines()[-1]))


def test_the_table_covers_all_and_nothing_else() -> None:
    assert set(package._SUBMODULE_OF) == set(package.__all__)
    assert len(package.__all__) == len(set(package.__all__))


@pytest.mark.parametrize("name", sorted(package._SUBMODULE_OF))
def test_each_name_is_the_submodule_object(name: str) -> None:
    submodule = importlib.import_module(f"capsuled.varlink.{package._SUBMODULE_OF[name]}")
    assert getattr(package, name) is getattr(submodule, name)
    assert name in getattr(submodule, "__all__", [name])


def test_importing_the_package_loads_no_submodule() -> None:
    assert loaded_after("import capsuled.varlink") == []


def test_a_name_loads_only_its_own_submodules() -> None:
    # messages needs errors; nothing may pull in the IDL parser.
    loaded = loaded_after("from capsuled.varlink import Call\nCall('a.b.C')")
    assert loaded == ["capsuled.varlink.errors", "capsuled.varlink.messages"]


def test_the_lazy_check_would_notice_an_eager_import() -> None:
    # Guard against a check that cannot fail: a name from interface does load it.
    assert "capsuled.varlink.interface" in loaded_after("from capsuled.varlink import Interface")


def test_star_import_gives_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from capsuled.varlink import *", namespace)
    assert set(package.__all__) <= set(namespace)


def test_submodules_still_import_through_the_package() -> None:
    # `from capsuled.varlink import errors` falls back to the submodule only if __getattr__
    # raises AttributeError for names it does not know.
    from capsuled.varlink import errors, interface

    assert errors.__name__ == "capsuled.varlink.errors"
    assert interface.__name__ == "capsuled.varlink.interface"


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        package.no_such_name  # noqa: B018  # the point: the lookup itself raises
    assert not hasattr(package, "no_such_name")


def test_dir_lists_the_lazy_names() -> None:
    assert set(package.__all__) <= set(dir(package))
