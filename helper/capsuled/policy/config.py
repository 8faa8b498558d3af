"""The policy configuration under /etc/capsuled: files read safely, then checked against the schema.

Both backends use it: capsuled's own grants, quotas and the backend choice apply whichever of
builtin or polkit decides; [defaults] and [[rule]] are the builtin backend's.

Files, read in this order (later values override earlier ones; rules are concatenated):
    /etc/capsuled/capsuled.toml
    /etc/capsuled/capsuled.toml.d/*.toml      lexical order, names starting with "." skipped

Missing files are fine: the compiled-in default (engine.DEFAULT_CONFIG, spelled out in
config/capsuled.toml) applies. A file or directory that is not owned by root or is writable by
group or others, a file that is not regular, not UTF-8, not TOML, or does not follow the schema
(unknown keys included: a typo must not silently change the policy) refuses the *whole*
configuration: an error goes to the journal and every non-root request is denied until it is
fixed — never a fall-back to allow.

Schema (see config/capsuled.toml for the commented version):
    [policy]   backend = "auto" | "builtin" | "polkit"
    [owner]    actions = [ACTION...], require_group = "capsule" ("" for no condition)
    [create]   groups = [GROUP...]
    [defaults] ACTION = "yes" | "no" | "auth_admin"         (builtin backend only)
    [quota]    max_capsules / max_memory_bytes / max_tasks / max_cpu_weight = INT | "infinity"
               (max_memory_bytes also "512M", "2G": 1024-based like systemd)
    [[quota_rule]]  users / groups = [...], any max_* key
    [[rule]]   users (names or uids), groups, actions, capsules (globs), verbs, units (globs),
               signers (deploy: trusted-key names), caller_units (globs on the calling
               process's system unit), result = "yes" | "no" | "auth_admin"
               (builtin backend only; first match wins)
ACTION is a short name ("manage-units"), a full id, or "*" for every action.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Final

from capsuled.policy import actions
from capsuled.policy.engine import (
    BACKENDS,
    DEFAULT_CONFIG,
    DENY_ALL,
    QUOTA_FIELDS,
    Decision,
    PolicyConfig,
    QuotaRule,
    Rule,
    Who,
)

log = logging.getLogger(__name__)

MAIN_FILE: Final = "capsuled.toml"
DROPIN_DIR: Final = "capsuled.toml.d"
MAX_CONFIG_BYTES: Final = 1024 * 1024
_RESULTS: Final = {d.value: d for d in Decision}
_SIZE_SUFFIXES: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE: Final = re.compile(r"([0-9]+)([KMGT]?)")


class ConfigError(Exception):
    """A configuration file is unsafe or malformed; the message names the file and the problem."""


# -- loading -------------------------------------------------------------------------------------


def load_config(config_dir: Path) -> PolicyConfig:
    """The configuration under `config_dir`, or DENY_ALL (logged) if any part of it is refused."""
    try:
        texts = read_config_files(config_dir)
        config = DEFAULT_CONFIG
        for origin, text in texts:
            config = apply_layer(config, origin, text)
    except ConfigError as exc:
        log.error(
            "policy configuration refused: %s; denying every request from non-root callers "
            "until it is fixed",
            exc,
        )
        return DENY_ALL
    return config


def read_config_files(config_dir: Path) -> list[tuple[str, str]]:
    """(path, text) of every config file in order, after the ownership and mode checks.

    Raises:
        ConfigError: a file or directory is unsafe or unreadable.
    """
    files: list[tuple[str, str]] = []
    dir_fd = open_checked_dir(config_dir)
    if dir_fd is None:
        return files
    try:
        text = read_checked_file(dir_fd, MAIN_FILE, config_dir / MAIN_FILE)
        if text is not None:
            files.append((str(config_dir / MAIN_FILE), text))
        dropin_fd = open_checked_dir(
            Path(DROPIN_DIR), parent_fd=dir_fd, shown=config_dir / DROPIN_DIR
        )
    finally:
        os.close(dir_fd)
    if dropin_fd is None:
        return files
    try:
        # sorted() on str is code-point order: the same as C's strcmp on UTF-8 names.
        for name in sorted(os.listdir(dropin_fd)):
            if name.startswith(".") or not name.endswith(".toml"):
                continue
            shown = config_dir / DROPIN_DIR / name
            text = read_checked_file(dropin_fd, name, shown)
            if text is not None:
                files.append((str(shown), text))
    finally:
        os.close(dropin_fd)
    return files


def _check_safe(st: os.stat_result, shown: Path, kind: str) -> None:
    # A file a non-root user can write (or replace, for directories) would let that user write the
    # policy that decides what root does for them.
    if st.st_uid != 0:
        raise ConfigError(f"{shown}: {kind} is owned by uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{shown}: {kind} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        )


def open_checked_dir(
    path: Path, *, parent_fd: int | None = None, shown: Path | None = None
) -> int | None:
    """Open a directory of the configuration (None if missing), refusing an unsafe one.

    Raises:
        ConfigError: not a directory, unreadable, not root's or writable by group or others.
    """
    shown = shown or path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    except NotADirectoryError as exc:
        raise ConfigError(f"{shown}: not a directory") from exc
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot open: {os.strerror(exc.errno or errno.EIO)}") from exc
    try:
        # fstat on the opened fd: what we checked is what we read, whatever happens to the path.
        _check_safe(os.fstat(fd), shown, "directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_checked_file(
    dir_fd: int, name: str, shown: Path, *, max_bytes: int = MAX_CONFIG_BYTES
) -> str | None:
    """The UTF-8 text of a configuration file (None if missing), refusing an unsafe one.

    Raises:
        ConfigError: not a regular file, not root's, writable by group or others, over
            `max_bytes`, unreadable or not UTF-8.
    """
    try:
        # O_NONBLOCK: a FIFO must not hang the daemon; it is refused below as not a regular file.
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot open: {os.strerror(exc.errno or errno.EIO)}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{shown}: not a regular file")
        _check_safe(st, shown, "file")
        if st.st_size > max_bytes:
            raise ConfigError(f"{shown}: larger than {max_bytes} bytes")
        data = os.read(fd, max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {os.strerror(exc.errno or errno.EIO)}") from exc
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: not valid UTF-8 (byte {exc.start})") from exc


# -- schema ----------------------------------------------------------------------------------------

_RULE_KEYS: Final = frozenset(
    {
        "users",
        "groups",
        "actions",
        "capsules",
        "verbs",
        "units",
        "owner",
        "signers",
        "caller_units",
        "result",
    }
)


def apply_layer(config: PolicyConfig, origin: str, text: str) -> PolicyConfig:
    """`config` with the settings of one file applied on top.

    Raises:
        ConfigError: the text is not TOML or does not follow the schema.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from exc
    _only_keys(doc, _TOP_KEYS, origin)
    for section, apply in _SECTIONS.items():
        if section in doc:
            config = apply(config, doc[section], origin)
    return config


