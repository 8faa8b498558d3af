"""`capsulectl`: the command line. Global options, the parser, and the one place where every
failure becomes a line on stderr and an exit status; the verbs themselves (each one's help,
arguments and handler) are declared in verbs.py.

Start-up stays cheap: `--version` is answered before anything but this module and the package
is imported (not even argparse or typing); a plain command line (`status web`, `--json list`)
is read by fastargs.py from the same verb declarations, without argparse, typing, json or re;
argparse parses every other one (help, usage errors, values refused); the protocol core loads
when the first call is made, and nothing here imports asyncio, jeepney, the `varlink` package or
systemd (tests/unit/test_cli_imports.py checks it in a fresh interpreter).
"""

from __future__ import annotations

import os
import sys

from capsulectl import __version__

# Not typing.TYPE_CHECKING: importing typing (like argparse, collections.abc and the failure
# table) is a third of what `capsulectl --version` costs beyond the interpreter's start-up;
# mypy treats this name as true all the same.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import NoReturn, TextIO

    # The verbs, their context and the output formats load after `--version` has been answered.
    from capsulectl.context import Context
    from capsulectl.fastargs import Declared, Namespace
    from capsulectl.verbs import Verb

__all__ = ["build_parser", "exit_with", "main"]

EXIT_STATUS_HELP = """\
exit status:
  0  success (can-i: the answer is "yes")
  1  failure (can-i: "no", or only after authenticating)
  2  invalid arguments
  3  the capsule is not running (status of a stopped capsule, or a verb that needs it running)
  4  no such capsule, or no such unit in it
  5  permission denied (also: authentication needed and --no-ask-password given)"""

MAIN_EPILOG = f"""\
{EXIT_STATUS_HELP}

authentication:
  When the policy requires an administrator's password ("auth_admin"), capsulectl repeats the
  call allowing interactive authentication, and polkit asks through your session's agent. On a
  text console without a desktop agent, capsulectl starts pkttyagent(1) on its terminal itself
  when standard input is a terminal (as systemctl does). Over ssh or from scripts, pass
  --no-ask-password to fail with exit status 5 instead, or run `pkttyagent --fallback` in
  another terminal of the same login session before calling capsulectl.

environment:
  CAPSULECTL_ADDRESS  socket to use instead of {{default}}
  CAPSULECTL_SSH      command used for -H instead of "ssh"
  NO_COLOR, SYSTEMD_COLORS=0  no colour (colour is only ever used on a terminal)

examples:
  capsulectl create web --start
  capsulectl install-unit web ./app.service --enable --now
  capsulectl run web --wait -- /bin/sh -c 'echo hello'
  capsulectl logs web -u app.service -f
  capsulectl -H alice@server status web
  capsulectl --json list | jq -r '.capsules[].name'

See capsuled(8) for the policy that decides who may do what."""


def add_global_options(p: argparse.ArgumentParser | Declared, top: bool) -> None:
    """Global options, accepted before and after the verb (systemctl takes them anywhere).

    On subparsers every default is SUPPRESS, so an option not given after the verb does not
    overwrite the one given before it. p is a parser, or fastargs' recorder of the same calls.
    """
    from capsulectl.argtypes import parse_timeout
    from capsulectl.fastargs import SUPPRESS, Declared

    if isinstance(p, Declared):
        suppress: object = SUPPRESS  # its value; fastargs does not import argparse
    else:
        import argparse  # loaded with the parser p; argparse compares SUPPRESS by identity

        suppress = argparse.SUPPRESS

    def d(value: object) -> object:
        return value if top else suppress

    g = p.add_argument_group("global options")
    g.add_argument(
        "--json",
        action="store_true",
        default=d(False),
        help="print the Varlink reply as JSON (one document per line for streams)",
    )
    g.add_argument(
        "--no-ask-password",
        action="store_true",
        default=d(False),
        help="never ask for a password; fail with exit status 5 instead",
    )
    g.add_argument(
        "--address",
        metavar="ADDRESS",
        default=d(None),
        help="capsuled's socket: unix:PATH or PATH (default: $CAPSULECTL_ADDRESS, "
        "else unix:/run/capsuled/org.capsuled.Manager)",
    )
    g.add_argument(
        "-H",
        "--host",
        metavar="[USER@]HOST",
        default=d(None),
        help="act on HOST's capsuled over ssh (runs: ssh -T [USER@]HOST capsulectl "
        "--bridge); HOST's user is the one the remote policy judges",
    )
    g.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=parse_timeout,
        default=d(90.0),
        help="how long to wait for each reply (default 90; 0 or infinity: forever)",
    )
    g.add_argument(
        "--no-legend",
        action="store_true",
        default=d(False),
        help="tables without header and footer",
    )


