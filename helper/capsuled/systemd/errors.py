"""Errors raised by the systemd backend.

    BackendError                    base: something about systemd went wrong
    ├── SystemdUnavailable          no system bus, PID 1 is not systemd, or the bus went away
    ├── SystemdTooOld(version)      PID 1 is older than 256 (no capsules)
    ├── NoSuchUnit(unit)            systemd does not know the unit
    ├── JobFailed(result, unit_result)
    │                               a job (start/stop/restart/clean) finished, but not with "done"
    ├── UnitBusy(unit)              the unit must be inactive for this (CleanUnit while running)
    ├── ManagerUnavailable(name, reason)
    │                               a capsule's manager socket is missing, unsafe or not answering
    ├── AccessDenied                D-Bus AccessDenied (or polkit said no)
    ├── BackendTimeout              systemd did not answer (or finish a job) in time
    ├── InvalidArgument(text)       systemd refused a value (InvalidArgs: e.g. CPUWeight > 10000)
    ├── BadReply                    a reply did not have the shape we expected
    ├── WatchOverflow               a watcher did not keep up; events were lost
    └── DBusCallFailed(name, text)  any other D-Bus error reply (the name is kept for logs)

D-Bus error names map to these in one table, ``ERROR_TABLE``; ``error_from_dbus`` is the only
translation. The lead maps these to Varlink errors; nothing here knows about Varlink.
"""

from __future__ import annotations

from .values import MIN_SYSTEMD_VERSION


class BackendError(Exception):
    """Base of every error the systemd backend raises."""


class SystemdUnavailable(BackendError):
    """The system bus is missing, PID 1 is not systemd, or the connection broke."""


class SystemdTooOld(BackendError):
    """PID 1 is older than the first release with capsules (MIN_SYSTEMD_VERSION)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"systemd {version} is too old, capsules need {MIN_SYSTEMD_VERSION}")
        self.version = version


class NoSuchUnit(BackendError):
    """systemd (PID 1 or a capsule's manager) does not know the unit."""

    def __init__(self, unit: str) -> None:
        super().__init__(f"no such unit: {unit}")
        self.unit = unit


class JobFailed(BackendError):
    """A job finished with a result other than "done".

    ``result`` is the job result (JobRemoved: failed, timeout, dependency, canceled, ...);
    ``unit_result`` the unit's Result property after the job (exit-code, signal, ...), if known.
    """

    def __init__(self, result: str, unit_result: str | None = None) -> None:
        super().__init__(f"job {result}" + (f" (unit result {unit_result})" if unit_result else ""))
        self.result = result
        self.unit_result = unit_result


class UnitBusy(BackendError):
    """The unit must be inactive (CleanUnit on a running capsule), or a job is pending."""

    def __init__(self, unit: str) -> None:
        super().__init__(f"unit is not inactive: {unit}")
        self.unit = unit


class ManagerUnavailable(BackendError):
    """A capsule's service manager cannot be reached safely (not running, unsafe socket, ...)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"capsule {name}: manager unavailable: {reason}")
        self.name = name
        self.reason = reason


class AccessDenied(BackendError):
    """D-Bus refused the call (org.freedesktop.DBus.Error.AccessDenied and friends)."""


class BackendTimeout(BackendError):
    """systemd did not answer a call, or did not finish a job, within our bound."""


class InvalidArgument(BackendError):
    """systemd refused an argument as out of range or malformed (its message in ``text``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class BadReply(BackendError):
    """A reply or signal body did not have the shape (or a size) we expected."""


class WatchOverflow(BackendError):
    """A state watcher fell behind its bounded queue; events were dropped."""


class DBusCallFailed(BackendError):
    """Any D-Bus error reply not listed in ERROR_TABLE."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


# The one table: D-Bus error name -> how to build our error from (unit, text).
# Names from systemd's src/libsystemd/sd-bus/bus-common-errors.h and the D-Bus spec.
def _no_such_unit(unit: str, _text: str) -> BackendError:
    return NoSuchUnit(unit)


def _busy(unit: str, _text: str) -> BackendError:
    return UnitBusy(unit)


def _denied(_unit: str, text: str) -> BackendError:
    return AccessDenied(text)


def _unavailable(_unit: str, text: str) -> BackendError:
    return SystemdUnavailable(text)


def _invalid(_unit: str, text: str) -> BackendError:
    return InvalidArgument(text)


def _timeout(_unit: str, text: str) -> BackendError:
    return BackendTimeout(text)


ERROR_TABLE = {
    "org.freedesktop.systemd1.NoSuchUnit": _no_such_unit,
    "org.freedesktop.systemd1.LoadFailed": _no_such_unit,
    "org.freedesktop.systemd1.UnitMasked": _no_such_unit,
    "org.freedesktop.systemd1.UnitBusy": _busy,
    "org.freedesktop.systemd1.UnitExists": _busy,  # StartTransientUnit with a name in use
    "org.freedesktop.systemd1.UnitInactive": _busy,
    "org.freedesktop.systemd1.TransactionIsDestructive": _busy,
    "org.freedesktop.DBus.Error.AccessDenied": _denied,
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired": _denied,
    "org.freedesktop.DBus.Error.AuthFailed": _denied,
    "org.freedesktop.DBus.Error.InvalidArgs": _invalid,
    "org.freedesktop.DBus.Error.ServiceUnknown": _unavailable,
    "org.freedesktop.DBus.Error.NameHasNoOwner": _unavailable,
    "org.freedesktop.DBus.Error.NoServer": _unavailable,
    "org.freedesktop.DBus.Error.Disconnected": _unavailable,
    "org.freedesktop.DBus.Error.NoReply": _timeout,
    "org.freedesktop.DBus.Error.Timeout": _timeout,
    "org.freedesktop.DBus.Error.TimedOut": _timeout,
}


def error_from_dbus(name: str, text: str, unit: str = "") -> BackendError:
    """Translate a D-Bus error reply into our tree (the only place that does)."""
    make = ERROR_TABLE.get(name)
    if make is None:
        return DBusCallFailed(name, text)
    return make(unit, text)
