"""Render the manual pages: man/NAME.SECTION.rst (reStructuredText) to roff, with docutils.

Why reStructuredText and docutils: the pages stay readable as plain text in the checkout, the
renderer is one small pure-Python package (PyPI `docutils`, Debian `python3-docutils`, in
main since forever), so it can be a PEP 517 build requirement and a Debian Build-Depends alike,
and its manpage writer emits plain man(7) macros that groff renders without warnings. systemd's
own DocBook would need xsltproc and the DocBook XSL stylesheets, neither installable by pip.

Used by setup.py (the wheel carries the rendered pages as package data capsuled/data/man/) and
by `capsuled install` in a source checkout; `python3 tools/manpages.py OUTDIR` renders by hand.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
SOURCE_DIR = CHECKOUT / "man"
VERSION_PLACEHOLDER = "@VERSION@"
SECTIONS = frozenset("12345678")


def project_version(checkout: Path = CHECKOUT) -> str:
    """The version pyproject.toml declares."""
    return str(tomllib.loads((checkout / "pyproject.toml").read_text())["project"]["version"])


def sources(source_dir: Path = SOURCE_DIR) -> list[Path]:
    """Every page source, NAME.SECTION.rst, sorted.

    Raises:
        ValueError: a .rst file whose name does not end in a manual section.
    """
    found = sorted(source_dir.glob("*.rst"))
    for path in found:
        if path.stem.rpartition(".")[2] not in SECTIONS:
            raise ValueError(f"{path}: name it NAME.SECTION.rst (section 1-8)")
    return found


def render(source: Path, version: str) -> bytes:
    """One page as roff.

    Raises:
        ValueError: docutils reported a warning or error (the message says where).
    """
    # Imported here: `capsuled install` from a wheel never renders, and needs no docutils.
    import docutils.core
    import docutils.utils
    from docutils.writers import manpage

    text = source.read_text(encoding="utf-8").replace(VERSION_PLACEHOLDER, version)
    try:
        out = docutils.core.publish_string(
            text,
            source_path=str(source),
            writer=manpage.Writer(),
            settings_overrides={
                # A warning (a broken list, an unknown role) means a page that renders wrong:
                # stop the build rather than ship it.
                "halt_level": docutils.utils.Reporter.WARNING_LEVEL,
                "report_level": docutils.utils.Reporter.WARNING_LEVEL,
                "output_encoding": "utf-8",
                "input_encoding": "utf-8",
            },
        )
    except docutils.utils.SystemMessage as exc:
        raise ValueError(f"{source}: {exc}") from None
    return out if isinstance(out, bytes) else out.encode("utf-8")


def render_all(out_dir: Path, version: str, source_dir: Path = SOURCE_DIR) -> list[Path]:
    """Render every page into out_dir as NAME.SECTION; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sources(source_dir):
        target = out_dir / source.stem
        target.write_bytes(render(source, version))
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    """`python3 tools/manpages.py OUTDIR`: render every page into OUTDIR."""
    if len(argv) != 1:
        print("usage: python3 tools/manpages.py OUTDIR", file=sys.stderr)
        return 2
    for path in render_all(Path(argv[0]), project_version()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
