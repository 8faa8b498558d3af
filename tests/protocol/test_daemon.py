"""The daemon process: socket activation (listening and Accept=yes), LISTEN_* handling,
sd_notify, idle exit, --listen, policy reload on SIGHUP, and the real `capsuled` entry point with
its real IDL."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from capsuled import daemon, methods
from capsuled.audit import AuditLog
from capsuled.methods.context import Services
from capsuled.peer import Peer
from capsuled.policy.authorizer import Authorizer
from capsuled.policy.engine import DEFAULT_CONFIG, Decision, Identity, Request
from capsuled.policy.polkit import PolkitBackend
from capsuled.records import RecordStore
from capsuled.sdjournal import SdJournal
from capsuled.systemd.backend import DBusSystemdBackend
from capsuled.transport import NotifyFn
from capsuled.varlink.messages import Call
from doubles.backend import FakeBackend
from protocol.harness import TIMEOUT_S, Closed, RawClient

ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = f"{ROOT / 'helper'}:{ROOT / 'client'}:{ROOT / 'tests'}"
TESTSERVER = str(ROOT / "tests" / "protocol" / "testserver.py")
ACTIVATE = "/usr/bin/systemd-socket-activate"
CAPSULED = [sys.executable, "-c", "import sys; from capsuled.cli import main; sys.exit(main())"]
T = "org.example.test"


class Proc:
    """A subprocess whose stderr lines can be waited for."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(
            argv, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env, cwd=ROOT
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = TIMEOUT_S) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} in stderr; saw {self.seen!r}") from None
            self.seen.append(line)
            if text in line:
                return line

    def wait_exit(self, timeout: float = TIMEOUT_S) -> int:
        return self.p.wait(timeout)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            self.p.wait(TIMEOUT_S)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
def notify_socket(sockdir: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(sockdir / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(TIMEOUT_S)
    yield s, path
    s.close()


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "JOURNAL_STREAM"):
        env.pop(key, None)
    return env


def _activate(*args: str) -> list[str]:
    # systemd-socket-activate passes children only the variables given with -E.
    return [ACTIVATE, *args, f"-EPYTHONPATH={PYTHONPATH}"]


# --- listen_fds / pick_fd / sd_notify in-process --------------------------------------------


def test_listen_env_for_another_process_is_ignored_and_cleared() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "varlink"}
    assert daemon.listen_fds(env) == []
    assert env == {}


def test_invalid_listen_env_is_an_error_and_still_cleared() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "many"}
    with pytest.raises(daemon.ActivationError):
        daemon.listen_fds(env)
    assert env == {}


def test_no_activation_means_no_fds() -> None:
    assert daemon.listen_fds({}) == []
    assert daemon.pick_fd([]) is None


@pytest.mark.parametrize(
    ("fds", "want"),
    [
        ([(3, "unknown")], 3),
        ([(3, "other"), (4, "varlink")], 4),
        ([(3, "varlink"), (4, "varlink")], 3),
    ],
)
def test_pick_fd(fds: list[tuple[int, str]], want: int) -> None:
    assert daemon.pick_fd(fds) == want


def test_pick_fd_refuses_ambiguity() -> None:
    with pytest.raises(daemon.ActivationError):
        daemon.pick_fd([(3, "a"), (4, "b")])


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_without_systemd_python(
    monkeypatch: pytest.MonkeyPatch, sockdir: Path, abstract: bool
) -> None:
    monkeypatch.setitem(sys.modules, "systemd", None)  # `from systemd import daemon` fails
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT_S)
    if abstract:
        name = f"capsuled-test-{os.getpid()}"
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        path = str(sockdir / "n")
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
    with s:
        daemon.sd_notify("READY=1\nSTATUS=x")
        assert s.recv(4096) == b"READY=1\nSTATUS=x"


def test_sd_notify_without_a_manager_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "systemd", None)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    daemon.sd_notify("READY=1")  # must not raise


