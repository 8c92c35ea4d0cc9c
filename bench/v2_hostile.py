"""V2 ingress under hostile bodies (issue 15 §3): CPU per body, another client's warm p99.

A hostile body is ~8 KB of gzip that inflates to the whole `max_body_bytes` (8 MiB): one
BYTES tensor of ~2M empty elements, sent to a text model's `/v2/models/{m}/infer`. The
benchmark runs the real ingress app (`serve_app.api.app.create_app` over a real
`ModelHost`, models in an in-memory store) in its own process under uvicorn, so what it
measures is the ingress alone (no Ray: the issue's stall was in the ingress), and reports:

    cpu      the server process's CPU time per hostile body (sent one at a time), for the
             BYTES body and for a JSON bomb (8 MiB of `0,0,0,...` in `data`, ~8 KB of
             gzip); goal < 50 ms each;
    p99      one closed-loop client's warm p99 on a tabular model while hostile bodies
             (both kinds in turn) arrive at `--rate`/s, over its warm p99 in a quiet
             window of the same round;
             goal <= 1.2.

Rounds alternate the window order; medians over `--runs` rounds.

Run: `python -m bench.v2_hostile` (about a minute with the defaults; on the code before the
fix, use `--seconds 4 --bodies 3`: each body then costs seconds and they queue).
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.harness import Result, parse_args, percentile, progress

WARM_ID = "warm-fraud"
TEXT_ID = "text-clf-sentiment"
LIMIT = 8 * 2**20
CPU_GOAL_MS = 50.0
P99_GOAL = 1.2


def hostile_body(limit: int = LIMIT) -> bytes:
    """Gzip of a V2 binary request whose BYTES tensor fills `limit` once inflated."""
    count = (limit - 200) // 4
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [count],
                    "parameters": {"binary_data_size": count * 4},
                }
            ]
        }
    ).encode()
    head += b" " * (limit - len(head) - count * 4)  # pad the header: exactly `limit` bytes
    return gzip.compress(head + bytes(count * 4), compresslevel=9)


def json_bomb(limit: int = LIMIT) -> bytes:
    """Gzip of a JSON V2 request whose `data` is `limit` bytes of `0,0,0,...`."""
    head = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ['
    values = b"0," * ((limit - len(head) - 16) // 2)
    return gzip.compress(head + values + b"0]}]}", compresslevel=9)


def _serve(port: int) -> None:
    """The server process: the ingress app over a real host, models in memory."""
    import fsspec
    import uvicorn

    from devstack.demo_fleet import TEXT_CLASSIFIERS, write_fraud_model, write_text_classifier
    from serve_app.api.app import create_app
    from serve_app.config import HostConfig, IngressConfig, StoreConfig
    from serve_app.gateway.gateway import Gateway
    from serve_app.host.model_host import ModelHost
    from serve_app.storage.publisher import publish_path
    from serve_app.storage.registry import Registry
    from serve_app.storage.store import ModelStore

    tmp = Path(tempfile.mkdtemp(prefix="v2-hostile-"))
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    store = ModelStore(StoreConfig(url="s3://fleet/bench"), fs=fs)
    publish_path(store, write_fraud_model(tmp / WARM_ID, 0), WARM_ID, "1")
    spec = next(s for s in TEXT_CLASSIFIERS if s.model_id == TEXT_ID)
    publish_path(store, write_text_classifier(tmp / TEXT_ID, spec), TEXT_ID, "1")
    host = ModelHost(
        HostConfig(memory_budget=2**30, disk_cache_dir=str(tmp / "disk"), accelerator="cpu"),
        store,
        replica="bench",
    )
    registry = Registry(store, refresh_s=3600)
    registry.refresh()
    gateway = Gateway(registry, host.predict, IngressConfig())
    app = create_app(gateway, max_body_bytes=LIMIT)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _send_hostile(url: str, body: bytes, split: int | None, statuses: list[int]) -> None:
    headers = {"Content-Encoding": "gzip"}
    if split is not None:
        headers["Inference-Header-Content-Length"] = str(split)
    try:
        response = httpx.post(
            f"{url}/v2/models/{TEXT_ID}/infer", content=body, headers=headers, timeout=130
        )
        statuses.append(response.status_code)
    except httpx.HTTPError:
        statuses.append(-1)


def _storm(
    url: str, bodies: list[tuple[bytes, int | None]], rate: float, stop: Any, out: Any
) -> None:
    """(In its own process, so its client CPU never shares a GIL with the warm client.)
    Send `bodies` in turn at `rate`/s until `stop` is set; put the statuses on `out`."""
    statuses: list[int] = []
    with ThreadPoolExecutor(max_workers=64) as pool:
        next_at = time.monotonic()
        sent = 0
        while not stop.is_set():
            body, split = bodies[sent % len(bodies)]
            pool.submit(_send_hostile, url, body, split, statuses)
            sent += 1
            next_at += 1 / rate
            time.sleep(max(0.0, next_at - time.monotonic()))
    out.put(statuses)


def _warm_window(
    url: str, seconds: float, hostile: tuple[list[tuple[bytes, int | None]], float] | None
) -> dict:
    """Warm latencies (ms) of one closed-loop client for `seconds`, with hostile bodies
    (taken in turn, sent from another process) at `rate`/s meanwhile when `hostile` is
    given; the window waits for every body's answer."""
    row = [[0.1] * 32]
    context = multiprocessing.get_context("spawn")
    stop, out = context.Event(), context.Queue()
    sender = None
    if hostile is not None:
        sender = context.Process(target=_storm, args=(url, *hostile, stop, out), daemon=True)
        sender.start()
    latencies: list[float] = []
    with httpx.Client(timeout=130) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            response = http.post(f"{url}/v1/models/{WARM_ID}/predict", json={"inputs": row})
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    statuses: list[int] = []
    if sender is not None:
        stop.set()
        statuses = out.get(timeout=300)
        sender.join(timeout=30)
    return {"latencies": latencies, "statuses": statuses}


