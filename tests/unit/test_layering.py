"""The protocol core does no I/O and imports nothing of ours (style guide "Module boundaries")."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "helper" / "capsuled" / "varlink"
# (threading is not listed: this interpreter already loads it at start-up.)
FORBIDDEN_LOADED = ["asyncio", "socket", "jeepney", "varlink", "logging", "selectors", "subprocess"]
# _json and _collections: the C halves of json and collections, which the core uses directly so
# that the client's start-up need not load the packages (issue 12).
ALLOWED_IMPORTS = {"__future__", "collections", "dataclasses", "enum", "json", "re", "typing"}
ALLOWED_IMPORTS |= {"_collections", "_json"}


def test_importing_the_core_loads_no_io_modules() -> None:
    modules = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")
    code = (
        "import json, sys\n"
        + "".join(f"import capsuled.varlink.{m}\n" for m in modules)
        + "import capsuled.varlink\n"
        + f"print(json.dumps([m for m in {FORBIDDEN_LOADED!r} if m in sys.modules]))\n"
    )
    helper = str(CORE.parents[1])
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {helper!r})\n{code}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(out.stdout) == []
    assert {"connection", "errors", "framing", "interface", "messages", "service"} <= set(modules)


def test_core_imports_only_pure_stdlib_and_itself() -> None:
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = top in ALLOWED_IMPORTS or name.startswith("capsuled.varlink")
                assert ok, f"{path.name} imports {name}"
