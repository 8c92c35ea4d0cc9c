"""The gateway: the ingress's logic, free of HTTP and of Ray.

A request names a model: the gateway validates the id, resolves it through the routing
table (alias split, default version, `id@version`, pool placement) against the in-memory
registry, checks the inputs against the model's task, and dispatches a `PredictCall` to the
model's pool (in Serve: a handle call with `multiplexed_model_id` set to `model_id@version`,
so the router prefers a replica that holds that version). A request on an alias with a
shadow arm also sends a copy to the shadow candidate, in a background task whose answer is
discarded and whose latency and errors are recorded per arm.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pyarrow as pa

from serve_app.config import IngressConfig, PoolConfig, RoutingConfig
from serve_app.errors import InvalidInput, status_of
from serve_app.gateway.arm_stats import ArmStats
from serve_app.gateway.routing_table import Route, RoutingTable
from serve_app.host.predictor import validate_inputs
from serve_app.observability.metrics import OTHER, ArmMetrics, IngressMetrics
from serve_app.observability.stats import StatsRecorder, StatsReport, summarise
from serve_app.schemas import ModelDetail, ModelList, PredictCall, PredictResponse
from serve_app.storage.manifest import IMAGE_TASKS, Manifest, validate_model_id
from serve_app.storage.registry import Registry

Dispatch = Callable[[PredictCall], Awaitable[PredictResponse]]
access_log = logging.getLogger("serve_app.access")
IMAGE_TABLE_CHUNK = 64  # images per call when scoring a table
logger = logging.getLogger(__name__)


class Gateway:
    """Validates, resolves and dispatches predictions; records stats, metrics, access logs."""

    def __init__(
        self,
        registry: Registry,
        dispatch: Dispatch,
        config: IngressConfig,
        *,
        recorder: StatsRecorder | None = None,
        metrics: IngressMetrics | None = None,
        peer_stats: Callable[[], list[dict[str, Any]]] | None = None,
        host_states: Callable[[], list[dict[str, Any]]] | None = None,
        routing: RoutingTable | None = None,
        arm_metrics: ArmMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.dispatch = dispatch
        self.config = config
        self.recorder = recorder or StatsRecorder()
        self.metrics = metrics
        self._peer_stats = peer_stats
        self._host_states = host_states
        self.routing = routing or RoutingTable(RoutingConfig(), [PoolConfig()], registry)
        self.arm_stats = ArmStats()
        self.arm_metrics = arm_metrics
        self._shadows: set[asyncio.Task[None]] = set()
        self.rejected: dict[str, Any] | None = None

    def set_routing(self, routing: RoutingTable) -> None:
        """Swap in a new routing table (requests already resolved keep their route)."""
        if routing.config.aliases != self.routing.config.aliases:
            self.arm_stats.reset(routing.config.model_dump(mode="json")["aliases"])
        self.routing = routing
        self.rejected = None

    def reject_routing(self, config: dict[str, Any], error: str) -> None:
        """Record a routing config that was refused (the active one keeps serving)."""
        self.rejected = {"error": error, "config": config, "at": time.time()}

    def recheck_routing(
        self,
        save: Callable[[dict[str, Any]], None] | None = None,
        fallback: Callable[[], RoutingTable | None] | None = None,
    ) -> list[str]:
        """Check the active routing against the registry as it is now; returns the problems.

        Called after every registry change (`Registry.on_change`, from its thread). A
        routing accepted while the registry was unreadable (not `checked`) is validated
        here for the first time: if it passes, `save(config)` records it as the accepted
        routing; if not, it is refused like any bad config: `fallback()` (the last accepted
        routing, or None) takes over when there is one, and the refusal shows at
        `GET /v1/routing`. A routing that was checked keeps serving when versions it names
        vanish later; its problems show at `GET /v1/routing` and in the log.
        """
        table = self.routing
        was_checked = table.checked
        problems = table.recheck()
        if problems:
            logger.warning("routing re-check found problems", extra={"problems": problems})
        if was_checked or self.routing is not table:
            return problems
        config = table.config.model_dump(mode="json")
        if not problems:
            if table.checked and save is not None:
                save(config)
            return problems
        replacement = fallback() if fallback is not None else None
        if replacement is not None and self.routing is table:
            self.set_routing(replacement)
        self.reject_routing(
            config,
            "routing config refused when checked against the registry: " + "; ".join(problems),
        )
        return problems

    def routing_report(self) -> dict[str, Any]:
        """The active routing, the last refused one (if any), per-arm counters, and whether
        each host replica took the same pins from its own `user_config` (blocking: call it
        off the event loop)."""
        report = {
            "active": self.routing.config.model_dump(),
            "checked": self.routing.checked,
            "problems": list(self.routing.problems),
            "pools": list(self.routing.pools),
            "rejected": self.rejected,
            "arms": self.arm_stats.snapshot(peer.get("arms") or {} for peer in self._peers()),
        }
        if self._host_states is not None:
            report["hosts"] = host_pin_sync(self.routing.config.pins, self._host_states())
        return report

    def resolve(self, name: str, version: str | None = None, key: str | None = None) -> Route:
        """Resolve a requested name (`id`, `id@version`, alias) to a manifest and pool.

        The one place versions, defaults and alias splits are decided; every protocol's
        routes (native, V2) go through it.
        """
        return self.routing.resolve(name, version, key)

    def sticky_key(self, name: str, headers: Mapping[str, str]) -> str | None:
        """The caller's sticky key for `name`: the value of its alias's sticky header in
        `headers` (request headers), if the alias has one and the caller sent it."""
        header = self.routing.sticky_header(name)
        return headers.get(header) if header else None

    async def predict(
        self,
        model_id: str,
        inputs: Any,
        version: str | None = None,
        request_id: str | None = None,
        started: float | None = None,
        sticky_key: str | None = None,
        route: Route | None = None,
    ) -> PredictResponse:
        """Predict `inputs` with `model_id` (an id, `id@version` or an alias; default
        version unless `version` is given). `sticky_key` keeps a caller on one alias arm.

        `started` is the `time.perf_counter()` at which the caller received the request
        (default: now); the recorded latency runs from there. `route` is the route
        `resolve()` already gave the HTTP layer (which resolves before it reads the body);
        without it the request is resolved here.

        Raises:
            FleetError: typed errors for bad ids, unknown models, bad inputs, load failures.
        """
        request_id = request_id or new_id()
        started = time.perf_counter() if started is None else started
        manifest: Manifest | None = None
        result: PredictResponse | None = None
        status = 500
        try:
            route = route or self.resolve(model_id, version, sticky_key)
            manifest = route.manifest
            if manifest.task in IMAGE_TASKS:
                # NOTE: base64 decoding and header checks of a batch of images: off the loop.
                rows = await asyncio.to_thread(
                    validate_inputs, manifest, inputs, self.config.max_batch_rows
                )
            else:
                rows = validate_inputs(manifest, inputs, self.config.max_batch_rows)
            call = PredictCall(
                manifest=manifest, inputs=rows, request_id=request_id, pool=route.pool
            )
            self._shadow(route, rows, request_id)
            result = await self.dispatch(call)
            if route.alias is not None:
                result = result.model_copy(update={"alias": route.alias, "arm": route.arm})
            status = 200
            return result
        except asyncio.CancelledError:
            status = 499  # the caller went away
            raise
        except Exception as exc:
            status = status_of(exc)
            raise
        finally:
            self.observe(request_id, manifest, status, started, result)
            if route is not None and route.alias is not None and route.arm is not None:
                self._observe_arm(route.alias, route.arm, "serve", status == 200, started)

    def _observe_arm(self, alias: str, arm: str, role: str, ok: bool, started: float) -> None:
        latency_ms = (time.perf_counter() - started) * 1000
        self.arm_stats.record(alias, arm, role, ok, latency_ms)
        if self.arm_metrics is not None:
            self.arm_metrics.observe(alias, arm, role, "ok" if ok else "error", latency_ms)

    def _shadow(self, route: Route, rows: list[Any], request_id: str) -> None:
        """Send the route's shadow copy, if any; whatever happens, the request goes on."""
        if route.alias is not None and route.shadow_missing is not None:
            # NOTE: the target is gone from the registry: counted as dropped, logged by the
            # routing re-check (GET /v1/routing shows the problem).
            self.arm_stats.dropped(route.alias, route.shadow_missing)
            if self.arm_metrics is not None:
                self.arm_metrics.observe(route.alias, route.shadow_missing, "shadow", "dropped", 0)
            return
        if route.shadow is None:
            return
        try:
            self._send_shadow(route, rows, request_id)
        except Exception:
            logger.exception("shadow not sent", extra={"request_id": request_id})

    def _send_shadow(self, route: Route, rows: list[Any], request_id: str) -> None:
        """Send a copy to the shadow candidate in the background (never awaited by the
        request); drop it when `shadow_max_inflight` copies are already in flight."""
        shadow, alias = route.shadow, route.alias
        if shadow is None or alias is None:
            return
        if len(self._shadows) >= self.routing.config.shadow_max_inflight:
            self.arm_stats.dropped(alias, shadow.key)
            if self.arm_metrics is not None:
                self.arm_metrics.observe(alias, shadow.key, "shadow", "dropped", 0.0)
            return
        call = PredictCall(
            manifest=shadow,
            inputs=rows,
            request_id=f"{request_id}-shadow",
            pool=route.shadow_pool or route.pool,
        )

        async def run() -> None:
            started = time.perf_counter()
            ok = False
            try:
                await self.dispatch(call)
                ok = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a shadow's failure is recorded, never raised
                access_log.info(
                    "shadow failed",
                    extra={
                        "request_id": call.request_id,
                        "model_id": shadow.model_id,
                        "version": shadow.version,
                        "status": status_of(exc),
                    },
                )
            finally:
                self._observe_arm(alias, shadow.key, "shadow", ok, started)

        task = asyncio.get_running_loop().create_task(run(), name=f"shadow:{request_id}")
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    def observe(
        self,
        request_id: str,
        manifest: Manifest | None,
        status: int,
        started: float,
        result: PredictResponse | None,
    ) -> None:
        """Stats, metrics and one access-log line per request (ids only, never bodies).

        `predict()` calls this for every call; the HTTP layer calls it for requests it
        rejects before they reach `predict()` (unreadable or oversized bodies).
        """
        latency_ms = (time.perf_counter() - started) * 1000
        cold = None if result is None else not result.resident
        wait_ms = 0.0 if result is None else result.load_wait_ms
        if manifest is not None:
            self.recorder.record(
                manifest.key, latency_ms, result is not None, result and result.resident, wait_ms
            )
        if self.metrics is not None:
            model, version = (manifest.model_id, manifest.version) if manifest else (OTHER, OTHER)
            self.metrics.observe(model, version, status, latency_ms, cold)
        access_log.info(
            "request",
            extra={
                "request_id": request_id,
                "model_id": manifest.model_id if manifest else None,
                "version": manifest.version if manifest else None,
                "status": status,
                "replica": result.replica if result else None,
                "cold": cold,
                "load_wait_ms": round(wait_ms, 3),
                "latency_ms": round(latency_ms, 3),
            },
        )

    def stats(self, window_s: float) -> StatsReport:
        """Per-model stats over the last `window_s` seconds, across all ingress replicas."""
        return summarise([self.recorder.snapshot(), *self._peers()], window_s)

    def _peers(self) -> list[dict[str, Any]]:
        """The other ingress replicas' published snapshots (stats and arm counters)."""
        return [] if self._peer_stats is None else self._peer_stats()

    def published(self) -> dict[str, Any]:
        """What this replica publishes for its peers: stats snapshot plus arm counters."""
        return {**self.recorder.snapshot(), "arms": self.arm_stats.export()}

    async def predict_table(
        self, model_id: str, table: pa.Table, version: str | None = None
    ) -> pa.Table:
        """Score every row of a pyarrow table; return it with the output column(s) added.

        Tabular models read all numeric columns in order; text models read the `text`
        column, image models the binary `image` column (encoded JPEG, PNG or WebP files).
        Rows are sent in chunks of `ingress.max_batch_rows` (images: at most
        `IMAGE_TABLE_CHUNK`, so one call's payload stays small).
        """
        manifest = self.resolve(model_id, version).manifest
        inputs = table_inputs(manifest.task, table)
        outputs: list[Any] = []
        step = self.config.max_batch_rows
        if manifest.task in IMAGE_TASKS:
            step = min(step, IMAGE_TABLE_CHUNK)
        for start in range(0, max(len(inputs), 1), step):
            chunk = inputs[start : start + step]
            result = await self.predict(manifest.model_id, chunk, manifest.version)
            outputs.extend(result.outputs)
        return with_outputs(manifest.task, table, outputs)

    def list_models(self) -> ModelList:
        """Every published model (latest version), from the in-memory registry."""
        models = self.registry.summaries()
        age = self.registry.age_s
        return ModelList(
            models=models, count=len(models), registry_age_s=None if age is None else round(age, 3)
        )

    def describe(self, model_id: str, version: str | None = None) -> ModelDetail:
        """The manifest of a model version."""
        manifest = self.resolve(validate_model_id(model_id), version).manifest
        return ModelDetail(
            model_id=model_id, versions=self.registry.versions(model_id), manifest=manifest
        )


