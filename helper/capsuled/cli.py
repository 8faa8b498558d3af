"""`capsuled`: serve (the default), install, uninstall.

capsuled [serve] [--listen PATH] [--config-dir DIR] [--idle-exit-sec N] [--max-connections N] ...
capsuled install ...     (capsuled.install, imported only when asked for)
capsuled uninstall ...
capsuled audit verify [FILE...]   (capsuled.verify)
capsuled --version

Socket activation runs `capsuled` with no arguments (ExecStart=): that start builds the
default Options without argparse, and `--version` is answered before anything is imported,
since every millisecond here is a millisecond of the first caller's wait (issue 12).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from capsuled import __version__

if TYPE_CHECKING:
    import argparse

    from capsuled.daemon import Options

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    import argparse
    from pathlib import Path

    from capsuled.transport import Limits

    d = Limits()
    p = argparse.ArgumentParser(
        prog="capsuled",
        description="Varlink helper managing systemd capsules for unprivileged users.",
        epilog="Subcommands: serve (default), install, uninstall, audit (see `capsuled install "
        "--help`, `capsuled audit verify --help`).",
    )
    p.add_argument("--version", action="version", version=f"capsuled {__version__}")
    p.add_argument(
        "--listen",
        metavar="PATH",
        help="create and listen on this socket (development); default: socket activation",
    )
    p.add_argument(
        "--idle-exit-sec",
        type=float,
        metavar="N",
        help="exit after N seconds without connections; 0 never "
        "(default: 30 when socket-activated, never with --listen)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        metavar="N",
        help="connections at once, all users (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections-per-uid",
        type=int,
        metavar="N",
        help="connections at once for one UID (a capsule's processes count against its owner), "
        "at most 3/4 of --max-connections (default: 1/16)",
    )
    p.add_argument(
        "--idle-timeout-sec",
        type=float,
        default=d.idle_timeout_s,
        metavar="N",
        help="close a connection after N seconds without a call (default: %(default)s)",
    )
    p.add_argument(
        "--max-inflight-calls",
        type=int,
        default=d.max_inflight_calls,
        metavar="N",
        help="method calls running at once, all users (default: %(default)s)",
    )
    p.add_argument(
        "--max-inflight-calls-per-uid",
        type=int,
        metavar="N",
        help="method calls running at once for one UID, at most 3/4 of the total (default: 1/16)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=d.max_message_bytes,
        metavar="N",
        help="largest call accepted; the largest this interface needs is ~400 KiB "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-json-depth",
        type=int,
        default=d.max_json_depth,
        metavar="N",
        help="deepest JSON nesting accepted in a call (default: %(default)s)",
    )
    p.add_argument(
        "--max-json-values",
        type=int,
        default=d.max_json_values,
        metavar="N",
        help="most JSON values accepted in a call (default: %(default)s)",
    )
    p.add_argument(
        "--max-buffered-bytes",
        type=int,
        default=d.max_buffered_bytes,
        metavar="N",
        help="bytes held for all connections together (calls received and not yet handled, "
        "replies being sent); past it the connection holding the most is closed "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--send-timeout-sec",
        type=float,
        default=d.send_timeout_s,
        metavar="N",
        help="disconnect a client that does not read its replies for N seconds "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--slot-wait-sec",
        type=float,
        default=d.slot_wait_s,
        metavar="N",
        help="answer Busy to a call that waited N seconds for an in-flight slot "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-streams",
        type=int,
        default=d.max_streams,
        metavar="N",
        help="streaming calls (Watch, followed Logs, Run with more) at once, all users; "
        "they hold no in-flight slot (default: %(default)s)",
    )
    p.add_argument(
        "--max-streams-per-uid",
        type=int,
        default=d.max_streams_per_uid,
        metavar="N",
        help="streaming calls at once for one UID (default: %(default)s)",
    )
    p.add_argument(
        "--max-open-streams",
        type=int,
        default=d.max_open_streams,
        metavar="N",
        help="of those, streams anybody may open without authorization (Watch), all users "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-open-streams-per-uid",
        type=int,
        default=d.max_open_streams_per_uid,
        metavar="N",
        help="streams without authorization at once for one UID (default: %(default)s)",
    )
    p.add_argument(
        "--max-waiting-calls",
        type=int,
        default=d.max_waiting_calls,
        metavar="N",
        help="calls waiting for interactive authentication, which hold no in-flight slot "
        "meanwhile, all users (default: %(default)s)",
    )
    p.add_argument(
        "--max-waiting-calls-per-uid",
        type=int,
        default=d.max_waiting_calls_per_uid,
        metavar="N",
        help="calls waiting for interactive authentication for one UID (default: %(default)s)",
    )
    p.add_argument(
        "--max-fds-per-message",
        type=int,
        default=d.max_fds_per_message,
        metavar="N",
        help="file descriptors one call may carry; more close the connection "
        "(default: %(default)s; Run --pipe needs 3)",
    )
    p.add_argument(
        "--max-fds",
        type=int,
        default=d.max_fds,
        metavar="N",
        help="file descriptors received from callers held at once, all users "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-fds-per-uid",
        type=int,
        default=d.max_fds_per_uid,
        metavar="N",
        help="file descriptors received and held at once for one UID (default: %(default)s)",
    )
    p.add_argument(
        "--shutdown-grace-sec",
        type=float,
        default=10.0,
        metavar="N",
        help="on SIGTERM, let running calls finish for up to N seconds (default: %(default)s)",
    )
    p.add_argument(
        "--config-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="read the policy from DIR/capsuled.toml and DIR/capsuled.toml.d/ "
        "(default: /etc/capsuled)",
    )
    p.add_argument("--validate-replies", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="log debug messages")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the `capsuled` command; returns the exit status."""
    args_in = sys.argv[1:] if argv is None else list(argv)
    if args_in and args_in[0] in ("install", "uninstall"):
        # Imported only here: install pulls in file-system code the daemon never needs.
        if args_in[0] == "install":
            from capsuled.install import main_install

            return main_install(args_in[1:])
        from capsuled.install import main_uninstall

        return main_uninstall(args_in[1:])
    if args_in and args_in[0] == "audit":
        from capsuled.verify import main_audit

        return main_audit(args_in[1:])
    if args_in and args_in[0] == "serve":
        args_in = args_in[1:]
    if args_in == ["--version"]:
        print(f"capsuled {__version__}")
        return 0
    _block_ssl()  # before anything imports asyncio
    if not args_in:
        return _serve_defaults()
    parser = _parser()
    args = parser.parse_args(args_in)
    from capsuled.daemon import run, setup_logging

    try:
        options = options_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(args.debug)
    return run(options)


