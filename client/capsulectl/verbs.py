"""The verbs: one class per subcommand, holding its help, its arguments and what it does.

Adding a verb is adding one class here. A subclass of `Verb` that sets `name` registers itself;
`capsulectl --help` lists the verbs in the order they are declared below, and cli.build_parser()
builds each one's subparser from its `summary`, `description` and `arguments()`. `OnCapsules` and
`OnUnit` are the two shapes several verbs share (NAME... and NAME UNIT); they name no verb.

Verbs decide nothing: the helper authorizes and validates; a verb builds the call, prints the
reply (or, with --json, the reply itself) and returns an exit status. An error reply is raised
and becomes one line on stderr in cli.run_verb() (or, for verbs taking several capsules, in
for_each(), which then goes on with the next one).
"""

from __future__ import annotations

import os
import sys
from abc import abstractmethod  # loaded with io at start-up; only ABCMeta costs (see Verb)

from capsulectl import __version__, output
from capsulectl.argtypes import parse_count, parse_since, parse_size
from capsulectl.context import (
    EXIT_FAILURE,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    Context,
    UsageError,
    quote,
)

# Not typing's: a plain command (capsulectl/fastargs.py) loads neither typing nor argparse, ~5 ms
# and ~10 ms of its start-up (mypy treats the name as true all the same).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    # pathlib only where a verb takes a file (deploy, bundle): ~4 ms of every other command.
    from pathlib import Path
    from typing import ClassVar

    from capsulectl.client import Client
    from capsuled import wire
    from capsuled.wire import LogEntry

__all__ = ["OnCapsules", "OnUnit", "Verb", "verb_table"]

# The states in which `status` exits 0, as systemctl does for active and reloading units.
RUNNING_STATES = frozenset({"active", "reloading", "refreshing"})

_VERBS: list[Verb] = []  # in declaration order: the order of `capsulectl --help`


class Verb:
    """One subcommand: its help texts, its arguments and what it does, declared together.

    Not an abc.ABC: ABCMeta made building the verb classes, which every command does, ~1.7x as
    slow (running verbs.py: 0.50 -> 0.38 ms). The abstract methods are still marked, and a verb
    that leaves one undefined is refused when it is declared, as ABC refused to instantiate it.
    """

    name: ClassVar[str]  # the word on the command line
    summary: ClassVar[str]  # its line in `capsulectl --help`
    description: ClassVar[str]  # the paragraph of `capsulectl VERB --help`
    # The abstract methods of Verb and of the shapes below, for __init_subclass__ to check.
    _HOOKS: ClassVar[tuple[str, ...]] = ("arguments", "run", "act", "call")

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Only classes that name a verb register; the shared shapes (OnCapsules, OnUnit) do not.
        if "name" in cls.__dict__:
            missing = [
                hook
                for hook in cls._HOOKS
                if getattr(getattr(cls, hook, None), "__isabstractmethod__", False)
            ]
            if missing:
                raise TypeError(f"verb {cls.__name__} does not define {', '.join(missing)}")
            _VERBS.append(cls())

    @abstractmethod
    def arguments(self, p: argparse.ArgumentParser) -> None:
        """Add the verb's own arguments to its subparser (cli.py adds the global options)."""

    @abstractmethod
    def run(self, ctx: Context) -> int:
        """Do it and return the exit status; an error reply is raised."""


def verb_table() -> list[Verb]:
    """Every verb, in the order `capsulectl --help` lists them."""
    return list(_VERBS)


# --- what several verbs share -------------------------------------------------------------------


def capsule_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="capsule name")


def capsule_names(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="+", metavar="NAME", help="capsule name(s)")


def print_reply(ctx: Context, reply: object) -> None:
    """Mutating verbs are silent on success, like systemctl; --json prints the reply."""
    if ctx.json:
        ctx.print_json(reply)


