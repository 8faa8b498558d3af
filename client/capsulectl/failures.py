"""What a failed command prints and exits with: one line on stderr, a stable exit status.

The line names the capsule (or unit) and what to do about it, like systemctl's messages; the
statuses are the LSB/systemctl ones documented in `capsulectl --help`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capsuled.varlink.errors import VarlinkError

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_NOT_RUNNING",
    "EXIT_NO_SUCH",
    "EXIT_OK",
    "EXIT_PERMISSION",
    "EXIT_USAGE",
    "explain_client_error",
    "explain_error",
    "quote",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # argparse's, and LSB's "invalid or excess argument(s)"
EXIT_NOT_RUNNING = 3  # LSB/systemctl status: "program is not running"
EXIT_NO_SUCH = 4  # systemctl: "no such unit"
EXIT_PERMISSION = 5
EXIT_BROKEN_PIPE = 141  # what a C tool killed by SIGPIPE reports through the shell


def quote(value: object) -> str:
    """A name as the messages show it: 'web'."""
    return f"'{value}'"


def explain_error(exc: VarlinkError, doing: str, *, asked: bool = False) -> tuple[str, int]:
    """The one line for stderr and the exit status for an error reply of capsuled.

    `asked`: the call was already repeated allowing interactive authentication.
    """
    from capsuled import errors as e
    from capsuled.varlink import errors as ve

    p = exc.parameters
    name = quote(p.get("name", "?"))
    unit = quote(p.get("unit", "?"))
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
        return f"capsuled refused parameter {quote(p.get('parameter'))} to {doing}", EXIT_USAGE
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


def explain_client_error(
    exc: Exception, *, host: str | None, timeout: float | None
) -> tuple[str, int]:
    """The one line and exit status when capsuled could not be reached or answered nothing."""
    import errno

    from capsulectl import transport as t

    where = f" on {host}" if host else ""
    if isinstance(exc, t.InvalidAddress):
        return f"capsulectl: {exc}", EXIT_USAGE
    if isinstance(exc, t.NotRunning):
        return f"capsuled is not running{where}: is capsuled.socket enabled?", EXIT_FAILURE
    if isinstance(exc, t.ConnectFailed) and exc.errno in (errno.EACCES, errno.EPERM):
        return f"{exc} (permission denied on the socket)", EXIT_PERMISSION
    if isinstance(exc, t.Timeout):
        return (
            f"capsuled{where} did not answer within {timeout}s (see --timeout)",
            EXIT_FAILURE,
        )
    return str(exc), EXIT_FAILURE
