"""Throughput under concurrency: the fleet vs a plain single-model Serve deployment (issue 6
item 12), and the fleet with per-model batching on vs off (issue 9 §5).

One private stack (SeaweedFS + Ray + Serve, see bench/local_stack.py) runs, side by side:

    fleet          the `fleet` app (ingress + 2 host replicas, 0.5 CPU each), batching on
    fleet-nobatch  the same app with batching off (`max_batch_size: 1`)
    plain          an ordinary single-model Serve deployment of the same model (2 replicas,
                   0.5 CPU each, FastAPI, one hop), see bench/baselines.py

`--clients` (16) closed-loop clients send one-row requests to one warm fraud model for
`--seconds` per target; targets are interleaved in each of `--runs` rounds (order rotated),
and the medians across rounds give the ratios:

    throughput fleet/plain          goal >= 0.8   (issue 6 item 12)
    throughput fleet/fleet-nobatch  batching's gain (reported; goal > 1.0)

Run: `.venv/bin/python -m bench.throughput` (it needs the machine to itself).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.baselines import plain_app
from bench.load import closed_loop
from bench.local_stack import LocalStack, save_result, say

MODEL_ID = "fraud-bench"
FRAUD_INDEX = 41  # the demo fleet's largest fraud MLP (~19 MB)
GOAL_VS_PLAIN = 0.8


def _row() -> list[float]:
    from devstack.demo_fleet import FRAUD_FEATURES

    return [((i * 37) % 11) / 10 - 0.5 for i in range(FRAUD_FEATURES)]


def _profile(stack: LocalStack, out: Path, seconds: float) -> list[subprocess.Popen[bytes]]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per target")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=0.5, help="CPUs per host / plain replica")
    parser.add_argument("--no-nobatch", action="store_true", help="skip fleet-nobatch")
    parser.add_argument("--profile", type=Path, help="py-spy the replicas in round 1 into DIR")
    parser.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"))
    args = parser.parse_args()

    from devstack.demo_fleet import write_fraud_model
    from serve_app.storage.publisher import publish_path

    with LocalStack() as stack:
        assert stack.store is not None
        assert stack.store_config is not None
        manifest = publish_path(
            stack.store, write_fraud_model(stack.tmp / "m", FRAUD_INDEX), MODEL_ID, "1"
        )
        say(f"published {manifest.key} ({manifest.weight_bytes / 1e6:.1f} MB)")
        host = {"num_replicas": args.replicas, "num_cpus": args.cpus, "memory_budget": "1GiB"}
        config = stack.fleet_config(host)
        stack.deploy_fleet(config, [MODEL_ID])
        targets = {"fleet": f"{stack.url}/v1/models/{MODEL_ID}/predict"}
        if not args.no_nobatch:
            from deployments.builder import build_app

            nobatch = stack.fleet_config({**host, "batching": {"max_batch_size": 1}})
            base = stack.run_app(build_app(nobatch), "fleet-nobatch", "/fleet-nobatch")
            targets["fleet-nobatch"] = f"{base}/v1/models/{MODEL_ID}/predict"
        targets["plain"] = (
            stack.run_app(
                plain_app(stack.store_config, MODEL_ID, "1", args.replicas, args.cpus),
                "plain",
                "/plain",
            )
            + "/"
        )
        body = {"inputs": [_row()]}
        for url in targets.values():  # load the model everywhere before measuring
            closed_loop(url, body, args.clients, seconds=1.0, warmup_s=1.0)
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        names = list(targets)
        for run in range(args.runs):
            order = names[run % len(names) :] + names[: run % len(names)]
            for name in order:
                spies = (
                    _profile(stack, args.profile / name, args.seconds)
                    if args.profile and run == 0
                    else []
                )
                before = cpu_seconds()
                result = closed_loop(targets[name], body, args.clients, args.seconds, warmup_s=0)
                result["cpu_ms_per_request"] = cpu_per_request(
                    before, cpu_seconds(), int(result["rps"] * args.seconds)
                )
                for spy in spies:
                    spy.wait(timeout=60)
                samples[name].append(result)
                say(
                    f"run {run + 1}/{args.runs} {name:14s} {result['rps']:7.1f} req/s  "
                    f"p50 {result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms"
                )
                say(f"    CPU ms/request: {result['cpu_ms_per_request']}")

    medians = {
        name: {
            key: round(statistics.median(r[key] for r in rows), 3)
            for key in ("rps", "p50_ms", "p99_ms")
        }
        for name, rows in samples.items()
    }
    ratios = {"throughput fleet/plain": round(medians["fleet"]["rps"] / medians["plain"]["rps"], 3)}
    goals = {"throughput fleet/plain": f">= {GOAL_VS_PLAIN}"}
    if "fleet-nobatch" in medians:
        ratios["throughput fleet/fleet-nobatch"] = round(
            medians["fleet"]["rps"] / medians["fleet-nobatch"]["rps"], 3
        )
        goals["throughput fleet/fleet-nobatch"] = "> 1.0"
    passed = {
        "throughput fleet/plain": ratios["throughput fleet/plain"] >= GOAL_VS_PLAIN,
        "throughput fleet/fleet-nobatch": ratios.get("throughput fleet/fleet-nobatch", 2) > 1.0,
    }
    for name, ratio in ratios.items():
        print(f"{name} = {ratio:.2f} (goal {goals[name]}) {'PASS' if passed[name] else 'FAIL'}")
    save_result(
        "throughput",
        args,
        model={"id": MODEL_ID, "bytes": manifest.weight_bytes},
        samples=samples,
        medians=medians,
        ratios=ratios,
        goals=goals,
    )


if __name__ == "__main__":
    main()
