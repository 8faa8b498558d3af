"""The manual pages: they document every verb, option and configuration key, and render cleanly.

The pages are read as docutils parses them (the sections, the terms of their definition lists),
and compared with what the programs really accept: capsulectl's argparse parser, `capsuled
--help`, and the policy loader probed key by key. So a verb, option or key added without its
documentation fails here, and so does documentation of one that is gone.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import docutils.core
import docutils.nodes
import pytest

import capsuled.policy
from capsulectl.cli import build_parser
from capsuled.cli import main as capsuled_main
from capsuled.policy.config import ConfigError, apply_layer
from capsuled.policy.engine import DEFAULT_CONFIG

CHECKOUT = Path(__file__).resolve().parents[2]
MAN = CHECKOUT / "man"
PAGES = ("capsulectl.1", "capsuled.8", "capsuled.toml.5")
HELP = frozenset({"-h", "--help"})


def manpages() -> ModuleType:
    """tools/manpages.py, the renderer setup.py uses."""
    spec = importlib.util.spec_from_file_location("manpages", CHECKOUT / "tools/manpages.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doctree(page: str) -> docutils.nodes.document:
    text = (MAN / f"{page}.rst").read_text()
    document: docutils.nodes.document = docutils.core.publish_doctree(
        text, settings_overrides={"report_level": 5}
    )
    return document


def section(parent: docutils.nodes.Node, title: str) -> docutils.nodes.section:
    """The (sub)section of parent with this title."""
    for node in parent.findall(docutils.nodes.section):
        if node[0].astext() == title:
            return node
    raise AssertionError(f"no section {title!r}")


def subsections(parent: docutils.nodes.section) -> Iterator[docutils.nodes.section]:
    for child in parent.children:
        if isinstance(child, docutils.nodes.section):
            yield child


def entries(parent: docutils.nodes.Element) -> Iterator[docutils.nodes.definition_list_item]:
    """The definition list items directly in parent (not those nested in a definition)."""
    for child in parent.children:
        if isinstance(child, docutils.nodes.definition_list):
            for item in child.children:
                if isinstance(item, docutils.nodes.definition_list_item):
                    yield item


def literals(node: docutils.nodes.Node) -> list[str]:
    return [lit.astext() for lit in node.findall(docutils.nodes.literal)]


def term_literals(item: docutils.nodes.definition_list_item) -> list[str]:
    return literals(item[0])


def term_options(item: docutils.nodes.definition_list_item) -> set[str]:
    """The option names in an entry's term (not the ``@`` of ``[USER@]HOST``)."""
    return {lit for lit in term_literals(item) if re.match(r"--?[a-zA-Z]", lit)}


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("capsulectl's parser has no verbs")


# -- capsulectl(1) ---------------------------------------------------------------------------------


def documented_verbs() -> dict[str, set[str]]:
    """verb -> the options written anywhere in its entry (its line and its option list)."""
    commands = section(doctree("capsulectl.1"), "COMMANDS")
    found: dict[str, set[str]] = {}
    for group in subsections(commands):
        for item in entries(group):
            verb = term_literals(item)[0]
            assert verb not in found, f"{verb} documented twice"
            # Option names only: not "-" (standard input) nor "--" (end of options).
            found[verb] = {lit for lit in literals(item) if re.match(r"--?[a-zA-Z]", lit)}
    return found


def test_capsulectl_documents_every_verb_and_no_other() -> None:
    assert set(documented_verbs()) == set(verb_parsers())


def test_capsulectl_documents_every_option_of_each_verb_in_its_entry() -> None:
    global_options = options_of(build_parser())
    documented = documented_verbs()
    for verb, parser in verb_parsers().items():
        own = options_of(parser) - global_options - HELP
        missing = own - documented[verb]
        assert not missing, f"capsulectl(1) {verb}: undocumented {sorted(missing)}"
        stale = documented[verb] - options_of(parser)
        assert not stale, f"capsulectl(1) {verb}: documents {sorted(stale)}, which it lacks"


def test_capsulectl_documents_every_global_option() -> None:
    options = section(doctree("capsulectl.1"), "OPTIONS")
    documented = {opt for item in entries(options) for opt in term_options(item)}
    assert documented == options_of(build_parser())


def test_capsulectl_documents_exit_status_and_environment() -> None:
    tree = doctree("capsulectl.1")
    codes = {item[0].astext() for item in entries(section(tree, "EXIT STATUS"))}
    assert codes == {"0", "1", "2", "3", "4", "5"}
    env = {lit for item in entries(section(tree, "ENVIRONMENT")) for lit in term_literals(item)}
    assert {"CAPSULECTL_ADDRESS", "CAPSULECTL_SSH", "NO_COLOR"} <= env


# -- capsuled(8) -----------------------------------------------------------------------------------


def help_options(monkeypatch: pytest.MonkeyPatch, *argv: str) -> set[str]:
    """The options `capsuled ARGV --help` lists (argparse's lines indented by two spaces)."""
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        capsuled_main([*argv, "--help"])
    found: set[str] = set()
    for line in out.getvalue().splitlines():
        if re.match(r"  -", line):
            spec = re.split(r"\s{2,}", line.strip())[0]
            found.update(w.rstrip(",") for w in spec.split() if w.startswith("-"))
    assert found, out.getvalue()
    return found


def test_capsuled_documents_every_daemon_option(monkeypatch: pytest.MonkeyPatch) -> None:
    options = section(doctree("capsuled.8"), "OPTIONS")
    documented = {opt for item in entries(options) for opt in term_options(item)}
    assert documented == help_options(monkeypatch, "serve")


