"""Boot a cached Debian tree with systemd-nspawn and run commands inside it.

The tree is trixie (systemd 257) unless a RootSpec says otherwise; bookworm (systemd 252) is
booted for the "systemd too old" tests, with capsuled's wheel installed but `capsuled install`
left to the test (it must refuse there).

Every boot gets its own overlay mount, managed here rather than by `--volatile=overlay`:

    lower   = the cached tree (read-only, shared by concurrent runs; see rootfs.py)
    upper   = RUNS_DIR/MACHINE/upper   (this run's writes)
    merged  = RUNS_DIR/MACHINE/merged  (what nspawn boots)

nspawn's own volatile overlay lives on a tmpfs inside the container's mount namespace and is
gone when the container reboots; ours lives in the host's, so `reboot()` keeps /etc and /var
exactly as a real machine does (SetAutostart and friends must survive a reboot), and `close()`
throws the lot away. Processes inside are reached with `nsenter` into the container's PID 1 (the
"leader"); users switch with `setpriv`, as a login would, but without a logind session (polkit
then treats every subject as `allow_any`, as the design brief says).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from testbed.errors import CommandTimeout, TestbedError, TestbedUnavailable
from testbed.rootfs import SUITE, CachedRoot, RootSpec, ensure_root

CHECKOUT = Path(__file__).resolve().parents[2]

# Per-boot writable layers. /var/tmp, not /tmp: an upper dir can be large and must not land on a
# tmpfs, and it is on the same filesystem as the cache on the machines we run on.
RUNS_DIR = Path(os.environ.get("CAPSULED_TESTBED_RUNS", "/var/tmp/capsuled-testbed/runs"))

# Users every e2e test can rely on (contracts.md, "Testbed API").
CAPSULE_GROUP = "capsule"
USERS: Mapping[str, tuple[str, ...]] = {
    "alice": (CAPSULE_GROUP,),
    "bob": (CAPSULE_GROUP,),
    "carol": (CAPSULE_GROUP,),  # spare member for policy tests
    "mallory": (),  # not a member
}

WHEEL_DIR_INSIDE = "/var/tmp/capsuled-wheel"
SOURCE_INSIDE = "/src"
# Where run_module() finds e2e/inbed/ and contract/: the checkout's tests/, bound read-only.
TESTS_INSIDE = f"{SOURCE_INSIDE}/tests"

LEADER_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 60.0
KILL_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.02  # infrastructure polling of /proc, not a test sleep

NSPAWN_EXIT_REBOOT = 133  # systemd-nspawn(1): the container asked to be rebooted

PATH_USER = "/usr/local/bin:/usr/bin:/bin"
PATH_ROOT = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_PR_SET_PDEATHSIG = 1


def _log(msg: str) -> None:
    print(f"[testbed] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Result:
    """What a command inside the container did."""

    returncode: int
    stdout: str
    stderr: str
    argv: tuple[str, ...] = ()
    user: str = "root"

    @property
    def ok(self) -> bool:
        """True if the command exited with status 0."""
        return self.returncode == 0

    def check(self) -> Result:
        """Return self, or raise TestbedError with the whole output if the command failed."""
        if self.returncode != 0:
            raise TestbedError(
                f"{' '.join(self.argv)!r} as {self.user} exited {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
            )
        return self


@dataclass(slots=True)
class Timings:
    """Seconds spent in each phase, for the boot-time report."""

    rootfs_build: float = 0.0
    rootfs_cached: bool = True
    wheel: float = 0.0
    boot: list[float] = field(default_factory=list)  # nspawn start -> is-system-running
    install: float = 0.0
    ready: float = 0.0  # Testbed.boot() called -> capsuled installed, users created
    reboots: list[float] = field(default_factory=list)  # reboot() called -> ready again
    degraded: list[str] = field(default_factory=list)  # failed units, per degraded boot

    def summary(self) -> str:
        """One line a person can read."""
        if self.rootfs_cached:
            cache = "warm cache"
        else:
            cache = f"cold cache, root filesystem built in {self.rootfs_build:.1f} s"
        boots = ", ".join(f"{b:.2f} s" for b in self.boot)
        line = (
            f"{cache}; usable after {self.ready:.1f} s (nspawn to is-system-running: {boots}; "
            f"wheel {self.wheel:.1f} s, in parallel; install+users {self.install:.1f} s)"
        )
        if self.reboots:
            line += "; reboot() " + ", ".join(f"{r:.2f} s" for r in self.reboots)
        for failed in self.degraded:
            line += f"\nDEGRADED boot, failed units:\n{failed}"
        return line


# --- teardown registry: every live bed is closed at exit, on SIGTERM/SIGHUP and on Ctrl-C --------

_LIVE: set[Testbed] = set()
_LIVE_LOCK = threading.Lock()


def _close_all() -> None:
    with _LIVE_LOCK:
        beds = list(_LIVE)
    for bed in beds:
        bed.close()


atexit.register(_close_all)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C does, so pytest's fixture finalizers and our `finally` blocks run.
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _raise_interrupt)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    # Teardown must not be cut short by a second Ctrl-C, or a mount would survive.
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _set_pdeathsig() -> None:
    # Runs in the forked child before exec: if the test process dies (even by SIGKILL), nspawn
    # gets SIGKILL, and nspawn's own children carry PR_SET_PDEATHSIG too, so the container's
    # PID 1 and with it the whole PID namespace go as well.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _nspawn_preexec(cgroup: Path | None) -> Callable[[], None]:
    def preexec() -> None:
        if cgroup is not None:
            # "0": the writing process itself; nspawn and all it starts stay in there.
            with open(cgroup / "cgroup.procs", "w") as f:
                f.write("0")
        _set_pdeathsig()

    return preexec


def _default_terminal_signals() -> None:
    # The child must not inherit our "ignore Ctrl-C" (ignored signals survive exec).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


# --- host-side helpers ----------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _umount(path: Path) -> None:
    if not os.path.ismount(path):
        return
    if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode != 0:
        # Something still has a file open in it: detach now, the kernel frees it when closed.
        subprocess.run(["umount", "--lazy", str(path)], check=False)


# Every bed runs in a cgroup of its own on the cgroup2 tree. With --keep-unit on a host whose PID 1
# is not systemd, nspawn puts the container's cgroups at `payload/` below the cgroup it was started
# from: two beds started from the same cgroup would share `payload/system.slice/X.service`, and
# `systemctl kill X` in one would kill X in the other.
CGROUP_PARENT = "capsuled-testbed"


def cgroup2_root() -> Path | None:
    """Where the cgroup2 tree is mounted (the "unified" tree on a hybrid host), or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    found = [Path(line.split()[1]) for line in mounts if line.split()[2:3] == ["cgroup2"]]
    return min(found, key=lambda p: len(p.parts)) if found else None


