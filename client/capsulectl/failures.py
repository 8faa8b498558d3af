"""What a failed command prints and exits with: one line on stderr, a stable exit status.

The line names the capsule (or unit) and what to do about it, like systemctl's messages; the
statuses are the LSB/systemctl ones documented in `capsulectl --help` (defined in context.py).
"""

from __future__ import annotations

# The statuses are defined beside the verbs' context, which every command loads; this table
# loads only once a command has failed.
from capsulectl.context import (
    EXIT_FAILURE,
    EXIT_NO_SUCH,
    EXIT_NOT_RUNNING,
    EXIT_PERMISSION,
    EXIT_USAGE,
    quote,
)

TYPE_CHECKING = False  # not typing's: a plain command loads no typing (capsulectl/fastargs.py)
if TYPE_CHECKING:
    from collections.abc import Callable

    from capsuled.varlink.errors import VarlinkError

__all__ = [
    "explain_client_error",
    "explain_error",
    "explanations",
]


class Facts:
    """What a line of the table may use: the reply's name and parameters (`p`), the capsule and
    unit names as the messages quote them, what we were doing, whether we already asked.

    A plain class, not a dataclass: importing dataclasses costs start-up (see context.Context).
    """

    def __init__(self, exc: VarlinkError, doing: str, asked: bool) -> None:
        from capsulectl.output import printable  # loaded once a call failed

        self.error = printable(exc.name)
        # Error parameters may echo what a capsule controls (a unit file's reason, a path in
        # its home): escaped for the terminal like every human-format string (issue 11, 10).
        self.p = {k: printable(v) if isinstance(v, str) else v for k, v in exc.parameters.items()}
        self.doing = doing
        self.asked = asked
        self.name = quote(self.p.get("name", "?"))
        self.unit = quote(self.p.get("unit", "?"))


if TYPE_CHECKING:
    Line = Callable[[Facts], str]


def _auth_required(f: Facts) -> str:
    hint = (
        "no polkit agent answered: run one (see capsulectl --help) or ask an administrator"
        if f.asked
        else "run without --no-ask-password so a polkit agent can ask"
    )
    return f"you may not {f.doing} without authenticating as an administrator ({hint})"


def _invalid_unit(f: Facts) -> str:
    where = f" (line {f.p['line']})" if f.p.get("line") is not None else ""
    return f"unit {f.unit} is not acceptable: {f.p.get('reason')}{where}"


def _job_failed(f: Facts) -> str:
    detail = f.p.get("result")
    if f.p.get("unitResult"):
        detail = f"{detail}, {f.p.get('unitResult')}"
    return f"failed to {f.doing} ({detail}); see: capsulectl logs"


def _invalid_bundle(f: Facts) -> str:
    where = f"{f.p['path']}: " if f.p.get("path") else ""
    return f"refused to {f.doing}: the bundle is not usable: {where}{f.p.get('reason')}"


def _deploy_failed(f: Facts) -> str:
    detail = f.p.get("result")
    if f.p.get("unitResult"):
        detail = f"{detail}, {f.p.get('unitResult')}"
    restored = f.p.get("restoredVersion")
    if not f.p.get("rolledBack"):
        after = "and putting the previous state back failed too (see: journalctl -u capsuled)"
    elif restored is None:
        after = "so the capsule was put back as it was, with no bundle"
    else:
        after = f"so the capsule was put back to version {restored}"
    return f"failed to {f.doing}: unit {f.unit} did not start ({detail}), {after}"


def _too_new(f: Facts) -> str:
    return f"this capsuled cannot {f.doing} ({f.error}: is it older than capsulectl?)"


def _generic(f: Facts) -> str:
    return f"failed to {f.doing}: {f.error}"