def main() -> None:
    """Start the server process, measure, print the goal lines, write the result."""

    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
        parser.add_argument("--seconds", type=float, default=10.0, help="window length")
        parser.add_argument("--rate", type=float, default=5.0, help="hostile bodies per second")
        parser.add_argument("--bodies", type=int, default=20, help="bodies for the CPU sample")

    args = parse_args(__doc__.splitlines()[0], extra)
    if args.serve is not None:
        _serve(args.serve)
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.v2_hostile", "--serve", str(port)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    result = Result("v2_hostile", args.runs)
    try:
        _wait_ready(url)
        body = hostile_body()
        raw = gzip.decompress(body)
        split = raw.index(b"}]}") + 3
        split += len(raw[split:]) - len(raw[split:].lstrip(b" "))
        bomb = json_bomb()
        progress(f"hostile body: {len(body)} bytes gzip, {len(raw)} inflated")
        progress(f"JSON bomb: {len(bomb)} bytes gzip, {len(gzip.decompress(bomb))} inflated")
        assert httpx.post(f"{url}/v1/models/{WARM_ID}/predict", json={"inputs": [[0.1] * 32]})
        statuses: list[int] = []
        for _ in range(2):  # warm up the code path
            _send_hostile(url, body, split, statuses)
        for run in range(args.runs):
            cpu_before = _cpu_s(server.pid)
            wall = time.perf_counter()
            for _ in range(args.bodies):
                _send_hostile(url, body, split, statuses)
            per_body = (_cpu_s(server.pid) - cpu_before) / args.bodies * 1000
            wall_ms = (time.perf_counter() - wall) / args.bodies * 1000
            result.sample("hostile_cpu_ms", per_body)
            result.sample("hostile_wall_ms", wall_ms)
            cpu_before = _cpu_s(server.pid)
            for _ in range(args.bodies):
                _send_hostile(url, bomb, None, statuses)
            json_ms = (_cpu_s(server.pid) - cpu_before) / args.bodies * 1000
            result.sample("json_bomb_cpu_ms", json_ms)
            windows = {}
            order = ["quiet", "storm"] if run % 2 == 0 else ["storm", "quiet"]
            for name in order:
                window = _warm_window(
                    url,
                    args.seconds,
                    ([(body, split), (bomb, None)], args.rate) if name == "storm" else None,
                )
                windows[name] = window["latencies"]
                result.sample(f"{name}_p99_ms", percentile(window["latencies"], 99))
                result.sample(f"{name}_p50_ms", statistics.median(window["latencies"]))
                if name == "storm":
                    result.notes.setdefault("storm_statuses", []).append(
                        sorted(set(window["statuses"]))
                    )
            ratio = percentile(windows["storm"], 99) / percentile(windows["quiet"], 99)
            result.sample("p99_ratio", ratio)
            progress(
                f"round {run + 1}: {per_body:.1f} ms CPU/body ({wall_ms:.0f} ms wall), JSON bomb "
                f"{json_ms:.1f} ms CPU, warm p99 "
                f"quiet {percentile(windows['quiet'], 99):.1f} ms, storm "
                f"{percentile(windows['storm'], 99):.1f} ms ({ratio:.2f}x)"
            )
        result.notes["statuses"] = sorted(set(statuses))
        result.notes["body_bytes"] = len(body)
        result.finish_medians()
        result.goal(
            "V2 hostile body ingress CPU / 50 ms",
            result.medians["hostile_cpu_ms"] / CPU_GOAL_MS,
            "<=",
            1.0,
        )
        result.goal(
            "V2 JSON bomb ingress CPU / 50 ms",
            result.medians["json_bomb_cpu_ms"] / CPU_GOAL_MS,
            "<=",
            1.0,
        )
        result.goal("V2 warm p99 storm/quiet", result.medians["p99_ratio"], "<=", P99_GOAL)
        result.write(args.out)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} did not become healthy in {timeout_s}s")


if __name__ == "__main__":
    main()