def _apply_policy(config: PolicyConfig, value: object, origin: str) -> PolicyConfig:
    table = _table(value, f"{origin}: [policy]")
    _only_keys(table, {"backend"}, f"{origin}: [policy]")
    if "backend" not in table:
        return config
    backend = table["backend"]
    if backend not in BACKENDS:
        choices = ", ".join(BACKENDS)
        raise ConfigError(f"{origin}: [policy] backend must be one of {choices}")
    return replace(config, backend=str(backend))


def _apply_owner(config: PolicyConfig, value: object, origin: str) -> PolicyConfig:
    where = f"{origin}: [owner]"
    table = _table(value, where)
    _only_keys(table, {"actions", "require_group"}, where)
    owner = config.owner
    if "actions" in table:
        owner = replace(owner, actions=_actions(table["actions"], f"{where} actions"))
    if "require_group" in table:
        group = _string(table["require_group"], f"{where} require_group")
        owner = replace(owner, require_group=group or None)
    return replace(config, owner=owner)


def _apply_create(config: PolicyConfig, value: object, origin: str) -> PolicyConfig:
    where = f"{origin}: [create]"
    table = _table(value, where)
    _only_keys(table, {"groups"}, where)
    if "groups" not in table:
        return config
    return replace(config, create_groups=_names(table["groups"], f"{where} groups"))


def _apply_defaults(config: PolicyConfig, value: object, origin: str) -> PolicyConfig:
    where = f"{origin}: [defaults]"
    defaults = dict(config.defaults)
    for key, result in _table(value, where).items():
        decision = _result(result, f"{where} {key}")
        for action in _actions([key], f"{where} {key}"):
            defaults[action] = decision
    return replace(config, defaults=MappingProxyType(defaults))


def _apply_quota(config: PolicyConfig, value: object, origin: str) -> PolicyConfig:
    where = f"{origin}: [quota]"
    table = _table(value, where)
    _only_keys(table, set(QUOTA_FIELDS), where)
    values = _quota_values(table, where)
    return replace(config, quota=replace(config.quota, **dict(values)))


