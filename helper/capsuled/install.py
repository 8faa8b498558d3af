"""`capsuled install` / `capsuled uninstall`: put capsuled's host files in place, or remove them.

The files come from the wheel itself (package data capsuled.data.{units,polkit,config}, see
pyproject.toml, and the manual pages setup.py renders into capsuled/data/man/), so a host needs
nothing but the installed distribution; in a source checkout the top-level units/ polkit/
config/ directories are used instead, and the pages are rendered from man/ (needs docutils).

Where things go (all relative to --root, default /). PREFIX is /usr/local by default, since a
pip install is a local admin install (file-hierarchy(7)); a distribution package passes /usr:

    PREFIX/lib/systemd/system/capsuled.{socket,service}
    PREFIX/lib/sysusers.d/capsuled.conf           group `capsule`
    PREFIX/lib/tmpfiles.d/capsuled.conf           the capsule directories the service may write
    PREFIX/share/capsuled/install-manifest.json   what was written, for uninstall
    PREFIX/share/bash-completion/completions/capsulectl   the client's bash completion
    PREFIX/share/zsh/site-functions/_capsulectl    zsh (Debian's /usr: share/zsh/vendor-completions)
    PREFIX/share/fish/vendor_completions.d/capsulectl.fish    fish, for PREFIX /usr only; other
                                                  prefixes: /etc/fish/completions/capsulectl.fish
    PREFIX/share/man/man{1,5,8}/                  capsulectl(1), capsuled.toml(5), capsuled(8)
    /usr/share/polkit-1/actions/*.policy          the only directory polkitd reads actions from
    /usr/share/doc/capsuled/examples/             example polkit rules and the default config
                                                  (polkit(8): a mechanism ships no active rules)
    /etc/capsuled/capsuled.toml                   only if absent: an admin's config is never
                                                  overwritten
    /etc/capsuled/capsuled.toml.d/                drop-ins

`install` then (unless --root) creates the helper's audit signing key
(/var/lib/capsuled/audit-signing.key, root only, kept if it exists: capsuled.trail), the group
`capsule` with systemd-sysusers, the capsule directories with systemd-tmpfiles, reloads PID 1
and (unless --no-enable) enables capsuled.socket. Never with --root: a key staged into a
package would be the same secret on every host (the daemon makes one itself if missing).
This is an admin tool, so running systemctl here is fine; the daemon never does.

A distribution package is built with `install --root DESTDIR --prefix /usr --no-manifest` (see
debian/rules): the same layout, but the package manager owns the files, so there is no manifest
for `uninstall` to act on, and a live `install` refuses where a package has put capsuled's
units into /usr/lib (it would shadow or fight the package's files).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

__all__ = ["main_install", "main_uninstall"]

MIN_SYSTEMD_VERSION = 256  # capsule@.service appeared in systemd 256
BINDIR_PLACEHOLDER = "@BINDIR@"
SOCKET_UNIT = "capsuled.socket"
SERVICE_UNIT = "capsuled.service"
FILE_MODE = 0o644  # world-readable, root-owned: units, actions and config hold no secrets
DIR_MODE = 0o755

ETC_DIR = PurePosixPath("/etc/capsuled")
CONFIG_NAME = "capsuled.toml"
POLKIT_ACTIONS_DIR = PurePosixPath("/usr/share/polkit-1/actions")
EXAMPLES_DIR = PurePosixPath("/usr/share/doc/capsuled/examples")
# bash-completion loads completions/NAME on first use of NAME, from every XDG_DATA_DIRS entry
# (/usr/local/share first by default), so PREFIX/share suits pip and packages alike.
COMPLETION_DIR = PurePosixPath("share/bash-completion/completions")
COMPLETION_SOURCE = ("completion", "capsulectl.bash")  # inside the capsulectl package
# zsh: upstream's default $fpath has PREFIX/share/zsh/site-functions for every prefix; Debian's
# zsh keeps /usr/local/share/zsh/site-functions but reads packages' completions from
# /usr/share/zsh/vendor-completions instead (/usr/share/zsh/site-functions is not on its $fpath).
ZSH_COMPLETION_DIR = PurePosixPath("share/zsh/site-functions")
ZSH_DEBIAN_VENDOR_DIR = PurePosixPath("/usr/share/zsh/vendor-completions")
ZSH_COMPLETION_SOURCE = ("completion", "_capsulectl")
# fish: packages use its vendor directory (`pkg-config --variable completionsdir fish`); fish
# looks for vendor_completions.d under $XDG_DATA_DIRS only, which is unset on a console or ssh
# login, so /usr/local/share/fish is not read there. /etc/fish/completions (fish's sysconf dir,
# for completions the administrator installs) always is.
FISH_VENDOR_DIR = PurePosixPath("/usr/share/fish/vendor_completions.d")
FISH_ADMIN_DIR = PurePosixPath("/etc/fish/completions")
FISH_COMPLETION_SOURCE = ("completion", "capsulectl.fish")
MAN_DIR = PurePosixPath("share/man")
MAN_SOURCE = ("data", "man")  # inside the capsuled package: rendered by setup.py
DEBIAN_MARKER = Path("/etc/debian_version")
# A distribution package's units (file-hierarchy(7): /usr/lib is the vendor's, /usr/local/lib
# the admin's): found there and not in our /usr manifest, they are the package's.
VENDOR_UNIT = PurePosixPath("/usr/lib/systemd/system") / "capsuled.socket"

_CHECKOUT = Path(__file__).resolve().parents[2]


class InstallError(Exception):
    """A reason to stop, printed as one line to stderr."""


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """One file `install` writes: where (inside the root), what, and whether it is admin config."""

    dest: PurePosixPath
    content: bytes
    config: bool = False  # written only if absent, removed only if unmodified


# --- where the packaged files are -------------------------------------------------------------


def _data_dir(kind: str) -> Traversable:
    """capsuled.data.KIND from the installed wheel, or the checkout's top-level KIND/ directory."""
    try:
        found = resources.files(f"capsuled.data.{kind}")
    except ModuleNotFoundError:
        found = None
    if found is not None and found.is_dir() and any(found.iterdir()):
        return found
    return _CHECKOUT / kind


