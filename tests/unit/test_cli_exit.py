"""cli.exit_with, how the launcher ends capsulectl: the output whole, the status kept, the
interpreter's teardown skipped only when nothing waits for it, a reader gone away is status 141.

Each case runs in a fresh `python3 -S` (this host's site registers an atexit callback of its
own, which would keep the teardown in every case). A module-level object whose __del__ writes
"teardown" to stderr shows whether the teardown ran: the interpreter collects __main__'s
globals there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """\
import os, sys
from capsulectl.cli import exit_with

class Witness:
    def __del__(self):
        os.write(2, b"teardown")

witness = Witness()
"""


def run(code: str, *, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    env = {"PYTHONPATH": f"{ROOT / 'helper'}:{ROOT / 'client'}", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-S", "-c", PRELUDE + code],
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        check=False,
        timeout=30,
    )


def test_the_output_arrives_whole_with_the_status_and_no_teardown() -> None:
    # 200 KB through a pipe: block-buffered, so most of it is still buffered when exit_with runs.
    done = run("print('x' * 99, file=sys.stdout)\n" * 2000 + "exit_with(3)")
    assert done.returncode == 3
    assert done.stdout == (b"x" * 99 + b"\n") * 2000
    assert done.stderr == b""  # the teardown was skipped: no "teardown" from the witness


def test_the_witness_sees_a_normal_exit() -> None:
    # The check above would notice a teardown: sys.exit runs it.
    done = run("sys.exit(3)")
    assert done.returncode == 3
    assert done.stderr == b"teardown"


def test_atexit_callbacks_still_run() -> None:
    done = run("import atexit\natexit.register(lambda: os.write(1, b'callback'))\nexit_with(4)")
    assert done.returncode == 4
    assert done.stdout == b"callback"
    assert done.stderr == b"teardown"


def test_a_loaded_atexit_without_callbacks_does_not_keep_the_teardown() -> None:
    done = run("import atexit\nexit_with(0)")
    assert (done.returncode, done.stderr) == (0, b"")


def test_another_thread_keeps_the_teardown() -> None:
    # A daemon thread blocked on a pipe: it never ends, and the interpreter does not wait for it.
    done = run(
        "import threading\nr, w = os.pipe()\n"
        "threading.Thread(target=os.read, args=(r, 1), daemon=True).start()\n"
        "exit_with(5)"
    )
    assert done.returncode == 5
    assert done.stderr == b"teardown"


@pytest.mark.parametrize(
    ("end", "status", "stderr"),
    [
        ("exit_with(0)", 141, b""),
        # What the launcher's sys.exit(main()) did: Python's "Exception ignored ...
        # BrokenPipeError" and 120. The case above would notice it coming back.
        ("sys.exit(0)", 120, b"BrokenPipeError"),
    ],
)
def test_a_reader_gone_away(end: str, status: int, stderr: bytes) -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        done = run(f"print('capsules')\n{end}", stdout=w)
    finally:
        os.close(w)
    assert done.returncode == status
    if stderr:
        assert stderr in done.stderr
    else:
        assert done.stderr == b""  # no message at all


def test_the_launcher_ends_through_exit_with() -> None:
    launcher = (ROOT / "client" / "scripts" / "capsulectl").read_text()
    assert "exit_with(main())" in launcher