def test_capsuled_documents_install_and_uninstall(monkeypatch: pytest.MonkeyPatch) -> None:
    install = section(doctree("capsuled.8"), "INSTALL AND UNINSTALL")
    documented = {opt for item in entries(install) for opt in term_options(item)}
    accepted = help_options(monkeypatch, "install") | help_options(monkeypatch, "uninstall")
    assert documented == accepted - HELP


def test_capsuled_documents_audit_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    trail = section(doctree("capsuled.8"), "AUDIT TRAIL")
    documented = {opt for item in entries(trail) for opt in term_options(item)}
    assert documented == help_options(monkeypatch, "audit", "verify") - HELP


def test_capsuled_has_the_sections_the_issue_asks_for() -> None:
    titles = {s[0].astext() for s in doctree("capsuled.8").findall(docutils.nodes.section)}
    for wanted in ("SOCKET ACTIVATION", "SIGNALS", "LIMITS", "SECURITY", "FILES", "OPTIONS"):
        assert wanted in titles


# -- capsuled.toml(5) ------------------------------------------------------------------------------

ARRAY_TABLES = frozenset({"rule", "quota_rule"})


def documented_keys() -> dict[str, set[str]]:
    """[table] -> keys, from the subsections of OPTIONS titled [table] or [[table]]."""
    found: dict[str, set[str]] = {}
    for sub in subsections(section(doctree("capsuled.toml.5"), "OPTIONS")):
        table = sub[0].astext().strip("[]")
        found[table] = {lit for item in entries(sub) for lit in term_literals(item)}
    return found


def loader_accepts(table: str | None, key: str) -> bool:
    """Whether the policy loader knows `key` (at top level if table is None).

    A wrong value is fine (the loader then objects to the value, not the key): only "unknown
    key" and "unknown action" mean the loader does not know it.
    """
    body = f'{json.dumps(key)} = "no"\n'
    if table is not None:
        body = (f"[[{table}]]\n" if table in ARRAY_TABLES else f"[{table}]\n") + body
    try:
        apply_layer(DEFAULT_CONFIG, "probe.toml", body)
    except ConfigError as exc:
        return re.search(r"unknown (key|action)", str(exc)) is None
    return True


def candidate_keys() -> set[str]:
    """Every key-like string literal in capsuled.policy's modules, and every documented key."""
    found: set[str] = set()
    for path in Path(capsuled.policy.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"[a-z*][a-z0-9_*-]*", node.value)
            ):
                found.add(node.value)
    for keys in documented_keys().values():
        found |= keys
    return found


def test_every_key_the_loader_accepts_is_documented() -> None:
    candidates = candidate_keys()
    tables = {key for key in candidates if loader_accepts(None, key)}
    documented = documented_keys()
    assert tables == set(documented), "capsuled.toml(5) OPTIONS: one subsection per table"
    for table in tables:
        accepted = {key for key in candidates if loader_accepts(table, key)}
        assert accepted == documented[table], f"[{table}]"


def test_the_shipped_config_uses_only_documented_keys() -> None:
    import tomllib

    # The shipped file's own keys, and the keys of its commented examples.
    text = (CHECKOUT / "config/capsuled.toml").read_text()
    examples = "\n".join(
        line[2:] for line in text.splitlines() if re.match(r"# (\[|[a-z_-]+ = )", line)
    )
    documented = documented_keys()
    for doc in (tomllib.loads(text), tomllib.loads(examples)):
        for table, value in doc.items():
            items = value if isinstance(value, list) else [value]
            for item in items:
                assert set(item) <= documented[table], table


# -- rendering -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("man")
    module = manpages()
    written = module.render_all(out, module.project_version())
    return {p.name: p for p in written}


def test_every_page_is_rendered_with_the_project_version(rendered: dict[str, Path]) -> None:
    assert set(rendered) == set(PAGES)
    version = manpages().project_version()
    for page in rendered.values():
        text = page.read_text()
        assert text.startswith('.\\" Man page generated from reStructuredText')
        header = next(line for line in text.splitlines() if line.startswith(".TH "))
        assert f"capsuled {version}" in header, header
        assert "@VERSION@" not in text


@pytest.mark.parametrize("page", PAGES)
def test_groff_renders_without_warnings(rendered: dict[str, Path], page: str) -> None:
    groff = shutil.which("groff")
    assert groff, "groff is missing (tools/install-deps.sh installs groff-base)"
    # -ww: every warning; -z: no output, only diagnostics. lintian runs `man --warnings`, below.
    proc = subprocess.run(
        [groff, "-man", "-ww", "-z", "-Tutf8", str(rendered[page])],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_man_renders_without_warnings_as_lintian_checks(
    rendered: dict[str, Path], page: str
) -> None:
    man = shutil.which("man")
    assert man, "man is missing (tools/install-deps.sh installs man-db)"
    proc = subprocess.run(
        [man, "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(rendered[page])],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LC_ALL": "C.UTF-8"},
    )
    assert (proc.returncode, proc.stderr) == (0, "")


def test_a_docutils_warning_stops_the_build(tmp_path: Path) -> None:
    broken = tmp_path / "broken.1.rst"
    broken.write_text("=====\nbroken\n=====\n\n* a list\nnot indented\n")
    with pytest.raises(ValueError, match=r"broken\.1\.rst"):
        manpages().render(broken, "0")


def test_a_source_without_a_section_is_refused(tmp_path: Path) -> None:
    (tmp_path / "nosection.rst").write_text("x\n")
    with pytest.raises(ValueError, match=r"NAME\.SECTION"):
        manpages().sources(tmp_path)
