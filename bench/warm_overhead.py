"""B4: warm-request overhead of the fleet against single-model and multi-model baselines.

One private stack (bench/local_stack.py) runs side by side, each with ONE replica of
0.5 CPU holding minilm-embed (all-MiniLM-L6-v2), loaded with fleetserve's loader where the
server is Ray:

    fleet        the `fleet` app: ingress -> model host (1 host replica)
    fleet-nobatch  (with --nobatch) the same app with batching off
    fleet-before   (with --before) the same app with Serve's default process settings
                   (`serve_env: {}` for the ingress and the hosts), as before issue 16
    plain        an ordinary single-model Serve deployment (FastAPI, one hop)
    multiplexed  Ray Serve's built-in `@serve.multiplexed` (model id in the header)
    mlserver     MLServer 1.7 + mlserver-huggingface (feature-extraction pipeline), its own
                 venv (bench/mlserver_env.py) and process, V2 REST `/v2/models/.../infer`

Per round (`--runs`, order rotated) each target gets `--n` sequential requests (warm p50 /
p99) and `--seconds` of `--clients` closed-loop clients (throughput). Medians over rounds:

    B4 p50 fleet/plain   goal <= 1.05 and <= 1 ms added
    B4 p99 fleet/plain   goal <= 1.2
    (reported) fleet/multiplexed, fleet/mlserver p50 and throughput ratios

Run: `.venv/bin/python -m bench.warm_overhead` (it needs the machine to itself).
`--no-mlserver` skips MLServer; if it cannot be installed or started, the result says why.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

import httpx

from bench.baselines import multiplexed_app, plain_app
from bench.load import closed_loop, percentile, sequential
from bench.local_stack import LocalStack, save_result, say, wait_until
from bench.mlserver_env import MLServerUnavailable, ensure_mlserver, write_model_settings

MODEL = "minilm-embed"
TEXT = ["the quick brown fox jumps over the lazy dog"]
GOALS = {"B4 p50 fleet/plain": 1.05, "B4 p99 fleet/plain": 1.2}
GOAL_ADDED_MS = 1.0


class MLServerProcess:
    """MLServer serving a local copy of minilm-embed on free loopback ports."""

    def __init__(self, root: Path, model_path: Path) -> None:
        from devstack.seaweed import find_free_port

        self.exe = ensure_mlserver()
        self.root = root
        self.port = find_free_port()
        models = root / "models"
        write_model_settings(models, MODEL, model_path)
        (models / "settings.json").write_text(
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "http_port": self.port,
                    "grpc_port": find_free_port(),
                    "metrics_port": find_free_port(),
                    "parallel_workers": 0,
                    "debug": False,
                }
            )
        )
        self.log = (root / "mlserver.log").open("w")
        env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        import os

        self.proc = subprocess.Popen(
            [str(self.exe), "start", str(models)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        self.url = f"http://127.0.0.1:{self.port}/v2/models/{MODEL}/infer"
        try:
            wait_until(self._ready, 240, "MLServer to load minilm-embed")
        except TimeoutError as exc:
            self.stop()
            tail = (root / "mlserver.log").read_text()[-800:]
            raise MLServerUnavailable(f"MLServer did not become ready: {tail}") from exc

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            tail = (self.root / "mlserver.log").read_text()[-800:]
            raise MLServerUnavailable(f"MLServer exited ({self.proc.returncode}): {tail}")
        ready = f"http://127.0.0.1:{self.port}/v2/models/{MODEL}/ready"
        return httpx.get(ready, timeout=5).status_code == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def v2_body() -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "args",
                "shape": [len(TEXT)],
                "datatype": "BYTES",
                "data": TEXT,
                "parameters": {"content_type": "str"},
            }
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (medians)")
    parser.add_argument("--n", type=int, default=100, help="sequential requests per round")
    parser.add_argument("--clients", type=int, default=8, help="clients for throughput")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput window")
    parser.add_argument("--no-mlserver", action="store_true")
    parser.add_argument("--nobatch", action="store_true", help="also the fleet, batching off")
    parser.add_argument("--before", action="store_true", help="also the fleet, serve_env {}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/warm_overhead.json"))
    args = parser.parse_args()

    from devstack.demo_fleet import minilm_dir
    from serve_app.storage.publisher import publish_path

    mlserver: MLServerProcess | None = None
    mlserver_note = "skipped (--no-mlserver)" if args.no_mlserver else ""
    samples: dict[str, list[dict[str, Any]]] = {}
    with LocalStack() as stack:
        assert stack.store is not None
        assert stack.store_config is not None
        publish_path(stack.store, minilm_dir(), MODEL, "1")
        host = {"num_replicas": 1, "num_cpus": 0.5, "memory_budget": "1GiB"}
        stack.deploy_fleet(stack.fleet_config(host), [MODEL])
        targets: dict[str, tuple[str, dict[str, Any], dict[str, str] | None]] = {
            "fleet": (f"{stack.url}/v1/models/{MODEL}/predict", {"inputs": TEXT}, None),
        }
        if args.nobatch:
            from deployments.builder import build_app

            nobatch = stack.fleet_config({**host, "batching": {"max_batch_size": 1}})
            base = stack.run_app(build_app(nobatch), "fleet-nobatch", "/fleet-nobatch")
            targets["fleet-nobatch"] = (f"{base}/v1/models/{MODEL}/predict", {"inputs": TEXT}, None)
        if args.before:
            from deployments.builder import build_app

            before = stack.fleet_config({**host, "serve_env": {}}, {"serve_env": {}})
            base = stack.run_app(build_app(before), "fleet-before", "/fleet-before")
            targets["fleet-before"] = (f"{base}/v1/models/{MODEL}/predict", {"inputs": TEXT}, None)
        plain = stack.run_app(plain_app(stack.store_config, MODEL, "1", 1, 0.5), "plain", "/plain")
        targets["plain"] = (plain + "/", {"inputs": TEXT}, None)
        mux = stack.run_app(multiplexed_app(stack.store_config, 1, 0.5), "mux", "/mux")
        targets["multiplexed"] = (
            mux + "/",
            {"inputs": TEXT},
            {"serve_multiplexed_model_id": f"{MODEL}@1"},
        )
        if not args.no_mlserver:
            try:
                model_copy = stack.tmp / "minilm"
                shutil.copytree(minilm_dir(), model_copy)
                say("starting MLServer (installs its venv on first use)")
                mlserver = MLServerProcess(stack.tmp / "mlserver", model_copy)
                targets["mlserver"] = (mlserver.url, v2_body(), None)
            except MLServerUnavailable as exc:
                mlserver_note = str(exc)
                say(f"MLServer unavailable: {exc}")
        try:
            samples = {name: [] for name in targets}
            names = list(targets)
            for run in range(args.runs):
                for name in names[run % len(names) :] + names[: run % len(names)]:
                    url, body, headers = targets[name]
                    lat = sequential(url, body, args.n, headers)
                    tput = closed_loop(url, body, args.clients, args.seconds, headers=headers)
                    row = {
                        "p50_ms": round(statistics.median(lat), 3),
                        "p99_ms": round(percentile(lat, 0.99), 3),
                        "rps": tput["rps"],
                    }
                    samples[name].append(row)
                    say(
                        f"run {run + 1}/{args.runs} {name:12s} p50 {row['p50_ms']:.1f} ms  "
                        f"p99 {row['p99_ms']:.1f} ms  {row['rps']:.0f} req/s"
                    )
        finally:
            if mlserver is not None:
                mlserver.stop()

    medians = {
        name: {
            k: round(statistics.median(r[k] for r in rows), 3) for k in ("p50_ms", "p99_ms", "rps")
        }
        for name, rows in samples.items()
    }
    fleet, plain_m = medians["fleet"], medians["plain"]
    ratios: dict[str, float] = {
        "B4 p50 fleet/plain": round(fleet["p50_ms"] / plain_m["p50_ms"], 3),
        "B4 p99 fleet/plain": round(fleet["p99_ms"] / plain_m["p99_ms"], 3),
        "B4 p50 added ms": round(fleet["p50_ms"] - plain_m["p50_ms"], 3),
    }
    for other in ("multiplexed", "mlserver"):
        if other in medians:
            ratios[f"p50 fleet/{other}"] = round(fleet["p50_ms"] / medians[other]["p50_ms"], 3)
            ratios[f"throughput fleet/{other}"] = round(fleet["rps"] / medians[other]["rps"], 3)
    ratios["throughput fleet/plain"] = round(fleet["rps"] / plain_m["rps"], 3)
    goals = {
        "B4 p50 fleet/plain": "<= 1.05",
        "B4 p99 fleet/plain": "<= 1.2",
        "B4 p50 added ms": "<= 1.0",
    }
    passed = {
        "B4 p50 fleet/plain": ratios["B4 p50 fleet/plain"] <= GOALS["B4 p50 fleet/plain"],
        "B4 p99 fleet/plain": ratios["B4 p99 fleet/plain"] <= GOALS["B4 p99 fleet/plain"],
        "B4 p50 added ms": ratios["B4 p50 added ms"] <= GOAL_ADDED_MS,
    }
    for name, value in ratios.items():
        verdict = (
            f" (goal {goals[name]}) {'PASS' if passed[name] else 'FAIL'}" if name in goals else ""
        )
        print(f"{name} = {value:.2f}{verdict}")
    for name, values in medians.items():
        print(f"  {name}: {values}")
    if mlserver_note:
        print(f"  mlserver: {mlserver_note}")
    save_result(
        "warm_overhead",
        args,
        samples=samples,
        medians=medians,
        ratios=ratios,
        goals=goals,
        mlserver=mlserver_note or "measured",
    )


if __name__ == "__main__":
    main()
