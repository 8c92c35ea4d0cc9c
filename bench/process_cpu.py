"""Where the CPU goes during a benchmark window: CPU seconds per Ray process (from psutil)
and py-spy GIL profiles of Serve's replicas and proxy. Shared by the throughput benches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def profile(out: Path, seconds: float) -> list[subprocess.Popen[bytes]]:
    """Start py-spy on every Serve replica and the proxy (raw collapsed stacks)."""
    import psutil

    out.mkdir(parents=True, exist_ok=True)
    spies = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        name = " ".join(proc.info["cmdline"] or [])
        if not name.startswith(("ray::ServeReplica", "ray::ProxyActor")):
            continue
        label = name.split()[0].replace(":", "_")
        spies.append(
            subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(out / f"{label}-{proc.pid}.txt"),
                    "--gil",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return spies


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each Ray process on this machine (by its title), and by
    this bench's client ("client")."""
    import psutil

    totals: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        cmd = proc.info["cmdline"] or []
        times = proc.info["cpu_times"]
        if not cmd or times is None:
            continue
        if proc.pid == psutil.Process().pid:
            name = "client"
        elif cmd[0].startswith("ray::"):
            name = cmd[0].removeprefix("ray::")
        elif "raylet" in cmd[0] or "gcs_server" in cmd[0]:
            name = Path(cmd[0]).name
        else:
            continue
        totals[name] = totals.get(name, 0.0) + times.user + times.system
    return totals


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict:
    """ms of CPU per request by process, largest first (processes using > 0.05 ms)."""
    per = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1000 / max(1, requests) for k in after}
    return {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0.05}
