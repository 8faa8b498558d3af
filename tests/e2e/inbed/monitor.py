"""The helper's memory and open files over time, for the load proof (run as root in the bed).

    python3 -m e2e.inbed.monitor SECONDS INTERVAL_S

Samples capsuled.service's main process every INTERVAL_S seconds for SECONDS: VmRSS (KiB) and the
number of open fds, and which main pids it saw (a new one is a restart). Prints one JSON object
with the samples' maximum, the pids in the order seen, and the CPU seconds the helper, polkitd
and dbus-daemon used meanwhile (where the work went).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main_pid() -> int:
    shown = subprocess.run(
        ["systemctl", "show", "-P", "MainPID", "capsuled.service"],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(shown.stdout.strip() or 0)


def sample(pid: int) -> tuple[int, int] | None:
    """(VmRSS in KiB, open fds) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    return int(status["VmRSS"].split()[0]), fds


CPU_UNITS = {"capsuled": "capsuled.service", "polkitd": "polkit.service", "dbus": "dbus.service"}


def cpu_ns() -> dict[str, int]:
    """CPU time each unit's cgroup used so far (CPUUsageNSec; helper restarts included)."""
    used = {}
    for name, unit in CPU_UNITS.items():
        shown = subprocess.run(
            ["systemctl", "show", "-P", "CPUUsageNSec", unit],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        used[name] = int(shown) if shown.isdigit() else 0
    return used


def main(seconds: float, interval_s: float) -> dict[str, object]:
    started_cpu = cpu_ns()
    pids: list[int] = []
    max_rss_kib = max_fds = samples = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pid = main_pid()
        if pid and (not pids or pids[-1] != pid):
            pids.append(pid)
        seen = sample(pid) if pid else None
        if seen is not None:
            samples += 1
            max_rss_kib = max(max_rss_kib, seen[0])
            max_fds = max(max_fds, seen[1])
        time.sleep(interval_s)
    cpu_s = {k: round((v - started_cpu[k]) / 1e9, 2) for k, v in cpu_ns().items()}
    return {
        "pids": pids,
        "max_rss_kib": max_rss_kib,
        "max_fds": max_fds,
        "samples": samples,
        "cpu_s": cpu_s,
    }


if __name__ == "__main__":
    print(json.dumps(main(float(sys.argv[1]), float(sys.argv[2]))), flush=True)
