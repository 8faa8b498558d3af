"""The narrated walkthrough behind `make demo`: steps from demo.toml, run in a fresh testbed.

The steps are data (demo.toml) so the story can be changed without touching code. Every step
states whether it should succeed or be refused; an unexpected outcome stops the demo and makes
it exit non-zero, so a broken demo cannot pass for a working one.
"""

from __future__ import annotations

import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from testbed.bed import USERS, Result, Testbed

DEFAULT_STEPS = Path(__file__).with_name("demo.toml")
STEP_TIMEOUT_S = 120.0
WIDTH = 78


class StepError(ValueError):
    """demo.toml is malformed."""


@dataclass(frozen=True, slots=True)
class Step:
    """One command of the walkthrough."""

    say: str
    user: str
    run: tuple[str, ...]
    input: str | None = None
    expect_ok: bool = True


def _text(table: dict[str, object], key: str, where: str, required: bool = True) -> str | None:
    value = table.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise StepError(f"{where}: '{key}' must be a string")
    return value


def load_steps(path: Path, capsule: str | None = None) -> list[Step]:
    """Parse and validate a steps file; capsule overrides the file's capsule name.

    Raises:
        StepError: a step is missing a field or has one of the wrong type.
    """
    data = tomllib.loads(path.read_text())
    if capsule is None:
        capsule = data.get("capsule", "demo")
    raw_steps = data.get("step")
    if not isinstance(capsule, str) or not isinstance(raw_steps, list):
        raise StepError(f'{path}: needs capsule = "NAME" and [[step]] tables')
    steps: list[Step] = []
    for number, raw in enumerate(raw_steps, 1):
        where = f"{path.name} step {number}"
        if not isinstance(raw, dict):
            raise StepError(f"{where}: not a table")
        unknown = set(raw) - {"say", "user", "run", "input", "expect"}
        if unknown:
            raise StepError(f"{where}: unknown keys {sorted(unknown)}")
        user = _text(raw, "user", where) or ""
        if user != "root" and user not in USERS:
            raise StepError(f"{where}: unknown user {user!r}")
        run = raw.get("run")
        if not isinstance(run, list) or not run or not all(isinstance(w, str) for w in run):
            raise StepError(f"{where}: 'run' must be a non-empty list of strings")
        expect = raw.get("expect", "ok")
        if expect not in ("ok", "refused"):
            raise StepError(f'{where}: \'expect\' must be "ok" or "refused"')
        say = _text(raw, "say", where) or ""
        steps.append(
            Step(
                say=say.replace("{capsule}", capsule),
                user=user,
                run=tuple(w.replace("{capsule}", capsule) for w in run),
                input=_text(raw, "input", where, required=False),
                expect_ok=expect == "ok",
            )
        )
    return steps


class Narrator:
    """Prints the story: bold narration, a shell-like prompt, the command's output indented."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()

    def _style(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.tty else text

    def say(self, number: int, total: int, text: str) -> None:
        """Narration before a step."""
        self.out.write("\n")
        prefix = f"[{number}/{total}] "
        for line in textwrap.wrap(text, WIDTH - len(prefix)) or [""]:
            self.out.write(self._style("1", prefix + line) + "\n")
            prefix = " " * len(prefix)

    def command(self, step: Step) -> None:
        """The command as the user would type it."""
        prompt = "#" if step.user == "root" else "$"
        shown = " ".join(w if w and " " not in w else repr(w) for w in step.run)
        self.out.write(self._style("36", f"{step.user}@testbed {prompt} ") + shown + "\n")

    def result(self, res: Result, step: Step, as_expected: bool) -> None:
        """Its output, and a note when it was refused as intended or went wrong."""
        for stream in (res.stdout, res.stderr):
            for line in stream.rstrip("\n").splitlines():
                self.out.write(f"    {line}\n")
        if not step.expect_ok and as_expected:
            self.out.write(
                self._style("33", f"    -> refused (exit status {res.returncode})") + "\n"
            )
        if not as_expected:
            want = "success" if step.expect_ok else "a refusal"
            self.out.write(
                self._style("31", f"    !! expected {want}, got exit status {res.returncode}")
                + "\n"
            )
        self.out.flush()


def run_demo(bed: Testbed, steps: list[Step], out: TextIO = sys.stdout) -> int:
    """Run the steps in order; 0 if each one ended as expected, else 1 (stopping there)."""
    narrator = Narrator(out)
    for number, step in enumerate(steps, 1):
        narrator.say(number, len(steps), step.say)
        narrator.command(step)
        res = bed.run(*step.run, user=step.user, input=step.input, timeout=STEP_TIMEOUT_S)
        as_expected = res.ok == step.expect_ok
        narrator.result(res, step, as_expected)
        if not as_expected:
            out.write(f"\nThe demo stopped at step {number}: see the output above.\n")
            return 1
    out.write(f"\nAll {len(steps)} steps behaved as expected.\n")
    return 0