def for_each(ctx: Context, names: Sequence[str], doing: str, act: Callable[[str], None]) -> int:
    """Run act(name) for each name; on an error reply print its line and go on; first error wins."""
    from capsuled.varlink.errors import VarlinkError

    status = EXIT_OK
    for name in names:
        ctx.doing = doing.format(name=quote(name))
        try:
            act(name)
        except VarlinkError as exc:
            from capsulectl.failures import explain_error  # the failure table: once one failed

            message, code = explain_error(exc, ctx.doing, asked=ctx.asked)
            ctx.error(message)
            status = status or code
    return status


class OnCapsules(Verb):
    """NAME...: acts on each capsule in turn; an error is reported and the next one is tried."""

    doing: ClassVar[str]  # what the error lines say we were doing, with {name}

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_names(p)

    @abstractmethod
    def act(self, ctx: Context, name: str) -> None:
        """Act on one capsule; an error reply is raised."""

    def run(self, ctx: Context) -> int:
        return for_each(ctx, ctx.args.names, self.doing, lambda name: self.act(ctx, name))


class OnUnit(Verb):
    """NAME UNIT: acts on one user unit inside a capsule; silent on success, like systemctl."""

    doing: ClassVar[str]  # what the error lines say we were doing, with {unit} and {name}
    description = "Acts on a user unit inside the running capsule and waits for systemd's job."

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_name(p)
        p.add_argument(
            "unit", metavar="UNIT", help="user unit inside the capsule, e.g. app.service"
        )

    @abstractmethod
    def call(self, client: Client, name: str, unit: str) -> object:
        """Make the call; return its reply."""

    def run(self, ctx: Context) -> int:
        a = ctx.args
        ctx.doing = self.doing.format(unit=quote(a.unit), name=quote(a.name))
        print_reply(ctx, self.call(ctx.client, a.name, a.unit))
        return EXIT_OK


# --- the verbs, in the order of `capsulectl --help` ---------------------------------------------


class List(Verb):
    name = "list"
    summary = "list the capsules you may see"
    description = "Lists the capsules you may read, with their state, owner and usage."

    def arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("-q", "--quiet", action="store_true", help="print only the names")

    def run(self, ctx: Context) -> int:
        ctx.doing = "list capsules"
        reply = ctx.client.list()
        if ctx.json:
            ctx.print_json(reply)
        elif ctx.args.quiet:
            ctx.print_lines(output.printable(c["name"]) for c in reply["capsules"])
        else:
            capsules = sorted(reply["capsules"], key=lambda c: c["name"])
            ctx.print_lines(output.capsule_table(capsules, legend=not ctx.args.no_legend))
        return EXIT_OK


