"""The path, query and header parameters of every route, as the OpenAPI document shows them.

Each carries the pattern the server enforces, so a schema-driven client (or fuzzer)
generates only what the server accepts, and examples with real demo-fleet ids
(`devstack/demo_fleet.py`), so it gets past the 404s. The patterns are declared, not
enforced by FastAPI: the server's own checks (`serve_app.storage.manifest.validate_model_id`
and `validate_version`, the same rules) enforce them, with their specific error codes
(`invalid_model_id`, `invalid_version`) instead of a generic validation error.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, Path, Query

# NOTE: the same rules as MODEL_ID_RE / VERSION_RE in serve_app.storage.manifest, plus the
# "no '..'" rule those checks add, written as a lookahead (ECMA-262, as JSON Schema wants).
MODEL_ID_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VERSION_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$"
# NOTE: ids of the demo fleet (`fleetserve up`): a tabular model, a text classifier, the
# embedder; versions the demo publishes.
MODEL_EXAMPLES = ["fraud-merchant-0001", "text-clf-sentiment", "minilm-embed"]
NAME_EXAMPLES = [*MODEL_EXAMPLES, "fraud-merchant-0001@1"]
VERSION_EXAMPLES = ["1"]

_NAME_DOC = (
    "A model id, `id@version`, or an alias from the routing config (1-128 characters from "
    "[A-Za-z0-9._-], starting with a letter or digit, no '..')."
)
_ID_DOC = "A model id (1-128 characters from [A-Za-z0-9._-], starting alphanumeric, no '..')."
_VERSION_DOC = "A published version (1-64 characters from [A-Za-z0-9._-], no '..')."

ModelName = Annotated[
    str,
    Path(
        description=_NAME_DOC,
        examples=NAME_EXAMPLES,
        json_schema_extra={"pattern": NAME_PATTERN},
    ),
]
ModelId = Annotated[
    str,
    Path(
        description=_ID_DOC,
        examples=MODEL_EXAMPLES,
        json_schema_extra={"pattern": MODEL_ID_PATTERN},
    ),
]
PathVersion = Annotated[
    str,
    Path(
        description=_VERSION_DOC,
        examples=VERSION_EXAMPLES,
        json_schema_extra={"pattern": VERSION_PATTERN},
    ),
]
QueryVersion = Annotated[
    str | None,
    Query(
        description=_VERSION_DOC + " Default: the model's default (latest) version.",
        examples=VERSION_EXAMPLES,
        json_schema_extra={"pattern": VERSION_PATTERN},
    ),
]


def model_header(name: str) -> object:
    """The header that names the model on `POST /v1/predict` (Ray's multiplexing header)."""
    return Header(
        alias=name,
        convert_underscores=False,
        description=_NAME_DOC,
        examples=NAME_EXAMPLES,
        json_schema_extra={"pattern": NAME_PATTERN},
    )


HeaderLength = Annotated[
    str | None,
    Header(
        alias="Inference-Header-Content-Length",
        description="With binary tensor data: the length of the JSON header that starts "
        "the body (ASCII digits, at most the body's length).",
        json_schema_extra={"pattern": r"^[0-9]{1,12}$"},
    ),
]
