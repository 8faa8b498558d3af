"""The daemon's life cycle: socket activation, readiness, idle exit, and wiring objects together.

Socket activation is parsed here rather than through sd_listen_fds so every branch is testable with
systemd-socket-activate: LISTEN_PID must be ours, the fd named `varlink` (FileDescriptorName=) is
taken, else the only fd; SO_ACCEPTCONN tells a listening socket from an already connected one
(Accept=yes, `varlinkctl exec:`), which is served as one connection until it closes. LISTEN_* is
always removed from os.environ so no child inherits it (sd_listen_fds(unset_environment=1)).

With a listening socket the daemon exits after `idle_exit_s` without any connection, like systemd's
own bus-activated helpers (30 s, DEFAULT_EXIT_USEC); systemd keeps the socket and starts us again
on the next connection.

SIGHUP re-reads the policy (PolicyReloader), as Type=notify-reload expects (the handler is in
place before READY=1, which systemd >= 260 checks): RELOADING=1 with
MONOTONIC_USEC, the swap, then READY=1 (sd_notify(3)), so `systemctl reload` returns once the new
policy is in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from capsuled import __version__, errors
from capsuled.transport import Account, Handle, Limits, Listener, Server, ServerErrors
from capsuled.varlink.interface import Interface, parse_interface
from capsuled.varlink.service import ServiceInfo

if TYPE_CHECKING:
    from capsuled.audit import AuditLog
    from capsuled.dbus import SystemBus
    from capsuled.methods.context import Services
    from capsuled.peer import Peer
    from capsuled.policy.authorizer import Authorizer
    from capsuled.records import RecordStore
    from capsuled.transport import NotifyFn
    from capsuled.varlink.messages import Call

__all__ = [
    "DEFAULT_IDLE_EXIT_S",
    "ActivationError",
    "Options",
    "PolicyReloader",
    "Wiring",
    "build_wiring",
    "listen_fds",
    "load_interface",
    "run",
    "sd_notify",
    "service_info",
    "unsafe_import_paths",
]

log = logging.getLogger("capsuled.daemon")

IDL_RESOURCE = "org.capsuled.Manager.varlink"
DEFAULT_IDLE_EXIT_S = 30.0
# On SIGTERM running calls get this long to finish (below systemd's TimeoutStopSec=90s).
DEFAULT_SHUTDOWN_GRACE_S = 10.0
SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES")
PROJECT_URL = "https://github.com/capsuled/capsuled"


class ActivationError(Exception):
    """The socket-activation environment or the passed fd is unusable."""


@dataclass(frozen=True, slots=True)
class Options:
    """What `capsuled serve` was asked to do."""

    listen: str | None = None  # development: bind this path (mode 0666) instead of activation
    idle_exit_s: float | None = None  # None: DEFAULT_IDLE_EXIT_S if activated, never with listen
    limits: Limits = field(default_factory=Limits)
    validate_replies: bool = False
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    config_dir: Path | None = None  # None: policy.DEFAULT_CONFIG_DIR (/etc/capsuled)


def load_interface() -> Interface:
    """The org.capsuled.Manager IDL shipped inside the package."""
    # Beside this file, not through importlib.resources (which imports zipfile and tempfile at
    # every start): the package is always installed as files (wheel, Debian package, checkout).
    text = (Path(__file__).parent / IDL_RESOURCE).read_text(encoding="utf-8")
    return parse_interface(text)


def service_info() -> ServiceInfo:
    """What org.varlink.service.GetInfo reports."""
    return ServiceInfo(vendor="capsuled", product="capsuled", version=__version__, url=PROJECT_URL)


@dataclass(frozen=True, slots=True)
class Wiring:
    """What `capsuled serve` runs: the per-call handler (a Dispatcher's), the errors the transport
    answers by itself, the reloader holding the Services (SIGHUP), the one system bus
    connection PID 1's backend and polkit share (closed when serving ends), whom a peer's
    connections count against, and the methods anybody may stream from unauthorized."""

    handle: Handle
    errors: ServerErrors
    reloader: PolicyReloader | None = None
    system_bus: SystemBus | None = None
    account: Account | None = None  # None: every peer counts against its own uid
    open_streams: frozenset[str] = frozenset()
    takes_fds: Mapping[str, int] = field(default_factory=dict)  # method -> fds it takes
    # Its refusal summaries are written while serving and at exit, and its trail gets a
    # signed checkpoint when serving ends.
    audit: AuditLog | None = None


# The interface's own errors for what the transport answers itself (the core knows no interface).
MANAGER_ERRORS: Final = ServerErrors(
    internal=errors.InternalError, busy=errors.Busy, fds_refused=errors.fds_refused
)
# How often refusal summaries whose window ended are written when no call triggers it
# (audit.REFUSAL_WINDOW_S is the window; a summary is at most this late).
REFUSAL_FLUSH_S: Final = 10.0


def unsafe_import_paths(
    paths: Sequence[str] | None = None,
    stat_path: Callable[[str], os.stat_result] = os.stat,
    realpath: Callable[[str], str] = os.path.realpath,
) -> list[str]:
    """The sys.path entries (default: this process's) that someone other than root could
    change: the entry, or a directory above it, not owned by root, or writable by its group or
    others (a sticky directory above is fine: nobody renames root's entry out of it); for a
    missing entry, the directory that would hold it. An entry reached through a symbolic link
    is judged along both paths: the one named (whoever may replace the link) and the one the
    link leads to (whoever may replace a directory above the target, e.g. a venv in a home).

    Run as root, capsuled imports some modules on first use (methods.Deferred, the key
    parser): one found in such a place would run as root. It would be as bad at start, so
    this is checked, not worked around: build_wiring logs each one (an installation problem,
    e.g. a PYTHONPATH pointing into a home, which the unit never sets)."""
    unsafe: list[str] = []
    for entry in sys.path if paths is None else paths:
        if not entry:
            unsafe.append(entry)  # the current directory
            continue
        named = os.path.abspath(entry)
        if _changeable_by_others(named, stat_path) or _changeable_by_others(
            realpath(named), stat_path
        ):
            unsafe.append(entry)
    return unsafe


def _changeable_by_others(path: str, stat_path: Callable[[str], os.stat_result]) -> bool:
    """Whether `path` (absolute), or a directory above it, is someone else's than root's."""
    # True for the entry and, if it is missing, for the directory it would be created in:
    # there a sticky bit does not help (anyone who may write it may create the entry).
    own = True
    while True:
        try:
            st = stat_path(path)
        except OSError:
            # Missing: it imports nothing until someone creates it, so its parent decides.
            if path == "/":
                return False
            path = os.path.dirname(path)
            continue
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = not own and st.st_mode & stat.S_ISVTX
        if st.st_uid != 0 or (writable and not sticky):
            return True
        if path == "/":
            return False
        path, own = os.path.dirname(path), False


def build_wiring(options: Options) -> Wiring:
    """Wiring: the one place that builds the services, the Dispatcher and the policy reloader."""
    if os.geteuid() == 0:
        for entry in unsafe_import_paths():
            log.error(
                "sys.path entry %r can be changed by a user other than root: code imported "
                "from it runs as root (check PYTHONPATH and the installation)",
                entry,
            )
    # Imported here so `capsuled --version`/`install` do not pay for jeepney and policy.
    from capsuled import methods
    from capsuled.audit import AuditLog
    from capsuled.dbus import SystemBus
    from capsuled.methods.context import Services
    from capsuled.policy.authorizer import DEFAULT_CONFIG_DIR, Authorizer
    from capsuled.records import RecordStore
    from capsuled.sdjournal import SdJournal
    from capsuled.systemd.backend import DBusSystemdBackend
    from capsuled.trail import Trail

    config_dir = DEFAULT_CONFIG_DIR if options.config_dir is None else options.config_dir
    info = service_info()
    # Opened on first use: a call that needs neither PID 1 nor polkit never touches the bus.
    system_bus = SystemBus()
    records = RecordStore()
    audit = AuditLog(trail=Trail())
    services = Services(
        backend=DBusSystemdBackend(system_bus),
        journal=SdJournal(),
        authorizer=Authorizer.from_config(config_dir, system_bus=system_bus),
        records=records,
        audit=audit,
        version=info.version,
    )
    interface = load_interface()
    dispatcher = methods.build_dispatcher(
        interface, services, info, validate_replies=options.validate_replies
    )
    return Wiring(
        handle=dispatcher.handle,
        errors=MANAGER_ERRORS,
        reloader=PolicyReloader(
            services, lambda: Authorizer.from_config(config_dir, system_bus=system_bus)
        ),
        system_bus=system_bus,
        account=capsule_owner_account(records),
        open_streams=frozenset(f"{interface.name}.{m}" for m in methods.OPEN_STREAMS),
        takes_fds={f"{interface.name}.{m}": n for m, n in methods.TAKES_FDS.items()},
        audit=services.audit,
    )


def capsule_owner_account(
    records: RecordStore, user_name: Callable[[int], str | None] | None = None
) -> Account:
    """Whom a peer's connections, calls and streams count against (transport's `account`):
    its uid, but a capsule's dynamic uid counts against the capsule's owner, so that every
    capsule one owns is not another share of the limits (issue 11, finding 8). A capsule
    without an owner record (made by root outside capsuled) counts as its own uid.

    The dynamic uid's name (c-NAME) comes from NSS (nss-systemd asks PID 1, which handed it
    out): systemd 257 also kept /run/systemd/dynamic-uid/direct:UID links, 262 no longer does.
    Asked only for uids in the dynamic range. `user_name` is for tests."""
    from capsuled.names import CAPSULE_USER_PREFIX, is_valid_capsule_name
    from capsuled.policy.identity import user_name as nss_user_name
    from capsuled.records import CorruptRecord
    from capsuled.safefs import DYNAMIC_UID_MAX, DYNAMIC_UID_MIN

    name_of = nss_user_name if user_name is None else user_name

    def account(uid: int) -> int:
        if not DYNAMIC_UID_MIN <= uid <= DYNAMIC_UID_MAX:
            return uid
        user = name_of(uid)
        if user is None or not user.startswith(CAPSULE_USER_PREFIX):
            return uid
        name = user.removeprefix(CAPSULE_USER_PREFIX)
        if not is_valid_capsule_name(name):
            return uid
        try:
            record = records.get(name)
        except (CorruptRecord, OSError):
            return uid
        return record.owner if record is not None else uid

    return account


@dataclass(slots=True)
class _Generation:
    """The calls that started while one authorizer was current."""

    calls: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class PolicyReloader:
    """SIGHUP: load the policy again and swap it into the Services every handler reads.

    A configuration that is refused gives deny-all for non-root, exactly as at start-up, never
    "keep the old one" (which is what most daemons do on a failed reload): the administrator may
    be editing the policy to take a grant away, and the old policy cannot come back anyway the
    next time socket activation starts us. So the answer never depends on whether the daemon
    happened to be running when the file was broken.

    The swap is one attribute assignment on the event loop, so every check starting after it
    uses the new policy. A check already awaiting the old authorizer (a polkit round trip) keeps
    it: the old one is closed only when every call that started before the swap has ended.
    """

    def __init__(self, services: Services, load: Callable[[], Authorizer]) -> None:
        self._services = services
        self._load = load
        self._current = _Generation()
        self._closing: set[asyncio.Task[None]] = set()

    def track(self, handle: Handle) -> Handle:
        """Wrap the transport's per-call handler so calls are counted against their policy."""

        async def counted(call: Call, peer: Peer, notify: NotifyFn) -> dict[str, object]:
            generation = self._current
            generation.calls += 1
            try:
                return await handle(call, peer, notify)
            finally:
                generation.calls -= 1
                if generation.calls == 0:
                    generation.idle.set()

        return counted

    def reload(self, status: str) -> None:
        """Reload now; `status` is the STATUS= to report again once serving with the new policy."""
        # sd_notify(3): RELOADING=1 must carry CLOCK_MONOTONIC so systemd (>= 253) can tell this
        # reload from an earlier one; READY=1 ends it and `systemctl reload` returns.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=Reloading the policy")
        new = self._load()  # logs why, and is deny-all for non-root, if the config is refused
        old, retired = self._services.authorizer, self._current
        self._services.authorizer, self._current = new, _Generation()
        # Streams authorized under the old policy check their grant again now (finding 2).
        self._services.grants.reloaded()
        log.info(
            "policy reloaded: backend %s%s",
            new.backend_name,
            ", configuration refused: denying every non-root request"
            if new.config.deny_all
            else "",
        )
        task = asyncio.create_task(self._retire(old, retired), name="capsuled-policy-retire")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        sd_notify(f"READY=1\nSTATUS={status}")

    async def _retire(self, old: Authorizer, generation: _Generation) -> None:
        if generation.calls > 0:
            await generation.idle.wait()
        await old.aclose()

    async def aclose(self) -> None:
        """Wait for retired authorizers to close (after the server stopped: no call holds one)."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[tuple[int, str]]:
    """Return the (fd, name) pairs passed to us by socket activation, clearing LISTEN_*.

    Raises:
        ActivationError: LISTEN_FDS is not a number.
    """
    env = os.environ if environ is None else environ
    values = {key: env.pop(key, None) for key in _LISTEN_VARS}
    pid, count = values["LISTEN_PID"], values["LISTEN_FDS"]
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []  # meant for another process (e.g. our parent); sd_listen_fds ignores it too
        n = int(count)
    except ValueError as exc:
        raise ActivationError(f"invalid LISTEN_PID/LISTEN_FDS: {exc}") from None
    if n < 0:
        raise ActivationError("invalid LISTEN_FDS")
    names = (values["LISTEN_FDNAMES"] or "").split(":")
    if len(names) != n:
        names = ["unknown"] * n  # systemd's default name when none (or a wrong count) is given
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))
    for fd in fds:
        os.set_inheritable(fd, False)  # nothing we spawn may inherit the listening socket
    return list(zip(fds, names, strict=True))


def pick_fd(fds: list[tuple[int, str]]) -> int | None:
    """The fd named `varlink`, else the only one; None without activation.

    Raises:
        ActivationError: several fds, none named `varlink`.
    """
    if not fds:
        return None
    for fd, name in fds:
        if name == "varlink":
            return fd
    if len(fds) == 1:
        return fds[0][0]
    raise ActivationError("several fds passed and none is named 'varlink'")


def socket_from_fd(fd: int) -> tuple[socket.socket, bool]:
    """Wrap an activation fd; return it and whether it is listening (SO_ACCEPTCONN).

    Raises:
        ActivationError: not a Unix stream socket.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"fd {fd} is not a socket: {exc}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(f"fd {fd} is not a Unix stream socket")
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
    return sock, listening


def bind_listen(path: str) -> socket.socket:
    """Create a listening socket at `path` (development), mode 0666 as capsuled.socket has."""
    with contextlib.suppress(FileNotFoundError):
        # Replace only a stale socket, never some other file that happens to be there.
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(socket.SOMAXCONN)
    return sock


def sd_notify(state: str) -> None:
    """Tell the service manager about our state (READY=1, STATUS=..., STOPPING=1); no-op if none."""
    try:
        # Lazily: a C extension, absent in some venvs. No stubs exist for systemd-python.
        from systemd import daemon as sd_daemon
    except ImportError:
        sd_daemon = None
    if sd_daemon is not None:
        sd_daemon.notify(state)
        return
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return
    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


@dataclass(frozen=True, slots=True)
class _Socket:
    """The socket to serve, and what follows from how we got it."""

    sock: socket.socket
    listening: bool
    idle_exit_s: float  # 0: never
    where: str  # for STATUS= and the log
    created_path: str | None  # a --listen socket we made, and remove at exit


def _socket_to_serve(options: Options) -> _Socket:
    """The activation fd if systemd passed one, else a new socket at --listen.

    Raises:
        ActivationError: neither, or an unusable one.
    """
    fd = pick_fd(listen_fds())
    if fd is not None:
        sock, listening = socket_from_fd(fd)
        idle = DEFAULT_IDLE_EXIT_S if options.idle_exit_s is None else options.idle_exit_s
        return _Socket(sock, listening, idle, f"fd {fd}", None)
    if options.listen is None:
        raise ActivationError("no socket passed by systemd and no --listen PATH given")
    try:
        sock = bind_listen(options.listen)
    except OSError as exc:
        raise ActivationError(f"cannot listen on {options.listen}: {exc}") from None
    idle = 0.0 if options.idle_exit_s is None else options.idle_exit_s
    return _Socket(sock, True, idle, options.listen, options.listen)


async def serve(options: Options, wiring: Wiring) -> int:
    """Serve until idle, told to stop, or (connected socket) the one connection ends.

    With a reloader, SIGHUP reloads the policy; without one SIGHUP keeps its default (exit).
    """
    target = _socket_to_serve(options)
    reloader = wiring.reloader
    handle = wiring.handle if reloader is None else reloader.track(wiring.handle)
    server = Server(
        handle,
        wiring.errors,
        options.limits,
        account=wiring.account,
        open_streams=wiring.open_streams,
        takes_fds=wiring.takes_fds,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listener: Listener | None = None
    # What ends serving: a signal, idleness, or the end of the one connection we were given.
    ends: list[asyncio.Task[object] | asyncio.Task[None]] = [asyncio.create_task(stop.wait())]
    if target.listening:
        listener = await server.listen(target.sock)
        # The accept loop ends only if the listening socket broke: stop, and let socket
        # activation start a fresh helper.
        ends.append(asyncio.create_task(listener.wait_closed()))
        if target.idle_exit_s > 0:
            ends.append(asyncio.create_task(server.wait_idle(target.idle_exit_s)))
        status = f"Serving on {target.where}"
    else:
        ends.append(asyncio.create_task(server.serve_connected(target.sock)))
        status = "Serving one connection"
    if wiring.audit is not None:
        ends.append(asyncio.create_task(_flush_refusals(wiring.audit)))
    if reloader is not None:
        # Before READY=1: for Type=notify-reload, systemd >= 260 checks at READY=1 that the
        # reload signal is caught (SigCgt in /proc/PID/status) and otherwise kills the service
        # ("lacks handler for reload signal HUP", result 'protocol'; seen on Debian's 262).
        loop.add_signal_handler(signal.SIGHUP, reloader.reload, status)
    sd_notify(f"READY=1\nSTATUS={status}")
    log.info("%s", status)
    try:
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sd_notify("STOPPING=1\nSTATUS=Shutting down")
        if reloader is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        if listener is not None:
            listener.close()
        await _wind_down(options, server, wiring, ends, target.created_path)
    log.info("exiting (%s)", "signal" if stop.is_set() else "idle or connection closed")
    return 0


async def _flush_refusals(audit: AuditLog) -> None:
    """Write refusal summaries as their windows end, also while no call comes (never returns)."""
    while True:
        await asyncio.sleep(REFUSAL_FLUSH_S)
        audit.flush_refusals()


async def _wind_down(
    options: Options,
    server: Server,
    wiring: Wiring,
    ends: list[asyncio.Task[object] | asyncio.Task[None]],
    created_path: str | None,
) -> None:
    """Let running calls finish (bounded), then release what serving held, in that order."""
    await server.shutdown(options.shutdown_grace_s)  # also ends a connected socket's task
    for task in ends:
        task.cancel()
    await asyncio.gather(*ends, return_exceptions=True)
    if wiring.reloader is not None:
        await wiring.reloader.aclose()
    if wiring.system_bus is not None:
        await wiring.system_bus.close()  # no call is left that could use it
    if wiring.audit is not None:
        # Every call has ended: no refusal goes uncounted, and what this run wrote is signed,
        # so its tail cannot be cut unnoticed.
        await asyncio.to_thread(wiring.audit.close)
    if created_path is not None:
        with contextlib.suppress(OSError):
            os.unlink(created_path)


def setup_logging(debug: bool = False) -> None:
    """Log to the journal when systemd gave us one (structured priority), else to stderr."""
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler
        except ImportError:
            pass
        else:
            handler = JournalHandler(SYSLOG_IDENTIFIER="capsuled")
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("capsuled: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def run(options: Options, wiring: Wiring | None = None) -> int:
    """Entry point of `capsuled serve` (org.capsuled.Manager unless given another wiring);
    returns the exit status."""
    try:
        return asyncio.run(_serve(options, wiring))
    except ActivationError as exc:
        log.error("%s", exc)
        return 1


async def _serve(options: Options, wiring: Wiring | None) -> int:
    # Built inside the running loop: the reloader's events and tasks belong to it.
    return await serve(options, wiring if wiring is not None else build_wiring(options))