# --- subprocesses -----------------------------------------------------------------------------


def test_listen_path_serves_and_exits_when_idle(procs: list[Proc], sockdir: Path) -> None:
    path = str(sockdir / "dev.sock")
    proc = Proc([sys.executable, TESTSERVER, "--listen", path, "--idle-exit-sec", "0.5"], _env())
    procs.append(proc)
    proc.wait_for("Serving on")
    assert os.stat(path).st_mode & 0o777 == 0o666
    with RawClient(path) as c:
        assert c.call(f"{T}.Ping", text="x") == {"parameters": {"text": "x"}}
        # An open connection keeps the daemon alive past the idle period.
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait_exit(timeout=1.0)
    assert proc.wait_exit() == 0
    assert not os.path.exists(path)  # we created it, we remove it


def test_socket_activation_listening(
    procs: list[Proc], sockdir: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    nsock, npath = notify_socket
    path = str(sockdir / "act.sock")
    argv = [
        *_activate("-l", path, "--fdname=varlink", f"-ENOTIFY_SOCKET={npath}"),
        sys.executable,
        TESTSERVER,
        "--idle-exit-sec",
        "0.5",
    ]
    proc = Proc(argv, _env())
    procs.append(proc)
    proc.wait_for("Listening on")
    with RawClient(path) as c:
        # systemd-socket-activate execs the daemon on the first connection.
        assert c.call(f"{T}.Environment") == {"parameters": {"listen": []}}
        assert nsock.recv(4096) == b"READY=1\nSTATUS=Serving on fd 3"
        who = c.call(f"{T}.WhoAmI")["parameters"]
        assert isinstance(who, dict)
        assert who["pid"] == os.getpid()
    assert proc.wait_exit() == 0  # idle exit: systemd would keep the socket and start us again
    assert nsock.recv(4096).startswith(b"STOPPING=1")


def test_socket_activation_picks_the_fd_named_varlink(procs: list[Proc], sockdir: Path) -> None:
    other, mine = str(sockdir / "other.sock"), str(sockdir / "mine.sock")
    argv = [
        *_activate("-l", other, "-l", mine, "--fdname=other:varlink"),
        sys.executable,
        TESTSERVER,
    ]
    proc = Proc(argv, _env())
    procs.append(proc)
    proc.wait_for(f"Listening on {mine}")
    with RawClient(mine) as c:
        assert c.call(f"{T}.Ping", text="m") == {"parameters": {"text": "m"}}
    proc.wait_for("Serving on fd 4")
    with RawClient(other, timeout=0.3) as c:
        c.send({"method": f"{T}.Ping"})
        with pytest.raises(TimeoutError):
            c.recv()  # the socket named "other" is not ours to serve


def test_socket_activation_accept_serves_one_connection(procs: list[Proc], sockdir: Path) -> None:
    path = str(sockdir / "accept.sock")
    argv = [*_activate("-l", path, "--accept"), sys.executable, TESTSERVER]
    proc = Proc(argv, _env())
    procs.append(proc)
    proc.wait_for("Listening on")
    for _ in range(2):  # each connection gets its own daemon process
        with RawClient(path) as c:
            assert c.call(f"{T}.Environment") == {"parameters": {"listen": []}}
            assert c.call(f"{T}.Ping", text="a") == {"parameters": {"text": "a"}}
        line = proc.wait_for("died with code")
        assert line.rstrip().endswith("code 0")  # exited by itself when the connection closed


def test_no_socket_at_all_fails(procs: list[Proc]) -> None:
    proc = Proc([sys.executable, TESTSERVER], _env())
    procs.append(proc)
    assert proc.wait_exit() == 1
    proc.wait_for("no socket passed")


def test_listen_on_an_impossible_path_fails_cleanly(procs: list[Proc], sockdir: Path) -> None:
    path = str(sockdir / "missing-dir" / "x.sock")
    proc = Proc([sys.executable, TESTSERVER, "--listen", path], _env())
    procs.append(proc)
    assert proc.wait_exit() == 1
    line = proc.wait_for("cannot listen on")
    assert "Traceback" not in "".join(proc.seen)
    assert path in line


def test_real_capsuled_serves_its_interface_verbatim(procs: list[Proc], sockdir: Path) -> None:
    path = str(sockdir / "capsuled.sock")
    idl = (ROOT / "helper" / "capsuled" / "org.capsuled.Manager.varlink").read_text("utf-8")
    argv = [*_activate("-l", path, "--fdname=varlink"), *CAPSULED, "--idle-exit-sec", "0.5"]
    proc = Proc(argv, _env())
    procs.append(proc)
    proc.wait_for("Listening on")
    with RawClient(path) as c:
        info = c.call("org.varlink.service.GetInfo")["parameters"]
        assert isinstance(info, dict)
        assert info["interfaces"] == ["org.varlink.service", "org.capsuled.Manager"]
        assert (info["vendor"], info["product"]) == ("capsuled", "capsuled")
        desc = c.call(
            "org.varlink.service.GetInterfaceDescription", interface="org.capsuled.Manager"
        )
        assert desc == {"parameters": {"description": idl}}
        c.send_raw(b"{}\0")
        with pytest.raises(Closed):
            c.recv()
    assert proc.wait_exit() == 0


def test_capsuled_version() -> None:
    out = subprocess.run(
        [*CAPSULED, "--version"], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert out.returncode == 0
    assert out.stdout.startswith("capsuled ")


def test_capsuled_rejects_a_per_uid_limit_above_three_quarters() -> None:
    out = subprocess.run(
        [*CAPSULED, "--max-connections", "4", "--max-connections-per-uid", "4"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert out.returncode == 2
    assert "3/4" in out.stderr


@pytest.mark.parametrize("verb", ["install", "uninstall"])
def test_capsuled_hands_install_verbs_to_the_installer(verb: str) -> None:
    out = subprocess.run(
        [*CAPSULED, verb, "--help"], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert out.returncode == 0
    assert f"usage: capsuled {verb}" in out.stdout


# --- policy reload (SIGHUP) ---------------------------------------------------------------------

NOBODY = 65534
# The system interpreter: the one running pytest may live where nobody cannot reach (~root).
SYSTEM_PYTHON = "/usr/bin/python3"
BUILTIN = '[policy]\nbackend = "builtin"\n'
LET_NOBODY_READ = BUILTIN + '[[rule]]\nusers = ["nobody"]\nactions = ["read"]\nresult = "yes"\n'

# Run as nobody: one CheckAccess on a fresh connection; prints the reply and the server's pid
# (SO_PEERCRED), which tells whether the same daemon process answered.
_CHECK_AS_NOBODY = r"""
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[2]))
s.connect(sys.argv[1])
pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
call = {"method": "org.capsuled.Manager.CheckAccess",
        "parameters": {"name": "web-1", "action": "read"}}
s.sendall(json.dumps(call).encode() + b"\0")
buf = b""
while b"\0" not in buf:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
print(json.dumps({"pid": pid, "reply": json.loads(buf.partition(b"\0")[0] or b"null")}))
"""


def _check_as_nobody(path: str) -> tuple[int, object]:
    out = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", _CHECK_AS_NOBODY, path, str(TIMEOUT_S)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
        cwd="/",
    )
    got = json.loads(out.stdout)
    assert isinstance(got, dict)
    return got["pid"], got["reply"]


def _access(result: str, reason: str) -> dict[str, object]:
    return {"parameters": {"access": {"result": result, "reason": reason}}}


def _write_config(config_dir: Path, text: str) -> None:
    # Temp name + rename: the daemon never sees a half-written file (as an editor saving would).
    tmp = config_dir / ".capsuled.toml.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o644)
    tmp.rename(config_dir / "capsuled.toml")


@pytest.fixture
def config_dir() -> Iterator[Path]:
    # Root-owned and 0700 (mkdtemp): the policy loader refuses group- or world-writable ones.
    d = Path(tempfile.mkdtemp(prefix="capsuled-config-"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK), reason="connects as uid nobody"
)
def test_sighup_reloads_the_policy_in_the_same_process(
    procs: list[Proc],
    sockdir: Path,
    config_dir: Path,
    notify_socket: tuple[socket.socket, str],
) -> None:
    nsock, npath = notify_socket
    path = str(sockdir / "capsuled.sock")
    _write_config(config_dir, BUILTIN)
    env = dict(_env(), NOTIFY_SOCKET=npath)
    proc = Proc([*CAPSULED, "--listen", path, "--config-dir", str(config_dir)], env)
    procs.append(proc)
    proc.wait_for("Serving on")
    assert nsock.recv(4096) == f"READY=1\nSTATUS=Serving on {path}".encode()
    # The shipped [defaults]: nobody would have to authenticate to read.
    assert _check_as_nobody(path) == (proc.p.pid, _access("auth_admin", "builtin"))

    _write_config(config_dir, LET_NOBODY_READ)
    before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    proc.p.send_signal(signal.SIGHUP)
    reloading = nsock.recv(4096).decode().split("\n")
    assert reloading[0] == "RELOADING=1"
    key, _, usec = reloading[1].partition("=")
    after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert key == "MONOTONIC_USEC"
    assert before_us <= int(usec) <= after_us
    # READY=1 ends the reload (what `systemctl reload` waits for), with the old STATUS= back.
    assert nsock.recv(4096) == f"READY=1\nSTATUS=Serving on {path}".encode()
    line = proc.wait_for("policy reloaded")
    assert "backend builtin" in line
    assert "refused" not in line
    assert _check_as_nobody(path) == (proc.p.pid, _access("yes", "builtin"))

    # A refused configuration denies, as at start-up: the previous (allowing) one is not kept.
    _write_config(config_dir, LET_NOBODY_READ + "[policy\n")
    proc.p.send_signal(signal.SIGHUP)
    proc.wait_for("policy configuration refused")
    line = proc.wait_for("policy reloaded")
    assert "configuration refused" in line
    assert _check_as_nobody(path) == (proc.p.pid, _access("no", "config-refused"))

    _write_config(config_dir, LET_NOBODY_READ)
    proc.p.send_signal(signal.SIGHUP)
    assert "refused" not in proc.wait_for("policy reloaded")
    assert _check_as_nobody(path) == (proc.p.pid, _access("yes", "builtin"))
    proc.p.terminate()
    assert proc.wait_exit() == 0


class _ClosingBackend:
    """A policy backend that only records whether it was closed."""

    name = "builtin"

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def check(self, peer: Peer, identity: Identity, request: Request) -> Decision:
        return Decision.NO

    async def aclose(self) -> None:
        self.closed.set()


def test_reload_closes_the_old_policy_after_the_calls_that_started_under_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sent: list[str] = []
    monkeypatch.setattr(daemon, "sd_notify", sent.append)

    async def scenario() -> None:
        old_backend, new_backend = _ClosingBackend(), _ClosingBackend()
        old = Authorizer(DEFAULT_CONFIG, old_backend)
        new = Authorizer(DEFAULT_CONFIG, new_backend)
        services = Services(
            backend=FakeBackend(),
            journal=SdJournal(),
            authorizer=old,
            records=RecordStore(tmp_path),
            audit=AuditLog(),
            version="test",
        )
        reloader = daemon.PolicyReloader(services, lambda: new)
        entered, release = asyncio.Event(), asyncio.Event()
        seen: list[Authorizer] = []

        async def handle(call: Call, peer: Peer, notify: NotifyFn) -> dict[str, object]:
            seen.append(services.authorizer)
            if len(seen) == 1:  # the first call stays in flight until released
                entered.set()
                await release.wait()
            return {}

        async def notify(params: dict[str, object]) -> None:
            pass

        counted = reloader.track(handle)
        peer = Peer(uid=NOBODY, gid=NOBODY, pid=os.getpid(), pidfd=None)

        async def first_call() -> dict[str, object]:
            return await counted(Call("org.capsuled.Manager.List"), peer, notify)

        in_flight = asyncio.create_task(first_call())
        await entered.wait()
        reloader.reload("Serving")
        assert services.authorizer is new
        await counted(Call("org.capsuled.Manager.List"), peer, notify)
        assert seen == [old, new]  # the call after the swap saw the new policy
        # Let every runnable task run (a scheduler turn, not a timed wait): the retiring task
        # must still be parked while the first call is in flight.
        for _ in range(5):
            await asyncio.sleep(0)
        assert not old_backend.closed.is_set()
        release.set()
        async with asyncio.timeout(TIMEOUT_S):
            await in_flight
            await old_backend.closed.wait()  # closed once the call that began under it ended
        await reloader.aclose()
        assert not new_backend.closed.is_set()

    asyncio.run(scenario())
    assert sent[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert sent[1] == "READY=1\nSTATUS=Serving"


def test_sighup_is_caught_before_ready_is_sent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sockdir: Path
) -> None:
    # systemd >= 260 checks, when READY=1 arrives from a Type=notify-reload service, that the
    # reload signal is caught, and kills the service otherwise (seen on Debian's 262).
    caught_at_ready: list[bool] = []

    async def scenario() -> None:
        ready = asyncio.Event()

        def notify(state: str) -> None:
            if state.startswith("READY=1"):
                caught_at_ready.append(signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL)
                ready.set()

        monkeypatch.setattr(daemon, "sd_notify", notify)
        services = Services(
            backend=FakeBackend(),
            journal=SdJournal(),
            authorizer=Authorizer(DEFAULT_CONFIG, _ClosingBackend()),
            records=RecordStore(tmp_path),
            audit=AuditLog(),
            version="test",
        )
        reloader = daemon.PolicyReloader(services, lambda: services.authorizer)
        dispatcher = methods.build_dispatcher(
            daemon.load_interface(), services, daemon.service_info()
        )
        options = daemon.Options(listen=str(sockdir / "ready.sock"), idle_exit_s=0.0)
        wiring = daemon.Wiring(dispatcher.handle, daemon.MANAGER_ERRORS, reloader)
        serving = asyncio.create_task(daemon.serve(options, wiring))
        async with asyncio.timeout(TIMEOUT_S):
            await ready.wait()
            os.kill(os.getpid(), signal.SIGTERM)
            assert await serving == 0

    asyncio.run(scenario())
    assert caught_at_ready == [True]


def test_pid1_and_polkit_share_one_system_bus_connection(tmp_path: Path) -> None:
    # One connection serves both (capsuled.dbus.SystemBus), and a reloaded policy keeps using it:
    # the daemon never opens the system bus twice. (Private attributes: what is shared is the
    # wiring's own business, with no public accessor.)
    config = tmp_path / "etc"
    config.mkdir(mode=0o755)
    (config / "capsuled.toml").write_text('[policy]\nbackend = "polkit"\n')
    (config / "capsuled.toml").chmod(0o644)

    async def scenario() -> None:
        wiring = daemon.build_wiring(daemon.Options(config_dir=config))
        assert wiring.reloader is not None
        services = wiring.reloader._services
        assert isinstance(services.backend, DBusSystemdBackend)
        assert services.backend._system_bus is wiring.system_bus
        for authorizer in (services.authorizer, wiring.reloader._load()):
            assert isinstance(authorizer._backend, PolkitBackend)
            assert authorizer._backend._connect == wiring.system_bus.connection
        await wiring.system_bus.close()

    asyncio.run(scenario())
