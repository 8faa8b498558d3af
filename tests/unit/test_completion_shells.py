"""zsh and fish completion for capsulectl, run in the real shells, and where install puts them.

zsh completes only inside its line editor, so the zsh harness starts an interactive `zsh -f` on a
pseudo-terminal (zsh/zpty), types each command line followed by Tab and records what the
completion system offered (compadd is wrapped to write its matches to a file). fish answers
`complete -C LINE` directly. In both, `capsulectl` is a shell function standing in for the
client: it logs how it was asked and answers `list -q` and `units web -q` as the real one does,
so the tests see which queries a completion makes and through which --address/-H.

Verbs and options are compared with capsulectl's own parser (build_parser), for bash too, so a
verb or option added to the client without its completion fails here.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from capsulectl.cli import build_parser
from capsuled import install

COMPLETION = Path(__file__).resolve().parents[2] / "client" / "capsulectl" / "completion"
TIMEOUT_S = 30
END = "@@END@@"

ZSH_HARNESS = Path(__file__).with_name("zsh_completion_harness.zsh")

FISH_STUB = r"""
function capsulectl
    echo "$argv" >> $LOG
    switch "$argv"
        case '* list -q'
            printf '%s\n' web webb db
        case '* units web -q'
            printf '%s\n' app.service api.service
    end
