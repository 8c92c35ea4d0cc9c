"""A private, throw-away stack for one benchmark run: SeaweedFS + local Ray + Serve HTTP.

Benchmarks that compare the fleet against baselines in the same run start everything they
need here, on free loopback ports, so they never touch (or depend on) a stack started with
`fleetserve up`, and every baseline shares the same Ray instance, HTTP proxy and cores.

    with LocalStack() as stack:
        stack.deploy_fleet(host={...})
        stack.url  # Serve HTTP base URL
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.harness import machine
from devstack.seaweed import SeaweedServer, find_free_port
from serve_app.config import AppConfig, StoreConfig
from serve_app.storage.store import ModelStore, wait_for_store


def say(message: str) -> None:
    """A progress line on stderr (stdout carries the results)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def save_result(bench: str, args: argparse.Namespace, **fields: Any) -> None:
    """Write a benchmark's result JSON to `args.out`: its name, the machine, a timestamp and
    its parameters, then `fields` (samples, medians, ratios, goals, ...)."""
    result = {
        "bench": bench,
        "machine": machine(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": {k: str(v) for k, v in vars(args).items()},
        **fields,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    say(f"wrote {out}")


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `condition` until truthy; raise TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = condition()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


class LocalStack:
    """SeaweedFS + one local Ray instance + Serve HTTP on 127.0.0.1, removed on exit."""

    def __init__(self, num_cpus: int = 8, s3_niceness: int = 0) -> None:
        self.num_cpus = num_cpus
        self.s3_niceness = s3_niceness
        self._tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
        self.s3: SeaweedServer | None = None
        self.store_config: StoreConfig | None = None
        self.store: ModelStore | None = None
        self.url = ""

    def __enter__(self) -> LocalStack:
        say("starting SeaweedFS")
        self.s3 = SeaweedServer(self._tmp / "seaweed", niceness=self.s3_niceness)
        self.s3.start()
        self.s3.wait_ready(timeout_s=60)
        os.environ.update(self.s3.env())
        self.store_config = StoreConfig(url=f"s3://fleet/bench-{uuid.uuid4().hex[:8]}")
        self.store = ModelStore(self.store_config)
        wait_for_store(self.store)
        say("starting Ray and Serve")
        import ray
        from ray import serve

        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            num_cpus=self.num_cpus,
            include_dashboard=False,
            _temp_dir=str(self._tmp / "ray"),
            logging_level="ERROR",
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
        port = find_free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        import ray
        from ray import serve

        say("stopping Ray and SeaweedFS")
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if self.s3 is not None:
            self.s3.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def tmp(self) -> Path:
        """A scratch folder removed with the stack."""
        return self._tmp

    def fleet_config(
        self, host: dict[str, Any], ingress: dict[str, Any] | None = None
    ) -> AppConfig:
        """The fleet's AppConfig on this stack's store."""
        assert self.store_config is not None
        return AppConfig.model_validate(
            {
                "store": self.store_config.model_dump(),
                "host": {"accelerator": "cpu", **host},
                # NOTE: a throwaway loopback app; benches read /v1/replicas unkeyed.
                "ingress": {
                    "registry_refresh_s": 1.0,
                    "management": {"allow_unauthenticated": True},
                    **(ingress or {}),
                },
            }
        )

    def deploy_fleet(self, config: AppConfig, model_ids: list[str]) -> None:
        """Run the `fleet` app at `/` and wait until its registry lists `model_ids`."""
        from ray import serve

        from deployments.builder import build_app

        say("deploying the fleet app")
        serve.run(build_app(config), name="fleet", route_prefix="/", blocking=False)
        wait_until(
            lambda: httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200,
            300,
            "the fleet app",
        )
        wait_until(
            lambda: all(
                httpx.get(f"{self.url}/v1/models/{m}", timeout=10).status_code == 200
                for m in model_ids
            ),
            60,
            "the registry to list the bench models",
        )
        wait_until(
            lambda: (
                len(httpx.get(f"{self.url}/v1/replicas", timeout=10).json())
                == config.host.num_replicas
            ),
            120,
            "every host replica",
        )

    def run_app(self, app: Any, name: str, route_prefix: str) -> str:
        """Run a baseline app; returns its base URL."""
        from ray import serve

        say(f"deploying {name}")
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
        wait_until(
            lambda: serve.status().applications[name].status == "RUNNING", 300, f"app {name}"
        )
        return f"{self.url}{route_prefix}"
