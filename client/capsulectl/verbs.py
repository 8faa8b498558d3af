"""The verbs: one function per subcommand mapping it to Client calls and output, and the table
that names them, their help and their arguments.

Verbs decide nothing: the helper authorizes and validates; a verb builds the call, prints the
reply (or, with --json, the reply itself) and returns an exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TextIO

from capsulectl import __version__, output
from capsulectl.argtypes import parse_count, parse_since, parse_size
from capsulectl.failures import (
    EXIT_FAILURE,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    explain_error,
    quote,
)

if TYPE_CHECKING:
    from capsulectl.agent import TtyAgent
    from capsulectl.client import Client
    from capsulectl.wire import LogEntry

__all__ = ["ENV_ADDRESS", "Context", "UsageError", "Verb", "verb_table"]

ENV_ADDRESS = "CAPSULECTL_ADDRESS"

# The states in which `status` exits 0, as systemctl does for active and reloading units.
RUNNING_STATES = frozenset({"active", "reloading", "refreshing"})


class UsageError(Exception):
    """A command line that makes no sense beyond what argparse can check."""


class Context:
    """What a verb needs: parsed options, output streams, and a lazily opened Client."""

    # A plain class, not a dataclass: importing dataclasses costs ~8 ms of start-up (inspect).
    def __init__(
        self, args: argparse.Namespace, out: TextIO, err: TextIO, style: output.Style
    ) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.style = style
        self.doing = "use capsuled"  # for error lines: "you may not <doing>"
        self._client: Client | None = None
        self._agent: TtyAgent | None = None

    @property
    def asked(self) -> bool:
        """Whether calls may be repeated allowing interactive authentication."""
        return not self.args.no_ask_password

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    @property
    def address(self) -> str:
        from capsulectl.transport import DEFAULT_ADDRESS

        return self.args.address or os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS

    @property
    def client(self) -> Client:
        if self._client is None:
            from capsulectl.client import Client

            explicit = self.args.address or os.environ.get(ENV_ADDRESS)
            self._client = Client(
                explicit if self.args.host is None else self.args.address,
                host=self.args.host,
                timeout=self.args.timeout,
                interactive=not self.args.no_ask_password,
                on_interactive=self._start_agent if self.args.host is None else None,
            )
        return self._client

    def _start_agent(self) -> None:
        from capsulectl.agent import TtyAgent

        if self._agent is None:
            self._agent = TtyAgent()
            self._agent.start()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._agent is not None:
            self._agent.stop()

    def print(self, line: str = "") -> None:
        print(line, file=self.out)

    def print_lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            print(line, file=self.out)

    def print_json(self, value: object) -> None:
        print(output.dump_json(value), file=self.out, flush=True)

    def error(self, message: str) -> None:
        print(message, file=self.err, flush=True)


def _for_each(ctx: Context, names: Sequence[str], doing: str, act: Callable[[str], None]) -> int:
    """Run act(name) for each name; on an error reply print its line and go on; first error wins."""
    from capsuled.varlink.errors import VarlinkError

    status = EXIT_OK
    for name in names:
        ctx.doing = doing.format(name=quote(name))
        try:
            act(name)
        except VarlinkError as exc:
            message, code = explain_error(exc, ctx.doing, asked=ctx.asked)
            ctx.error(message)
            status = status or code
    return status


def verb_list(ctx: Context) -> int:
    ctx.doing = "list capsules"
    reply = ctx.client.list()
    if ctx.json:
        ctx.print_json(reply)
    elif ctx.args.quiet:
        ctx.print_lines(c["name"] for c in reply["capsules"])
    else:
        capsules = sorted(reply["capsules"], key=lambda c: c["name"])
        ctx.print_lines(output.capsule_table(capsules, legend=not ctx.args.no_legend))
    return EXIT_OK


def verb_status(ctx: Context) -> int:
    not_running = False
    shown = 0

    def show(name: str) -> None:
        nonlocal not_running, shown
        reply = ctx.client.describe(name)
        capsule = reply["capsule"]
        if ctx.json:
            ctx.print_json(reply)
        else:
            if shown:
                ctx.print()
            ctx.print_lines(output.status_view(capsule, ctx.style, output.now_usec()))
        shown += 1
        not_running = not_running or capsule["state"] not in RUNNING_STATES

    status = _for_each(ctx, ctx.args.names, "read capsule {name}", show)
    return status or (EXIT_NOT_RUNNING if not_running else EXIT_OK)


def _print_reply(ctx: Context, reply: object) -> None:
    """Mutating verbs are silent on success, like systemctl; --json prints the reply."""
    if ctx.json:
        ctx.print_json(reply)


def verb_create(ctx: Context) -> int:
    name = ctx.args.name
    ctx.doing = f"create capsule {quote(name)}"
    _print_reply(ctx, ctx.client.create(name, start=True if ctx.args.start else None))
    return EXIT_OK


def _lifecycle(verb: str) -> Callable[[Context], int]:
    def run(ctx: Context) -> int:
        def act(name: str) -> None:
            c = ctx.client
            method = {"start": c.start, "stop": c.stop, "restart": c.restart}[verb]
            _print_reply(ctx, method(name))

        return _for_each(ctx, ctx.args.names, verb + " capsule {name}", act)

    return run


def _autostart(enabled: bool) -> Callable[[Context], int]:
    def run(ctx: Context) -> int:
        def act(name: str) -> None:
            _print_reply(ctx, ctx.client.set_autostart(name, enabled))

        doing = ("enable" if enabled else "disable") + " autostart of capsule {name}"
        return _for_each(ctx, ctx.args.names, doing, act)

    return run


def verb_remove(ctx: Context) -> int:
    def act(name: str) -> None:
        _print_reply(ctx, ctx.client.remove(name, keep_data=True if ctx.args.keep_data else None))

    return _for_each(ctx, ctx.args.names, "remove capsule {name}", act)


def verb_set_limits(ctx: Context) -> int:
    a = ctx.args
    if a.memory_max is None and a.tasks_max is None and a.cpu_weight is None:
        raise UsageError("set-limits needs at least one of --memory-max, --tasks-max, --cpu-weight")
    ctx.doing = f"set limits of capsule {quote(a.name)}"
    reply = ctx.client.set_limits(
        a.name, memory_max=a.memory_max, tasks_max=a.tasks_max, cpu_weight=a.cpu_weight
    )
    _print_reply(ctx, reply)
    return EXIT_OK


def verb_units(ctx: Context) -> int:
    ctx.doing = f"list the units of capsule {quote(ctx.args.name)}"
    reply = ctx.client.list_units(ctx.args.name)
    if ctx.json:
        ctx.print_json(reply)
    elif ctx.args.quiet:
        ctx.print_lines(u["name"] for u in reply["units"])
    else:
        units = sorted(reply["units"], key=lambda u: u["name"])
        ctx.print_lines(output.unit_table(units, legend=not ctx.args.no_legend))
    return EXIT_OK


def _read_unit_file(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


def verb_install_unit(ctx: Context) -> int:
    a = ctx.args
    unit = a.unit_name or (None if a.file == "-" else os.path.basename(a.file))
    if not unit:
        raise UsageError("install-unit: reading from standard input needs --name UNIT")
    try:
        content = _read_unit_file(a.file)
    except OSError as exc:
        ctx.error(f"cannot read {a.file}: {exc.strerror or exc}")
        return EXIT_FAILURE
    ctx.doing = f"install unit {quote(unit)} in capsule {quote(a.name)}"
    reply = ctx.client.install_unit(
        a.name, unit, content, enable=True if a.enable else None, start=True if a.now else None
    )
    _print_reply(ctx, reply)
    return EXIT_OK


def _unit_verb(verb: str) -> Callable[[Context], int]:
    def run(ctx: Context) -> int:
        a = ctx.args
        ctx.doing = f"{verb} unit {quote(a.unit)} in capsule {quote(a.name)}"
        c = ctx.client
        method: Callable[[str, str], object] = {
            "remove": c.remove_unit,
            "start": c.start_unit,
            "stop": c.stop_unit,
            "restart": c.restart_unit,
            "enable": c.enable_unit,
            "disable": c.disable_unit,
        }[verb]
        _print_reply(ctx, method(a.name, a.unit))
        return EXIT_OK

    return run


def verb_run(ctx: Context) -> int:
    a = ctx.args
    ctx.doing = f"run commands in capsule {quote(a.name)}"
    unit, env, cwd = a.unit, a.setenv, a.working_directory
    if not a.wait:
        reply = ctx.client.run(a.name, a.command, unit=unit, environment=env, working_directory=cwd)
        if ctx.json:
            ctx.print_json(reply)
        else:
            ctx.error(f"Running as unit: {reply['unit']}")
        return EXIT_OK
    final = None
    replies = ctx.client.run_and_wait(
        a.name, a.command, unit=unit, environment=env, working_directory=cwd
    )
    for reply in replies:
        if ctx.json:
            ctx.print_json(reply)
        elif final is None:
            ctx.error(f"Running as unit: {reply['unit']}; waiting for it to finish...")
        final = reply
    if final is None:  # the generator yields the final reply or raises
        return EXIT_FAILURE
    status, result = final["exitStatus"], final["result"]
    if not ctx.json:
        ctx.error(f"Finished with result: {result or 'unknown'}")
        if status is not None:
            ctx.error(f"Main process exited with status {status}")
    if status is not None:
        return status if 0 <= status <= 255 else EXIT_FAILURE
    return EXIT_OK if result == "success" else EXIT_FAILURE


def verb_logs(ctx: Context) -> int:
    a = ctx.args
    ctx.doing = f"read the logs of capsule {quote(a.name)}"
    since = parse_since(a.since, output.now_usec()) if a.since is not None else None

    def show(entries: Sequence[LogEntry]) -> None:
        for entry in entries:
            ctx.print(output.log_line(entry, ctx.style))

    if not a.follow:
        reply = ctx.client.logs(a.name, unit=a.unit, lines=a.lines, since=since)
        if ctx.json:
            ctx.print_json(reply)
        else:
            show(reply["entries"])
        return EXIT_OK
    try:
        for reply in ctx.client.follow_logs(a.name, unit=a.unit, lines=a.lines, since=since):
            if ctx.json:
                ctx.print_json(reply)
            else:
                show(reply["entries"])
                ctx.out.flush()
    except KeyboardInterrupt:
        pass  # ^C is how one stops following (journalctl -f exits 0 too)
    return EXIT_OK


def verb_watch(ctx: Context) -> int:
    names = ctx.args.names
    ctx.doing = "watch capsules" if not names else "watch capsule " + ", ".join(map(quote, names))
    try:
        for reply in ctx.client.watch(names or None):
            if ctx.json:
                ctx.print_json(reply)
            else:
                ctx.print(output.event_line(reply["event"], ctx.style))
                ctx.out.flush()
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# Verbs people say, mapped to the policy action (and its verb detail) that guards them.
CAN_I_SHORTCUTS: dict[str, tuple[str, str | None]] = {
    "start": ("manage", "start"),
    "stop": ("manage", "stop"),
    "restart": ("manage", "restart"),
    "enable": ("manage", "autostart"),
    "disable": ("manage", "autostart"),
    "autostart": ("manage", "autostart"),
    "status": ("read", None),
    "list": ("read", None),
    "logs": ("read", None),
    "units": ("read", None),
}


def verb_can_i(ctx: Context) -> int:
    a = ctx.args
    action, verb = CAN_I_SHORTCUTS.get(a.action, (a.action, None))
    verb = a.policy_verb or verb
    ctx.doing = f"ask about capsule {quote(a.name)}"
    reply = ctx.client.check_access(a.name, action, verb=verb, unit=a.unit)
    if ctx.json:
        ctx.print_json(reply)
    else:
        ctx.print(output.access_line(reply["access"]))
    return EXIT_OK if reply["access"]["result"] == "yes" else EXIT_FAILURE


def verb_info(ctx: Context) -> int:
    from capsuled.varlink.errors import VarlinkError

    ctx.doing = "ask capsuled about itself"
    info = ctx.client.info()
    if ctx.json:
        ctx.print_json(info)
        return EXIT_OK
    try:
        service = ctx.client.get_info()
    except VarlinkError:
        service = None  # GetInfo is optional decoration here
    remote = ctx.args.host is not None
    lines = output.info_lines(
        info,
        service,
        address=f"ssh:{ctx.args.host}" if remote else ctx.address,
        client_version=__version__,
        user_name=None if remote else output.user_name(info["callerUid"]),
    )
    ctx.print_lines(lines)
    return EXIT_OK


def _name_args(p: argparse.ArgumentParser, many: bool) -> None:
    if many:
        p.add_argument("names", nargs="+", metavar="NAME", help="capsule name(s)")
    else:
        p.add_argument("name", metavar="NAME", help="capsule name")


class Verb(NamedTuple):
    """One subcommand: its handler, one-line summary, --help description and argument setup."""

    name: str
    handler: Callable[[Context], int]
    summary: str
    description: str
    setup: Callable[[argparse.ArgumentParser], None]


def _unit_setup(p: argparse.ArgumentParser) -> None:
    _name_args(p, many=False)
    p.add_argument("unit", metavar="UNIT", help="user unit inside the capsule, e.g. app.service")


def verb_table() -> list[Verb]:
    def names(p: argparse.ArgumentParser) -> None:
        _name_args(p, many=True)

    def name(p: argparse.ArgumentParser) -> None:
        _name_args(p, many=False)

    def list_setup(p: argparse.ArgumentParser) -> None:
        p.add_argument("-q", "--quiet", action="store_true", help="print only the names")

    def create_setup(p: argparse.ArgumentParser) -> None:
        name(p)
        p.add_argument("--start", action="store_true", help="leave the capsule running")

    def remove_setup(p: argparse.ArgumentParser) -> None:
        names(p)
        p.add_argument(
            "--keep-data",
            action="store_true",
            help="keep /var/lib/capsules/NAME; only forget capsuled's record",
        )

    def limits_setup(p: argparse.ArgumentParser) -> None:
        name(p)
        p.add_argument(
            "--memory-max",
            metavar="BYTES",
            type=parse_size,
            help="MemoryMax=, e.g. 512M, 2G (1024-based), or infinity",
        )
        p.add_argument("--tasks-max", metavar="N", type=parse_count, help="TasksMax=, or infinity")
        p.add_argument(
            "--cpu-weight", metavar="N", type=parse_count, help="CPUWeight= (1..10000), or default"
        )

    def units_setup(p: argparse.ArgumentParser) -> None:
        name(p)
        p.add_argument("-q", "--quiet", action="store_true", help="print only the unit names")

    def install_setup(p: argparse.ArgumentParser) -> None:
        name(p)
        p.add_argument("file", metavar="FILE", help="the unit file, or - for standard input")
        p.add_argument(
            "--name",
            dest="unit_name",
            metavar="UNIT",
            help="the unit's name (default: FILE's base name; required with -)",
        )
        p.add_argument("--enable", action="store_true", help="start it with the capsule")
        p.add_argument("--now", action="store_true", help="start it now (capsule must run)")

    def run_setup(p: argparse.ArgumentParser) -> None:
        name(p)
        p.add_argument(
            "-u",
            "--unit",
            metavar="UNIT",
            help="name of the transient service (default: run-uRANDOM.service)",
        )
        p.add_argument(
            "-E",
            "--setenv",
            metavar="NAME=VALUE",
            action="append",
            help="set an environment variable (repeatable; never logged)",
        )
        p.add_argument(
            "--working-directory",
            metavar="DIR",
            help="absolute working directory (default: the capsule's home)",
        )
        p.add_argument(
            "-W",
            "--wait",
            action="store_true",
            help="wait for the command and exit with its exit status",
        )
        p.add_argument(
            "command",
            nargs="+",
            metavar="CMD",
            help="the command line; CMD must be an absolute path",
        )

    def logs_setup(p: argparse.ArgumentParser) -> None:
        name(p)
        p.add_argument("-u", "--unit", metavar="UNIT", help="only this user unit's entries")
        p.add_argument(
            "-n",
            "--lines",
            metavar="N",
            type=int,
            help="the N newest entries (capsuled's default: 100)",
        )
        p.add_argument(
            "-f",
            "--follow",
            action="store_true",
            help="keep printing new entries until interrupted",
        )
        p.add_argument(
            "-S",
            "--since",
            metavar="TIME",
            help="entries since TIME: '2026-11-25 12:00', today, -1h, '5min ago'",
        )

    def watch_setup(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "names", nargs="*", metavar="NAME", help="capsules to watch (default: all you may read)"
        )

    def can_i_setup(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "action",
            metavar="ACTION",
            help="a policy action (read, create, remove, manage, manage-units, run, "
            "set-limits, or org.capsuled.*), or a verb: start, stop, restart, "
            "enable, disable, status, logs",
        )
        name(p)
        p.add_argument(
            "--verb",
            dest="policy_verb",
            metavar="VERB",
            help="for manage: start, stop, restart, autostart",
        )
        p.add_argument("--unit", metavar="UNIT", help="for manage-units: the unit")

    def nothing(p: argparse.ArgumentParser) -> None:
        pass

    unit_verb_help = "Acts on a user unit inside the running capsule and waits for systemd's job."
    return [
        Verb(
            "list",
            verb_list,
            "list the capsules you may see",
            "Lists the capsules you may read, with their state, owner and usage.",
            list_setup,
        ),
        Verb(
            "status",
            verb_status,
            "show a capsule's state, like systemctl status",
            "Shows the state, owner, limits and usage of each capsule. Exits 3 if one is not "
            "running.",
            names,
        ),
        Verb(
            "create",
            verb_create,
            "create a capsule owned by you",
            "Creates capsule@NAME: capsuled records you as its owner and has systemd create "
            "its home /var/lib/capsules/NAME. NAME is 1..29 characters of [A-Za-z0-9_-].",
            create_setup,
        ),
        Verb(
            "start",
            _lifecycle("start"),
            "start capsules",
            "Starts capsule@NAME.service and waits for systemd's job.",
            names,
        ),
        Verb(
            "stop",
            _lifecycle("stop"),
            "stop capsules",
            "Stops capsule@NAME.service and waits for systemd's job.",
            names,
        ),
        Verb(
            "restart",
            _lifecycle("restart"),
            "restart capsules",
            "Restarts capsule@NAME.service and waits for systemd's job.",
            names,
        ),
        Verb(
            "remove",
            verb_remove,
            "stop, delete and forget capsules",
            "Stops the capsule, deletes its data (unless --keep-data), its autostart link and "
            "limits, and forgets it.",
            remove_setup,
        ),
        Verb(
            "enable",
            _autostart(True),
            "start capsules at boot",
            "Makes the capsules start at boot.",
            names,
        ),
        Verb(
            "disable",
            _autostart(False),
            "do not start capsules at boot",
            "Stops the capsules from starting at boot (does not stop them now).",
            names,
        ),
        Verb(
            "set-limits",
            verb_set_limits,
            "set memory, task and CPU limits",
            "Sets persistent resource limits on capsule@NAME.service; limits not given are "
            "left alone, 'infinity' (or 'default') resets one.",
            limits_setup,
        ),
        Verb(
            "units",
            verb_units,
            "list the user units in a capsule",
            "Lists the user units of a capsule: live states while it runs, its unit files "
            "while it is stopped.",
            units_setup,
        ),
        Verb(
            "install-unit",
            verb_install_unit,
            "install a unit file into a capsule",
            "Copies FILE into the capsule's ~/.config/systemd/user/ and reloads its manager; "
            "--enable makes it start with the capsule, --now starts it.",
            install_setup,
        ),
        Verb(
            "remove-unit",
            _unit_verb("remove"),
            "stop, disable and delete a unit",
            "Stops, disables and deletes a unit of the capsule.",
            _unit_setup,
        ),
        Verb(
            "start-unit",
            _unit_verb("start"),
            "start a unit in a capsule",
            unit_verb_help,
            _unit_setup,
        ),
        Verb(
            "stop-unit", _unit_verb("stop"), "stop a unit in a capsule", unit_verb_help, _unit_setup
        ),
        Verb(
            "restart-unit",
            _unit_verb("restart"),
            "restart a unit in a capsule",
            unit_verb_help,
            _unit_setup,
        ),
        Verb(
            "enable-unit",
            _unit_verb("enable"),
            "make a unit start with its capsule",
            "Makes the unit wanted by capsule@.target, so it starts with the capsule.",
            _unit_setup,
        ),
        Verb(
            "disable-unit",
            _unit_verb("disable"),
            "undo enable-unit",
            "Stops the unit from starting with the capsule (does not stop it now).",
            _unit_setup,
        ),
        Verb(
            "run",
            verb_run,
            "run a command in a capsule (like systemd-run --capsule)",
            "Runs CMD as a transient service inside the running capsule. Put -- before CMD "
            "when it has options: capsulectl run web --wait -- /bin/sh -c 'exit 3'. "
            "With --wait, exits with the command's exit status.",
            run_setup,
        ),
        Verb(
            "logs",
            verb_logs,
            "show a capsule's journal",
            "Shows journal entries of the capsule (CAPSULE=NAME), or of one unit in it, "
            "oldest first.",
            logs_setup,
        ),
        Verb(
            "watch",
            verb_watch,
            "print capsule state changes as they happen",
            "Prints state changes of capsules and of their units until interrupted.",
            watch_setup,
        ),
        Verb(
            "can-i",
            verb_can_i,
            "ask what the policy would decide for you",
            "Prints the policy's answer (yes, no, auth_admin, auth_self) and why, without "
            "doing anything. Exits 0 only for yes: auth_admin/auth_self exit 1 too (the "
            "action would need a password).",
            can_i_setup,
        ),
        Verb(
            "info",
            verb_info,
            "show capsuled's version, systemd's, and the policy backend",
            "Describes the helper capsulectl reaches, and who it thinks you are.",
            nothing,
        ),
    ]
