"""Drive capsulectl's interactive verbs in the bed, as a user at a real terminal would.

    python3 -m e2e.inbed.interactive pty INPUT_JSON ARGV...
        runs `capsulectl ARGV...` on a fresh pty (its stdin, stdout and stderr) of 24x80,
        types INPUT (a JSON string) once it has started, reads until it exits; prints
        {"status", "output", "restored"} (output decoded as UTF-8 with replacement; restored:
        the terminal is back in canonical mode with echo). INPUT_JSON may instead be an object
        {"typed": ..., "resize": [ROWS, COLS]}: the pty is resized when the first output
        comes, before typing.
    python3 -m e2e.inbed.interactive pipe SIZE ARGV...
        runs `capsulectl ARGV...` with SIZE random bytes as stdin (a file), stdout a file and
        stderr a pipe; prints {"status", "identical", "size", "output" (its start, as
        text), "stderr"}.
    python3 -m e2e.inbed.interactive held USER NAME   (as root)
        as USER, `capsulectl run NAME --pipe -- /bin/sh -c 'read x; echo got-$x'` with three
        pipes of ours; while the command waits for its line and after it ended, lists which
        of those pipes capsuled's main process holds (/proc/MAINPID/fd); prints {"during",
        "after", "output", "status"}.

With --ssh=COMMAND right after pty or pipe, capsulectl's $CAPSULECTL_SSH is COMMAND.

Waits on events only (the child's output and its exit); the timeouts are the test's.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time

READ_TIMEOUT_S = 60.0


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_until_exit(
    fd: int, pid: int, typed: bytes, resize: list[int] | None = None
) -> tuple[int, bytes]:
    out = bytearray()
    deadline = time.monotonic() + READ_TIMEOUT_S
    sent = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no end after {READ_TIMEOUT_S} s; output so far: {bytes(out)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: every process on the terminal is gone
            data = b""
        if not data:
            break
        out += data
        # Type only once the far side shows a sign of life (the shell's first output or
        # prompt), as a person would: before that, the pty is not yet in raw mode.
        if not sent:
            if resize is not None:
                _set_size(fd, resize[0], resize[1])  # SIGWINCH for capsulectl, as a resize
            if typed:
                os.write(fd, typed)
            sent = True
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), bytes(out)


def run_on_pty(spec: str | dict[str, object], argv: list[str]) -> dict[str, object]:
    typed = spec if isinstance(spec, str) else str(spec.get("typed", ""))
    resize = None if isinstance(spec, str) else spec.get("resize")
    pid, fd = pty.fork()
    if pid == 0:  # the child: capsulectl with the pty as its controlling terminal
        os.environ["TERM"] = "xterm-256color"
        _set_size(0, 24, 80)
        os.execvp("capsulectl", ["capsulectl", *argv])
    try:
        status, out = _read_until_exit(
            fd, pid, typed.encode(), resize if isinstance(resize, list) else None
        )
        lflag = termios.tcgetattr(fd)[3]  # the terminal's (the slave's) settings, seen here
        restored = bool(lflag & termios.ICANON and lflag & termios.ECHO)
    finally:
        os.close(fd)
    return {"status": status, "output": out.decode("utf-8", "replace"), "restored": restored}


def run_with_pipe(size: int, argv: list[str]) -> dict[str, object]:
    data = os.urandom(size)
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stdout:
        stdin.write(data)
        stdin.seek(0)
        proc = subprocess.run(
            ["capsulectl", *argv],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=READ_TIMEOUT_S,
            check=False,
        )
        stdout.seek(0)
        got = stdout.read()
    return {
        "status": proc.returncode,
        "identical": got == data,
        "size": len(got),
        "output": got[:65536].decode("utf-8", "replace"),
        "stderr": proc.stderr.decode("utf-8", "replace"),
    }


def _helper_pipes(pipes: set[str]) -> list[str]:
    pid = subprocess.run(
        ["systemctl", "show", "-P", "MainPID", "capsuled.service"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    held = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            held.add(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue  # closed while we looked
    return sorted(held & pipes)


def _pipe_name(fd: int) -> str:
    return f"pipe:[{os.fstat(fd).st_ino}]"


def held_by_helper(user: str, name: str) -> dict[str, object]:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pipes = {_pipe_name(fd) for fd in (in_r, out_r, err_r)}
    proc = subprocess.Popen(
        [
            *("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "capsulectl"),
            *("run", name, "--pipe", "--", "/bin/sh", "-c", "read x; echo got-$x"),
        ],
        stdin=in_r,
        stdout=out_w,
        stderr=err_w,
    )
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    errors = b""
    while b"Running as unit" not in errors:  # printed once the command has started
        ready, _, _ = select.select([err_r], [], [], READ_TIMEOUT_S)
        chunk = os.read(err_r, 4096) if ready else b""
        if not chunk:
            raise TimeoutError(f"capsulectl never said it started: {errors!r}")
        errors += chunk
    during = _helper_pipes(pipes)
    os.write(in_w, b"x\n")
    os.close(in_w)
    output = b""
    while chunk := os.read(out_r, 4096):
        output += chunk
    status = proc.wait(READ_TIMEOUT_S)
    return {
        "during": during,
        "after": _helper_pipes(pipes),
        "output": output.decode("utf-8", "replace"),
        "status": status,
    }


def main(argv: list[str]) -> int:
    mode = argv[1]
    if argv[2].startswith("--ssh="):  # pty/pipe: the ssh stand-in capsulectl -H is to use
        os.environ["CAPSULECTL_SSH"] = argv[2].removeprefix("--ssh=")
        argv = argv[:2] + argv[3:]
    if mode == "pty":
        result = run_on_pty(json.loads(argv[2]), argv[3:])
    elif mode == "pipe":
        result = run_with_pipe(int(argv[2]), argv[3:])
    elif mode == "held":
        result = held_by_helper(argv[2], argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