class Status(Verb):
    name = "status"
    summary = "show a capsule's state, like systemctl status"
    description = (
        "Shows the state, owner, limits and usage of each capsule. Exits 3 if one is not running."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_names(p)

    def run(self, ctx: Context) -> int:
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

        status = for_each(ctx, ctx.args.names, "read capsule {name}", show)
        return status or (EXIT_NOT_RUNNING if not_running else EXIT_OK)


class Create(Verb):
    name = "create"
    summary = "create a capsule owned by you"
    description = (
        "Creates capsule@NAME: capsuled records you as its owner and has systemd create its home "
        "/var/lib/capsules/NAME. NAME is 1..29 characters of [A-Za-z0-9_-]."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_name(p)
        p.add_argument("--start", action="store_true", help="leave the capsule running")

    def run(self, ctx: Context) -> int:
        name = ctx.args.name
        ctx.doing = f"create capsule {quote(name)}"
        print_reply(ctx, ctx.client.create(name, start=True if ctx.args.start else None))
        return EXIT_OK


class Start(OnCapsules):
    name = "start"
    summary = "start capsules"
    description = "Starts capsule@NAME.service and waits for systemd's job."
    doing = "start capsule {name}"

    def act(self, ctx: Context, name: str) -> None:
        print_reply(ctx, ctx.client.start(name))


class Stop(OnCapsules):
    name = "stop"
    summary = "stop capsules"
    description = "Stops capsule@NAME.service and waits for systemd's job."
    doing = "stop capsule {name}"

    def act(self, ctx: Context, name: str) -> None:
        print_reply(ctx, ctx.client.stop(name))


class Restart(OnCapsules):
    name = "restart"
    summary = "restart capsules"
    description = "Restarts capsule@NAME.service and waits for systemd's job."
    doing = "restart capsule {name}"

    def act(self, ctx: Context, name: str) -> None:
        print_reply(ctx, ctx.client.restart(name))


class Remove(OnCapsules):
    name = "remove"
    summary = "stop, delete and forget capsules"
    description = (
        "Stops the capsule, deletes its data (unless --keep-data), its autostart link and limits, "
        "and forgets it."
    )
    doing = "remove capsule {name}"

    def arguments(self, p: argparse.ArgumentParser) -> None:
        super().arguments(p)
        p.add_argument(
            "--keep-data",
            action="store_true",
            help="keep /var/lib/capsules/NAME; only forget capsuled's record",
        )

    def act(self, ctx: Context, name: str) -> None:
        print_reply(ctx, ctx.client.remove(name, keep_data=True if ctx.args.keep_data else None))


class Enable(OnCapsules):
    name = "enable"
    summary = "start capsules at boot"
    description = "Makes the capsules start at boot."
    doing = "enable autostart of capsule {name}"

    def act(self, ctx: Context, name: str) -> None:
        print_reply(ctx, ctx.client.set_autostart(name, True))


class Disable(OnCapsules):
    name = "disable"
    summary = "do not start capsules at boot"
    description = "Stops the capsules from starting at boot (does not stop them now)."
    doing = "disable autostart of capsule {name}"

    def act(self, ctx: Context, name: str) -> None:
        print_reply(ctx, ctx.client.set_autostart(name, False))


class SetLimits(Verb):
    name = "set-limits"
    summary = "set memory, task and CPU limits"
    description = (
        "Sets persistent resource limits on capsule@NAME.service; limits not given are left "
        "alone, 'infinity' (or 'default') resets one."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_name(p)
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

    def run(self, ctx: Context) -> int:
        a = ctx.args
        if a.memory_max is None and a.tasks_max is None and a.cpu_weight is None:
            raise UsageError(
                "set-limits needs at least one of --memory-max, --tasks-max, --cpu-weight"
            )
        ctx.doing = f"set limits of capsule {quote(a.name)}"
        reply = ctx.client.set_limits(
            a.name, memory_max=a.memory_max, tasks_max=a.tasks_max, cpu_weight=a.cpu_weight
        )
        print_reply(ctx, reply)
        return EXIT_OK


class Units(Verb):
    name = "units"
    summary = "list the user units in a capsule"
    description = (
        "Lists the user units of a capsule: live states while it runs, its unit files while it "
        "is stopped."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_name(p)
        p.add_argument("-q", "--quiet", action="store_true", help="print only the unit names")

    def run(self, ctx: Context) -> int:
        ctx.doing = f"list the units of capsule {quote(ctx.args.name)}"
        reply = ctx.client.list_units(ctx.args.name)
        if ctx.json:
            ctx.print_json(reply)
        elif ctx.args.quiet:
            ctx.print_lines(output.printable(u["name"]) for u in reply["units"])
        else:
            units = sorted(reply["units"], key=lambda u: u["name"])
            ctx.print_lines(output.unit_table(units, legend=not ctx.args.no_legend))
        return EXIT_OK


def read_unit_file(path: str) -> str:
    """The text of the unit file at path ("-": standard input).

    Raises:
        OSError: it cannot be read.
        UsageError: it is not UTF-8.
    """
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


class InstallUnit(Verb):
    name = "install-unit"
    summary = "install a unit file into a capsule"
    description = (
        "Copies FILE into the capsule's ~/.config/systemd/user/ and reloads its manager; "
        "--enable makes it start with the capsule, --now starts it."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_name(p)
        p.add_argument("file", metavar="FILE", help="the unit file, or - for standard input")
        p.add_argument(
            "--name",
            dest="unit_name",
            metavar="UNIT",
            help="the unit's name (default: FILE's base name; required with -)",
        )
        p.add_argument("--enable", action="store_true", help="start it with the capsule")
        p.add_argument("--now", action="store_true", help="start it now (capsule must run)")

    def run(self, ctx: Context) -> int:
        a = ctx.args
        unit = a.unit_name or (None if a.file == "-" else os.path.basename(a.file))
        if not unit:
            raise UsageError("install-unit: reading from standard input needs --name UNIT")
        try:
            content = read_unit_file(a.file)
        except OSError as exc:
            ctx.error(f"cannot read {a.file}: {exc.strerror or exc}")
            return EXIT_FAILURE
        ctx.doing = f"install unit {quote(unit)} in capsule {quote(a.name)}"
        reply = ctx.client.install_unit(
            a.name, unit, content, enable=True if a.enable else None, start=True if a.now else None
        )
        print_reply(ctx, reply)
        return EXIT_OK


class RemoveUnit(OnUnit):
    name = "remove-unit"
    summary = "stop, disable and delete a unit"
    description = "Stops, disables and deletes a unit of the capsule."
    doing = "remove unit {unit} in capsule {name}"

    def call(self, client: Client, name: str, unit: str) -> object:
        return client.remove_unit(name, unit)


class StartUnit(OnUnit):
    name = "start-unit"
    summary = "start a unit in a capsule"
    doing = "start unit {unit} in capsule {name}"

    def call(self, client: Client, name: str, unit: str) -> object:
        return client.start_unit(name, unit)


class StopUnit(OnUnit):
    name = "stop-unit"
    summary = "stop a unit in a capsule"
    doing = "stop unit {unit} in capsule {name}"

    def call(self, client: Client, name: str, unit: str) -> object:
        return client.stop_unit(name, unit)


class RestartUnit(OnUnit):
    name = "restart-unit"
    summary = "restart a unit in a capsule"
    doing = "restart unit {unit} in capsule {name}"

    def call(self, client: Client, name: str, unit: str) -> object:
        return client.restart_unit(name, unit)


class EnableUnit(OnUnit):
    name = "enable-unit"
    summary = "make a unit start with its capsule"
    description = "Makes the unit wanted by capsule@.target, so it starts with the capsule."
    doing = "enable unit {unit} in capsule {name}"

    def call(self, client: Client, name: str, unit: str) -> object:
        return client.enable_unit(name, unit)


class DisableUnit(OnUnit):
    name = "disable-unit"
    summary = "undo enable-unit"
    description = "Stops the unit from starting with the capsule (does not stop it now)."
    doing = "disable unit {unit} in capsule {name}"

    def call(self, client: Client, name: str, unit: str) -> object:
        return client.disable_unit(name, unit)


def run_interactively(
    ctx: Context,
    name: str,
    command: Sequence[str],
    *,
    pty: bool,
    environment: Sequence[str] = (),
    unit: str | None = None,
    working_directory: str | None = None,
    remote: Sequence[str],
    quiet: bool = False,
) -> int:
    """Run `command` with the caller's stdio (capsulectl.interactive), waiting for its exit
    status. Over -H no fd can cross ssh: capsulectl itself runs on the remote host instead,
    through `ssh -t` for a pty (`ssh -T` for pipes, which must stay binary-safe), given the
    `remote` command line; ssh exits with its exit status."""
    if ctx.args.host is not None:
        return exec_remote(ctx, remote, tty=pty)
    from capsulectl import interactive

    def started(reply: wire.RunReply) -> None:
        if not quiet:
            ctx.error(f"Running as unit: {output.printable(reply['unit'])}")

    run = interactive.run_with_pty if pty else interactive.run_with_pipes
    return run(
        ctx.client,
        name,
        command,
        environment=list(environment),
        unit=unit,
        working_directory=working_directory,
        started=started,
    )


def exec_remote(ctx: Context, remote: Sequence[str], *, tty: bool) -> int:
    """Become `ssh -t|-T HOST capsulectl REMOTE...` ($CAPSULECTL_SSH for ssh, as -H uses)."""
    import shlex

    host = ctx.args.host
    if not host or host.startswith("-"):
        raise UsageError(f"invalid host {host!r}")
    ssh = shlex.split(os.environ.get("CAPSULECTL_SSH", "ssh"))
    options: list[str] = []
    if ctx.args.address is not None:
        options += ["--address", ctx.args.address]
    if ctx.args.no_ask_password:
        options.append("--no-ask-password")
    # ssh joins the remote command with spaces for the remote shell: quote every word.
    words = [shlex.quote(w) for w in ["capsulectl", *options, *remote]]
    ctx.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(ssh[0], [*ssh, "-t" if tty else "-T", "--", host, *words])


class Run(Verb):
    name = "run"
    summary = "run a command in a capsule (like systemd-run --capsule)"
    description = (
        "Runs CMD as a transient service inside the running capsule. Put -- before CMD when it "
        "has options: capsulectl run web --wait -- /bin/sh -c 'exit 3'. With --wait, exits with "
        "the command's exit status. --pipe gives CMD this command's stdin, stdout and stderr "
        "(capsulectl run web --pipe -- /bin/tar c . > backup.tar); --pty gives it a fresh "
        "terminal relayed to this one. Both wait and exit with CMD's exit status."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_name(p)
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
        stdio = p.add_mutually_exclusive_group()
        stdio.add_argument(
            "-P",
            "--pipe",
            action="store_true",
            help="give CMD this command's stdin, stdout and stderr (implies --wait)",
        )
        stdio.add_argument(
            "-t",
            "--pty",
            action="store_true",
            help="give CMD a fresh terminal relayed to this one (implies --wait)",
        )
        p.add_argument(
            "command",
            nargs="+",
            metavar="CMD",
            help="the command line; CMD must be an absolute path",
        )

    def run(self, ctx: Context) -> int:
        a = ctx.args
        ctx.doing = f"run commands in capsule {quote(a.name)}"
        unit, env, cwd = a.unit, a.setenv, a.working_directory
        if a.pipe or a.pty:
            remote = ["run", a.name, "--pty" if a.pty else "--pipe"]
            remote += ["--unit", unit] if unit is not None else []
            remote += [f"--setenv={e}" for e in env or []]
            remote += ["--working-directory", cwd] if cwd is not None else []
            environment = list(env or [])
            if a.pty and not any(e.startswith("TERM=") for e in environment):
                environment.append(f"TERM={terminal_type()}")
            return run_interactively(
                ctx,
                a.name,
                a.command,
                pty=a.pty,
                environment=environment,
                unit=unit,
                working_directory=cwd,
                remote=[*remote, "--", *a.command],
                quiet=a.pty or ctx.json,
            )
        if not a.wait:
            reply = ctx.client.run(
                a.name, a.command, unit=unit, environment=env, working_directory=cwd
            )
            if ctx.json:
                ctx.print_json(reply)
            else:
                ctx.error(f"Running as unit: {output.printable(reply['unit'])}")
            return EXIT_OK
        final = None
        replies = ctx.client.run_and_wait(
            a.name, a.command, unit=unit, environment=env, working_directory=cwd
        )
        for reply in replies:
            if ctx.json:
                ctx.print_json(reply)
            elif final is None:
                unit_shown = output.printable(reply["unit"])
                ctx.error(f"Running as unit: {unit_shown}; waiting for it to finish...")
            final = reply
        if final is None:  # the generator yields the final reply or raises
            return EXIT_FAILURE
        status, result = final["exitStatus"], final["result"]
        if not ctx.json:
            ctx.error(f"Finished with result: {output.printable(result or 'unknown')}")
            if status is not None:
                ctx.error(f"Main process exited with status {status}")
        if status is not None:
            return status if 0 <= status <= 255 else EXIT_FAILURE
        return EXIT_OK if result == "success" else EXIT_FAILURE


def terminal_type() -> str:
    """$TERM for a command on a pty relayed to ours: ours, as systemd-run passes it on."""
    return os.environ.get("TERM") or "vt220"


# Where systemd puts a capsule's home and runtime directory (capsule@.service's Environment=).
CAPSULE_HOME = "/var/lib/capsules/{name}"
CAPSULE_RUNTIME_DIR = "/run/capsules/{name}"
# A login shell: bash where there is one (the capsule's user has no shell of its own: a
# DynamicUser= account's is nologin), else sh; a CMD that is not a path is looked up by it.
LOGIN_SHELL = "if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l"
LOGIN_EXEC = 'exec "$0" "$@"'


def capsule_environment(name: str, *, term: str | None) -> list[str]:
    env = [
        f"HOME={CAPSULE_HOME.format(name=name)}",
        f"XDG_RUNTIME_DIR={CAPSULE_RUNTIME_DIR.format(name=name)}",
    ]
    return [*env, f"TERM={term}"] if term is not None else env


def after_separator(words: Sequence[str]) -> list[str]:
    """A REMAINDER argument without the "--" that may lead it (argparse keeps it there)."""
    return list(words[1:] if words and words[0] == "--" else words)


class Shell(Verb):
    name = "shell"
    summary = "an interactive login shell (or CMD) in a capsule, as its user"
    description = (
        "Like machinectl shell: starts a login shell as the capsule's user (bash if the capsule "
        "has one, else sh) on a fresh terminal relayed to this one, with the capsule's HOME, "
        "XDG_RUNTIME_DIR and this terminal's TERM, and exits with its exit status. With CMD, "
        "runs CMD ARG... instead (looked up in PATH unless it is a path)."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        import argparse  # for REMAINDER: such a verb is argparse's whole (fastargs.py)

        capsule_name(p)
        p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="command and args")

    def run(self, ctx: Context) -> int:
        a = ctx.args
        ctx.doing = f"run commands in capsule {quote(a.name)}"
        command = after_separator(a.command)
        if not command:
            argv = ["/bin/sh", "-c", LOGIN_SHELL]
        elif command[0].startswith("/"):
            argv = command
        else:
            argv = ["/bin/sh", "-lc", LOGIN_EXEC, *command]
        return run_interactively(
            ctx,
            a.name,
            argv,
            pty=True,
            environment=capsule_environment(a.name, term=terminal_type()),
            remote=["shell", a.name, "--", *command],
            quiet=True,
        )


SYSTEMCTL = "/usr/bin/systemctl"


class Systemctl(Verb):
    name = "systemctl"
    summary = "systemctl --user inside a capsule: every systemctl verb"
    description = (
        "Runs systemctl --user ARG... inside the capsule as its user, on a terminal relayed to "
        "this one when stdout is a terminal, else with this command's stdin, stdout and stderr, "
        "and exits with its exit status. Put -- before ARGs that are options: capsulectl "
        "systemctl web -- list-units --all. (systemctl --capsule=NAME needs root.)"
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        import argparse  # for REMAINDER: such a verb is argparse's whole (fastargs.py)

        capsule_name(p)
        p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG", help="systemctl arguments")

    def run(self, ctx: Context) -> int:
        a = ctx.args
        ctx.doing = f"run commands in capsule {quote(a.name)}"
        args = after_separator(a.args)
        pty = os.isatty(1)
        return run_interactively(
            ctx,
            a.name,
            [SYSTEMCTL, "--user", *args],
            pty=pty,
            environment=capsule_environment(a.name, term=terminal_type() if pty else None),
            remote=["systemctl", a.name, "--", *args],
            quiet=True,
        )


class Deploy(Verb):
    name = "deploy"
    summary = "deploy a signed bundle into a capsule"
    description = (
        "Deploys the signed bundle FILE (see: capsulectl bundle) into the capsule, all or "
        "nothing: its units and files are put in place, the capsule's manager reloaded and the "
        "bundle's enabled units (re)started; if one fails, the capsule is put back as it was. "
        "The version replaced is kept for rollback."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_name(p)
        p.add_argument("file", metavar="FILE", help="the signed bundle file")
        p.add_argument(
            "--allow-downgrade",
            action="store_true",
            help="deploy even if FILE's version is lower than the deployed one",
        )

    def run(self, ctx: Context) -> int:
        from pathlib import Path

        from capsulectl.bundles import BundleToolError, read_bundle

        a = ctx.args
        try:
            data = read_bundle(Path(a.file))
        except BundleToolError as exc:
            ctx.error(f"capsulectl: {exc}")
            return EXIT_FAILURE
        ctx.doing = f"deploy {a.file} into capsule {quote(a.name)}"
        downgrade = True if a.allow_downgrade else None
        print_reply(ctx, ctx.client.deploy(a.name, data, allow_downgrade=downgrade))
        return EXIT_OK


class Rollback(Verb):
    name = "rollback"
    summary = "return a capsule to its previous bundle version"
    description = (
        "Puts the bundle version the last deploy replaced back in place, in the same "
        "all-or-nothing way; the version rolled back from is kept in its place."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_name(p)

    def run(self, ctx: Context) -> int:
        ctx.doing = f"roll back capsule {quote(ctx.args.name)}"
        print_reply(ctx, ctx.client.rollback(ctx.args.name))
        return EXIT_OK


class Audit(Verb):
    name = "audit"
    summary = "list the audit trail's records about a capsule"
    description = (
        "Lists, oldest first, the records capsuled's audit trail (/var/log/capsuled/) holds "
        "about the capsule: every change by anybody, allowed or refused, with the caller's "
        "uid, pid and unit. Needs read access to the capsule."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_name(p)
        p.add_argument(
            "-n",
            "--lines",
            metavar="N",
            type=int,
            help="the N newest records (capsuled's default: 100)",
        )

    def run(self, ctx: Context) -> int:
        ctx.doing = f"read the audit records of capsule {quote(ctx.args.name)}"
        reply = ctx.client.audit(ctx.args.name, lines=ctx.args.lines)
        if ctx.json:
            ctx.print_json(reply)
        else:
            ctx.print_lines(output.audit_table(reply["records"], legend=not ctx.args.no_legend))
        return EXIT_OK


class Bundle(Verb):
    name = "bundle"
    summary = "make, sign and check deploy bundles (offline)"
    description = (
        "Works on bundle files without capsuled. keygen KEY: a new Ed25519 key in KEY (mode "
        "0600) and KEY.pub (install it as /etc/capsuled/trusted-keys.d/SIGNER.pub). build DIR "
        "-o FILE: an unsigned bundle of DIR (bundle.toml with name, version, enable; units/; "
        "files/). sign FILE --key KEY: adds or replaces FILE's signature. verify FILE --pubkey "
        "PUB: exits 0 if capsuled would accept FILE signed by PUB, else 1 with the reason."
    )
    ACTIONS: ClassVar[dict[str, str]] = {
        "keygen": "KEY",
        "build": "DIR",
        "sign": "FILE",
        "verify": "FILE",
    }

    def arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "action",
            metavar="ACTION",
            choices=list(self.ACTIONS),
            help="keygen, build, sign or verify",
        )
        p.add_argument("path", metavar="PATH", help="KEY, DIR or FILE, as the action needs")
        p.add_argument("-o", "--output", metavar="FILE", help="build: the bundle file to write")
        p.add_argument("--key", metavar="KEY", help="sign: the private key")
        p.add_argument("--pubkey", metavar="PUB", help="verify: the public key to trust")

    def run(self, ctx: Context) -> int:
        from pathlib import Path

        from capsulectl.bundles import BundleToolError

        a = ctx.args
        needs = {"build": "output", "sign": "key", "verify": "pubkey"}
        for action, option in (("build", "output"), ("sign", "key"), ("verify", "pubkey")):
            given = getattr(a, option) is not None
            flag = "-o" if option == "output" else f"--{option}"
            if a.action == action and not given:
                raise UsageError(f"bundle {action} needs {flag}")
            if given and needs.get(a.action) != option:
                raise UsageError(f"{flag} is for bundle {action} only")
        try:
            return self._act(ctx, a.action, Path(a.path))
        except BundleToolError as exc:
            ctx.error(f"capsulectl bundle {a.action}: {exc}")
            return EXIT_FAILURE

    def _act(self, ctx: Context, action: str, path: Path) -> int:
        from pathlib import Path

        from capsulectl import bundles

        a = ctx.args
        if action == "keygen":
            key_id = bundles.keygen(path)
            ctx.print(f"{path}: new Ed25519 key, key id {key_id}; public key in {path}.pub")
        elif action == "build":
            bundles.write_file(Path(a.output), bundles.build(path))
        elif action == "sign":
            key_id = bundles.sign_file(path, Path(a.key))
            ctx.print(f"{path}: signed with key id {key_id}")
        else:
            parsed = bundles.verify_file(path, Path(a.pubkey))
            units, files = len(parsed.units), len(parsed.files)
            ctx.print(
                f"{path}: OK: {parsed.name} {parsed.version}, {units} unit(s), {files} file(s), "
                f"enables {', '.join(parsed.enable) or 'nothing'}"
            )
        return EXIT_OK


class Logs(Verb):
    name = "logs"
    summary = "show a capsule's journal"
    description = (
        "Shows the capsule's journal entries, oldest first: what journalctl -u "
        "capsule@NAME.service shows, or with -u UNIT the output of that user unit and its "
        "manager's messages about it. Entries are chosen by fields journald records itself or "
        "only trusted senders set, never by CAPSULE=, which any process can send."
    )

    def arguments(self, p: argparse.ArgumentParser) -> None:
        capsule_name(p)
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

    def run(self, ctx: Context) -> int:
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


class Watch(Verb):
    name = "watch"
    summary = "print capsule state changes as they happen"
    description = "Prints state changes of capsules and of their units until interrupted."

    def arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "names", nargs="*", metavar="NAME", help="capsules to watch (default: all you may read)"
        )

    def run(self, ctx: Context) -> int:
        names = ctx.args.names
        ctx.doing = (
            "watch capsules" if not names else "watch capsule " + ", ".join(map(quote, names))
        )
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


class CanI(Verb):
    name = "can-i"
    summary = "ask what the policy would decide for you"
    # The engine answers yes, no or auth_admin: polkit's challenge does not say which kind of
    # authentication it wants, so an auth_self rule also reads auth_admin (policy/engine.py).
    description = (
        "Prints the policy's answer (yes, no or auth_admin) and why, without doing anything. "
        "Exits 0 only for yes: auth_admin exits 1 too (the action would need a password)."
    )

    # Verbs people say, mapped to the policy action (and its verb detail) that guards them.
    SHORTCUTS: ClassVar[dict[str, tuple[str, str | None]]] = {
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
        "audit": ("read", None),
        "rollback": ("deploy", "rollback"),
    }

    def arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "action",
            metavar="ACTION",
            help="a policy action (read, create, remove, manage, manage-units, run, "
            "set-limits, deploy, or org.capsuled.*), or a verb: start, stop, restart, "
            "enable, disable, status, logs, audit, rollback",
        )
        capsule_name(p)
        p.add_argument(
            "--verb",
            dest="policy_verb",
            metavar="VERB",
            help="for manage: start, stop, restart, autostart; for deploy: deploy, downgrade, "
            "rollback",
        )
        p.add_argument("--unit", metavar="UNIT", help="for manage-units: the unit")
        p.add_argument(
            "--signer", metavar="SIGNER", help="for deploy: the signer (a trusted key's name)"
        )

    def run(self, ctx: Context) -> int:
        a = ctx.args
        action, verb = self.SHORTCUTS.get(a.action, (a.action, None))
        verb = a.policy_verb or verb
        ctx.doing = f"ask about capsule {quote(a.name)}"
        reply = ctx.client.check_access(a.name, action, verb=verb, unit=a.unit, signer=a.signer)
        if ctx.json:
            ctx.print_json(reply)
        else:
            ctx.print(output.access_line(reply["access"]))
        return EXIT_OK if reply["access"]["result"] == "yes" else EXIT_FAILURE


class Info(Verb):
    name = "info"
    summary = "show capsuled's version, systemd's, and the policy backend"
    description = "Describes the helper capsulectl reaches, and who it thinks you are."

    def arguments(self, p: argparse.ArgumentParser) -> None:
        """None but the global options."""

    def run(self, ctx: Context) -> int:
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
