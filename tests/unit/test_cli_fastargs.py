"""capsulectl/fastargs.py: the plain command lines it parses get argparse's Namespace exactly, and
everything else is left to argparse (so help, usage errors and conversions stay argparse's)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsulectl import cli, fastargs
from capsulectl.verbs import verb_table
from doubles.scripted_capsuled import FakeCapsuled, capsule, fake, ok

__all__ = ["fake"]  # the fixture, re-exported for pytest

VERBS = [v.name for v in verb_table()]


@functools.cache
def parser_for(verb: str) -> argparse.ArgumentParser:
    return cli.build_parser(verb)


def fast(words: list[str]) -> fastargs.Namespace | None:
    return fastargs.parse(words, verb_table(), cli.add_global_options)


def argparse_namespace(words: list[str]) -> argparse.Namespace | None:
    """argparse's Namespace for words, or None where it refuses them (usage error, help)."""
    verb = cli.find_verb(words, verb_table())
    parser = parser_for(verb.name) if verb is not None else cli.build_parser()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(words)
        except SystemExit:
            return None


def subparser(verb: str) -> argparse.ArgumentParser:
    for action in parser_for(verb)._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[verb]  # type: ignore[no-any-return]  # argparse's typeshed
    raise AssertionError("no subparsers")


def option_items(parser: argparse.ArgumentParser) -> list[list[str]]:
    """Each option of parser as it may be written: alone, with a value, as --opt=value."""
    items: list[list[str]] = []
    for action in parser._actions:
        for name in action.option_strings:
            items.append([name])
            items.append([name, "v"])
            if name.startswith("--"):
                items.append([f"{name}=v"])
    return items


NOISE = ["", "x y", "-1", "-", "--", "-qq", "--jso", "--json=1", "5", "infinity", "-h", "status"]


def words_for(verb: str) -> st.SearchStrategy[list[str]]:
    """Command lines around verb: names and its own and the global options in any order (also
    misspelt, with =, with values that look like options), and words argparse treats specially.
    Most are plain, so the fast path is compared often, not just asked."""
    sub = subparser(verb)
    options = option_items(sub)
    names = [["web"], ["app.service"], ["b"]] * (len(options) // 3 + 2)
    item = st.sampled_from(names + options + [[w] for w in NOISE])
    top_items = option_items(parser_for(verb))
    plain_top = [i for i in top_items if i[0] not in ("-h", "--help", "--version", "--timeout")]
    top = st.lists(st.sampled_from(top_items + plain_top * 3), max_size=2)
    rest = st.lists(item, max_size=5)
    noisy = st.tuples(top, rest)
    # Names first, then options: the shape most command lines have.
    plain = st.tuples(
        top, st.tuples(st.lists(st.sampled_from(names), max_size=3), st.lists(item, max_size=3))
    ).map(lambda t: (t[0], [*t[1][0], *t[1][1]]))
    return st.one_of(noisy, plain).map(
        lambda t: [*(w for i in t[0] for w in i), verb, *(w for i in t[1] for w in i)]
    )


@pytest.mark.parametrize("verb", VERBS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_namespace_is_argparse_namespace(verb: str, data: st.DataObject) -> None:
    words = data.draw(words_for(verb))
    got = fast(words)
    if got is None:
        return  # argparse's to parse: nothing to compare
    expected = argparse_namespace(words)
    assert expected is not None, f"fastargs accepted what argparse refuses: {words}"
    assert vars(got) == vars(expected), words


PLAIN = [
    ["status", "web"],
    ["status", "a", "b", "--json"],
    ["--json", "list"],
    ["list", "-q", "--no-legend"],
    ["stop", "a", "b"],
    ["start", "--no-ask-password", "web"],
    ["restart", "web", "--host=alice@server"],
    ["--address", "unix:/run/x", "status", "--address=/y", "web"],
    ["start-unit", "web", "app.service"],
    ["logs", "web", "-u", "app.service", "--since", "today"],
    ["remove", "web", "--keep-data"],
    # Values their type= function accepts, converted by it as argparse does.
    ["--timeout", "5", "status", "web"],
    ["--timeout=infinity", "list"],
    ["logs", "web", "-n", "100"],
    ["audit", "web", "--lines", "7"],
    ["set-limits", "web", "--memory-max", "1G", "--tasks-max=infinity"],
]


@pytest.mark.parametrize("words", PLAIN, ids=" ".join)
def test_plain_command_lines_take_the_fast_path(words: list[str]) -> None:
    got = fast(words)
    assert got is not None
    expected = argparse_namespace(words)
    assert expected is not None
    assert vars(got) == vars(expected)


LEFT_TO_ARGPARSE = [
    [],  # no verb: argparse, then `list`
    ["--json"],
    ["--version"],
    ["-h"],
    ["status", "--help"],
    ["status", "-h", "web"],
    ["status"],  # too few: argparse's usage error
    ["status", "--jso", "web"],  # an abbreviation
    ["status", "--", "web"],
    ["status", "-web"],
    ["status", "a", "--json", "b"],  # positionals split by an option
    ["status", "web", "--json=1"],
    ["status", "web", "--address"],  # no value
    ["status", "web", "--address", "-x"],  # a value that looks like an option
    ["--timeout", "x", "status", "web"],  # values their type= function refuses
    ["--timeout=-1", "status", "web"],
    ["logs", "web", "-n", "five"],
    ["logs", "web", "--lines="],
    ["set-limits", "web", "--memory-max", "1Q"],
    ["units", "a", "b"],  # too many
    ["bundle", "keygen", "k"],  # choices
    ["run", "web", "--", "true"],  # REMAINDER
    ["watch"],  # nargs="*"
    ["nosuchverb", "x"],
]


@pytest.mark.parametrize("words", LEFT_TO_ARGPARSE, ids=lambda w: " ".join(w) or "(none)")
def test_what_fastargs_is_not_sure_of_is_argparse_s(words: list[str]) -> None:
    assert fast(words) is None


def test_suppress_is_argparse_s() -> None:
    assert fastargs.SUPPRESS == argparse.SUPPRESS


def test_a_usage_error_is_argparse_s_byte_for_byte(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "a", "--json", "b"])
    assert info.value.code == 2
    ours = capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser("status").parse_args(["status", "a", "--json", "b"])
    assert ours == capsys.readouterr().err
    assert "unrecognized arguments: b" in ours


@pytest.mark.parametrize(
    ("verb", "words"),
    [("logs", ["logs", "web", "-n", "five"]), ("status", ["--timeout=x", "status", "web"])],
)
def test_a_refused_value_is_argparse_s_error_byte_for_byte(
    capsys: pytest.CaptureFixture[str], verb: str, words: list[str]
) -> None:
    # fastargs tried the type= function first; the message is still argparse's own.
    with pytest.raises(SystemExit) as info:
        cli.main(words)
    assert info.value.code == 2
    ours = capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser(verb).parse_args(words)
    assert ours == capsys.readouterr().err
    assert "invalid" in ours


@pytest.mark.parametrize("words", [[], ["--json"], ["--no-legend", "--no-ask-password"]])
def test_no_verb_lists_as_before(fake: FakeCapsuled, words: list[str]) -> None:
    fake.on("List", ok(capsules=[capsule("b"), capsule("a")]))
    out = io.StringIO()
    assert cli.main(["--address", fake.address, *words], out=out) == 0
    expected = io.StringIO()
    assert cli.main(["--address", fake.address, *words, "list"], out=expected) == 0
    assert out.getvalue() == expected.getvalue()
    assert fake.methods() == ["List", "List"]
