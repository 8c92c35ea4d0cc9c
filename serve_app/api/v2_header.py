"""The header of an Open Inference Protocol v2 request: datatypes, shapes, limits.

Everything about a request that can be checked without reading tensor data: the
`Inference-Header-Content-Length` (ASCII digits), the JSON header and its `inputs`
(`read_header`, under a token budget derived from the model's element limit), each
input's name, datatype, shape and typed parameters (`tensor_spec`, the shape held to the
element limit). `EarlyCheck` runs these checks while a compressed body inflates
(`serve_app.api.body.decompress`), so a body that is refused on its header is never
inflated in full. The codec (`serve_app.api.v2_codec`) decodes the data itself and
re-exports the names here that callers used from it (`DATATYPES`, `HEADER_LENGTH`,
`MAX_DIMS`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from serve_app.api.json_text import TokenCounter, parse_json
from serve_app.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"

# NOTE: BF16 has no numpy dtype; it is carried as the upper half of a float32 (see _bf16_*).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<f4"),
    "BYTES": np.dtype(object),
}
MAX_DIMS = 8
# NOTE: the default per-tensor element limit when no model limit is given (2**31 - 1,
# Triton's int32 element counts); the routes always pass the model's own, far smaller one.
MAX_ELEMENTS = 2**31 - 1
HEADER_TOKENS = 4096


def read_header(raw_header: bytes, max_elements: int) -> tuple[dict[str, Any], list[Any]]:
    """The JSON header and its `inputs` list."""
    # NOTE: every element costs at least one comma or bracket in JSON data; the rest of a
    # header (names, shapes, parameters) stays far below HEADER_TOKENS.
    budget = token_budget(max_elements)
    header = (
        parse_json(raw_header, "the inference request", max_tokens=budget)
        if raw_header.strip()
        else None
    )
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object with 'inputs'")
    specs = header.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise BadRequest("the inference request needs a non-empty 'inputs' list")
    return header, specs


def token_budget(max_elements: int) -> int | None:
    """The most commas and brackets a request's JSON may hold for `max_elements`."""
    return 2 * max_elements + HEADER_TOKENS if max_elements < MAX_ELEMENTS else None


class EarlyCheck:
    """Looks at a request body while it inflates (`serve_app.api.body.decompress`'s
    `inspect`) and refuses a bad one before the rest is inflated: with binary data, the
    JSON header (its first `header_length` bytes) must pass every check that needs no
    tensor data (shapes within `max_elements` included); a JSON-only body must stay
    within the token budget.
    """

    def __init__(
        self, header_length: str | int | None, max_elements: int, max_items: int | None = None
    ) -> None:
        self._split = header_digits(header_length)
        self._max = max_elements
        self._max_items = max_items
        self._prefix = bytearray()
        self._done = False
        budget = token_budget(max_elements)
        self._tokens = None if budget is None else TokenCounter(budget)

    def __call__(self, piece: bytes) -> None:
        """Take the next piece of the inflated body."""
        if self._done:
            return
        if self._split is None:
            if self._tokens is not None and self._tokens.feed(piece) > self._tokens.budget:
                self._done = True
                raise BadRequest(
                    "the inference request holds more values than this model's element "
                    f"limit allows (over {self._tokens.budget} commas and brackets)"
                )
            return
        self._prefix += piece[: self._split - len(self._prefix)]
        if len(self._prefix) >= self._split:
            self._done = True
            _, specs = read_header(bytes(self._prefix), self._max)
            for spec in specs:
                tensor_spec(spec, self._max, self._max_items)


def header_digits(value: str | int | None) -> int | None:
    """An `Inference-Header-Content-Length` as a number (ASCII digits only).

    Raises:
        BadRequest: anything but ASCII digits (400).
    """
    if value is None or isinstance(value, int):
        return value
    # NOTE: int() would also take " 12", "+12", "1_2" and non-ASCII digits.
    if not (value.isascii() and value.isdigit()) or len(value) > 12:
        raise BadRequest(f"{HEADER_LENGTH} must be ASCII digits, got {value[:20]!r}")
    return int(value)


def tensor_spec(
    spec: Any, max_elements: int, max_items: int | None = None
) -> tuple[str, str, list[int], dict[str, Any]]:
    """An input's name, datatype, shape and parameters, checked (no data is read).

    `max_items` (default: `max_elements`) bounds BYTES tensors, whose elements are walked
    one by one (a text or an encoded file each: a model's rows), while `max_elements`
    bounds the others (decoded by numpy in one step).

    Raises:
        BadRequest: malformed, or a shape over its limit (400).
    """
    if not isinstance(spec, dict):
        raise BadRequest("each input must be a JSON object with name, datatype, shape")
    name = spec.get("name")
    datatype = spec.get("datatype")
    shape = spec.get("shape")
    if not isinstance(name, str) or not name:
        raise BadRequest("an input has no 'name'")
    if datatype not in DATATYPES:
        raise BadRequest(
            f"input {name!r}: unknown datatype {datatype!r}; known: {', '.join(DATATYPES)}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers")
    # NOTE: zero dimensions are skipped: [0, 10**30] holds nothing, but numpy cannot shape it.
    spanned = math.prod(d for d in shape if d != 0)
    limit = max_elements if datatype != "BYTES" or max_items is None else max_items
    if spanned > limit:
        raise BadRequest(
            f"input {name!r}: shape {_shown(shape)} spans more than the {limit} "
            f"{datatype} elements allowed for one tensor of this model"
        )
    parameters = parameters_of(spec.get("parameters"), f"input {name!r}")
    return name, datatype, shape, parameters


# NOTE: the parameters this server reads, and the JSON type each must have.
_PARAMETER_TYPES: dict[str, type] = {"binary_data_output": bool, "binary_data": bool}


def parameters_of(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where} parameters must be a JSON object")
    for key, kind in _PARAMETER_TYPES.items():
        if key in value and not isinstance(value[key], kind):
            raise BadRequest(f"{where} parameter {key!r} must be true or false")
    return value


def _shown(shape: list[int]) -> str:
    """A shape for a message, cut short (a hostile one may have huge numbers)."""
    text = str(shape)
    return text if len(text) <= 80 else text[:77] + "..."