def explanations() -> dict[type[VarlinkError], tuple[Line, int]]:
    """Every error class capsuled can answer with -> (its line, its exit status).

    Built when a call has failed: the classes live in the protocol core, which the CLI loads only
    once it makes a call. Not cached (functools would cost every command ~1-4 ms of start-up, with
    the collections it imports): a command explains a handful of errors at most.
    tests/unit/test_failures.py checks that every class of capsuled.errors and
    capsuled.varlink.errors has an entry.
    """
    from capsuled import errors as e
    from capsuled.varlink import errors as ve

    return {
        e.NoSuchCapsule: (lambda f: f"capsule {f.name} does not exist", EXIT_NO_SUCH),
        e.NoSuchUnit: (
            lambda f: (
                f"capsule {f.name} has no unit {f.unit} (see: capsulectl units {f.p.get('name')})"
            ),
            EXIT_NO_SUCH,
        ),
        ve.PermissionDenied: (
            lambda f: (
                f"you may not {f.doing} "
                "(ask an administrator to add you to a rule, see capsuled(8))"
            ),
            EXIT_PERMISSION,
        ),
        e.InteractiveAuthenticationRequired: (_auth_required, EXIT_PERMISSION),
        e.CapsuleNotRunning: (
            lambda f: (
                f"capsule {f.name} is not running "
                f"(start it first: capsulectl start {f.p.get('name')})"
            ),
            EXIT_NOT_RUNNING,
        ),
        e.CapsuleRunning: (
            lambda f: (
                f"capsule {f.name} is running (stop it first: capsulectl stop {f.p.get('name')})"
            ),
            EXIT_FAILURE,
        ),
        e.CapsuleExists: (lambda f: f"capsule {f.name} already exists", EXIT_FAILURE),
        e.InvalidName: (
            lambda f: f"{f.name} is not a valid capsule name: {f.p.get('reason')}",
            EXIT_USAGE,
        ),
        e.InvalidUnit: (_invalid_unit, EXIT_USAGE),
        e.InvalidValue: (
            lambda f: f"invalid {f.p.get('parameter')}: {f.p.get('reason')}",
            EXIT_USAGE,
        ),
        ve.InvalidParameter: (
            lambda f: f"capsuled refused parameter {quote(f.p.get('parameter'))} to {f.doing}",
            EXIT_USAGE,
        ),
        e.QuotaExceeded: (
            lambda f: (
                f"cannot {f.doing}: your quota allows {f.p.get('limit')} for "
                f"{f.p.get('what')} (ask an administrator to raise it, see capsuled(8))"
            ),
            EXIT_FAILURE,
        ),
        e.JobFailed: (_job_failed, EXIT_FAILURE),
        e.SystemdTooOld: (
            lambda f: (
                f"systemd {f.p.get('version')} is too old for capsules "
                "(they need systemd 256 or newer)"
            ),
            EXIT_FAILURE,
        ),
        e.SystemdUnavailable: (
            lambda f: "capsuled cannot reach systemd (see: journalctl -u capsuled)",
            EXIT_FAILURE,
        ),
        e.UnsafeCapsuleHome: (
            lambda f: (
                f"refused to {f.doing}: {f.p.get('path')} in the capsule's home is unsafe "
                f"({f.p.get('reason')}); nothing was changed"
            ),
            EXIT_FAILURE,
        ),
        e.InvalidBundle: (_invalid_bundle, EXIT_FAILURE),
        e.UnsignedBundle: (
            lambda f: (
                f"refused to {f.doing}: the bundle is not signed "
                "(sign it: capsulectl bundle sign FILE --key KEY)"
            ),
            EXIT_FAILURE,
        ),
        e.UntrustedSigner: (
            lambda f: (
                f"refused to {f.doing}: the bundle is signed by a key capsuled does not trust "
                f"(key id {f.p.get('keyId')}; see /etc/capsuled/trusted-keys.d/)"
            ),
            EXIT_FAILURE,
        ),
        e.BadSignature: (
            lambda f: (
                f"refused to {f.doing}: the bundle's signature does not match its content "
                "(it was changed after it was signed)"
            ),
            EXIT_FAILURE,
        ),
        e.DowngradeRefused: (
            lambda f: (
                f"refused to {f.doing}: version {f.p.get('version')} is older than the "
                f"deployed {f.p.get('current')} (pass --allow-downgrade to deploy it anyway)"
            ),
            EXIT_FAILURE,
        ),
        e.DeployFailed: (_deploy_failed, EXIT_FAILURE),
        e.NoPreviousBundle: (
            lambda f: f"capsule {f.name} has no earlier bundle version to roll back to",
            EXIT_FAILURE,
        ),
        e.Busy: (
            lambda f: (
                f"cannot {f.doing} now: capsuled is busy (too many calls or streams "
                "running, yours or everyone's, or another call on the same capsule); "
                "try again later"
            ),
            EXIT_FAILURE,
        ),
        e.AccessChanged: (_access_changed, EXIT_FAILURE),
        e.FileDescriptorsRefused: (
            lambda f: (
                f"cannot {f.doing}: capsuled refused the file descriptors sent with "
                f"{f.p.get('method')} (it takes {f.p.get('accepted')}); capsulectl and capsuled "
                "may be of different versions"
            ),
            EXIT_FAILURE,
        ),
        e.RecordsUnwritable: (
            lambda f: (
                f"capsuled could not {f.doing}: it cannot write its records "
                f"({f.p.get('reason')}); ask an administrator to look at /var/lib/capsuled, "
                "then run the same command again"
            ),
            EXIT_FAILURE,
        ),
        e.InternalError: (
            lambda f: (
                f"capsuled failed to {f.doing} (an internal error; see: journalctl -u capsuled)"
            ),
            EXIT_FAILURE,
        ),
        ve.MethodNotFound: (_too_new, EXIT_FAILURE),
        ve.MethodNotImplemented: (_too_new, EXIT_FAILURE),
        ve.InterfaceNotFound: (_too_new, EXIT_FAILURE),
        # The client asks for "more" wherever a method needs it: only a server that disagrees
        # with our IDL answers this, and the error's own name says the most about it.
        ve.ExpectedMore: (_generic, EXIT_FAILURE),
    }


def _access_changed(f: Facts) -> str:
    why = {
        "removed": "it was removed",
        "replaced": "it was removed and created again, or changed owner",
        "access-withdrawn": "you may no longer read it",
    }.get(str(f.p.get("reason")), f"reason: {f.p.get('reason')}")
    return f"stopped following capsule {f.name}: {why}"


def explain_error(exc: VarlinkError, doing: str, *, asked: bool = False) -> tuple[str, int]:
    """The one line for stderr and the exit status for an error reply of capsuled.

    `asked`: the call was already repeated allowing interactive authentication. An error the
    table does not know (a newer capsuled's, or a foreign server's) gets a line naming it.
    """
    table = explanations()
    for cls in type(exc).__mro__:
        entry = table.get(cls)
        if entry is not None:
            line, code = entry
            return line(Facts(exc, doing, asked)), code
    return _generic(Facts(exc, doing, asked)), EXIT_FAILURE


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
