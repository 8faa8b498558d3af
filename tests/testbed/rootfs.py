"""The testbed's root filesystems: Debian trees built once and cached outside the checkout.

Four flavours, each a RootSpec: trixie (systemd 257, the testbed every e2e test boots), a
smaller bookworm (systemd 252, older than capsules) for the "too old" tests, forky (Debian
testing, the newest systemd Debian has: 262 when written) for the newest-systemd tests, and
trixie-deb, trixie with the Debian package's build dependencies, where `make deb` builds on a
host older than Debian 13 (the containers have no network, so the build dependencies come in
here, at debootstrap time).

Layout under CACHE_DIR (default /var/cache/capsuled-testbed, override with
CAPSULED_TESTBED_CACHE):

    KEY.lock          flock: shared while a testbed uses KEY/root as its lower layer,
                      exclusive while KEY is built or pruned
    KEY/root/         the tree (read-only lower layer of every boot)
    KEY/ready         written last, after an fsync of everything else: no stamp, no cache
    .build-KEY-PID/   a build in progress (or one that died; pruned when PID is gone)

KEY hashes everything that shapes the tree (flavour, suite, variant, package list, mirror and
BUILDER_VERSION), so changing any of them builds a new tree and stale ones of the same flavour
are pruned (the ready stamp's "suite" names the flavour, so that testbed code from before
flavours, which prunes by that field, leaves trixie-deb alone; a stamp without it is from
trixie-only days).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import TestbedUnavailable

SUITE = "trixie"
VARIANT = "minbase"
MIRROR = os.environ.get("CAPSULED_TESTBED_MIRROR", "http://deb.debian.org/debian")

# Bump when the post-processing below changes what ends up in the tree.
BUILDER_VERSION = 2

# What a capsuled host needs, from Debian's own packages (the design brief's dependency table).
# debootstrap does not resolve virtual packages, hence python3-cffi-backend spelled out for
# python3-cryptography. minbase already has passwd (useradd), login and util-linux (setpriv).
PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "polkitd",
    "libnss-systemd",  # resolves the capsules' DynamicUser accounts (c-NAME)
    "libpam-systemd",
    "python3",
    "python3-pip",  # installs our wheel with --no-deps, as an admin would
    "python3-systemd",
    "python3-jeepney",
    "python3-cryptography",
    "python3-cffi-backend",
    "python3-varlink",
    "procps",  # ps/pgrep for tests and the demo
)

# Debian 12's systemd 252 predates capsules (256): what capsuled needs at run time, minus
# polkitd (policy falls back to the builtin backend), libpam-systemd (no logins here) and
# python3-varlink (bookworm has none, and the daemon never imports `varlink`; only tests do).
BOOKWORM_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libnss-systemd",
    "python3",
    "python3-pip",
    "python3-jeepney",
    "python3-systemd",
    "python3-cryptography",
    "python3-cffi-backend",
    "procps",
)

# Timers that do network or housekeeping work a throwaway container never needs; masking them
# keeps boots quiet and short.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "systemd-tmpfiles-clean.timer",
    "getty@tty1.service",
    "console-getty.service",
)

# Debian testing: the newest systemd Debian ships (262 when this was written), with the same
# packages as the trixie testbed. Testing moves, so this tree is as old as its cache: `make
# clean-cache` (or a changed list) fetches the current one.
NEWEST_SUITE = "forky"

# The Debian package's build environment: what debian/control's Build-Depends name, plus lintian
# (build-deb.sh fails on its errors) and systemd to boot the container. Variant buildd brings
# build-essential, which dpkg-checkbuilddeps requires implicitly. Keep in step with
# debian/control (a unit test compares the two).
DEB_BUILD_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "debhelper",
    "dh-python",
    "pybuild-plugin-pyproject",
    "python3-all",
    "python3-setuptools",
    "python3-docutils",
    "lintian",
    # Virtual packages are not resolved by debootstrap: lintian's libnet-ssleay-perl needs
    # perl-openssl-abi-3, which this one provides.
    "perl-openssl-defaults",
)

DEBOOTSTRAP_TIMEOUT_S = 900
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")


@dataclass(frozen=True, slots=True)
class RootSpec:
    """Everything one cached tree is built from."""

    suite: str
    packages: tuple[str, ...]
    masked: tuple[str, ...]
    variant: str = VARIANT
    flavour: str = ""  # the tree's name when it is not just the suite's (trixie-deb)

    @property
    def name(self) -> str:
        """What the cache, the ready stamp and bed names call this tree."""
        return self.flavour or self.suite


FLAVOURS = (SUITE, "bookworm", NEWEST_SUITE, "trixie-deb")
# The testbeds the e2e suite runs on, each in turn (pytest --bed): Debian 13, systemd 257, the
# reference; and Debian testing, the newest systemd Debian has.
BED_FLAVOURS = (SUITE, NEWEST_SUITE)


def root_spec(flavour: str = SUITE) -> RootSpec:
    """The spec for a flavour (see FLAVOURS), read from the module constants now.

    Raises:
        ValueError: a flavour the testbed has no package list for.
    """
    # Looked up at call time, not frozen at import, so a changed PACKAGES changes the key.
    if flavour == SUITE:
        return RootSpec(SUITE, PACKAGES, MASKED_UNITS, VARIANT)
    if flavour == "bookworm":
        return RootSpec("bookworm", BOOKWORM_PACKAGES, MASKED_UNITS, VARIANT)
    if flavour == NEWEST_SUITE:
        return RootSpec(NEWEST_SUITE, PACKAGES, MASKED_UNITS, VARIANT)
    if flavour == "trixie-deb":
        return RootSpec(SUITE, DEB_BUILD_PACKAGES, MASKED_UNITS, "buildd", flavour="trixie-deb")
    raise ValueError(f"no testbed root filesystem for suite {flavour!r} ({', '.join(FLAVOURS)})")


def cache_dir() -> Path:
    """Where cached trees live; outside the checkout so `git status` never sees them."""
    return Path(os.environ.get("CAPSULED_TESTBED_CACHE", "/var/cache/capsuled-testbed"))


def cache_key(spec: RootSpec | None = None) -> str:
    """A digest of every input that shapes the tree (default: the trixie tree)."""
    spec = spec or root_spec()
    # The same inputs, in the same shape, as before suites were a parameter: the trixie key
    # (and with it every cached trixie tree) is unchanged.
    inputs = {
        "suite": spec.suite,
        "variant": spec.variant,
        "packages": sorted(spec.packages),
        "masked": sorted(spec.masked),
        "mirror": MIRROR,
        "builder": BUILDER_VERSION,
    }
    if spec.flavour:  # absent for plain suites, so their keys stay as they were
        inputs["flavour"] = spec.flavour
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class CachedRoot:
    """A ready tree, held with a shared lock until release() so nobody prunes it under us."""

    path: Path
    key: str
    built_now: bool
    build_seconds: float
    _lock_fd: int

    def release(self) -> None:
        """Drop the shared lock (the tree stays cached)."""
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def _log(msg: str) -> None:
    print(f"[testbed] {msg}", file=sys.stderr, flush=True)


def _is_ready(entry: Path) -> bool:
    return (entry / "ready").is_file() and (entry / "root" / "usr" / "lib" / "systemd").is_dir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_tree(path: Path) -> None:
    # A debootstrap that died mid-way can leave /proc or /sys mounted inside its target.
    for sub in ("proc", "sys", "dev/pts", "dev"):
        target = path / "root" / sub
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], check=False)
    shutil.rmtree(path, ignore_errors=True)


def _debootstrap(target: Path, spec: RootSpec) -> None:
    if shutil.which("debootstrap") is None:
        raise TestbedUnavailable("debootstrap is not installed (apt-get install debootstrap)")
    argv = [
        "debootstrap",
        f"--variant={spec.variant}",
        "--include=" + ",".join(spec.packages),
        spec.suite,
        str(target),
        MIRROR,
    ]
    if not (DEBOOTSTRAP_SCRIPTS / spec.suite).exists():
        # Debian 12's debootstrap predates forky; every Debian suite since etch uses the sid
        # script (the others are symlinks to it), so name it for suites it does not know yet.
        argv.append(str(DEBOOTSTRAP_SCRIPTS / "sid"))
    log_path = target.parent / "debootstrap.log"
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=DEBOOTSTRAP_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TestbedUnavailable(f"debootstrap timed out after {exc.timeout} s") from exc
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise TestbedUnavailable(
            f"debootstrap failed with status {proc.returncode}:\n" + "\n".join(tail)
        )


def _post_process(root: Path, spec: RootSpec) -> None:
    """Make the tree boot fast and quietly; nothing here is capsuled-specific."""
    for unit in spec.masked:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # debootstrap copies the build host's /etc/hostname; without it nspawn names the container
    # after --machine, so logs say which testbed they came from.
    (root / "etc/hostname").unlink(missing_ok=True)
    # An empty machine-id makes systemd generate one per boot (nspawn passes the machine's
    # UUID) instead of every container sharing one.
    (root / "etc/machine-id").write_text("")
    subprocess.run(
        ["chroot", str(root), "apt-get", "clean"], check=False, stdout=subprocess.DEVNULL
    )
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def _fsync_tree(path: Path) -> None:
    # `sync -f` flushes the whole filesystem holding path: cheap, and the stamp then means
    # "everything before it is on disk" even across a power cut.
    subprocess.run(["sync", "-f", str(path)], check=False)


def _build(cache: Path, key: str, spec: RootSpec) -> float:
    started = time.monotonic()
    staging = cache / f".build-{key}-{os.getpid()}"
    _remove_tree(staging)
    (staging / "root").mkdir(parents=True)
    _log(f"building root filesystem {key} ({spec.name}: debootstrap {spec.suite}, 1-4 min)")
    try:
        _debootstrap(staging / "root", spec)
        _post_process(staging / "root", spec)
        _fsync_tree(staging)
        final = cache / key
        _remove_tree(final)  # a half-built or broken entry with this key
        staging.rename(final)
        stamp = {
            "key": key,
            # "suite" names the tree's flavour, as it did when each suite had one tree: testbed
            # code from before flavours prunes other trees of its "suite", and must not take
            # trixie-deb for a stale trixie.
            "suite": spec.name,
            "debootstrap_suite": spec.suite,
            "packages": list(spec.packages),
            "built": time.time(),
        }
        (final / "ready").write_text(json.dumps(stamp) + "\n")
        _fsync_tree(final)
    except BaseException:
        _remove_tree(staging)
        raise
    seconds = time.monotonic() - started
    _log(f"root filesystem {key} built in {seconds:.1f} s")
    return seconds


def _flavour_of(entry: Path) -> str | None:
    """The flavour an entry's ready stamp names; None if it has no readable stamp (unfinished).

    The stamp's "suite" field is the flavour: stamps from before flavours named the suite, which
    was the flavour then.
    """
    try:
        stamp = json.loads((entry / "ready").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict):
        return SUITE
    flavour = stamp.get("suite", SUITE)
    return flavour if isinstance(flavour, str) else SUITE


def _prune(cache: Path, keep: str, flavour: str) -> None:
    """Remove other keys of the same flavour nobody holds, and builds whose builder died.

    An entry without a ready stamp is garbage whatever its suite: its builder holds the lock
    exclusively until the stamp is written, so if we can take the lock, nobody will finish it.
    """
    for entry in cache.iterdir():
        name = entry.name
        if name.startswith(".build-"):
            pid_text = name.rsplit("-", 1)[-1]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                _log(f"removing abandoned build {entry}")
                _remove_tree(entry)
            continue
        if not entry.is_dir() or name == keep:
            continue
        entry_flavour = _flavour_of(entry)
        if entry_flavour is not None and entry_flavour != flavour:
            continue  # another flavour's tree: used by other tests, not stale
        lock_path = cache / f"{name}.lock"
        with _open_lock(lock_path) as fd:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another run still boots from it
            _log(f"pruning stale root filesystem {entry}")
            _remove_tree(entry)
            lock_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _open_lock(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


def ensure_root(spec: RootSpec | None = None) -> CachedRoot:
    """Return the cached tree for spec (default: trixie), building it first if needed.

    Raises:
        TestbedUnavailable: not root, or debootstrap failed.
    """
    if os.geteuid() != 0:
        raise TestbedUnavailable("the testbed needs root (debootstrap, mount, systemd-nspawn)")
    spec = spec or root_spec()
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(spec)
    entry = cache / key
    fd = os.open(cache / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        built_now = False
        seconds = 0.0
        if not _is_ready(entry):
            # Only a builder takes the lock exclusively; re-check after waiting, since a
            # concurrent run may have finished the build meanwhile.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not _is_ready(entry):
                seconds = _build(cache, key, spec)
                built_now = True
            fcntl.flock(fd, fcntl.LOCK_SH)
        _prune(cache, keep=key, flavour=spec.name)
    except BaseException:
        os.close(fd)
        raise
    return CachedRoot(entry / "root", key, built_now, seconds, fd)