end
"""

Completed = list[tuple[list[str], list[str]]]  # per line: (offered, queries made)


def need(shell: str) -> str:
    found = shutil.which(shell)
    assert found, f"{shell} is missing (tools/install-deps.sh installs it)"
    return found


def complete_zsh(tmp_path: Path, *lines: str, compdir: Path = COMPLETION) -> Completed:
    """What zsh offers for each command line (its last word being completed)."""
    zsh = need("zsh")
    out = tmp_path / "zsh-out"
    for path in (out, Path(f"{out}.queries")):
        path.write_text("")
    subprocess.run(
        [zsh, "-f", str(ZSH_HARNESS), str(compdir), str(out), *lines],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TERM": "dumb"},
        check=True,
        timeout=TIMEOUT_S,
    )
    offered = _split(out.read_text())
    queries = _split(Path(f"{out}.queries").read_text())
    assert len(offered) == len(queries) == len(lines)
    return list(zip(offered, queries, strict=True))


def _split(text: str) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    for line in text.splitlines():
        if line == END:
            chunks.append([])
        elif line:
            chunks[-1].append(line)
    return chunks[:-1]


def complete_fish(
    tmp_path: Path, line: str, compdir: Path = COMPLETION, env: dict[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """What fish offers for the command line, and the queries it made."""
    fish = need("fish")
    log = tmp_path / "fish-queries"
    log.write_text("")
    script = f"set fish_complete_path {compdir} $fish_complete_path\n{FISH_STUB}\ncomplete -C $LINE"
    done = subprocess.run(
        [fish, "-c", script],
        env=fish_env(tmp_path) | {"LOG": str(log), "LINE": line} | (env or {}),
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT_S,
    )
    assert done.stderr == ""
    offered = [w.split("\t", 1)[0] for w in done.stdout.splitlines() if w]
    return offered, log.read_text().splitlines()


def fish_env(home: Path) -> dict[str, str]:
    """A login-like fish: its own configuration (which sets the search paths), none of ours.

    No XDG_DATA_DIRS, as on a console or ssh login: fish then reads only the directories it
    reads regardless.
    """
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config")}


def complete_bash(tmp_path: Path, line: str) -> list[str]:
    """What the bash completion offers for the command line (no capsuled behind it)."""
    words = line.split(" ")
    script = (
        f"source {COMPLETION / 'capsulectl.bash'}; capsulectl() {{ :; }}; "
        'COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _capsulectl; '
        "printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    done = subprocess.run(
        [need("bash"), "-c", script, "bash", *words],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT_S,
    )
    return [w for w in done.stdout.splitlines() if w]


def verbs() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no verbs")


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for s in options(parser) if s.startswith("--")}


# -- the files load --------------------------------------------------------------------------------


def test_zsh_file_parses() -> None:
    subprocess.run([need("zsh"), "-n", str(COMPLETION / "_capsulectl")], check=True)


def test_fish_file_parses_and_loads() -> None:
    fish = need("fish")
    script = COMPLETION / "capsulectl.fish"
    subprocess.run([fish, "--no-execute", str(script)], check=True, timeout=TIMEOUT_S)
    done = subprocess.run(
        [fish, "--no-config", "-c", f"source {script}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT_S,
    )
    assert done.stderr == ""


# -- verbs and options follow capsulectl's parser --------------------------------------------------


def test_every_shell_completes_exactly_the_verbs(tmp_path: Path) -> None:
    expected = sorted(verbs())
    (zsh_verbs, zsh_queries), *_ = complete_zsh(tmp_path, "capsulectl ")
    assert sorted(zsh_verbs) == expected
    assert zsh_queries == []  # verbs need no round trip to capsuled
    fish_verbs, fish_queries = complete_fish(tmp_path, "capsulectl ")
    assert sorted(fish_verbs) == expected
    assert fish_queries == []
    assert sorted(complete_bash(tmp_path, "capsulectl ")) == expected


def test_every_shell_completes_every_option_of_every_verb(tmp_path: Path) -> None:
    parsers = verbs()
    names = sorted(parsers)
    zsh = complete_zsh(tmp_path, *(f"capsulectl {verb} -" for verb in names))
    for verb, (offered, _) in zip(names, zsh, strict=True):
        missing = options(parsers[verb]) - set(offered)
        assert not missing, f"zsh, {verb}: {sorted(missing)}"
    for verb in names:
        # fish offers long options for "--" and short ones for "-".
        fish = set(complete_fish(tmp_path, f"capsulectl {verb} --")[0])
        fish |= set(complete_fish(tmp_path, f"capsulectl {verb} -")[0])
        missing = options(parsers[verb]) - fish
        assert not missing, f"fish, {verb}: {sorted(missing)}"
        # bash completes long and short option names the same way.
        missing = long_options(parsers[verb]) - set(complete_bash(tmp_path, f"capsulectl {verb} -"))
        assert not missing, f"bash, {verb}: {sorted(missing)}"


def test_every_shell_completes_the_options_before_the_verb(tmp_path: Path) -> None:
    top = {o for o in long_options(build_parser())}
    (zsh_offered, _), *_ = complete_zsh(tmp_path, "capsulectl --")
    assert top <= set(zsh_offered)
    assert top <= set(complete_fish(tmp_path, "capsulectl --")[0])
    assert top <= set(complete_bash(tmp_path, "capsulectl --"))


# -- names come from capsuled ----------------------------------------------------------------------


def test_zsh_completes_names_through_the_same_connection(tmp_path: Path) -> None:
    got = complete_zsh(
        tmp_path,
        "capsulectl status we",
        "capsulectl -H alice@server stop ",
        "capsulectl --address /run/other.sock start ",
        "capsulectl start-unit web a",
        "capsulectl logs web -u ",
        "capsulectl can-i ma",
        "capsulectl create ",
        "capsulectl can-i stop d",
    )
    assert got[0] == (["web", "webb"], ["--no-ask-password --timeout 2 list -q"])
    assert got[1] == (
        ["web", "webb", "db"],
        ["-H alice@server --no-ask-password --timeout 2 list -q"],
    )
    assert got[2][1] == ["--address /run/other.sock --no-ask-password --timeout 2 list -q"]
    units = (["app.service", "api.service"], ["--no-ask-password --timeout 2 units web -q"])
    assert got[3] == units
    assert got[4] == units
    assert sorted(got[5][0]) == ["manage", "manage-units"]
    assert got[6] == ([], [])  # a new name: nothing to offer, nobody asked
    assert got[7][0] == ["db"]


def test_fish_completes_names_through_the_same_connection(tmp_path: Path) -> None:
    assert complete_fish(tmp_path, "capsulectl status we") == (
        ["web", "webb"],
        ["--no-ask-password --timeout 2 list -q"],
    )
    offered, queries = complete_fish(tmp_path, "capsulectl -H alice@server stop ")
    assert sorted(offered) == ["db", "web", "webb"]
    assert queries == ["-H alice@server --no-ask-password --timeout 2 list -q"]
    _, queries = complete_fish(tmp_path, "capsulectl --address=/run/other.sock start ")
    assert queries == ["--address=/run/other.sock --no-ask-password --timeout 2 list -q"]
    offered, queries = complete_fish(tmp_path, "capsulectl start-unit web a")
    assert sorted(offered) == ["api.service", "app.service"]
    assert queries == ["--no-ask-password --timeout 2 units web -q"]
    assert sorted(complete_fish(tmp_path, "capsulectl logs web -u ")[0]) == [
        "api.service",
        "app.service",
    ]
    assert sorted(complete_fish(tmp_path, "capsulectl can-i ma")[0]) == ["manage", "manage-units"]
    assert complete_fish(tmp_path, "capsulectl create ") == ([], [])
    assert complete_fish(tmp_path, "capsulectl set-limits web ")[1] == []  # one capsule only


# -- install puts them where the shells look -------------------------------------------------------


def zsh_fpath() -> list[str]:
    done = subprocess.run(
        [need("zsh"), "-f", "-c", "print -l $fpath"],
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT_S,
    )
    return done.stdout.split()


def fish_completion_path(home: Path) -> list[str]:
    done = subprocess.run(
        [need("fish"), "-c", "printf '%s\\n' $fish_complete_path"],
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT_S,
        env=fish_env(home),
    )
    return done.stdout.split()


def staged(tmp_path: Path, prefix: str) -> dict[str, PurePosixPath]:
    """Install into tmp_path/root with prefix; where each shell's completion went."""
    root = tmp_path / "root"
    assert install.main_install(["--root", str(root), "--prefix", prefix, "--bindir", "/b"]) == 0
    found: dict[str, PurePosixPath] = {}
    for path in root.rglob("*"):
        rel = PurePosixPath("/", path.relative_to(root))
        if path.name == "_capsulectl":
            found["zsh"] = rel
        elif path.name == "capsulectl.fish":
            found["fish"] = rel
        elif re.search(r"bash-completion/completions/capsulectl$", str(rel)):
            found["bash"] = rel
    return found


