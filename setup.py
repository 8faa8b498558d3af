"""The one build step pyproject.toml cannot declare: rendering the manual pages into the wheel.

man/*.rst (reStructuredText) are rendered to roff with docutils (tools/manpages.py says why that
format) while build_py runs, into the build tree as capsuled/data/man/NAME.SECTION, so the wheel
carries them as package data and `capsuled install` puts them under PREFIX/share/man. Nothing
rendered is ever written into the source tree. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithManPages(build_py):
    """build_py, then the manual pages into BUILD_LIB/capsuled/data/man/."""

    def run(self) -> None:
        super().run()
        spec = importlib.util.spec_from_file_location("manpages", HERE / "tools/manpages.py")
        if spec is None or spec.loader is None:
            raise RuntimeError("cannot load tools/manpages.py")
        manpages = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(manpages)
        out = Path(self.build_lib) / "capsuled" / "data" / "man"
        for page in manpages.render_all(out, self.distribution.get_version(), HERE / "man"):
            self.announce(f"rendered {page}", level=2)


setup(cmdclass={"build_py": BuildPyWithManPages})
