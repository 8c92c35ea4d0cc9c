"""T1-T3: warm throughput of the fleet against one-hop Serve baselines (issue 16; it
replaces issue 6's fleet-vs-plain bench and keeps its batching on/off comparison).

One private stack (SeaweedFS + Ray + Serve, see bench/local_stack.py) runs, side by side:

    fleet          the `fleet` app: ingress + `--replicas` host replicas (`--cpus` each),
                   batching on, `--models` copies of one fraud MLP published under their own ids
    fleet-nobatch  the same app with batching off (`max_batch_size: 1`; `--nobatch`)
    fleet-before   the same app as it was before issue 16: no grouping by replica
                   (`group_by_replica: false`) and Serve's default process settings
                   (`serve_env: {}`); `--no-before` skips it
    plain          an ordinary single-model Serve deployment of the same MLP (same replicas
                   and CPU, FastAPI, one hop), see bench/baselines.py
    multiplexed    Ray Serve's `@serve.multiplexed` deployment holding the same models in
                   memory (same replicas and CPU, room for every model), one hop

Every model is warm before measuring. `--clients` (16) closed-loop clients send one-row
requests for `--seconds` per target; each client cycles over the models (client i starts
at model i), so every model gets the same share. Targets are interleaved in each of
`--runs` rounds (order rotated); ratios are taken between the medians:

    T1  fleet over `--models` models / plain (one model)           goal >= 0.9
    T2  fleet over one model / plain                               goal >= 1.0
    T3  fleet over `--models` / multiplexed over the same models   goal >= 1.0

CPU per request (ms, by Ray process) is measured for every window from /proc, and
`--profile DIR` py-spies the replicas and the proxy in round 1.

Run: `fleetserve bench t1` (or `.venv/bin/python -m bench.t1_t2_t3_warm_throughput`); it
needs the machine to itself.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from bench.baselines import multiplexed_app, plain_app
from bench.load import Target, closed_loop_over
from bench.local_stack import LocalStack, save_result, say
from bench.process_cpu import cpu_per_request, cpu_seconds, profile

MODEL_PREFIX = "fraud-warm"
FRAUD_INDEX = 41  # the demo fleet's largest fraud MLP (~19 MB)
GOALS = {"T1": 0.9, "T2": 1.0, "T3": 1.0}


def _row() -> list[float]:
    from devstack.demo_fleet import FRAUD_FEATURES

    return [((i * 37) % 11) / 10 - 0.5 for i in range(FRAUD_FEATURES)]


APPS = {"fleet": "fleet", "fleet-1": "fleet"}  # target -> Serve app (else the same name)


def serving_cpu(per_process: dict[str, float], target: str) -> float:
    """CPU ms per request of the target's own replicas plus the HTTP proxy (the part that
    scales with its requests; the controller and GCS are shared background)."""
    app = APPS.get(target, target)
    return round(
        sum(
            ms
            for name, ms in per_process.items()
            if name == "ProxyActor" or name.startswith(f"ServeReplica:{app}:")
        ),
        3,
    )


def _targets(stack: LocalStack, args: argparse.Namespace, model_ids: list[str]) -> dict:
    """name -> the (url, headers) each client cycles over."""
    from deployments.builder import build_app

    host = {"num_replicas": args.replicas, "num_cpus": args.cpus, "memory_budget": "1GiB"}
    stack.deploy_fleet(stack.fleet_config(host), model_ids)
    fleet = [(f"{stack.url}/v1/models/{m}/predict", None) for m in model_ids]
    targets: dict[str, list[Target]] = {"fleet": fleet, "fleet-1": fleet[:1]}
    if not args.no_before:
        before = stack.fleet_config(
            {**host, "batching": {"group_by_replica": False}, "serve_env": {}},
            {"serve_env": {}},
        )
        base = stack.run_app(build_app(before), "fleet-before", "/fleet-before")
        targets["fleet-before"] = [(f"{base}/v1/models/{m}/predict", None) for m in model_ids]
    if args.nobatch:
        nobatch = stack.fleet_config({**host, "batching": {"max_batch_size": 1}})
        base = stack.run_app(build_app(nobatch), "fleet-nobatch", "/fleet-nobatch")
        targets["fleet-nobatch"] = [(f"{base}/v1/models/{m}/predict", None) for m in model_ids]
    assert stack.store_config is not None
    plain = plain_app(stack.store_config, model_ids[0], "1", args.replicas, args.cpus)
    targets["plain"] = [(stack.run_app(plain, "plain", "/plain") + "/", None)]
    mux = multiplexed_app(stack.store_config, args.replicas, args.cpus, len(model_ids))
    base = stack.run_app(mux, "multiplexed", "/multiplexed") + "/"
    targets["multiplexed"] = [(base, {"serve_multiplexed_model_id": f"{m}@1"}) for m in model_ids]
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--models", type=int, default=8, help="warm models for T1 and T3")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per target")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=0.5, help="CPUs per host / baseline replica")
    parser.add_argument("--nobatch", action="store_true", help="also run fleet-nobatch")
    parser.add_argument("--no-before", action="store_true", help="skip fleet-before")
    parser.add_argument("--only", nargs="*", help="measure only these targets")
    parser.add_argument("--profile", type=Path, help="py-spy the replicas in round 1 into DIR")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/t1_t2_t3_warm_throughput.json")
    )
    args = parser.parse_args()

    from devstack.demo_fleet import write_fraud_model
    from serve_app.storage.publisher import publish_path

    with LocalStack() as stack:
        assert stack.store is not None
        files = write_fraud_model(stack.tmp / "m", FRAUD_INDEX)
        model_ids = [f"{MODEL_PREFIX}-{i}" for i in range(args.models)]
        for model_id in model_ids:
            manifest = publish_path(stack.store, files, model_id, "1")
        say(f"published {len(model_ids)} x {manifest.weight_bytes / 1e6:.1f} MB")
        targets = _targets(stack, args, model_ids)
        if args.only:
            targets = {k: v for k, v in targets.items() if k in args.only}
        body = {"inputs": [_row()]}
        for name, urls in targets.items():  # every model warm everywhere before measuring
            closed_loop_over(urls, body, args.clients, seconds=1.5, warmup_s=1.5)
            say(f"warmed {name}")
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        names = list(targets)
        for run in range(args.runs):
            order = names[run % len(names) :] + names[: run % len(names)]
            for name in order:
                spies = (
                    profile(args.profile / name, args.seconds) if args.profile and run == 0 else []
                )
                before = cpu_seconds()
                result = closed_loop_over(
                    targets[name], body, args.clients, args.seconds, warmup_s=0.5
                )
                result["cpu_ms_per_request"] = cpu_per_request(
                    before, cpu_seconds(), int(result["rps"] * args.seconds)
                )
                result["serving_cpu_ms"] = serving_cpu(result["cpu_ms_per_request"], name)
                for spy in spies:
                    spy.wait(timeout=60)
                samples[name].append(result)
                say(
                    f"run {run + 1}/{args.runs} {name:14s} {result['rps']:7.1f} req/s  "
                    f"p50 {result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms  "
                    f"CPU {result['serving_cpu_ms']:.2f} ms/req  errors {result['errors']}"
                )
                say(f"    CPU ms/request: {result['cpu_ms_per_request']}")

    medians = {
        name: {
            key: round(statistics.median(r[key] for r in rows), 3)
            for key in ("rps", "p50_ms", "p99_ms", "serving_cpu_ms")
        }
        for name, rows in samples.items()
    }
    pairs = {
        "T1": ("fleet", "plain"),
        "T2": ("fleet-1", "plain"),
        "T3": ("fleet", "multiplexed"),
        "batching on/off": ("fleet", "fleet-nobatch"),
        "issue 16 gain": ("fleet", "fleet-before"),
        "T1 before issue 16": ("fleet-before", "plain"),
    }
    ratios = {
        label: round(medians[a]["rps"] / medians[b]["rps"], 3)
        for label, (a, b) in pairs.items()
        if a in medians and b in medians
    }
    for label, ratio in ratios.items():
        goal = GOALS.get(label)
        verdict = "" if goal is None else f"(goal >= {goal}) {'PASS' if ratio >= goal else 'FAIL'}"
        a, b = pairs[label]
        print(f"{label} throughput {a}/{b} = {ratio:.2f} {verdict}")
    save_result(
        "t1_t2_t3_warm_throughput",
        args,
        models=model_ids,
        samples=samples,
        medians=medians,
        ratios=ratios,
        goals=GOALS,
    )


if __name__ == "__main__":
    main()