@pytest.mark.parametrize("prefix", ["/usr/local", "/usr"])
def test_install_puts_completions_where_the_shells_look(tmp_path: Path, prefix: str) -> None:
    if prefix == "/usr" and not install.DEBIAN_MARKER.exists():
        pytest.skip("the /usr layout for zsh is Debian's (vendor-completions)")
    where = staged(tmp_path, prefix)
    assert set(where) == {"bash", "zsh", "fish"}
    assert str(where["zsh"].parent) in zsh_fpath()
    assert str(where["fish"].parent) in fish_completion_path(tmp_path)
    assert str(where["bash"]).startswith(f"{prefix}/share/")  # bash-completion: XDG_DATA_DIRS
    # And what landed there works: the staged copies complete verbs.
    root = tmp_path / "root"
    zsh_dir = root / where["zsh"].parent.relative_to("/")
    (offered, _), *_ = complete_zsh(tmp_path, "capsulectl sta", compdir=zsh_dir)
    assert sorted(offered) == ["start", "start-unit", "status"]
    fish_dir = root / where["fish"].parent.relative_to("/")
    assert sorted(complete_fish(tmp_path, "capsulectl sta", compdir=fish_dir)[0]) == [
        "start",
        "start-unit",
        "status",
    ]


def test_uninstall_removes_every_completion(tmp_path: Path) -> None:
    where = staged(tmp_path, "/usr/local")
    root = tmp_path / "root"
    assert install.main_uninstall(["--root", str(root)]) == 0
    for path in where.values():
        assert not (root / path.relative_to("/")).exists(), path
    assert not (root / "etc/fish").exists()  # made for us, removed with us
