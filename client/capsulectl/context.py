"""What every verb is handed: the parsed command line, the output streams and a Client opened on
first use (`Context`), and the error a verb raises for a command line argparse cannot judge; and
what it hands back: an exit status, the LSB/systemctl ones documented in `capsulectl --help`.

The statuses and quote() live here rather than in failures.py, the failure table, so that a
verb that succeeds does not load that (~0.25 ms of start-up in the testbed)."""

from __future__ import annotations

import os

from capsulectl import output

TYPE_CHECKING = False  # not typing's: a plain command loads no typing (capsulectl/fastargs.py)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable
    from typing import TextIO

    from capsulectl.agent import TtyAgent
    from capsulectl.client import Client
    from capsulectl.fastargs import Namespace

__all__ = [
    "ENV_ADDRESS",
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_NOT_RUNNING",
    "EXIT_NO_SUCH",
    "EXIT_OK",
    "EXIT_PERMISSION",
    "EXIT_USAGE",
    "Context",
    "UsageError",
    "quote",
]

ENV_ADDRESS = "CAPSULECTL_ADDRESS"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # argparse's, and LSB's "invalid or excess argument(s)"
EXIT_NOT_RUNNING = 3  # LSB/systemctl status: "program is not running"
EXIT_NO_SUCH = 4  # systemctl: "no such unit"
EXIT_PERMISSION = 5
EXIT_BROKEN_PIPE = 141  # what a C tool killed by SIGPIPE reports through the shell


def quote(value: object) -> str:
    """A name as the messages show it: 'web'."""
    return f"'{value}'"


class UsageError(Exception):
    """A command line that makes no sense beyond what argparse can check."""


class Context:
    """What a verb needs: parsed options, output streams, and a lazily opened Client."""

    # A plain class, not a dataclass: importing dataclasses costs ~8 ms of start-up (inspect).
    def __init__(
        self, args: argparse.Namespace | Namespace, out: TextIO, err: TextIO, style: output.Style
    ) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.style = style
        self.doing = "use capsuled"  # for error lines: "you may not <doing>"
        self._client: Client | None = None
        self._agent: TtyAgent | None = None

    @property
    def asked(self) -> bool:
        """Whether calls may be repeated allowing interactive authentication."""
        return not self.args.no_ask_password

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    @property
    def address(self) -> str:
        from capsulectl.transport import DEFAULT_ADDRESS

        return self.args.address or os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS

    @property
    def client(self) -> Client:
        if self._client is None:
            from capsulectl.client import Client

            explicit = self.args.address or os.environ.get(ENV_ADDRESS)
            self._client = Client(
                explicit if self.args.host is None else self.args.address,
                host=self.args.host,
                timeout=self.args.timeout,
                interactive=not self.args.no_ask_password,
                on_interactive=self._start_agent if self.args.host is None else None,
            )
        return self._client

    def _start_agent(self) -> None:
        from capsulectl.agent import TtyAgent

        if self._agent is None:
            self._agent = TtyAgent()
            self._agent.start()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._agent is not None:
            self._agent.stop()

    def print(self, line: str = "") -> None:
        print(line, file=self.out)

    def print_lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            print(line, file=self.out)

    def print_json(self, value: object) -> None:
        print(output.dump_json(value), file=self.out, flush=True)

    def error(self, message: str) -> None:
        print(message, file=self.err, flush=True)
