"""`capsulectl`: the command line. Verbs, options and exit codes; no policy (the helper decides).

Start-up stays cheap: only argparse and the standard library's small modules load before a verb
runs; the protocol core loads when the first call is made, and nothing here imports asyncio,
jeepney, the `varlink` package or systemd (tests/unit/test_cli_imports.py checks it in a fresh
interpreter).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TextIO

from capsulectl import __version__, output

if TYPE_CHECKING:
    from capsulectl.agent import TtyAgent
    from capsulectl.client import Client
    from capsulectl.wire import LogEntry
    from capsuled.varlink.errors import VarlinkError

__all__ = ["EXIT_FAILURE", "EXIT_NOT_RUNNING", "EXIT_NO_SUCH", "EXIT_PERMISSION", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # argparse's, and LSB's "invalid or excess argument(s)"
EXIT_NOT_RUNNING = 3  # LSB/systemctl status: "program is not running"
EXIT_NO_SUCH = 4  # systemctl: "no such unit"
EXIT_PERMISSION = 5
EXIT_BROKEN_PIPE = 141  # what a C tool killed by SIGPIPE reports through the shell

ENV_ADDRESS = "CAPSULECTL_ADDRESS"

# The states in which `status` exits 0, as systemctl does for active and reloading units.
RUNNING_STATES = frozenset({"active", "reloading", "refreshing"})

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


# --- errors -> one line + exit status -----------------------------------------------------------


def _q(value: object) -> str:
    return f"'{value}'"


def explain_error(exc: VarlinkError, doing: str, *, asked: bool = False) -> tuple[str, int]:
    """The one line for stderr and the exit status for an error reply of capsuled.

    `asked`: the call was already repeated allowing interactive authentication.
    """
    from capsuled import errors as e
    from capsuled.varlink import errors as ve

    p = exc.parameters
    name = _q(p.get("name", "?"))
    unit = _q(p.get("unit", "?"))
    if isinstance(exc, e.NoSuchCapsule):
        return f"capsule {name} does not exist", EXIT_NO_SUCH
    if isinstance(exc, e.NoSuchUnit):
        return (
            f"capsule {name} has no unit {unit} (see: capsulectl units {p.get('name')})",
            EXIT_NO_SUCH,
        )
    if isinstance(exc, ve.PermissionDenied):
        return (
            f"you may not {doing} (ask an administrator to add you to a rule, see capsuled(8))",
            EXIT_PERMISSION,
        )
    if isinstance(exc, e.InteractiveAuthenticationRequired):
        hint = (
            "no polkit agent answered: run one (see capsulectl --help) or ask an administrator"
            if asked
            else "run without --no-ask-password so a polkit agent can ask"
        )
        return (
            f"you may not {doing} without authenticating as an administrator ({hint})",
            EXIT_PERMISSION,
        )
    if isinstance(exc, e.CapsuleNotRunning):
        return (
            f"capsule {name} is not running (start it first: capsulectl start {p.get('name')})",
            EXIT_NOT_RUNNING,
        )
    if isinstance(exc, e.CapsuleRunning):
        return (
            f"capsule {name} is running (stop it first: capsulectl stop {p.get('name')})",
            EXIT_FAILURE,
        )
    if isinstance(exc, e.CapsuleExists):
        return f"capsule {name} already exists", EXIT_FAILURE
    if isinstance(exc, e.InvalidName):
        return f"{name} is not a valid capsule name: {p.get('reason')}", EXIT_USAGE
    if isinstance(exc, e.InvalidUnit):
        where = f" (line {p['line']})" if p.get("line") is not None else ""
        return f"unit {unit} is not acceptable: {p.get('reason')}{where}", EXIT_USAGE
    if isinstance(exc, e.InvalidValue):
        return f"invalid {p.get('parameter')}: {p.get('reason')}", EXIT_USAGE
    if isinstance(exc, ve.InvalidParameter):
        return f"capsuled refused parameter {_q(p.get('parameter'))} to {doing}", EXIT_USAGE
    if isinstance(exc, e.QuotaExceeded):
        return (
            f"cannot {doing}: your quota allows {p.get('limit')} for {p.get('what')} "
            "(ask an administrator to raise it, see capsuled(8))",
            EXIT_FAILURE,
        )
    if isinstance(exc, e.JobFailed):
        detail = p.get("result")
        if p.get("unitResult"):
            detail = f"{detail}, {p.get('unitResult')}"
        return f"failed to {doing} ({detail}); see: capsulectl logs", EXIT_FAILURE
    if isinstance(exc, e.SystemdTooOld):
        return (
            f"systemd {p.get('version')} is too old for capsules (they need systemd 256 or newer)",
            EXIT_FAILURE,
        )
    if isinstance(exc, e.SystemdUnavailable):
        return "capsuled cannot reach systemd (see: journalctl -u capsuled)", EXIT_FAILURE
    if isinstance(exc, e.UnsafeCapsuleHome):
        return (
            f"refused to {doing}: {p.get('path')} in the capsule's home is unsafe "
            f"({p.get('reason')}); nothing was changed",
            EXIT_FAILURE,
        )
    if isinstance(exc, e.InternalError):
        return (
            f"capsuled failed to {doing} (an internal error; see: journalctl -u capsuled)",
            EXIT_FAILURE,
        )
    if isinstance(exc, ve.MethodNotFound | ve.MethodNotImplemented | ve.InterfaceNotFound):
        return (
            f"this capsuled cannot {doing} ({exc.name}: is it older than capsulectl?)",
            EXIT_FAILURE,
        )
    return f"failed to {doing}: {exc.name}", EXIT_FAILURE


def explain_client_error(exc: Exception, ctx: Context) -> tuple[str, int]:
    """The one line and exit status when capsuled could not be reached or answered nothing."""
    import errno

    from capsulectl import transport as t

    where = f" on {ctx.args.host}" if ctx.args.host else ""
    if isinstance(exc, t.InvalidAddress):
        return f"capsulectl: {exc}", EXIT_USAGE
    if isinstance(exc, t.NotRunning):
        return f"capsuled is not running{where}: is capsuled.socket enabled?", EXIT_FAILURE
    if isinstance(exc, t.ConnectFailed) and exc.errno in (errno.EACCES, errno.EPERM):
        return f"{exc} (permission denied on the socket)", EXIT_PERMISSION
    if isinstance(exc, t.Timeout):
        return (
            f"capsuled{where} did not answer within {ctx.args.timeout}s (see --timeout)",
            EXIT_FAILURE,
        )
    return str(exc), EXIT_FAILURE


# --- argument types -----------------------------------------------------------------------------

_SIZE_RE = r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)B?"  # compiled (and cached by re) on first use
_SIZE_FACTORS = {
    "": 1,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
    "P": 1024**5,
    "E": 1024**6,
}
_RESET_WORDS = frozenset({"infinity", "default"})  # -1 on the wire: back to systemd's default


def parse_size(text: str) -> int:
    """MemoryMax= syntax: bytes with an optional 1024-based K/M/G/T/P/E suffix, or infinity (-1)."""
    if text.strip().lower() in _RESET_WORDS:
        return -1
    m = re.fullmatch(_SIZE_RE, text.strip(), re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 512M, 2G, infinity)")
    number, suffix = m.groups()
    whole, _, frac = number.partition(".")
    factor = _SIZE_FACTORS[suffix.upper()]
    # Exact integer arithmetic: 1.5G must be 1610612736, not a float rounding of it.
    value = int(whole) * factor + (int(frac) * factor // 10 ** len(frac) if frac else 0)
    return value


def parse_count(text: str) -> int:
    """A non-negative integer, or infinity/default (-1)."""
    if text.strip().lower() in _RESET_WORDS:
        return -1
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative (use infinity to reset)")
    return value


def parse_timeout(text: str) -> float | None:
    """Seconds (a decimal), or 0/infinity for no timeout."""
    if text.strip().lower() == "infinity":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}")
    return None if value == 0 else value


_REL_RE = r"-?\s*(\d+)\s*(s|sec|m|min|h|d|w)\w*(\s+ago)?"
_REL_USEC = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now_usec: int) -> int:
    """journalctl-like --since: "2026-11-25 12:00", today, yesterday, -1h, "5min ago", @EPOCH."""
    import datetime

    t = text.strip()
    if t.startswith("@"):
        try:
            return int(float(t[1:]) * 1_000_000)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid time {text!r}") from None
    if t in ("now",):
        return now_usec
    if t in ("today", "yesterday"):
        day = datetime.datetime.fromtimestamp(now_usec / 1e6).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        if t == "yesterday":
            day -= datetime.timedelta(days=1)
        return int(day.timestamp() * 1_000_000)
    m = re.fullmatch(_REL_RE, t, re.IGNORECASE)
    if m is not None and (t.startswith("-") or m.group(3)):
        unit = m.group(2).lower()
        seconds = int(m.group(1)) * _REL_USEC.get(unit, _REL_USEC.get(unit[:1], 1))
        return now_usec - seconds * 1_000_000
    try:
        return int(datetime.datetime.fromisoformat(t).timestamp() * 1_000_000)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r} (e.g. '2026-11-25 12:00', today, -1h, '5min ago')"
        ) from None


# --- verbs --------------------------------------------------------------------------------------


def _for_each(ctx: Context, names: Sequence[str], doing: str, act: Callable[[str], None]) -> int:
    """Run act(name) for each name; on an error reply print its line and go on; first error wins."""
    from capsuled.varlink.errors import VarlinkError

    status = EXIT_OK
    for name in names:
        ctx.doing = doing.format(name=_q(name))
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
    ctx.doing = f"create capsule {_q(name)}"
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
    ctx.doing = f"set limits of capsule {_q(a.name)}"
    reply = ctx.client.set_limits(
        a.name, memory_max=a.memory_max, tasks_max=a.tasks_max, cpu_weight=a.cpu_weight
    )
    _print_reply(ctx, reply)
    return EXIT_OK


def verb_units(ctx: Context) -> int:
    ctx.doing = f"list the units of capsule {_q(ctx.args.name)}"
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
    ctx.doing = f"install unit {_q(unit)} in capsule {_q(a.name)}"
    reply = ctx.client.install_unit(
        a.name, unit, content, enable=True if a.enable else None, start=True if a.now else None
    )
    _print_reply(ctx, reply)
    return EXIT_OK


def _unit_verb(verb: str) -> Callable[[Context], int]:
    def run(ctx: Context) -> int:
        a = ctx.args
        ctx.doing = f"{verb} unit {_q(a.unit)} in capsule {_q(a.name)}"
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
    ctx.doing = f"run commands in capsule {_q(a.name)}"
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
    ctx.doing = f"read the logs of capsule {_q(a.name)}"
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
    ctx.doing = "watch capsules" if not names else "watch capsule " + ", ".join(map(_q, names))
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
    ctx.doing = f"ask about capsule {_q(a.name)}"
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


# --- the parser ---------------------------------------------------------------------------------


def _add_global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """Global options, accepted before and after the verb (systemctl takes them anywhere).

    On subparsers every default is SUPPRESS, so an option not given after the verb does not
    overwrite the one given before it.
    """

    def d(value: object) -> object:
        return value if top else argparse.SUPPRESS

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


def _verbs() -> list[Verb]:
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps one-paragraph descriptions, keeps multi-line epilogs (exit status tables) as written.

    Wrapping happens only when help is printed, so textwrap stays off the start-up path.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


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
    from capsulectl.transport import DEFAULT_ADDRESS

    fmt = HelpFormatter
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
    _add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    for verb in _verbs():
        if only is not None and verb.name != only:
            continue
        p = sub.add_parser(
            verb.name,
            help=verb.summary,
            description=verb.description,
            epilog=EXIT_STATUS_HELP,
            formatter_class=fmt,
        )
        verb.setup(p)
        _add_global_options(p, top=False)
        p.set_defaults(handler=verb.handler)
    return parser


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Entry point of the capsulectl console script; returns the exit status."""
    arglist = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    err = err or sys.stderr
    if arglist == ["--version"]:  # the most common probe: answer before building the parser
        print(f"capsulectl {__version__}", file=out)
        return EXIT_OK
    arglist = attach_dash_values(arglist)
    verb = find_verb(arglist, _verbs())
    parser = build_parser(verb.name if verb is not None else None)
    args = parser.parse_args(arglist)
    if args.bridge:
        from capsulectl.bridge import relay
        from capsulectl.transport import DEFAULT_ADDRESS

        return relay(args.address or os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS)
    if args.verb is None:
        parser = build_parser("list")
        args = parser.parse_args([*arglist, "list"])  # like systemctl: no verb lists
    style = output.Style(output.should_colour(out, os.environ), getattr(out, "encoding", None))
    ctx = Context(args=args, out=out, err=err, style=style)
    return run_verb(ctx, parser)


def run_verb(ctx: Context, parser: argparse.ArgumentParser) -> int:
    """Run the verb; turn every failure into one line on stderr and its exit status."""
    from capsulectl.transport import ClientError
    from capsuled.varlink.errors import VarlinkError

    try:
        return int(ctx.args.handler(ctx))
    except UsageError as exc:
        ctx.error(f"capsulectl: {exc}")
        return EXIT_USAGE
    except argparse.ArgumentTypeError as exc:
        ctx.error(f"capsulectl: {exc}")
        return EXIT_USAGE
    except VarlinkError as exc:
        message, code = explain_error(exc, ctx.doing, asked=ctx.asked)
        ctx.error(message)
        return code
    except ClientError as exc:
        message, code = explain_client_error(exc, ctx)
        ctx.error(message)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (capsulectl list | head): stop quietly, as a SIGPIPE'd tool would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), ctx.out.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
