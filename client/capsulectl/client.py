"""`capsulectl.Client`: a blocking Python API for org.capsuled.Manager, used by the CLI itself.

One method per IDL method; each returns the reply parameters as the TypedDict of capsuled.wire,
and streaming methods (`more`) are generators. An error reply raises the error's own class
(capsuled.errors for org.capsuled.Manager.*, capsuled.varlink.errors for org.varlink.service.*);
not reaching capsuled raises a capsulectl.transport.ClientError.

Example (automation)::

    from capsulectl import Client
    from capsuled.errors import NoSuchCapsule

    with Client() as capsuled:                     # default socket, no password prompts
        try:
            capsuled.describe("web")
        except NoSuchCapsule:
            capsuled.create("web", start=True)
        for capsule in capsuled.list()["capsules"]:
            print(capsule["name"], capsule["state"])

The framing and message rules are the protocol core's (capsuled.varlink), the same code the helper
runs: one implementation of Varlink. Only the socket I/O is here, as in jeepney's io/blocking.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, cast

from capsulectl.transport import (
    DEFAULT_ADDRESS,
    MAX_REPLY_FDS,
    ConnectionLost,
    SshTransport,
    Transport,
    UnixTransport,
)
from capsuled.varlink.connection import ClientConnection
from capsuled.varlink.errors import RemoteProtocolError, VarlinkError, error_from_name
from capsuled.varlink.messages import Call, ErrorReply, Reply

if TYPE_CHECKING:
    # Only for the type checker: building ~20 TypedDict classes costs several ms of start-up, and
    # at run time a cast() to a quoted name is free.
    from capsuled import wire

__all__ = ["DEFAULT_TIMEOUT_S", "INTERFACE", "Client"]

# capsuled.errors.INTERFACE (tests/unit/test_client.py holds them equal). That module, the
# error classes, loads only once an error reply comes: a command that succeeds needs none of it
# (~1.5 ms of start-up, python -X importtime).
INTERFACE = "org.capsuled.Manager"
DEFAULT_TIMEOUT_S = 90.0  # systemd's default start job timeout; Start waits for its job

# The top-level keys each reply must carry. The helper validates its replies against the IDL; this
# check only keeps a wrong or foreign server from surfacing as a KeyError deep in the CLI.
_REPLY_KEYS: dict[str, tuple[str, ...]] = {
    "List": ("capsules",),
    "Describe": ("capsule",),
    "Create": ("capsule",),
    "Start": ("capsule", "job"),
    "Stop": ("capsule", "job"),
    "Restart": ("capsule", "job"),
    "Remove": (),
    "SetAutostart": ("capsule",),
    "SetLimits": ("capsule",),
    "CheckAccess": ("access",),
    "ListUnits": ("units",),
    "InstallUnit": ("unit",),
    "RemoveUnit": (),
    "StartUnit": ("unit", "job"),
    "StopUnit": ("unit", "job"),
    "RestartUnit": ("unit", "job"),
    "EnableUnit": ("unit",),
    "DisableUnit": ("unit",),
    "Run": ("unit",),
    "Logs": ("entries",),
    "Watch": ("event",),
    "Deploy": ("capsule", "deployed", "started"),
    "Rollback": ("capsule", "deployed", "started"),
    "Audit": ("records",),
    "Info": ("version", "policyBackend", "callerUid"),
}

TransportFactory = Callable[[float | None], Transport]
ReceivedFds = list[int]  # fds that came with replies, the caller's to close


class Client:
    """A connection to capsuled; calls are sequential, the socket is opened on first use.

    `address` is "unix:PATH" or a path (default unix:/run/capsuled/org.capsuled.Manager; the
    CLI's $CAPSULECTL_ADDRESS is the CLI's business); `host` reaches another machine's capsuled
    through `ssh -T HOST capsulectl --bridge`. One Client serves one thread at a time.

    `interactive=True` repeats a call refused with InteractiveAuthenticationRequired once with
    allowInteractiveAuthentication=true, so a polkit agent can ask for a password; `on_interactive`
    runs before that retry (the CLI starts pkttyagent there). The default, False, never prompts:
    right for automation.

    `timeout` bounds connecting and each wait for a reply (None: no limit); streams (follow, Watch,
    Run with wait) wait for their later replies without a limit.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        host: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        interactive: bool = False,
        on_interactive: Callable[[], None] | None = None,
        transport: TransportFactory | None = None,
    ) -> None:
        self.address = address or DEFAULT_ADDRESS
        self.host = host
        self.timeout = timeout
        self.interactive = interactive
        self.on_interactive = on_interactive
        if transport is not None:
            self._factory = transport
        elif host is not None:
            self._factory = lambda t: SshTransport(host, address, t)
        else:
            self._factory = lambda t: UnixTransport(self.address, t)
        self._transport: Transport | None = None
        self._conn: ClientConnection | None = None

    # --- context management ----------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later call reconnects)."""
        if self._transport is not None:
            self._transport.close()
        self._transport = None
        self._conn = None

    # --- the generic call machinery --------------------------------------------------------------

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _exchange(
        self, call: Call, *, wait_later: bool, received: ReceivedFds | None = None
    ) -> Iterator[Reply]:
        """Send one call (and its fds) and yield its replies; raise the error class of an
        error reply. Fds that come with replies go to `received` (the caller's to close), or
        are closed here if the caller expects none.

        Abandoning the generator early (a broken stream, ^C, a consumer that stops) closes the
        connection: replies still in flight would otherwise be read as answers to the next call.
        """
        if self._transport is None or self._conn is None:
            self._transport = self._factory(self.timeout)
            self._conn = ClientConnection(max_fds=MAX_REPLY_FDS)
        transport, conn = self._transport, self._conn
        finished = False
        try:
            transport.send(conn.send(call), self._deadline(), call.fds)
            deadline = self._deadline()
            while True:
                reply = conn.next_reply()
                if reply is None:
                    data = transport.recv(deadline)
                    fds = transport.take_fds()
                    if not data:
                        _close_fds(fds)
                        raise ConnectionLost("capsuled closed the connection without replying")
                    conn.receive_data(data, fds)  # refused fds are closed below
                    continue
                if isinstance(reply, Reply) and reply.fds:
                    if received is None:
                        _close_fds(reply.fds)
                    else:
                        received.extend(reply.fds)
                if isinstance(reply, ErrorReply):
                    finished = True
                    raise _error(reply)
                if not reply.continues:
                    finished = True
                    yield reply
                    return
                yield reply
                if wait_later:
                    deadline = None
        except RemoteProtocolError as exc:
            # The stream cannot be trusted any more; LocalProtocolError (our bug) propagates.
            _close_fds(conn.release_fds())
            raise ConnectionLost(f"capsuled sent an invalid reply: {exc}") from exc
        finally:
            if not finished:
                _close_fds(conn.release_fds())
                self.close()

    def _replies(
        self,
        method: str,
        params: Mapping[str, object],
        *,
        more: bool = False,
        auth: bool = True,
        wait_later: bool = False,
        fds: tuple[int, ...] = (),
        received: ReceivedFds | None = None,
    ) -> Iterator[dict[str, object]]:
        """Call org.capsuled.Manager.METHOD; yield each reply's parameters, checked for shape.

        Null parameters are left out (absent == null, UAPI.20). With `auth`, an
        InteractiveAuthenticationRequired before the first reply is retried once interactively.
        """
        body = {key: value for key, value in params.items() if value is not None}
        call = Call(method=f"{INTERFACE}.{method}", parameters=body, more=more, fds=fds)
        try:
            first = True
            for reply in self._exchange(call, wait_later=wait_later, received=received):
                first = False
                yield _checked(method, reply.parameters)
        except VarlinkError as exc:
            from capsuled import errors as manager_errors  # _error() has loaded it

            retry = auth and first and self.interactive
            if not (retry and isinstance(exc, manager_errors.InteractiveAuthenticationRequired)):
                raise
        else:
            return
        if self.on_interactive is not None:
            self.on_interactive()
        body["allowInteractiveAuthentication"] = True
        call = Call(method=call.method, parameters=body, more=more, fds=fds)
        for reply in self._exchange(call, wait_later=wait_later, received=received):
            yield _checked(method, reply.parameters)

    def call(
        self, method: str, params: Mapping[str, object], *, auth: bool = True
    ) -> dict[str, object]:
        """Call a method of org.capsuled.Manager (short name) and return its reply parameters."""
        result: dict[str, object] | None = None
        for result in self._replies(method, params, auth=auth):  # noqa: B007 -- the last one
            pass
        if result is None:  # _exchange yields at least the final reply or raises
            raise ConnectionLost("capsuled sent no reply")
        return result

    def get_info(self) -> wire.ServiceInfo:
        """org.varlink.service.GetInfo: vendor, product, version, url, interfaces."""
        call = Call(method="org.varlink.service.GetInfo", parameters={})
        for reply in self._exchange(call, wait_later=False):
            params = reply.parameters
            if not isinstance(params.get("interfaces"), list):
                raise ConnectionLost("GetInfo reply without interfaces")
            return cast("wire.ServiceInfo", params)
        raise ConnectionLost("capsuled sent no reply")

    # --- org.capsuled.Manager --------------------------------------------------------------------

    def list(self) -> wire.ListReply:
        """The capsules the caller may read."""
        return cast("wire.ListReply", self.call("List", {}, auth=False))

    def describe(self, name: str) -> wire.CapsuleReply:
        """One capsule (raises NoSuchCapsule)."""
        return cast("wire.CapsuleReply", self.call("Describe", {"name": name}))

    def create(self, name: str, *, start: bool | None = None) -> wire.CapsuleReply:
        """Create a capsule owned by the caller; start=True leaves it running."""
        return cast("wire.CapsuleReply", self.call("Create", {"name": name, "start": start}))

    def start(self, name: str) -> wire.JobReply:
        """Start capsule@NAME.service and wait for the job."""
        return cast("wire.JobReply", self.call("Start", {"name": name}))

    def stop(self, name: str) -> wire.JobReply:
        """Stop capsule@NAME.service and wait for the job."""
        return cast("wire.JobReply", self.call("Stop", {"name": name}))

    def restart(self, name: str) -> wire.JobReply:
        """Restart capsule@NAME.service and wait for the job."""
        return cast("wire.JobReply", self.call("Restart", {"name": name}))

    def remove(self, name: str, *, keep_data: bool | None = None) -> wire.EmptyReply:
        """Stop, delete (unless keep_data) and forget a capsule."""
        return cast("wire.EmptyReply", self.call("Remove", {"name": name, "keepData": keep_data}))

    def set_autostart(self, name: str, enabled: bool) -> wire.CapsuleReply:
        """Start the capsule at boot, or not."""
        params = {"name": name, "enabled": enabled}
        return cast("wire.CapsuleReply", self.call("SetAutostart", params))

    def set_limits(
        self,
        name: str,
        *,
        memory_max: int | None = None,
        tasks_max: int | None = None,
        cpu_weight: int | None = None,
    ) -> wire.CapsuleReply:
        """Set MemoryMax=/TasksMax=/CPUWeight=; None leaves a limit alone, -1 resets it."""
        params = {
            "name": name,
            "memoryMax": memory_max,
            "tasksMax": tasks_max,
            "cpuWeight": cpu_weight,
        }
        return cast("wire.CapsuleReply", self.call("SetLimits", params))

    def check_access(
        self,
        name: str,
        action: str,
        *,
        verb: str | None = None,
        unit: str | None = None,
        signer: str | None = None,
    ) -> wire.CheckAccessReply:
        """What the policy would decide for the caller (nothing is done)."""
        params = {"name": name, "action": action, "verb": verb, "unit": unit, "signer": signer}
        return cast("wire.CheckAccessReply", self.call("CheckAccess", params, auth=False))

    def list_units(self, name: str) -> wire.ListUnitsReply:
        """The user units of a capsule."""
        return cast("wire.ListUnitsReply", self.call("ListUnits", {"name": name}))

    def install_unit(
        self,
        name: str,
        unit: str,
        content: str,
        *,
        enable: bool | None = None,
        start: bool | None = None,
    ) -> wire.UnitReply:
        """Write a unit file into the capsule; optionally enable and start it."""
        params = {"name": name, "unit": unit, "content": content, "enable": enable, "start": start}
        return cast("wire.UnitReply", self.call("InstallUnit", params))

    def remove_unit(self, name: str, unit: str) -> wire.EmptyReply:
        """Stop, disable and delete a unit."""
        return cast("wire.EmptyReply", self.call("RemoveUnit", {"name": name, "unit": unit}))

    def start_unit(self, name: str, unit: str) -> wire.UnitJobReply:
        """Start a unit in the running capsule and wait for its job."""
        return cast("wire.UnitJobReply", self.call("StartUnit", {"name": name, "unit": unit}))

    def stop_unit(self, name: str, unit: str) -> wire.UnitJobReply:
        """Stop a unit in the running capsule and wait for its job."""
        return cast("wire.UnitJobReply", self.call("StopUnit", {"name": name, "unit": unit}))

    def restart_unit(self, name: str, unit: str) -> wire.UnitJobReply:
        """Restart a unit in the running capsule and wait for its job."""
        return cast("wire.UnitJobReply", self.call("RestartUnit", {"name": name, "unit": unit}))

    def enable_unit(self, name: str, unit: str) -> wire.UnitReply:
        """Make a unit start with the capsule."""
        return cast("wire.UnitReply", self.call("EnableUnit", {"name": name, "unit": unit}))

    def disable_unit(self, name: str, unit: str) -> wire.UnitReply:
        """Undo enable_unit."""
        return cast("wire.UnitReply", self.call("DisableUnit", {"name": name, "unit": unit}))

    @staticmethod
    def _run_params(
        name: str,
        command: Sequence[str],
        unit: str | None,
        environment: Sequence[str] | None,
        working_directory: str | None,
    ) -> dict[str, object]:
        return {
            "name": name,
            "command": list(command),
            "unit": unit,
            "environment": list(environment) if environment is not None else None,
            "workingDirectory": working_directory,
        }

    def run(
        self,
        name: str,
        command: Sequence[str],
        *,
        unit: str | None = None,
        environment: Sequence[str] | None = None,
        working_directory: str | None = None,
    ) -> wire.RunReply:
        """Start a command as a transient service in the capsule; return once it started."""
        params = self._run_params(name, command, unit, environment, working_directory)
        return cast("wire.RunReply", self.call("Run", params))

    def run_and_wait(
        self,
        name: str,
        command: Sequence[str],
        *,
        unit: str | None = None,
        environment: Sequence[str] | None = None,
        working_directory: str | None = None,
        stdio: str | None = None,
        fds: tuple[int, ...] = (),
        received: ReceivedFds | None = None,
        size: tuple[int, int] | None = None,
    ) -> Generator[wire.RunReply, None, None]:
        """Run with `more`: yields the started reply, then the last one carrying exitStatus.

        stdio "pipe" sends `fds` (stdin, stdout, stderr: still ours afterwards) for the
        command; "pty" gets the master of the command's pty into `received` with the started
        reply (ours to relay and close), of `size` (rows, columns) from the start."""
        params = self._run_params(name, command, unit, environment, working_directory)
        params["stdio"] = stdio
        if size is not None:
            params["rows"], params["columns"] = size
        replies = self._replies(
            "Run", params, more=True, wait_later=True, fds=fds, received=received
        )
        for reply in replies:
            yield cast("wire.RunReply", reply)

    def logs(
        self,
        name: str,
        *,
        unit: str | None = None,
        lines: int | None = None,
        since: int | None = None,
    ) -> wire.LogsReply:
        """The newest journal entries of a capsule (or of one unit), oldest first."""
        params = {"name": name, "unit": unit, "lines": lines, "since": since}
        return cast("wire.LogsReply", self.call("Logs", params))

    def follow_logs(
        self,
        name: str,
        *,
        unit: str | None = None,
        lines: int | None = None,
        since: int | None = None,
    ) -> Generator[wire.LogsReply, None, None]:
        """Logs with `more` and follow: yields replies (one entry each) until the caller stops."""
        params = {"name": name, "unit": unit, "lines": lines, "since": since, "follow": True}
        for reply in self._replies("Logs", params, more=True, wait_later=True):
            yield cast("wire.LogsReply", reply)

    def watch(self, names: Sequence[str] | None = None) -> Generator[wire.WatchReply, None, None]:
        """Stream state changes of capsules (all readable ones, or only `names`)."""
        params = {"names": list(names) if names else None}
        for reply in self._replies("Watch", params, more=True, auth=False, wait_later=True):
            yield cast("wire.WatchReply", reply)

    def deploy(
        self, name: str, bundle: bytes, *, allow_downgrade: bool | None = None
    ) -> wire.DeployReply:
        """Deploy a signed bundle file's bytes into the capsule, all or nothing."""
        import base64

        params = {
            "name": name,
            "bundle": base64.b64encode(bundle).decode("ascii"),
            "allowDowngrade": allow_downgrade,
        }
        return cast("wire.DeployReply", self.call("Deploy", params))

    def rollback(self, name: str) -> wire.DeployReply:
        """Return the capsule to the bundle version kept by the last Deploy."""
        return cast("wire.DeployReply", self.call("Rollback", {"name": name}))

    def audit(self, name: str, *, lines: int | None = None) -> wire.AuditReply:
        """The audit trail's records about a capsule, oldest first."""
        return cast("wire.AuditReply", self.call("Audit", {"name": name, "lines": lines}))

    def info(self) -> wire.InfoReply:
        """The helper's version, systemd's version, the policy backend and the caller's uid."""
        return cast("wire.InfoReply", self.call("Info", {}, auth=False))


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:  # noqa: SIM105 -- not contextlib.suppress: contextlib costs every command ~0.8 ms
            os.close(fd)
        except OSError:
            pass  # already closed: nothing more to give back


def _error(reply: ErrorReply) -> VarlinkError:
    """The exception for an error reply: its registered class, or an ad-hoc one if unknown."""
    import capsuled.errors  # noqa: F401 -- registers org.capsuled.Manager's error classes

    return error_from_name(reply.error, reply.parameters)


def _checked(method: str, params: dict[str, object]) -> dict[str, object]:
    for key in _REPLY_KEYS.get(method, ()):
        if key not in params:
            raise ConnectionLost(f"capsuled's {method} reply lacks {key!r}")
    return params
