"""Request bodies for every route: the size limit, `Content-Encoding`, and JSON parsing.

`BodyReader` is the one place the HTTP layer reads a request body. `create_app` builds one
with `ingress.max_body_bytes` and hands it to every router, so the limit is enforced the
same way everywhere:

- `raw()`: the bytes as sent, refused with 413 as soon as they (or the declared
  `Content-Length`) pass the limit, before the whole body is buffered;
- `decoded()`: `raw()` with gzip/deflate undone, the limit applied again after
  decompression so a small body cannot expand without bound, and the stream must end
  cleanly (no truncated stream, no trailing bytes, no second gzip member);
- `model()`: a JSON body validated into a pydantic model, 400 `malformed_body` otherwise
  (the native predict routes, which take no `Content-Encoding`);
- `optional_object()`: a JSON object where an empty body means `{}` (V2 repository calls).

`compress()` is the response-side counterpart of `decompress()` (the V2 routes use it).
`off_loop()` runs the CPU work on a large (or compressed) body in a worker thread, so the
event loop keeps serving other requests meanwhile. JSON is parsed by
`serve_app.api.json_text.parse_json` (every failure a 400, deep nesting included).
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from serve_app.api.json_text import parse_json
from serve_app.errors import BadRequest, MalformedBody, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
# NOTE: below this a body's parse takes well under a millisecond: a thread hop costs more.
OFF_LOOP_BYTES = 64 * 1024
INFLATE_STEP = 64 * 1024


@dataclass(frozen=True)
class BodyReader:
    """Reads request bodies under one size limit (`max_bytes`, after decompression too)."""

    max_bytes: int

    async def raw(self, request: Request) -> bytes:
        """The body as sent.

        Raises:
            PayloadTooLarge: the body, or its declared Content-Length, passes the limit (413).
        """
        declared = request.headers.get("content-length")
        if declared is not None and _digits(declared) and int(declared) > self.max_bytes:
            raise PayloadTooLarge(f"request body over the {self.max_bytes}-byte limit")
        raw = bytearray()
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > self.max_bytes:
                raise PayloadTooLarge(f"request body over the {self.max_bytes}-byte limit")
        return bytes(raw)

    async def decoded(self, request: Request) -> bytes:
        """The body with its `Content-Encoding` (gzip, deflate) undone.

        Raises:
            PayloadTooLarge: over the limit before or after decompression (413).
            BadRequest: an unknown encoding or a corrupt stream (400).
        """
        raw = await self.raw(request)
        return decompress(raw, request.headers.get("content-encoding"), self.max_bytes)

    async def model(self, request: Request, model: type[M], max_tokens: int | None = None) -> M:
        """The (unencoded) JSON body validated as `model`.

        Args:
            request: the request.
            model: the pydantic model of the body.
            max_tokens: the most commas and brackets (outside strings) the body may hold,
                checked before it is parsed (see `serve_app.api.json_text`).

        Raises:
            PayloadTooLarge: over the limit (413).
            MalformedBody: not JSON, over `max_tokens`, or JSON that does not validate as
                `model` (400).
        """
        raw = await self.raw(request)
        data = await off_loop(len(raw), parse_json, raw, "the body", MalformedBody, max_tokens)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise MalformedBody(describe_validation(exc.errors(include_input=False))) from exc

    async def optional_object(self, request: Request) -> dict[str, Any]:
        """A JSON object body (decoded), where an empty body (tritonclient sends one) is `{}`.

        Raises:
            PayloadTooLarge: over the limit (413).
            BadRequest: not JSON, or JSON that is not an object (400).
        """
        raw = await self.decoded(request)
        if not raw.strip():
            return {}
        body = parse_json(raw, "the body")
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body


def decompress(
    body: bytes,
    encoding: str | None,
    max_bytes: int,
    inspect: Callable[[bytes], None] | None = None,
) -> bytes:
    """Undo `Content-Encoding: gzip|deflate`; at most `max_bytes` come out.

    Args:
        body: the body as sent.
        encoding: its `Content-Encoding` header.
        max_bytes: the most bytes that may come out.
        inspect: called with each piece of the output as it inflates (at most
            `INFLATE_STEP` bytes at a time; the whole body when it is not encoded); it may
            raise to stop a body that is already bad before the rest is inflated.

    Raises:
        BadRequest: unknown encoding or a corrupt stream (400).
        PayloadTooLarge: the decompressed body would exceed `max_bytes` (413).
    """
    name = (encoding or "identity").strip().lower()
    if name in ("", "identity"):
        if inspect is not None:
            inspect(body)
        return body
    if name == "gzip":
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    elif name == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise BadRequest(f"unsupported Content-Encoding {name!r}: use gzip or deflate")
    try:
        out = _inflate(inflater, body, max_bytes, inspect)
    except zlib.error as exc:
        raise BadRequest(f"the {name} request body is corrupt: {exc}") from exc
    if not inflater.eof:
        raise BadRequest(f"the {name} request body is truncated (the stream does not end)")
    if inflater.unused_data:
        raise BadRequest(
            f"the {name} request body has {len(inflater.unused_data)} bytes after the end of "
            "its stream (trailing data or a second gzip member)"
        )
    return out


def _inflate(
    inflater: Any, body: bytes, max_bytes: int, inspect: Callable[[bytes], None] | None
) -> bytes:
    """Inflate `body` (at most `max_bytes` out), in `INFLATE_STEP` pieces when `inspect`
    looks at each."""
    too_large = PayloadTooLarge(f"decompressed request body over the {max_bytes}-byte limit")
    if inspect is None:
        out = inflater.decompress(body, max_bytes + 1)
        if len(out) > max_bytes or inflater.unconsumed_tail:
            raise too_large
        return bytes(out)
    pieces: list[bytes] = []
    size = 0
    pending = body
    while True:
        piece = inflater.decompress(pending, INFLATE_STEP)
        pending = inflater.unconsumed_tail
        size += len(piece)
        if size > max_bytes:
            raise too_large
        if piece:
            pieces.append(piece)
            inspect(piece)
        if inflater.eof or (not pending and len(piece) < INFLATE_STEP):
            return b"".join(pieces)


async def off_loop(size: int, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)`, in a worker thread when the body it works on is `size` >= 64 KiB.

    The ingress's event loop serves every request; a large decode on it would stall them
    all, so large ones run in the default executor (the GIL is still shared, but the loop
    gets its turn every switch interval instead of waiting for the whole decode).
    """
    if size < OFF_LOOP_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _digits(value: str) -> bool:
    """Whether `value` is ASCII digits only (`str.isdigit` also takes "²" and "٣")."""
    return value.isascii() and value.isdigit()


def compress(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """Compress a response body with the first of gzip/deflate the client accepts; returns
    the body and its `Content-Encoding` (None: left as it was)."""
    accepted = {p.split(";")[0].strip().lower() for p in (accept_encoding or "").split(",")}
    if "gzip" in accepted:
        return gzip.compress(body, compresslevel=1), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body, 1), "deflate"
    return body, None


def describe_validation(errors: Iterable[Any]) -> str:
    """A one-line message for pydantic/FastAPI validation errors (the first five)."""
    parts = []
    for err in list(errors)[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)
