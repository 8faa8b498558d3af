"""Lifecycle verbs inside the testbed: capsulectl as the owner vs the systemd command as root.

Each capsulectl call is a new client process that connects to capsuled, which checks the policy
and drives PID 1 (or the capsule's manager) over D-Bus; the systemd command talks to PID 1 (or
the capsule's bus) directly. Both are whole processes started the same way, so the ratio is
what a user pays for going through the helper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from _bed import Cmd, Comparison, compare
from _table import pair_table

if TYPE_CHECKING:
    from testbed import Testbed

NAME = "bl"
SOCKET = "/run/capsuled/org.capsuled.Manager"
OTHERS = [f"bl{i}" for i in range(1, 10)]  # with NAME, the 10 capsules `list` shows
QUOTA_DROP_IN = "/etc/capsuled/capsuled.toml.d/50-bench.toml"
USER_UNITS = "/var/lib/capsules/{name}/.config/systemd/user"

# What Debian's dbus-user-session ships as user units: a session bus for the capsule, which
# `systemd-run --capsule=` needs (it connects to $XDG_RUNTIME_DIR/bus; the manager's private
# socket alone answers "Invalid request descriptor" to systemd-run). capsuled does not need it:
# it talks to the manager's private socket.
DBUS_SOCKET = """[Unit]
Description=D-Bus User Message Bus Socket
[Socket]
ListenStream=%t/bus
[Install]
WantedBy=sockets.target
"""
DBUS_SERVICE = """[Unit]
Description=D-Bus User Message Bus
Requires=dbus.socket
[Service]
ExecStart=/usr/bin/dbus-daemon --session --address=systemd: --nofork --nopidfile \
--systemd-activation --syslog-only
"""

FOOTNOTES = [
    "[a] the testbed's root has no dbus-user-session, so a capsule has no session bus and",
    '    `systemd-run --capsule=` fails ("Failed to connect to user scope bus"); the bench',
    "    installs that package's two user units (dbus.socket, dbus.service) into this capsule",
    "    so systemd-run --capsule runs as upstream intends. capsuled itself does not use them.",
    "[b] alice lists the capsules she may read (all 10 are hers); systemctl lists all loaded.",
    "[c] the helper's own overhead: systemd's own Varlink client (C) calls capsuled, which",
    "    checks the policy and runs the same job through PID 1 as systemctl does (issue 12:",
    "    at most 1.10x). As alice (the owner grant: her groups are read) and as root (both",
    "    sides then enter the container the same way, so only the call differs).",
]


def setup(bed: Testbed) -> None:
    """Ten running capsules owned by alice; NAME with a session bus and some journal lines."""
    # The default quota is 8 capsules per user; this throwaway bed lets alice own 10.
    bed.as_root("mkdir", "-p", "-m", "0755", "/etc/capsuled/capsuled.toml.d").check()
    bed.as_root(
        "sh",
        "-c",
        f"umask 022; printf '[[quota_rule]]\\nusers = [\"alice\"]\\nmax_capsules = 32\\n' > "
        f"{QUOTA_DROP_IN}",
    ).check()
    bed.as_root("systemctl", "stop", "capsuled.service").check()  # read the policy anew
    for name in [NAME, *OTHERS]:
        bed.as_user("alice", "capsulectl", "create", name, "--start").check()
    units = USER_UNITS.format(name=NAME)
    script = (
        f"set -e; umask 022; mkdir -p {units}/sockets.target.wants; "
        f"cat > {units}/dbus.socket; printf '%s' \"$1\" > {units}/dbus.service; "
        f"ln -sf ../dbus.socket {units}/sockets.target.wants/dbus.socket"
    )
    bed.run("sh", "-c", script, "sh", DBUS_SERVICE, input=DBUS_SOCKET).check()
    bed.as_root("systemctl", "restart", f"capsule@{NAME}.service").check()
    bed.as_root(
        "systemd-run",
        f"--capsule={NAME}",
        "--wait",
        "--quiet",
        "/bin/sh",
        "-c",
        "for i in $(seq 300); do echo bench line $i; done",
    ).check()


def run(bed: Testbed, n: int) -> None:
    setup(bed)
    unit = f"capsule@{NAME}.service"

    def alice(*argv: str) -> Cmd:
        return Cmd(bed, "alice", argv)

    def root(*argv: str) -> Cmd:
        return Cmd(bed, "root", argv)

    comparisons = [
        Comparison("stop", alice("capsulectl", "stop", NAME), root("systemctl", "stop", unit)),
        Comparison("start", alice("capsulectl", "start", NAME), root("systemctl", "start", unit)),
        Comparison(
            "restart", alice("capsulectl", "restart", NAME), root("systemctl", "restart", unit)
        ),
        Comparison(
            "status", alice("capsulectl", "status", NAME), root("systemctl", "status", unit)
        ),
        Comparison(
            "list (10 capsules)",
            alice("capsulectl", "list"),
            root("systemctl", "list-units", "capsule@*"),
            "b",
        ),
        Comparison(
            "logs -n 100",
            alice("capsulectl", "logs", NAME, "-n", "100"),
            root("journalctl", "-u", unit, "-n", "100"),
        ),
        Comparison(
            "run --wait /bin/true",
            alice("capsulectl", "run", NAME, "--wait", "--", "/bin/true"),
            root("systemd-run", f"--capsule={NAME}", "--wait", "--quiet", "/bin/true"),
            "a",
        ),
        Comparison(
            "stop, varlinkctl",
            alice(
                "varlinkctl", "call", SOCKET, "org.capsuled.Manager.Stop", f'{{"name":"{NAME}"}}'
            ),
            root("systemctl", "stop", unit),
            "c",
        ),
        Comparison(
            "start, varlinkctl",
            alice(
                "varlinkctl", "call", SOCKET, "org.capsuled.Manager.Start", f'{{"name":"{NAME}"}}'
            ),
            root("systemctl", "start", unit),
            "c",
        ),
        Comparison(
            "stop, varlinkctl as root",
            root("varlinkctl", "call", SOCKET, "org.capsuled.Manager.Stop", f'{{"name":"{NAME}"}}'),
            root("systemctl", "stop", unit),
            "c",
        ),
        Comparison(
            "start, varlinkctl as root",
            root(
                "varlinkctl", "call", SOCKET, "org.capsuled.Manager.Start", f'{{"name":"{NAME}"}}'
            ),
            root("systemctl", "start", unit),
            "c",
        ),
    ]
    # Stop and start change state: each round runs capsulectl stop, capsulectl start, systemctl
    # stop, systemctl start, so every stop finds the capsule running and every start finds it
    # stopped (a no-op job would flatter either side). The rest pairs back to back.
    order = [(0, "ours"), (1, "ours"), (0, "theirs"), (1, "theirs")]
    order += [(i, side) for i in range(2, 7) for side in ("ours", "theirs")]
    order += [(7, "ours"), (8, "ours"), (7, "theirs"), (8, "theirs")]
    order += [(9, "ours"), (10, "ours"), (9, "theirs"), (10, "theirs")]
    report = compare(bed, comparisons, n, order)
    entry = ", ".join(f"{u} {ms:.1f} ms" for u, ms in sorted(report.entry_ms.items()))
    pair_table(
        f"Lifecycle in the testbed (systemd 257, real capsuled), n={n}, wall ms per command",
        report.pairs,
        footnotes=[
            f"entering the container (`true` the same way, median) subtracted: {entry}",
            *FOOTNOTES,
            *report.failures,
        ],
    )
