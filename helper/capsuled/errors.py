"""The org.capsuled.Manager.* errors, one class per `error` in the IDL.

    VarlinkError                          (capsuled.varlink.errors: a reply, not a crash)
    ├── org.varlink.service.*             (capsuled.varlink.errors: InvalidParameter, ...)
    └── ManagerError                      (this module: interface-scoped errors)
        ├── NoSuchCapsule, CapsuleExists, InvalidName, QuotaExceeded
        ├── CapsuleRunning, CapsuleNotRunning, JobFailed
        ├── SystemdTooOld, SystemdUnavailable, InteractiveAuthenticationRequired
        ├── NoSuchUnit, InvalidUnit, UnsafeCapsuleHome, InvalidValue
        ├── InvalidBundle, UnsignedBundle, UntrustedSigner, BadSignature
        ├── DowngradeRefused, DeployFailed, NoPreviousBundle
        ├── Busy, AccessChanged, FileDescriptorsRefused, RecordsUnwritable
        └── InternalError

A unit test checks that this set and the IDL's `error` declarations are the same.
"""

from __future__ import annotations

from capsuled.varlink.errors import VarlinkError

INTERFACE = "org.capsuled.Manager"


class ManagerError(VarlinkError):
    """Base of the errors declared by org.capsuled.Manager."""


class NoSuchCapsule(ManagerError):
    """The capsule does not exist, or the caller may not know that it does."""

    name = f"{INTERFACE}.NoSuchCapsule"


class CapsuleExists(ManagerError):
    """Create was asked for a name that is already a capsule."""

    name = f"{INTERFACE}.CapsuleExists"


class InvalidName(ManagerError):
    """The capsule name is one systemd would refuse."""

    name = f"{INTERFACE}.InvalidName"


class QuotaExceeded(ManagerError):
    """The caller's quota (capsule count or a limit ceiling) forbids this."""

    name = f"{INTERFACE}.QuotaExceeded"


class CapsuleRunning(ManagerError):
    """The operation needs the capsule stopped."""

    name = f"{INTERFACE}.CapsuleRunning"


class CapsuleNotRunning(ManagerError):
    """The operation needs the capsule running."""

    name = f"{INTERFACE}.CapsuleNotRunning"


class JobFailed(ManagerError):
    """A systemd job ended with a result other than "done"."""

    name = f"{INTERFACE}.JobFailed"


class SystemdTooOld(ManagerError):
    """PID 1 is older than 256 and has no capsules."""

    name = f"{INTERFACE}.SystemdTooOld"


class SystemdUnavailable(ManagerError):
    """PID 1 could not be reached over D-Bus."""

    name = f"{INTERFACE}.SystemdUnavailable"


class InteractiveAuthenticationRequired(ManagerError):
    """Policy wants an administrator's password and the call did not allow asking."""

    name = f"{INTERFACE}.InteractiveAuthenticationRequired"


class NoSuchUnit(ManagerError):
    """The unit does not exist inside the capsule."""

    name = f"{INTERFACE}.NoSuchUnit"


class InvalidUnit(ManagerError):
    """The unit name or the unit file's text is unacceptable."""

    name = f"{INTERFACE}.InvalidUnit"


class UnsafeCapsuleHome(ManagerError):
    """Something planted in the capsule's home made the operation unsafe; nothing changed."""

    name = f"{INTERFACE}.UnsafeCapsuleHome"


class InvalidValue(ManagerError):
    """A well-typed parameter has an unacceptable value."""

    name = f"{INTERFACE}.InvalidValue"


class InvalidBundle(ManagerError):
    """The bundle file is not usable (framing, caps, manifest rules); nothing changed."""

    name = f"{INTERFACE}.InvalidBundle"


class UnsignedBundle(ManagerError):
    """The bundle has no signature; nothing changed."""

    name = f"{INTERFACE}.UnsignedBundle"


class UntrustedSigner(ManagerError):
    """The bundle's key is not a trusted key; nothing changed."""

    name = f"{INTERFACE}.UntrustedSigner"


class BadSignature(ManagerError):
    """The signature does not match the bundle (modified after signing); nothing changed."""

    name = f"{INTERFACE}.BadSignature"


class DowngradeRefused(ManagerError):
    """An older version without allowDowngrade; nothing changed."""

    name = f"{INTERFACE}.DowngradeRefused"


class DeployFailed(ManagerError):
    """A unit of the new version did not start; the capsule was put back (or says it was not)."""

    name = f"{INTERFACE}.DeployFailed"


class NoPreviousBundle(ManagerError):
    """Rollback without a kept version."""

    name = f"{INTERFACE}.NoPreviousBundle"


class Busy(ManagerError):
    """Too many calls or streams are running (for this caller, or in all); try again later."""

    name = f"{INTERFACE}.Busy"


class FileDescriptorsRefused(ManagerError):
    """The call brought file descriptors its method does not take (or more than it takes);
    they were closed and nothing was done."""

    name = f"{INTERFACE}.FileDescriptorsRefused"

    def __init__(self, *, method: str, accepted: int) -> None:
        super().__init__(method=method, accepted=accepted)


def fds_refused(method: str, accepted: int) -> FileDescriptorsRefused:
    """transport.ServerErrors.fds_refused for org.capsuled.Manager."""
    return FileDescriptorsRefused(method=method, accepted=accepted)


class AccessChanged(ManagerError):
    """A stream's grant no longer holds (capsule removed, replaced, or access withdrawn)."""

    name = f"{INTERFACE}.AccessChanged"


class RecordsUnwritable(ManagerError):
    """The helper's records (/var/lib/capsuled) could not be written; none is half written."""

    name = f"{INTERFACE}.RecordsUnwritable"


class InternalError(ManagerError):
    """An unexpected failure in the helper; the traceback is in its journal only."""

    name = f"{INTERFACE}.InternalError"