def bed_cgroup(machine: str) -> Path | None:
    """The cgroup a bed named `machine` runs in (created), or None without a cgroup2 tree."""
    root = cgroup2_root()
    if root is None:
        return None
    path = root / CGROUP_PARENT / machine
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_cgroup(path: Path) -> None:
    """Kill whatever still runs in `path` and remove it with its children (deepest first)."""
    if not path.is_dir():
        return
    kill = path / "cgroup.kill"  # Linux >= 5.14
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while "populated 1" in _read(path / "cgroup.events") and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def prune_stale_runs() -> None:
    """Remove the leftovers of runs whose test process died without tearing down (SIGKILL)."""
    if not RUNS_DIR.is_dir():
        return
    for run_dir in RUNS_DIR.iterdir():
        try:
            owner = json.loads((run_dir / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        owner_pid = owner.get("pid")
        if isinstance(owner_pid, int) and _pid_alive(owner_pid):
            continue
        nspawn_pid = owner.get("nspawn_pid")
        if isinstance(nspawn_pid, int) and _proc_comm(nspawn_pid) == "systemd-nspawn":
            with contextlib.suppress(ProcessLookupError):
                os.kill(nspawn_pid, signal.SIGKILL)
        _log(f"removing stale run {run_dir}")
        root = cgroup2_root()
        if root is not None:
            remove_cgroup(root / CGROUP_PARENT / run_dir.name)
        _umount(run_dir / "merged")
        shutil.rmtree(run_dir, ignore_errors=True)


def _copy_source(checkout: Path, dest: Path) -> None:
    # Build from a copy: setuptools writes build/ and *.egg-info next to pyproject.toml, and
    # several runs may build at once from one checkout.
    shutil.copytree(
        checkout,
        dest,
        ignore=shutil.ignore_patterns(
            ".git",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".mypy_cache",
            ".ruff_cache",
            ".hypothesis",
            ".venv",
        ),
        symlinks=True,
    )


def build_wheel(checkout: Path, out_dir: Path, work_dir: Path | None = None) -> Path:
    """Build the project's wheel the way a packager would, without touching the checkout.

    The source is copied to work_dir (a temporary directory if None) and built there.

    Raises:
        TestbedError: the build failed (its output is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="capsuled-src-", dir=work_dir) as tmp:
        src = Path(tmp) / "src"
        _copy_source(checkout, src)
        # The PEP 517 hook of the backend pyproject.toml names, called directly: what `pip wheel
        # --no-build-isolation` does, minus a second of pip's own start-up.
        backend = tomllib.loads((src / "pyproject.toml").read_text())["build-system"][
            "build-backend"
        ]
        hook = (
            "import importlib, sys; "
            f"print(importlib.import_module({backend!r}).build_wheel(sys.argv[1]))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", hook, str(out_dir)],
            cwd=src,
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=_set_pdeathsig,  # a killed test run takes the build down with it
        )
    if proc.returncode != 0:
        raise TestbedError(f"building the wheel failed:\n{proc.stdout}\n{proc.stderr}")
    wheels = sorted(out_dir.glob("capsuled-*.whl"))
    if len(wheels) != 1:
        raise TestbedError(f"expected one capsuled wheel in {out_dir}, found {wheels}")
    return wheels[0]


def _find_leader(nspawn: subprocess.Popen[bytes], log_path: Path) -> int:
    """The container's PID 1 as seen from the host: nspawn's child whose innermost pid is 1."""
    deadline = time.monotonic() + LEADER_TIMEOUT_S
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            raise TestbedError(
                f"systemd-nspawn exited with {nspawn.returncode} before the container started:\n"
                + log_path.read_text(errors="replace")[-3000:]
            )
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            ppid = fields.get("PPid", "").strip()
            nspid = fields.get("NSpid", "").split()
            if ppid == str(nspawn.pid) and len(nspid) >= 2 and nspid[-1] == "1":
                return int(entry.name)
        time.sleep(POLL_INTERVAL_S)
    raise TestbedError(f"no container PID 1 under nspawn {nspawn.pid} after {LEADER_TIMEOUT_S} s")


# --- the testbed ----------------------------------------------------------------------------------


class Testbed:
    """One booted container; create with Testbed.boot(), always close()."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, root: CachedRoot, checkout: Path, flavour: str = SUITE) -> None:
        # The flavour in the name of any non-default bed, so logs and `ps` tell them apart.
        infix = "" if flavour == SUITE else f"{flavour}-"
        self.machine = f"capsuled-tb-{infix}{secrets.token_hex(4)}"
        self.flavour = flavour
        self.checkout = checkout
        self.timings = Timings(rootfs_build=root.build_seconds, rootfs_cached=not root.built_now)
        self._root = root
        self._run_dir = RUNS_DIR / self.machine
        self._merged = self._run_dir / "merged"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._leader = 0
        self._closed = False
        self._boot_count = 0
        self._cgroup: Path | None = None
        self._systemd_version: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        checkout: Path = CHECKOUT,
        install: bool = True,
        *,
        spec: RootSpec | None = None,
        run_install: bool = True,
    ) -> Testbed:
        """Build or reuse the cached tree, boot it, install capsuled and the test users.

        spec picks the tree (default: trixie). With install, the wheel is pip-installed and the
        users created; run_install=False then skips `capsuled install` (the group `capsule` is
        created directly instead), for a host where the test itself runs it.

        Raises:
            TestbedUnavailable: a prerequisite is missing on this host.
            TestbedError: the container did not come up, or the install failed.
        """
        for tool in ("systemd-nspawn", "nsenter", "mount"):
            if shutil.which(tool) is None:
                raise TestbedUnavailable(f"{tool} not found (apt-get install systemd-container)")
        if os.geteuid() != 0:
            raise TestbedUnavailable("the testbed needs root (debootstrap, mount, systemd-nspawn)")
        started = time.monotonic()
        prune_stale_runs()
        root = ensure_root(spec)
        bed = cls(root, checkout, flavour=spec.name if spec else SUITE)
        with _LIVE_LOCK:
            _LIVE.add(bed)
        try:
            bed._prepare_overlay()
            wheel: list[Path] = []
            errors: list[BaseException] = []
            builder = threading.Thread(
                target=bed._build_wheel_into, args=(wheel, errors), daemon=True
            )
            if install:
                builder.start()  # overlaps the boot; both take a few seconds
            bed._start()
            if install:
                builder.join()
                if errors:
                    raise errors[0]
                bed._install(wheel[0], run_install=run_install)
        except BaseException:
            bed.close()
            raise
        bed.timings.ready = time.monotonic() - started
        return bed

    def _prepare_overlay(self) -> None:
        upper, work = self._run_dir / "upper", self._run_dir / "work"
        for d in (upper, work, self._merged):
            d.mkdir(parents=True)
        self._write_owner()
        # volatile: skip syncs in the upper layer; it is thrown away at close() and never
        # remounted, which is the one condition overlayfs puts on that option.
        options = f"lowerdir={self._root.path},upperdir={upper},workdir={work},volatile"
        proc = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(self._merged)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise TestbedUnavailable(f"cannot mount an overlay for the testbed: {proc.stderr}")

    def _write_owner(self) -> None:
        owner = {"pid": os.getpid(), "nspawn_pid": self._nspawn.pid if self._nspawn else None}
        (self._run_dir / "owner.json").write_text(json.dumps(owner))

    def _build_wheel_into(self, out: list[Path], errors: list[BaseException]) -> None:
        started = time.monotonic()
        try:
            wheel_dir = self._run_dir / "wheel"
            wheel_dir.mkdir(exist_ok=True)
            # Built inside the run directory, so a run killed mid-build leaves nothing that
            # prune_stale_runs() does not remove.
            out.append(build_wheel(self.checkout, wheel_dir, work_dir=self._run_dir))
        except BaseException as exc:  # handed to the booting thread, which re-raises it
            errors.append(exc)
        self.timings.wheel = time.monotonic() - started

    def _start(self) -> None:
        """Start nspawn on the overlay and wait until systemd says the system is up."""
        started = time.monotonic()
        self._boot_count += 1
        log_path = self._run_dir / f"nspawn-{self._boot_count}.log"
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--register=no",  # no systemd-machined on a host whose PID 1 is not systemd
            "--keep-unit",  # ... nor a host manager to create a scope with
            f"--machine={self.machine}",
            f"--directory={self._merged}",
            "--boot",
            "--console=passive",
            "--private-network",  # capsuled needs no network; keep the container off the host's
            "--link-journal=no",
            f"--bind-ro={self.checkout}:{SOURCE_INSIDE}",
        ]
        env = dict(os.environ)
        # The host mounts cgroup v1 controllers beside a v2 "unified" tree; systemd 257 in the
        # container needs a pure v2 hierarchy.
        env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        if self._cgroup is None:
            self._cgroup = bed_cgroup(self.machine)
            if self._cgroup is None:
                _log("no cgroup2 tree on this host: beds booted at once may see each other's units")
        with open(log_path, "wb") as log:
            self._nspawn = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches pytest only; we tear down in order
                preexec_fn=_nspawn_preexec(self._cgroup),
            )
        self._write_owner()
        self._leader = _find_leader(self._nspawn, log_path)
        self._wait_ready(started)
        seconds = time.monotonic() - started
        self.timings.boot.append(seconds)
        kind = "boot" if self._boot_count == 1 else f"reboot {self._boot_count - 1}"
        _log(f"{self.machine}: {kind} ready in {seconds:.2f} s (leader pid {self._leader})")

    def _wait_ready(self, started: float) -> None:
        deadline = started + READY_TIMEOUT_S
        state = ""
        while time.monotonic() < deadline:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                res = self.run("systemctl", "is-system-running", "--wait", timeout=remaining)
            except CommandTimeout:
                break
            state = res.stdout.strip()
            if state == "running":
                return
            if state == "degraded":
                failed = self.run("systemctl", "--failed", "--no-legend", "--plain").stdout
                _log(f"{self.machine} is degraded; failed units:\n{failed}")
                self.timings.degraded.append(failed.strip())
                return
            if state in ("maintenance", "stopping"):
                break
            # "offline"/"unknown"/connection refused: PID 1 is not answering on its private
            # socket yet.
            time.sleep(POLL_INTERVAL_S)
        raise TestbedError(f"{self.machine} did not reach running (last state: {state!r})")

    def _install(self, wheel: Path, run_install: bool = True) -> None:
        """Install capsuled exactly as an admin would on a host, then add the test users."""
        started = time.monotonic()
        dest = self._merged / WHEEL_DIR_INSIDE.lstrip("/")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, dest / wheel.name)
        self.as_root(
            "python3",
            "-m",
            "pip",
            "install",
            "--no-deps",  # the dependencies come from Debian's python3-* packages
            "--no-index",
            "--break-system-packages",  # PEP 668: a local admin install next to Debian's python
            "--root-user-action=ignore",
            "--disable-pip-version-check",
            "--quiet",
            f"{WHEEL_DIR_INSIDE}/{wheel.name}",
        ).check()
        if run_install:
            self.as_root("capsuled", "install").check()
        else:
            # What capsuled's sysusers.d file would have made; the users need it.
            self.as_root("groupadd", "--system", CAPSULE_GROUP).check()
        self.add_users()
        self.timings.install = time.monotonic() - started

    def add_users(self) -> None:
        """Create the test users (USERS); the group `capsule` must exist already.

        Raises:
            TestbedError: useradd failed.
        """
        for user, groups in USERS.items():
            argv = ["useradd", "--create-home", "--shell", "/bin/bash", "--user-group"]
            if groups:
                argv += ["--groups", ",".join(groups)]
            self.as_root(*argv, user).check()

    def reboot(self) -> float:
        """Reboot the container, keeping its writable layer (/etc, /var); return seconds taken.

        Raises:
            TestbedError: the container did not go down or come back.
        """
        started = time.monotonic()
        nspawn = self._require_running()
        # The reply may be lost when PID 1 goes down; what counts is nspawn's exit status.
        with contextlib.suppress(CommandTimeout):
            self.run("systemctl", "reboot", "--no-block", timeout=10)
        try:
            status = nspawn.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise TestbedError(f"{self.machine} did not shut down for reboot") from exc
        if status != NSPAWN_EXIT_REBOOT:
            raise TestbedError(f"systemd-nspawn exited {status}, expected {NSPAWN_EXIT_REBOOT}")
        self._nspawn = None
        self._start()
        seconds = time.monotonic() - started
        self.timings.reboots.append(seconds)
        return seconds

    def close(self) -> None:
        """Kill the container, unmount the overlay, delete this run's writes. Idempotent."""
        with _signals_blocked():
            if self._closed:
                return
            self._closed = True
            if self._nspawn is not None and self._nspawn.poll() is None:
                self._nspawn.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._nspawn.wait(timeout=KILL_TIMEOUT_S)
            # PR_SET_PDEATHSIG takes the container's PID 1 down with nspawn; make sure of it
            # before unmounting what it runs on.
            if self._leader and _pid_alive(self._leader):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._leader, signal.SIGKILL)
                deadline = time.monotonic() + KILL_TIMEOUT_S
                while _pid_alive(self._leader) and time.monotonic() < deadline:
                    time.sleep(POLL_INTERVAL_S)
            if self._cgroup is not None:
                remove_cgroup(self._cgroup)
            _umount(self._merged)
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._root.release()
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running commands --------------------------------------------------------------------------

    @property
    def leader(self) -> int:
        """Host PID of the container's PID 1."""
        return self._leader

    @property
    def cgroup(self) -> Path | None:
        """The host cgroup this bed runs in (None where the host has no cgroup2 tree)."""
        return self._cgroup

    @property
    def systemd_version(self) -> int:
        """The major version of the systemd this bed runs (`systemctl --version`).

        Raises:
            TestbedError: systemctl's answer does not start with "systemd N".
        """
        if self._systemd_version is None:
            first = self.as_root("systemctl", "--version").check().stdout.partition("\n")[0]
            word = first.split()[1:2]
            if not first.startswith("systemd ") or not word or not word[0].isdigit():
                raise TestbedError(f"cannot tell the systemd version from {first!r}")
            self._systemd_version = int(word[0])
        return self._systemd_version

    @property
    def root_dir(self) -> Path:
        """The container's / as seen from the host (the merged overlay)."""
        return self._merged

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self._closed or self._nspawn is None or self._nspawn.poll() is not None:
            raise TestbedError(f"{self.machine} is not running")
        return self._nspawn

    def command(
        self, argv: tuple[str, ...], user: str = "root", env: Mapping[str, str] | None = None
    ) -> list[str]:
        """The host argv that runs argv inside the container as user, with a clean environment."""
        if not argv:
            raise ValueError("empty command")
        home = "/root" if user == "root" else f"/home/{user}"
        environment = {
            "PATH": PATH_ROOT if user == "root" else PATH_USER,
            "HOME": home,
            "USER": user,
            "LOGNAME": user,
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
            "TERM": "dumb",  # no colours or pagers in captured output
        }
        environment.update(env or {})
        host = ["nsenter", f"--target={self._leader}", "--all", "--root", "--wd=/"]
        if user != "root":
            # setpriv resolves the names through the container's NSS (it runs after setns).
            host += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        host += ["env", "-i", "--chdir", home, *(f"{k}={v}" for k, v in environment.items())]
        # env(1) takes the first word without "=" as the command; ours never contain one.
        return [*host, *argv]

    def run(
        self,
        *argv: str,
        user: str = "root",
        input: str | None = None,  # the name subprocess.run uses
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        """Run argv inside the container as user; never raises on a non-zero exit.

        Raises:
            CommandTimeout: it ran past timeout (it and its children have been killed).
            TestbedError: the container is not running.
        """
        self._require_running()
        proc = subprocess.Popen(
            self.command(argv, user, env),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # one process group: a timeout kills nsenter and its child
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise CommandTimeout(argv, timeout, out, err) from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        return Result(proc.returncode, out, err, argv, user)

    def as_user(self, user: str, *argv: str, **kwargs: object) -> Result:
        """Run argv as user (e.g. bed.as_user("alice", "capsulectl", "list"))."""
        return self.run(*argv, user=user, **kwargs)  # type: ignore[arg-type]  # run's keywords

    def as_root(self, *argv: str, **kwargs: object) -> Result:
        """Run argv as root inside the container."""
        return self.run(*argv, user="root", **kwargs)  # type: ignore[arg-type]  # run's keywords

    def python(self, user: str, code: str, timeout: float = 60.0) -> Result:
        """Run `python3 -c code` inside as user."""
        return self.run("python3", "-c", code, user=user, timeout=timeout)

    def module_command(self, user: str, module: str, *args: str) -> list[str]:
        """The host argv that runs `python3 -m MODULE ARGS` inside as user (see run_module)."""
        return self.command(("python3", "-m", module, *args), user, {"PYTHONPATH": TESTS_INSIDE})

    def run_module(
        self,
        user: str,
        module: str,
        *args: str,
        input: str | None = None,  # the name subprocess.run uses
        timeout: float = 60.0,
    ) -> Result:
        """Run `python3 -m MODULE ARGS` inside as user, MODULE from the checkout's tests/.

        The bed's own python3 runs it: the installed wheel's capsuled, not the checkout's, and
        no pytest (tests/e2e/inbed/__init__.py says what such a module may use).
        """
        return self.run(
            "python3",
            "-m",
            module,
            *args,
            user=user,
            input=input,
            timeout=timeout,
            env={"PYTHONPATH": TESTS_INSIDE},
        )

    def interactive(self, *argv: str, user: str = "root") -> int:
        """Run argv with this terminal attached (for `make shell`); returns its exit status."""
        self._require_running()
        env = {"TERM": os.environ.get("TERM", "xterm")}
        # Like a shell running a foreground job: Ctrl-C is for the program inside, not for us
        # (it would tear the testbed down under the user's feet).
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_quit = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        try:
            return subprocess.call(
                self.command(argv, user, env),
                preexec_fn=_default_terminal_signals,
            )
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGQUIT, old_quit)