def new_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex[:16]


def table_inputs(task: str, table: pa.Table) -> list[Any]:
    """Rows of a pyarrow table as model inputs for `task`."""
    if task == "tabular-classification":
        columns = [
            c for c, t in zip(table.column_names, table.schema.types, strict=True) if _numeric(t)
        ]
        if not columns:
            raise InvalidInput("the table has no numeric columns to use as features")
        matrix = [table.column(c).to_pylist() for c in columns]
        return [list(row) for row in zip(*matrix, strict=True)]
    if task in IMAGE_TASKS:
        if "image" not in table.column_names:
            raise InvalidInput(f"a {task} model reads the table's binary 'image' column; none")
        column = table.column("image")
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            raise InvalidInput(
                f"the 'image' column must be binary (encoded images), not {column.type}"
            )
        return column.to_pylist()
    if "text" not in table.column_names:
        raise InvalidInput(f"a {task} model reads the table's 'text' column; there is none")
    return table.column("text").to_pylist()


def with_outputs(task: str, table: pa.Table, outputs: list[Any]) -> pa.Table:
    """`table` with the prediction column(s) for `task` appended."""
    if task == "tabular-classification":
        return table.append_column("score", pa.array(outputs, pa.float64()))
    if task in ("text-classification", "image-classification"):
        table = table.append_column("label", pa.array([o["label"] for o in outputs]))
        return table.append_column("score", pa.array([o["score"] for o in outputs], pa.float64()))
    return table.append_column("embedding", pa.array(outputs, pa.list_(pa.float32())))


def _numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype)


def host_pin_sync(pins: list[str], hosts: list[dict[str, Any]]) -> dict[str, Any]:
    """Which host replicas took the routing pins this ingress serves.

    Hosts read pins from their own deployment's `user_config`; a config that gives the
    routing to the Ingress only (the layout before pins moved to the hosts) leaves them
    without. `in_sync` is False when any host replica reports other pins, and `replicas`
    names each with what it took (`routing_pins`: None before its first `user_config`).
    """
    want = sorted(pins)
    replicas = [
        {
            "replica": h.get("replica"),
            "pool": h.get("pool"),
            "routing_pins": h.get("routing_pins"),
            "in_sync": sorted(h.get("routing_pins") or []) == want,
        }
        for h in hosts
    ]
    return {"in_sync": all(r["in_sync"] for r in replicas), "replicas": replicas}
