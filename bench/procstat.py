"""What a benchmark records of a run: one command as its own process, timed, with the peak memory of the
process and of its busiest Ray worker; and where and at which commit it ran.

Memory is sampled every 0.2 s: resident (RSS, which counts the object-store pages a process maps) and
private (USS, what the process holds itself). Ray workers are the process's descendants named `ray::...`.
USS is read only when a process's RSS is at a new high: reading it walks every mapping of the process
(the object store's included), and at every sample that cost the measured run seconds of its 2 cores.
"""
from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import psutil

PERIOD_S = 0.2
BENCH = Path(__file__).resolve().parent
# Where a run ran: its timings depend on it. BENCH_MACHINE may describe it better (a GPU, a cluster).
MACHINE = os.environ.get("BENCH_MACHINE", f"{platform.node()}, {os.cpu_count()} CPUs")


def commit() -> str:
    """The commit a run ran at, "+changes" if code differs from it (results files do not count)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=BENCH, capture_output=True, text=True).stdout.strip()
    changed = git("status", "--porcelain", "--", "..", ":(exclude)results")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+changes" if changed else "")


def run_measured(argv: list[str]) -> tuple[float, str, dict[str, float]]:
    """(seconds, the process's output, peak MiB as driver_rss, driver_uss, worker_rss, worker_uss).
    Raises SystemExit with the output's tail when the command fails."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = psutil.Process(proc.pid)
    peak = {"driver_rss": 0, "driver_uss": 0, "worker_rss": 0, "worker_uss": 0}
    own_peak_rss: dict[int, int] = {}
    output: list[str] = []
    reader = _drain(proc, output)
    while proc.poll() is None:
        try:
            for who, process in [("driver", driver)] + [("worker", c) for c in driver.children(recursive=True)
                                                        if c.name().startswith("ray::")]:
                rss = process.memory_info().rss
                if rss <= own_peak_rss.get(process.pid, 0):
                    continue
                own_peak_rss[process.pid] = rss
                peak[f"{who}_rss"] = max(peak[f"{who}_rss"], rss)
                peak[f"{who}_uss"] = max(peak[f"{who}_uss"], process.memory_full_info().uss)
        except psutil.Error:  # a process ended between the listing and the reading
            pass
        time.sleep(PERIOD_S)
    seconds = time.perf_counter() - started
    reader.join()
    log = "".join(output)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{log[-3000:]}")
    return seconds, log, {f"{k}_peak_mib": v / 2**20 for k, v in peak.items()}


def _drain(proc: subprocess.Popen, into: list[str]):
    """Reads the process's output as it comes, so a chatty process never blocks on a full pipe."""
    thread = threading.Thread(target=lambda: into.extend(proc.stdout), daemon=True)
    thread.start()
    return thread