def _files(kind: str) -> Iterator[Traversable]:
    for entry in sorted(_data_dir(kind).iterdir(), key=lambda e: e.name):
        if entry.is_file() and not entry.name.startswith(("_", ".")):
            yield entry


def _completion_script(parts: tuple[str, ...] = COMPLETION_SOURCE) -> Traversable | None:
    """A completion script of capsulectl from the installed wheel, or the checkout's copy."""
    try:
        found: Traversable = resources.files("capsulectl")
    except ModuleNotFoundError:
        found = _CHECKOUT / "client/capsulectl"
    script = found.joinpath(*parts)
    return script if script.is_file() else None


def _completions(prefix: PurePosixPath) -> Iterator[PlannedFile]:
    """bash, zsh and fish completion, each where that shell looks for a PREFIX install."""
    zsh_dir = prefix / ZSH_COMPLETION_DIR
    if prefix == PurePosixPath("/usr") and DEBIAN_MARKER.exists():
        zsh_dir = ZSH_DEBIAN_VENDOR_DIR
    fish_dir = FISH_VENDOR_DIR if prefix == PurePosixPath("/usr") else FISH_ADMIN_DIR
    for source, dest in (
        (COMPLETION_SOURCE, prefix / COMPLETION_DIR / "capsulectl"),
        (ZSH_COMPLETION_SOURCE, zsh_dir / "_capsulectl"),
        (FISH_COMPLETION_SOURCE, fish_dir / "capsulectl.fish"),
    ):
        script = _completion_script(source)
        if script is not None:  # the same wheel ships them; only a trimmed checkout lacks one
            yield PlannedFile(dest, script.read_bytes())


