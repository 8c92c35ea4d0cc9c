"""Shared helpers of the benchmarks: arguments, medians, ratio lines, results, a local S3.

Conventions (every `bench/<name>.py`):
- runnable as a script (`python -m bench.<name>`), with `--runs N` (default 5): each sample
  is measured N times and the median is reported;
- progress goes to stderr; one line per goal goes to stdout, e.g.
  `B1 minilm-embed cold/raw = 1.18 (goal <= 1.25) PASS`;
- the result is written to `bench/results/<name>.json`: machine, timestamp, raw samples,
  medians, ratios and goals (`load_results()` reads them back, e.g. in the notebook).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):  # type: ignore[no-untyped-def]
    """The common arguments (`--runs`, `--out`) plus the benchmark's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=5, help="repetitions; medians reported")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/)")
    if extra:
        extra(parser)
    return parser.parse_args()


def progress(message: str) -> None:
    """One progress line on stderr, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(samples: list[float]) -> float:
    """The median of `samples`."""
    return float(statistics.median(samples))


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    return info


@dataclass
class Goal:
    """One ratio and its goal: `ratio <op> limit`."""

    name: str
    ratio: float
    op: str  # "<=" or ">="
    limit: float

    @property
    def passed(self) -> bool:
        return self.ratio <= self.limit if self.op == "<=" else self.ratio >= self.limit

    def line(self) -> str:
        verdict = "PASS" if self.passed else "MISS"
        return f"{self.name} = {self.ratio:.2f} (goal {self.op} {self.limit:g}) {verdict}"


@dataclass
class Result:
    """What one benchmark writes: samples, medians, ratios against goals."""

    name: str
    runs: int
    samples: dict[str, list[float]] = field(default_factory=dict)
    medians: dict[str, float] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def sample(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def finish_medians(self) -> None:
        self.medians = {k: round(median(v), 6) for k, v in self.samples.items()}

    def goal(self, name: str, ratio: float, op: str, limit: float) -> Goal:
        goal = Goal(name, round(ratio, 4), op, limit)
        self.goals.append(goal)
        print(goal.line(), flush=True)
        return goal

    def write(self, out: str | None = None) -> Path:
        path = Path(out) if out else RESULTS_DIR / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "benchmark": self.name,
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "runs": self.runs,
            "samples": self.samples,
            "medians": self.medians,
            "ratios": {g.name: g.ratio for g in self.goals},
            "goals": [
                {"name": g.name, "ratio": g.ratio, "op": g.op, "limit": g.limit, "pass": g.passed}
                for g in self.goals
            ],
            "notes": self.notes,
        }
        path.write_text(json.dumps(body, indent=2))
        progress(f"wrote {path}")
        return path


def load_results(directory: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """Every result JSON in `directory`, by benchmark name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


@contextlib.contextmanager
def local_s3() -> Iterator[Any]:
    """A fresh SeaweedFS on loopback (AWS_* env pointed at it) and an empty store on it."""
    from devstack.seaweed import SeaweedServer
    from serve_app.config import StoreConfig
    from serve_app.storage.store import ModelStore, wait_for_store

    root = Path(tempfile.mkdtemp(prefix="fleet-bench-s3-"))
    server = SeaweedServer(root)
    progress("starting SeaweedFS")
    server.start()
    server.wait_ready(timeout_s=60)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        store = ModelStore(StoreConfig(url=f"s3://fleet/bench-{int(time.time())}"))
        wait_for_store(store)
        yield store
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def reference_read(store: Any, manifest: Any, chunk: int = 8 * 2**20, workers: int = 4) -> float:
    """Seconds for the tuned reference reader to read every file of `manifest`: parallel
    ranged GETs (`chunk` bytes, `workers` at once) with a plain botocore client, each body
    read straight into one preallocated buffer. Independent of serve_app's fetch path."""
    import botocore.session
    from botocore.config import Config

    global _REF_CLIENT
    if _REF_CLIENT is None:
        _REF_CLIENT = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            config=Config(max_pool_connections=16, s3={"addressing_style": "path"}),
        )
    client = _REF_CLIENT
    # NOTE: an untouched anonymous mapping, like the fetch path's buffers: a bytearray would
    # be zero-filled first, and that second pass is not part of reading.
    buf = mmap.mmap(-1, max(1, manifest.total_bytes))
    view = memoryview(buf)
    jobs, offset = [], 0
    base = store.version_dir(manifest.model_id, manifest.version)
    for entry in manifest.files:
        for start in range(0, entry.size, chunk):
            end = min(start + chunk, entry.size)
            jobs.append((f"{base}/{entry.path}", start, end, offset + start))
        offset += entry.size

    def get(job: tuple[str, int, int, int]) -> None:
        path, start, end, at = job
        bucket, key = path.split("/", 1)
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
        done = 0
        while done < end - start:
            n = body.readinto(view[at + done : at + end - start])
            if not n:
                raise OSError("short read")
            done += n

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(get, jobs))
    return time.perf_counter() - started


