"""Run with stdio "pipe" and "pty" against the fake backend: which fds reach the unit, what
the helper keeps of them (nothing), and what it refuses before anything runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from methods_fixtures import World, make_world

from capsuled import errors, fdpass
from capsuled.methods import TAKES_FDS
from capsuled.methods.inside import _STDIO_FDS
from doubles.backend import FakeUnit


class Holder:
    """What the transport would be for one call: its fds, and what the handler pushes."""

    def __init__(self, fds: tuple[int, ...] = ()) -> None:
        self.fds = list(fds)
        self.closed: list[int] = []
        self.pushed: list[int] = []

    def received(self) -> tuple[int, ...]:
        return tuple(self.fds)

    def close_received(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.closed += self.fds
        self.fds = []

    def push_fd(self, fd: int) -> None:
        self.pushed.append(fd)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path).standard()


@pytest.fixture
def pipes() -> Iterator[list[tuple[int, int]]]:
    made = [os.pipe() for _ in range(3)]
    yield made
    for r, w in made:
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _run(world: World, holder: Holder, **params: object) -> tuple[dict[str, object], FakeUnit]:
    with fdpass.holding(holder):
        out = world.run(
            "Run", {"name": "alpha", "command": ["/bin/true", "--x"], **params}, more=True
        )
    (unit,) = world.backend.capsules["alpha"].started
    return out.reply, unit


def test_pipe_hands_the_three_fds_to_the_unit_and_keeps_none(
    world: World, pipes: list[tuple[int, int]]
) -> None:
    ends = (pipes[0][0], pipes[1][1], pipes[2][1])  # stdin reads, stdout and stderr write
    inodes = tuple(os.fstat(fd).st_ino for fd in ends)
    copies = tuple(os.dup(fd) for fd in ends)  # what the caller sent; the helper has its own
    holder = Holder(copies)
    reply, unit = _run(world, holder, stdio="pipe")
    assert reply["exitStatus"] == 0
    assert unit.stdio_inodes == inodes
    assert unit.tty_path is None
    assert holder.closed == list(copies)  # closed by the handler itself, before the exit
    assert holder.pushed == []


def test_pipe_is_audited_with_unit_and_executable_only(
    world: World, pipes: list[tuple[int, int]]
) -> None:
    holder = Holder(tuple(os.dup(fd) for fd in (pipes[0][0], pipes[1][1], pipes[2][1])))
    with fdpass.holding(holder):
        world.run(
            "Run",
            {
                "name": "alpha",
                "command": ["/bin/true", "s3cret-arg"],
                "environment": ["TOKEN=s3cret-env"],
                "stdio": "pipe",
            },
            more=True,
        )
    started = [r for r in world.audit_records if r["CAPSULED_RESULT"] == "started"]
    (record,) = started
    assert record["CAPSULED_COMMAND"] == "/bin/true"
    assert record["CAPSULED_STDIO"] == "pipe"
    assert record["CAPSULED_UNIT"].startswith("run-u")
    assert "s3cret" not in repr(world.audit_records)


@pytest.mark.parametrize(
    ("stdio", "count"), [("pipe", 2), ("pipe", 0), (None, 1), ("pty", 1), ("pty", 3)]
)
def test_fds_that_do_not_fit_the_mode_are_refused_and_nothing_runs(
    world: World, stdio: str | None, count: int
) -> None:
    holder = Holder(tuple(os.dup(0) for _ in range(count)))
    try:
        with fdpass.holding(holder):
            exc = world.error(
                "Run", {"name": "alpha", "command": ["/bin/true"], "stdio": stdio}, more=True
            )
    finally:
        for fd in holder.fds:
            os.close(fd)  # the transport would
    assert isinstance(exc, errors.InvalidValue)
    assert exc.parameters["parameter"] == "stdio"
    assert world.backend.capsules["alpha"].started == []


@pytest.mark.parametrize("stdio", ["pipe", "pty"])
def test_pipe_and_pty_need_more(world: World, stdio: str) -> None:
    fds = tuple(os.dup(0) for _ in range(3 if stdio == "pipe" else 0))
    holder = Holder(fds)
    try:
        with fdpass.holding(holder):
            exc = world.error("Run", {"name": "alpha", "command": ["/bin/true"], "stdio": stdio})
    finally:
        for fd in holder.fds:
            os.close(fd)
    assert isinstance(exc, errors.InvalidValue)
    assert world.backend.capsules["alpha"].started == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chowning a pty to another uid needs root")
def test_pty_gives_the_unit_a_fresh_pty_owned_by_the_capsule_and_sends_the_master_back(
    world: World,
) -> None:
    holder = Holder()
    reply, unit = _run(world, holder, stdio="pty")
    assert reply["exitStatus"] == 0
    (master,) = holder.pushed
    try:
        assert unit.tty_path is not None
        assert unit.tty_path.startswith("/dev/pts/")
        assert unit.stdio_inodes is not None
        assert len(set(unit.stdio_inodes)) == 1  # one peer, as stdin, stdout and stderr
        peer = os.stat(unit.tty_path)
        assert peer.st_ino == unit.stdio_inodes[0]
        assert (peer.st_uid, peer.st_gid) == (61184, 61184)  # the capsule's, not the caller's
        assert stat.S_IMODE(peer.st_mode) == 0o600
        assert os.isatty(master)
        assert os.ttyname(master) != unit.tty_path  # the master, not another peer
    finally:
        os.close(master)


def _method_blocks(idl: str) -> dict[str, str]:
    """Each method's declaration with the comment block above it (and its fields' comments)."""
    blocks: dict[str, str] = {}
    for block in idl.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("method "):
                blocks[line.split()[1].split("(")[0]] = block
    return blocks


def test_the_fd_table_is_what_the_idl_documents() -> None:
    idl = (Path(__file__).parents[2] / "helper/capsuled/org.capsuled.Manager.varlink").read_text()
    documented = {name for name, text in _method_blocks(idl).items() if "SCM_RIGHTS" in text}
    assert documented == set(TAKES_FDS)
    assert TAKES_FDS["Run"] == max(_STDIO_FDS.values())


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"stdio": "pty", "rows": 0, "columns": 80}, "rows"),
        ({"stdio": "pty", "rows": 24, "columns": 65536}, "columns"),
        ({"stdio": "pty", "rows": 24}, "rows"),
        ({"rows": 24, "columns": 80}, "rows"),
    ],
)
def test_a_terminal_size_that_makes_no_sense_is_refused(
    world: World, extra: dict[str, object], field: str
) -> None:
    with fdpass.holding(Holder()):
        exc = world.error("Run", {"name": "alpha", "command": ["/bin/true"], **extra}, more=True)
    assert isinstance(exc, errors.InvalidValue)
    assert exc.parameters["parameter"] == field
    assert world.backend.capsules["alpha"].started == []


def test_pty_of_the_size_asked_for(world: World) -> None:
    holder = Holder()
    _run(world, holder, stdio="pty", rows=33, columns=101)
    (master,) = holder.pushed
    try:
        size = fcntl.ioctl(master, termios.TIOCGWINSZ, b"\0" * 8)
        assert struct.unpack("HHHH", size)[:2] == (33, 101)
    finally:
        os.close(master)