def _apply_quota_rules(config: PolicyConfig, value: object, origin: str) -> PolicyConfig:
    rules = list(config.quota_rules)
    for i, item in enumerate(_array_of_tables(value, f"{origin}: quota_rule")):
        where = f"{origin}: quota_rule #{i + 1}"
        _only_keys(item, {"users", "groups", *QUOTA_FIELDS}, where)
        rules.append(QuotaRule(_who(item, where), _quota_values(item, where), where))
    return replace(config, quota_rules=tuple(rules))


def _apply_rules(config: PolicyConfig, value: object, origin: str) -> PolicyConfig:
    rules = list(config.rules)
    for i, item in enumerate(_array_of_tables(value, f"{origin}: rule")):
        rules.append(_rule(item, f"{origin}: rule #{i + 1}"))
    return replace(config, rules=tuple(rules))


# The top-level tables, each with its reader, applied in this order.
_SECTIONS: Final[Mapping[str, Callable[[PolicyConfig, object, str], PolicyConfig]]] = {
    "policy": _apply_policy,
    "owner": _apply_owner,
    "create": _apply_create,
    "defaults": _apply_defaults,
    "quota": _apply_quota,
    "quota_rule": _apply_quota_rules,
    "rule": _apply_rules,
}
_TOP_KEYS: Final = frozenset(_SECTIONS)


def _rule(item: Mapping[str, object], where: str) -> Rule:
    _only_keys(item, _RULE_KEYS, where)
    if "result" not in item:
        raise ConfigError(f"{where}: result is missing")
    return Rule(
        result=_result(item["result"], f"{where} result"),
        who=_who(item, where),
        actions=_actions(item["actions"], f"{where} actions") if "actions" in item else frozenset(),
        capsules=tuple(_strings(item.get("capsules", []), f"{where} capsules")),
        verbs=frozenset(_strings(item.get("verbs", []), f"{where} verbs")),
        units=tuple(_strings(item.get("units", []), f"{where} units")),
        owner=_bool(item.get("owner", False), f"{where} owner"),
        signers=_names(item.get("signers", []), f"{where} signers"),
        caller_units=tuple(_strings(item.get("caller_units", []), f"{where} caller_units")),
        origin=where,
    )


def _who(item: Mapping[str, object], where: str) -> Who:
    users: set[str] = set()
    uids: set[int] = set()
    raw = item.get("users", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where} users: expected an array of user names or uids")
    for user in raw:
        # bool is an int in Python; a `true` here is a mistake, not uid 1.
        if isinstance(user, int) and not isinstance(user, bool) and user >= 0:
            uids.add(user)
        elif isinstance(user, str) and user:
            users.add(user)
        else:
            raise ConfigError(f"{where} users: {user!r} is neither a user name nor a uid")
    return Who(frozenset(users), frozenset(uids), _names(item.get("groups", []), f"{where} groups"))


def _quota_values(table: Mapping[str, object], where: str) -> tuple[tuple[str, int | None], ...]:
    values: list[tuple[str, int | None]] = []
    for name in QUOTA_FIELDS:
        if name not in table:
            continue
        raw = table[name]
        value: int | None
        if raw == "infinity":
            value = None
        elif isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
            value = raw
        elif isinstance(raw, str) and name == "max_memory_bytes" and _SIZE_RE.fullmatch(raw):
            match = _SIZE_RE.fullmatch(raw)
            assert match is not None  # just matched above
            value = int(match[1]) * _SIZE_SUFFIXES[match[2]]
        else:
            raise ConfigError(f'{where} {name}: expected a non-negative integer or "infinity"')
        values.append((name, value))
    return tuple(values)


def _only_keys(table: Mapping[str, object], allowed: set[str] | frozenset[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _table(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table")
    return value


def _array_of_tables(value: object, where: str) -> list[dict[str, object]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{where}: expected [[{where.rpartition(' ')[2]}]] tables")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string")
    return value


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: expected an array of non-empty strings")
    return list(value)


def _names(value: object, where: str) -> frozenset[str]:
    return frozenset(_strings(value, where))


def _actions(value: object, where: str) -> frozenset[str]:
    result: set[str] = set()
    for name in _strings(value, where):
        if name == "*":
            result.update(actions.ALL)
            continue
        try:
            result.add(actions.resolve(name))
        except ValueError:
            raise ConfigError(f"{where}: unknown action {name!r}") from None
    return frozenset(result)


def _result(value: object, where: str) -> Decision:
    if not isinstance(value, str) or value not in _RESULTS:
        raise ConfigError(f"{where}: expected one of {', '.join(_RESULTS)}")
    return _RESULTS[value]


__all__ = ["ConfigError", "apply_layer", "load_config", "read_config_files"]