_REF_CLIENT: Any = None


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (default: this one)."""
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


class PeakSampler:
    """Samples the RSS of some processes every `every_s` in a thread; keeps the peaks."""

    def __init__(self, pids: list[int], every_s: float = 0.005) -> None:
        import psutil

        self._procs = {pid: psutil.Process(pid) for pid in pids}
        self.peaks = dict.fromkeys(pids, 0)
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, proc in self._procs.items():
                self.peaks[pid] = max(self.peaks[pid], proc.memory_info().rss)
            self._stop.wait(self._every)

    @staticmethod
    def self_pid() -> int:
        return os.getpid()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for pid, proc in self._procs.items():
            self.peaks[pid] = max(self.peaks[pid], proc.memory_info().rss)


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim), after a gc."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def write_mlp(dest: Path, megabytes: int, seed: int = 0) -> Path:
    """A torch-module MLP of about `megabytes` MB of float32 weights (real, servable)."""
    from devstack.demo_fleet import write_fraud_model
    from serve_app.loading.architectures import MlpSpec

    hidden = 2048
    # NOTE: n hidden layers hold n - 1 hidden x hidden matrices (the rest is small)
    squares = max(1, round(megabytes * 10**6 / 4 / (hidden * hidden)))
    spec = MlpSpec(input_dim=32, hidden_dims=[hidden] * (squares + 1), output_dim=2)
    return write_fraud_model(dest, 0, seed, spec)


@contextlib.contextmanager
def serve_stack(store: Any, host: dict[str, Any], mux_models_per_replica: int | None = None):  # type: ignore[no-untyped-def]
    """Ray + the real `fleet` app on loopback over `store`; optionally, beside it, Ray's
    built-in `@serve.multiplexed` (count-based LRU) serving the same store with the same
    loader at `/mux` (model id in the `serve_multiplexed_model_id` header). Yields
    (fleet_url, mux_url or None, actor pids by deployment name)."""
    import ray
    from ray import serve

    from deployments.builder import build_app
    from devstack.seaweed import find_free_port
    from serve_app.config import AppConfig

    temp_dir = tempfile.mkdtemp(prefix="fleet-bench-ray-")
    progress("starting Ray and Serve")
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=8,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        port = find_free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = AppConfig.model_validate(
            {
                "store": store.config.model_dump(),
                "host": {"accelerator": "cpu", **host},
                "ingress": {
                    "num_cpus": 0.25,
                    "registry_refresh_s": 1.0,
                    # NOTE: a throwaway loopback app; the bench reads /v1/replicas unkeyed.
                    "management": {"allow_unauthenticated": True},
                },
            }
        )
        serve.run(build_app(config), name="fleet", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        mux_url = None
        if mux_models_per_replica is not None:
            serve.run(_mux_app(config, mux_models_per_replica), name="mux", route_prefix="/mux")
            mux_url = f"{url}/mux"
        _wait_healthy(url, host.get("num_replicas", 2))
        yield url, mux_url, _actor_pids()
    finally:
        serve.shutdown()
        ray.shutdown()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_healthy(url: str, replicas: int) -> None:
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if (
                httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                and len(httpx.get(f"{url}/v1/replicas", timeout=5).json()) == replicas
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the fleet app did not become healthy")


def _actor_pids() -> dict[str, list[int]]:
    """Pids of this driver's Serve replicas by deployment name, from their process titles
    (`ray::ServeReplica:<app>:<deployment>`); only descendants of this process count."""
    import psutil

    pids: dict[str, list[int]] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "ServeReplica:" not in title:
            continue
        deployment = title.split("ServeReplica:", 1)[1].split()[0].split(":")[-1]
        pids.setdefault(deployment.split(".")[0], []).append(proc.pid)
    return pids


def _mux_app(config: Any, max_models: int) -> Any:
    """Ray's built-in multiplexing over the same store and loader: the baseline."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(name="Mux", num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    class Mux:
        def __init__(self, app_config: Any) -> None:
            import torch

            from serve_app.loading.loader import ModelLoader
            from serve_app.storage.store import ModelStore

            torch.set_num_threads(1)
            self.store = ModelStore(app_config.store)
            self.loader = ModelLoader.from_config(self.store, app_config.host, torch.device("cpu"))

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str) -> Any:
            import asyncio

            manifest = await asyncio.to_thread(self.store.read_manifest, model_id, "1")
            return await asyncio.to_thread(self.loader.load, manifest)

        async def __call__(self, request: Request) -> dict[str, Any]:
            import asyncio

            model = await self.get_model(serve.get_multiplexed_model_id())
            body = await request.json()
            return {"outputs": await asyncio.to_thread(model.predict, body["inputs"])}

    return Mux.bind(config)