def options_from(args: argparse.Namespace) -> Options:
    """What `capsuled serve OPTIONS...` asks for.

    Raises:
        ValueError: the limits do not fit together (transport.Limits says which).
    """
    from capsuled.daemon import Options
    from capsuled.transport import Limits

    limits = Limits(
        max_connections=args.max_connections,
        max_connections_per_uid=args.max_connections_per_uid,
        idle_timeout_s=args.idle_timeout_sec,
        max_inflight_calls=args.max_inflight_calls,
        max_inflight_calls_per_uid=args.max_inflight_calls_per_uid,
        max_message_bytes=args.max_message_bytes,
        max_json_depth=args.max_json_depth,
        max_json_values=args.max_json_values,
        max_buffered_bytes=args.max_buffered_bytes,
        send_timeout_s=args.send_timeout_sec,
        slot_wait_s=args.slot_wait_sec,
        max_streams=args.max_streams,
        max_streams_per_uid=args.max_streams_per_uid,
        max_open_streams=args.max_open_streams,
        max_open_streams_per_uid=args.max_open_streams_per_uid,
        max_waiting_calls=args.max_waiting_calls,
        max_waiting_calls_per_uid=args.max_waiting_calls_per_uid,
        max_fds_per_message=args.max_fds_per_message,
        max_fds=args.max_fds,
        max_fds_per_uid=args.max_fds_per_uid,
    )
    return Options(
        listen=args.listen,
        idle_exit_s=args.idle_exit_sec,
        limits=limits,
        validate_replies=args.validate_replies,
        shutdown_grace_s=args.shutdown_grace_sec,
        config_dir=args.config_dir,
    )


def _serve_defaults() -> int:
    """`capsuled` as socket activation starts it: every option at its default (the same
    Options as options_from(no options), tests/unit/test_helper_cli.py checks)."""
    from capsuled.daemon import Options, run, setup_logging

    setup_logging(False)
    return run(Options())


def _block_ssl() -> None:
    """Make `import ssl` fail in this process: asyncio then runs without TLS support.

    capsuled speaks only over Unix sockets (RestrictAddressFamilies=AF_UNIX) and never uses
    TLS, but asyncio imports ssl when it can, which loads libssl and costs ~7-25 ms of every
    start and ~1 MiB resident (measured in the testbed, issue 12). asyncio treats a missing ssl
    as "no TLS" (`try: import ssl except ImportError: ssl = None` in base_events, sslproto,
    selector_events). A None entry is how sys.modules marks a module as unimportable. Only the
    daemon does this: install, audit verify and tests run with ssl as usual.
    """
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]  # None: unimportable
