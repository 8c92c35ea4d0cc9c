"""A Ray job: connects to a running cluster and calls the `fleet` app through handles.

Run as `python driver_job.py RAY_ADDRESS MODEL_ID...`; prints one JSON object with the
handle predictions and a pyarrow-table batch result. The integration test runs it as a
separate process, the way a user's batch-scoring job would.
"""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import ray
from ray import serve

from serve_app.errors import ModelNotFound
from tests.integration.reference import inputs_for, rows_for


def main() -> None:
    address, model_ids = sys.argv[1], sys.argv[2:]
    ray.init(address=address, logging_level="ERROR")
    handle = serve.get_app_handle("fleet")
    # fan out: many model ids at once, then gather
    pending = {m: handle.predict.remote(m, inputs_for(m)) for m in model_ids}
    predictions = {m: r.result(timeout_s=120) for m, r in pending.items()}
    # batch scoring: a pyarrow table of rows (32 feature columns) through one fraud model
    rows = rows_for(model_ids[0], n=500)
    table = pa.table({f"f{i:02d}": [row[i] for row in rows] for i in range(32)})
    scored = handle.predict_table.remote(model_ids[0], table).result(timeout_s=120)
    # typed errors cross the Ray boundary intact: catch them by class, not by message
    try:
        handle.predict.remote("no-such-model", [[0.0] * 32]).result(timeout_s=60)
        error = None
    except ModelNotFound as exc:
        error = {"code": exc.code, "status": exc.status_code}
    print(
        json.dumps(
            {
                "predictions": predictions,
                "table_columns": scored.column_names,
                "table_rows": scored.num_rows,
                "scores": scored.column("score").to_pylist(),
                "rows": rows,
                "error": error,
            }
        )
    )


if __name__ == "__main__":
    main()