def terminal_columns() -> int:
    """What shutil.get_terminal_size() reports as columns: $COLUMNS, else the terminal on
    standard output, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]  # None: caught
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def help_formatter() -> type[argparse.HelpFormatter]:
    """The formatter class of every capsulectl parser (made here: argparse loads only when a
    parser is built, not for `--version`)."""
    import argparse

    class HelpFormatter(argparse.RawDescriptionHelpFormatter):
        """Wraps one-paragraph descriptions, keeps multi-line epilogs (exit status tables) as
        written.

        Wrapping happens only when help is printed, so textwrap stays off the start-up path.
        The width is given: argparse would import shutil for it (and shutil bz2 and lzma, ~3 ms)
        every time it makes a formatter, which add_argument does for every option it checks.
        """

        def __init__(self, prog: str) -> None:
            super().__init__(prog, width=terminal_columns() - 2)  # argparse's own margin

        def _fill_text(self, text: str, width: int, indent: str) -> str:
            if "\n" in text:
                return super()._fill_text(text, width, indent)
            return argparse.HelpFormatter._fill_text(self, text, width, indent)

    return HelpFormatter


GLOBAL_OPTIONS_WITH_VALUE = frozenset({"--address", "-H", "--host", "--timeout"})


# Options whose values may start with "-": journalctl's `--since -1h` must work here too.
DASH_VALUE_OPTIONS = frozenset({"--since", "-S"})


def attach_dash_values(arglist: Sequence[str]) -> list[str]:
    """Rewrite `--since -1h` as `--since=-1h`: argparse would take "-1h" for an option."""
    out: list[str] = []
    i = 0
    while i < len(arglist):
        arg = arglist[i]
        if arg == "--":
            out.extend(arglist[i:])
            break
        if arg in DASH_VALUE_OPTIONS and i + 1 < len(arglist) and arglist[i + 1].startswith("-"):
            out.append(f"--since={arglist[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def find_verb(arglist: Sequence[str], verbs: Sequence[Verb]) -> Verb | None:
    """The verb named on the command line: the first word that is not a global option."""
    by_name = {v.name: v for v in verbs}
    skip_value = False
    for arg in arglist:
        if skip_value:
            skip_value = False
        elif arg in GLOBAL_OPTIONS_WITH_VALUE:
            skip_value = True
        elif arg == "--":
            return None
        elif not arg.startswith("-"):
            return by_name.get(arg)
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line: global options, then one subcommand per verb (or only the one named).

    Building all 23 subparsers costs ~10 ms (argparse and textwrap work per option), a third of
    capsulectl's own start-up; a command line names one verb, so only that one is built. The
    full parser is built for --help without a verb and for unknown verbs (argparse's message
    then lists them all).
    """
    import argparse

    from capsulectl.transport import DEFAULT_ADDRESS
    from capsulectl.verbs import verb_table

    fmt = help_formatter()
    parser = argparse.ArgumentParser(
        prog="capsulectl",
        description="Manage the systemd capsules that capsuled's policy lets you manage.",
        epilog=MAIN_EPILOG.format(default=DEFAULT_ADDRESS),
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"capsulectl {__version__}")
    parser.add_argument(
        "--bridge",
        action="store_true",
        help="relay standard input/output to the local socket (what -H runs on the remote host)",
    )
    add_global_options(parser, True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    for verb in verb_table():
        if only is not None and verb.name != only:
            continue
        p = sub.add_parser(
            verb.name,
            help=verb.summary,
            description=verb.description,
            epilog=EXIT_STATUS_HELP,
            formatter_class=fmt,
        )
        verb.arguments(p)
        add_global_options(p, False)
        p.set_defaults(handler=verb.run)
    return parser


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Entry point of capsulectl (client/scripts/capsulectl runs it); returns the exit status."""
    arglist = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    err = err or sys.stderr
    if arglist == ["--version"]:  # the most common probe: answer before building the parser
        print(f"capsulectl {__version__}", file=out)
        return 0  # context.EXIT_OK, not imported for this
    from capsulectl import fastargs, output
    from capsulectl.context import ENV_ADDRESS, Context
    from capsulectl.verbs import verb_table

    arglist = attach_dash_values(arglist)
    args: argparse.Namespace | Namespace | None = fastargs.parse(
        arglist, verb_table(), add_global_options
    )
    verb = find_verb(arglist, verb_table()) if args is None else None
    if args is None and verb is None:
        # No verb lists (below): plain global options and `list` need no parser either.
        args = fastargs.parse([*arglist, "list"], verb_table(), add_global_options)
    if args is None:  # not a plain command line: argparse's (help, usage errors, conversions)
        args = build_parser(verb.name if verb is not None else None).parse_args(arglist)
    if args.bridge:
        from capsulectl.bridge import relay
        from capsulectl.transport import DEFAULT_ADDRESS

        return relay(args.address or os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS)
    if args.verb is None:
        args = fastargs.parse([*arglist, "list"], verb_table(), add_global_options)
        if args is None:
            args = build_parser("list").parse_args([*arglist, "list"])  # no verb lists
    style = output.Style(output.should_colour(out, os.environ), getattr(out, "encoding", None))
    ctx = Context(args=args, out=out, err=err, style=style)
    return run_verb(ctx)


def run_verb(ctx: Context) -> int:
    """Run the verb; turn every failure into one line on stderr and its exit status."""
    try:
        return int(ctx.args.handler(ctx))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # explain_failure() re-raises what it cannot name
        return explain_failure(ctx, exc)
    finally:
        ctx.close()


def explain_failure(ctx: Context, exc: Exception) -> int:
    """Print the line for a verb's failure and return its exit status; re-raise any other.

    The classes are imported here, once a verb has failed: a command that succeeds loads none of
    them (and no argparse: an ArgumentTypeError can only come from argparse once it is loaded).
    """
    from capsulectl.context import EXIT_BROKEN_PIPE, EXIT_USAGE, UsageError
    from capsulectl.failures import explain_client_error, explain_error
    from capsulectl.transport import ClientError
    from capsuled.varlink.errors import VarlinkError

    argparse_module = sys.modules.get("argparse")
    if isinstance(exc, UsageError) or (
        argparse_module is not None and isinstance(exc, argparse_module.ArgumentTypeError)
    ):
        ctx.error(f"capsulectl: {exc}")
        return EXIT_USAGE
    if isinstance(exc, VarlinkError):
        message, code = explain_error(exc, ctx.doing, asked=ctx.asked)
        ctx.error(message)
        return code
    if isinstance(exc, ClientError):
        message, code = explain_client_error(exc, host=ctx.args.host, timeout=ctx.args.timeout)
        ctx.error(message)
        return code
    if isinstance(exc, BrokenPipeError):
        # The reader went away (capsulectl list | head): stop quietly, as a SIGPIPE'd tool would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), ctx.out.fileno())
        return EXIT_BROKEN_PIPE
    raise exc


def exit_with(status: int) -> NoReturn:
    """End the process with status once the output is written: what the launcher
    (client/scripts/capsulectl) does with main()'s status.

    The interpreter's teardown (freeing every module and object, then the modules themselves)
    cost a `capsulectl list` 3-4 ms of its ~25 in the testbed (in-bed timing, median of 40),
    and a command that has written its output needs none of it: so the process ends with
    os._exit (a C tool's exit() frees nothing either). The teardown still runs whenever
    something may be waiting for it: an atexit callback (registered through the atexit
    module, so only once that is loaded: weakref.finalize, logging, coverage), or a thread
    besides this one.

    A reader that went away (`capsulectl list | head -0`) ends the command with status 141 and
    no message, as a tool killed by SIGPIPE and a verb that flushes its own output
    (explain_failure) already did; Python's own flush at exit said "Exception ignored" and
    exited 120. Any other failure to write is left to the interpreter, which reports it.
    """
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        import contextlib  # only here: no command that succeeds needs it

        from capsulectl.context import EXIT_BROKEN_PIPE

        # What is still buffered goes nowhere, not to a second failing flush at exit. (A stream
        # with no fd, a caller embedding the client, has nothing to redirect.)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = EXIT_BROKEN_PIPE
    except (OSError, ValueError):
        sys.exit(status)  # the interpreter's flush at exit fails again, and says why
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(status)
    registry = sys.modules.get("atexit")
    ncallbacks = getattr(registry, "_ncallbacks", None)
    threading = sys.modules.get("threading")
    if registry is not None and (ncallbacks is None or ncallbacks() != 0):
        sys.exit(status)
    if threading is not None and threading.active_count() > 1:
        sys.exit(status)
    os._exit(status)


if __name__ == "__main__":
    exit_with(main())