def _man_pages() -> list[tuple[str, bytes]]:
    """(NAME.SECTION, roff) of every manual page: built into the wheel, or rendered from man/.

    Raises:
        InstallError: running from a checkout without docutils to render the pages.
    """
    built = resources.files("capsuled").joinpath(*MAN_SOURCE)
    if built.is_dir():
        pages = [(e.name, e.read_bytes()) for e in built.iterdir() if e.is_file()]
        if pages:
            return sorted(pages)
    return list(_render_checkout_pages())


@functools.cache  # a checkout's pages do not change while we run; rendering takes ~0.3 s
def _render_checkout_pages() -> tuple[tuple[str, bytes], ...]:
    renderer = _CHECKOUT / "tools/manpages.py"
    if not renderer.is_file():
        return ()  # neither a wheel with pages nor a checkout: nothing to install
    import importlib.util

    spec = importlib.util.spec_from_file_location("capsuled_manpages", renderer)
    if spec is None or spec.loader is None:
        raise InstallError(f"cannot load {renderer}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        version = module.project_version(_CHECKOUT)
        return tuple((src.stem, module.render(src, version)) for src in module.sources())
    except ImportError as exc:
        raise InstallError(f"rendering the manual pages from a checkout needs {exc.name}") from exc


def plan(prefix: PurePosixPath, bindir: PurePosixPath) -> list[PlannedFile]:
    """Every file `install` writes, in order.

    Raises:
        InstallError: the manual pages cannot be rendered (a checkout without docutils).
    """
    lib = prefix / "lib"
    planned: list[PlannedFile] = []
    for entry in _files("units"):
        data = entry.read_bytes()
        if entry.name.endswith((".socket", ".service")):
            data = data.replace(BINDIR_PLACEHOLDER.encode(), str(bindir).encode())
            planned.append(PlannedFile(lib / "systemd/system" / entry.name, data))
        elif entry.name == "capsuled.sysusers":
            planned.append(PlannedFile(lib / "sysusers.d/capsuled.conf", data))
        elif entry.name == "capsuled.tmpfiles":
            planned.append(PlannedFile(lib / "tmpfiles.d/capsuled.conf", data))
    for entry in _files("polkit"):
        data = entry.read_bytes()
        if entry.name.endswith(".policy"):
            planned.append(PlannedFile(POLKIT_ACTIONS_DIR / entry.name, data))
        else:
            planned.append(PlannedFile(EXAMPLES_DIR / entry.name, data))
    for entry in _files("config"):
        data = entry.read_bytes()
        planned.append(PlannedFile(EXAMPLES_DIR / entry.name, data))
        if entry.name == CONFIG_NAME:
            planned.append(PlannedFile(ETC_DIR / CONFIG_NAME, data, config=True))
    planned.extend(_completions(prefix))
    for name, page in _man_pages():
        section = name.rpartition(".")[2]
        planned.append(PlannedFile(prefix / MAN_DIR / f"man{section}" / name, page))
    return planned


def manifest_path(prefix: PurePosixPath) -> PurePosixPath:
    """Where install records what it wrote, for uninstall."""
    return prefix / "share/capsuled/install-manifest.json"


# --- host checks --------------------------------------------------------------------------------


def parse_systemd_version(text: str) -> int | None:
    """The major version from `systemctl --version` ("systemd 257 (257.13-1~deb13u1)")."""
    match = re.match(r"systemd (\d+)\b", text)
    return int(match.group(1)) if match else None


def host_problem(version: int | None, booted: bool) -> str | None:
    """Why capsuled cannot be installed live on this host, or None if it can."""
    if version is None:
        return "cannot tell the systemd version (is systemctl installed?)"
    if version < MIN_SYSTEMD_VERSION:
        return (
            f"systemd {version} is too old: capsules need systemd >= {MIN_SYSTEMD_VERSION} "
            "(use --root DIR to stage the files for another machine)"
        )
    if not booted:
        return (
            "systemd is not running as PID 1 here (no /run/systemd/system); "
            "use --root DIR to stage the files for another machine"
        )
    return None


def packaged_problem(root: Path) -> str | None:
    """Why a live install must not run: a distribution package installed capsuled; else None."""
    unit = _under(root, VENDOR_UNIT)
    if not unit.exists():
        return None
    try:
        manifest = json.loads(_under(root, manifest_path(PurePosixPath("/usr"))).read_text())
        ours = {entry["path"] for entry in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        ours = set()
    if str(VENDOR_UNIT) in ours:
        return None  # an earlier `capsuled install --prefix /usr`: reinstalling is fine
    return (
        f"{VENDOR_UNIT} is not from `capsuled install`: a distribution package installed "
        "capsuled, and owns its files (use the package manager, or --root DIR to stage files)"
    )


def _systemd_version() -> int | None:
    try:
        proc = subprocess.run(
            ["systemctl", "--version"], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_systemd_version(proc.stdout)


def _booted() -> bool:
    # sd_booted(3): this directory exists iff systemd is PID 1.
    return os.path.isdir("/run/systemd/system")


def find_bindir() -> PurePosixPath:
    """Directory of the installed `capsuled` script, for ExecStart=.

    Raises:
        InstallError: no `capsuled` executable can be found.
    """
    candidates: list[str] = []
    if os.path.basename(sys.argv[0]) == "capsuled":
        candidates.append(sys.argv[0])
    which = shutil.which("capsuled")
    if which:
        candidates.append(which)
    for candidate in candidates:
        path = Path(candidate).absolute()
        if path.is_file() and os.access(path, os.X_OK):
            return PurePosixPath(path.parent)
    raise InstallError("cannot find the `capsuled` executable; pass --bindir DIR")


def executable_problem(
    path: str, *, lstat: Callable[[str], os.stat_result] = os.lstat
) -> str | None:
    """Why root must not run `path` as capsuled.service's ExecStart=, or None.

    Whoever can replace the file, or rename anything on the way to it, runs code as root when
    the socket is next activated: so the file and every directory above it, on the path as
    given and on the path it resolves to, must be root's and writable by nobody else (group
    writable only for group root). Symlinks on the way are followed, not judged themselves:
    nobody can rewrite a symlink, only its directory's owner replace it, and that directory is
    checked.
    """
    real = os.path.realpath(path)
    for route in dict.fromkeys((os.path.abspath(path), real)):
        parts = PurePosixPath(route).parts
        for depth in range(1, len(parts) + 1):
            current = str(PurePosixPath(*parts[:depth]))
            try:
                st = lstat(current)
            except OSError as exc:
                return f"{current}: {exc.strerror or exc}"
            if stat.S_ISLNK(st.st_mode):
                continue
            if st.st_uid != 0:
                return f"{current} is owned by uid {st.st_uid}, not root"
            if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0):
                return f"{current} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    if not stat.S_ISREG(lstat(real).st_mode):
        return f"{real} is not a regular file"
    return None


# --- writing ----------------------------------------------------------------------------------


def _under(root: Path, path: PurePosixPath) -> Path:
    return root / path.relative_to("/")


def _make_dirs(root: Path, path: Path) -> None:
    missing: list[Path] = []
    cur = path
    while not cur.exists() and cur != root:
        missing.append(cur)
        cur = cur.parent
    for d in reversed(missing):
        d.mkdir(mode=DIR_MODE)
        os.chmod(d, DIR_MODE)  # mkdir's mode is filtered by the umask
        if os.geteuid() == 0:
            os.chown(d, 0, 0)


def _write_file(target: Path, content: bytes) -> None:
    """Write atomically (temp file + rename in the same directory), root-owned and 0644."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        if os.geteuid() == 0:
            os.chown(tmp, 0, 0)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def install_files(
    root: Path,
    prefix: PurePosixPath,
    bindir: PurePosixPath,
    out: list[str],
    *,
    manifest: bool = True,
) -> list[PlannedFile]:
    """Write every planned file under root, and the manifest unless told not to.

    Returns what was written.
    """
    written: list[PlannedFile] = []
    root.mkdir(parents=True, exist_ok=True)  # a packager's DESTDIR need not exist yet
    for item in plan(prefix, bindir):
        target = _under(root, item.dest)
        _make_dirs(root, target.parent)
        if item.config and target.exists():
            out.append(f"kept existing {item.dest} (an admin's configuration is never overwritten)")
            if target.read_bytes() == item.content:
                written.append(item)  # still the shipped default: uninstall may remove it
            continue
        _write_file(target, item.content)
        written.append(item)
        out.append(f"wrote {item.dest}")
    dropins = _under(root, ETC_DIR / f"{CONFIG_NAME}.d")
    _make_dirs(root, dropins)
    if not manifest:
        return written  # a package manager records the files itself
    record = {
        "files": [
            {"path": str(i.dest), "sha256": _sha256(i.content), "config": i.config} for i in written
        ],
        # Removed by uninstall if empty, deepest first. /etc/fish/completions: made for our
        # completion even where fish is absent; fish's own /etc/fish is never empty.
        "created_dirs": [
            str(ETC_DIR / f"{CONFIG_NAME}.d"),
            str(EXAMPLES_DIR),
            str(FISH_ADMIN_DIR),
            str(FISH_ADMIN_DIR.parent),
        ],
    }
    target = _under(root, manifest_path(prefix))
    _make_dirs(root, target.parent)
    _write_file(target, (json.dumps(record, indent=2) + "\n").encode())
    return written


def uninstall_files(root: Path, prefix: PurePosixPath, out: list[str]) -> None:
    """Remove what the manifest lists, except admin-modified config.

    Raises:
        InstallError: no manifest (nothing was installed with this --root/--prefix).
    """
    mpath = _under(root, manifest_path(prefix))
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        dirs = manifest.get("created_dirs", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InstallError(f"no usable install manifest at {manifest_path(prefix)}: {exc}") from exc
    for entry in files:
        dest = PurePosixPath(entry["path"])
        target = _under(root, dest)
        if not target.exists():
            continue
        if entry.get("config") and _sha256(target.read_bytes()) != entry["sha256"]:
            out.append(f"kept {dest}: modified by an admin")
            continue
        target.unlink()
        out.append(f"removed {dest}")
    for d in [*dirs, str(ETC_DIR), str(manifest_path(prefix).parent)]:
        with contextlib.suppress(OSError):  # only if empty: admin drop-ins stay
            _under(root, PurePosixPath(d)).rmdir()
    mpath.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        mpath.parent.rmdir()
    out.append(
        "left in place: /var/lib/capsuled (owner records), the group `capsule`, capsules and "
        "their data, and any configuration an admin changed or added"
    )


# --- live host actions -------------------------------------------------------------------------


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InstallError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def _audit_key(out: list[str]) -> None:
    """The helper's own key for signing the audit trail's checkpoints: made once, never
    replaced (a new key would leave the old checkpoints unverifiable with the published one)."""
    from capsuled.trail import AUDIT_KEY, TrailError, ensure_signing_key

    try:
        _, made = ensure_signing_key(AUDIT_KEY)
    except TrailError as exc:
        raise InstallError(str(exc)) from exc
    if made:
        out.append(f"created the audit signing key {AUDIT_KEY} (root only) and {AUDIT_KEY}.pub")
    else:
        out.append(f"kept the audit signing key {AUDIT_KEY}")


def _activate(prefix: PurePosixPath, enable: bool, out: list[str]) -> None:
    lib = prefix / "lib"
    _audit_key(out)
    _run(["systemd-sysusers", str(lib / "sysusers.d/capsuled.conf")])
    out.append("ensured group `capsule` (systemd-sysusers)")
    _run(["systemd-tmpfiles", "--create", str(lib / "tmpfiles.d/capsuled.conf")])
    _run(["systemctl", "daemon-reload"])
    out.append("reloaded systemd")
    if enable:
        _run(["systemctl", "enable", "--now", SOCKET_UNIT])
        # An upgrade: a running daemon still has the old code; the socket keeps connections.
        _run(["systemctl", "try-restart", SERVICE_UNIT])
        out.append(f"enabled and started {SOCKET_UNIT}")


def _deactivate(out: list[str]) -> None:
    # disable --now stops too; a missing unit is not an error here (half-removed install).
    subprocess.run(
        ["systemctl", "disable", "--now", SOCKET_UNIT, SERVICE_UNIT],
        capture_output=True,
        check=False,
    )
    out.append(f"stopped and disabled {SOCKET_UNIT}")


# --- command line -----------------------------------------------------------------------------


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--root",
        metavar="DIR",
        help="stage the files under DIR for packaging; touches nothing on the running system",
    )
    p.add_argument(
        "--prefix",
        default="/usr/local",
        metavar="DIR",
        help="where units, sysusers.d and tmpfiles.d go (default: %(default)s; packages: /usr)",
    )
    return p


def main_install(argv: list[str]) -> int:
    """`capsuled install`; returns the exit status."""
    p = _parser("capsuled install", "Install capsuled's units, polkit actions and config.")
    p.add_argument("--bindir", metavar="DIR", help="directory of the capsuled executable")
    p.add_argument("--no-enable", action="store_true", help="do not enable capsuled.socket")
    p.add_argument(
        "--no-manifest",
        action="store_true",
        help="write no install manifest: for a package manager that tracks the files itself "
        "(`capsuled uninstall` then has nothing to act on); only with --root",
    )
    args = p.parse_args(argv)
    if args.no_manifest and args.root is None:
        p.error("--no-manifest is for staging a package: use it with --root DIR")
    out: list[str] = []
    try:
        if args.root is None:
            if os.geteuid() != 0:
                raise InstallError("must be run as root (or with --root DIR)")
            problem = host_problem(_systemd_version(), _booted()) or packaged_problem(Path("/"))
            if problem:
                raise InstallError(problem)
        bindir = PurePosixPath(args.bindir) if args.bindir else find_bindir()
        if args.root is None:
            # Root will run it (ExecStart=): refuse one that someone else could replace.
            problem = executable_problem(str(bindir / "capsuled"))
            if problem:
                raise InstallError(f"will not point capsuled.service at it: {problem}")
        root = Path(args.root or "/")
        prefix = PurePosixPath(args.prefix)
        install_files(root, prefix, bindir, out, manifest=not args.no_manifest)
        if args.root is None:
            _activate(prefix, enable=not args.no_enable, out=out)
    except (InstallError, OSError) as exc:
        if out:
            print("\n".join(out))
        print(f"capsuled install: {exc}", file=sys.stderr)
        return 1
    print("\n".join(out))
    return 0


def main_uninstall(argv: list[str]) -> int:
    """`capsuled uninstall`; returns the exit status."""
    p = _parser("capsuled uninstall", "Remove what `capsuled install` put in place.")
    args = p.parse_args(argv)
    out: list[str] = []
    try:
        if args.root is None:
            if os.geteuid() != 0:
                raise InstallError("must be run as root (or with --root DIR)")
            _deactivate(out)
        uninstall_files(Path(args.root or "/"), PurePosixPath(args.prefix), out)
        if args.root is None:
            _run(["systemctl", "daemon-reload"])
    except (InstallError, OSError) as exc:
        if out:
            print("\n".join(out))
        print(f"capsuled uninstall: {exc}", file=sys.stderr)
        return 1
    print("\n".join(out))
    return 0
