"""Parsing untrusted JSON text for every route: whatever the bytes, a failure is a 400.

`json.loads` raises more than `JSONDecodeError` on hostile input: `RecursionError` for
arrays nested past the interpreter's recursion limit, `ValueError` for integers of more than
4300 digits, `UnicodeDecodeError` for bytes that are not UTF-8. `parse_json()` turns all
of them into one typed error, so no body can reach the 500 handler through the parser.

It also takes a token budget: 8 KB of gzip can inflate to 8 MiB of `[0,0,0,...]` or
`[[],[],...]`, which `json.loads` needs 0.2-0.5 s of CPU (holding the GIL) to build.
`TokenCounter` counts the commas and opening brackets outside strings (C-speed byte
counts, then one vectorised pass), chunk by chunk as a body inflates, and a body with more
than the caller's budget (derived from the model's element limit) is refused without
being parsed, or even inflated any further.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from serve_app.errors import BadRequest

_STRUCTURAL = (ord(","), ord("["), ord("{"))
_STRUCTURAL_BYTES = tuple(bytes([c]) for c in _STRUCTURAL)


def parse_json(
    raw: bytes,
    what: str,
    error: type[BadRequest] = BadRequest,
    max_tokens: int | None = None,
) -> Any:
    """`raw` parsed as JSON.

    Args:
        raw: the JSON text.
        what: what the text is, for the message ("the body", "the inference header").
        error: the `BadRequest` subclass to raise (e.g. `MalformedBody`).
        max_tokens: the most commas and opening brackets (outside strings) the text may
            hold; checked before parsing. None: no budget.

    Raises:
        BadRequest: (`error`) unreadable, too deep, over the token budget, or with an
            unrepresentable number (400).
    """
    if max_tokens is not None and TokenCounter(max_tokens).feed(raw) > max_tokens:
        raise error(
            f"{what} holds more values than this model's element limit allows "
            f"(over {max_tokens} commas and brackets)"
        )
    try:
        value = json.loads(raw)
    except RecursionError as exc:
        raise error(f"{what} is nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc.msg} at position {exc.pos}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text") from exc
    except ValueError as exc:  # NOTE: integers past sys.get_int_max_str_digits()
        raise error(f"{what} has a number that cannot be read: {exc}") from exc
    return value


def structural_tokens(raw: bytes, budget: int) -> int:
    """Commas, `[` and `{` outside JSON strings in `raw` (exact when over `budget`)."""
    return TokenCounter(budget).feed(raw)


class TokenCounter:
    """Counts commas, `[` and `{` outside JSON strings over a stream of chunks.

    While the count of those bytes anywhere (C-speed `bytes.count`) stays within `budget`
    that upper bound is returned; once it passes, the chunks seen so far and every later
    one are counted exactly: escape pairs (backslash-backslash, backslash-quote) are
    blanked out left to right as a JSON parser reads them (an escape cut by a chunk
    boundary carries over), then a running XOR over the quote bytes (vectorised) marks
    what lies inside strings.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.count = 0
        self._exact = False
        self._seen: list[bytes] = []
        self._in_string = False
        self._escape = False

    def feed(self, chunk: bytes) -> int:
        """Count `chunk` (the next bytes of the text); return the count so far."""
        if not self._exact:
            self.count += sum(chunk.count(c) for c in _STRUCTURAL_BYTES)
            self._seen.append(chunk)
            if self.count <= self.budget:
                return self.count
            self._exact, self.count = True, 0
            seen, self._seen = self._seen, []
            for part in seen:
                self._count(part)
            return self.count
        self._count(chunk)
        return self.count

    def _count(self, chunk: bytes) -> None:
        if self._escape and chunk:
            chunk, self._escape = b" " + chunk[1:], False
        if b"\\" in chunk:
            chunk = chunk.replace(b"\\\\", b"  ").replace(b'\\"', b"  ")
            if chunk.endswith(b"\\"):
                chunk, self._escape = chunk[:-1] + b" ", True
        data = np.frombuffer(chunk, dtype=np.uint8)
        if not data.size:
            return
        inside = np.bitwise_xor.accumulate((data == ord('"')).view(np.uint8))
        if self._in_string:
            inside ^= 1
        structural = data == _STRUCTURAL[0]
        for c in _STRUCTURAL[1:]:
            structural |= data == c
        structural &= inside == 0
        self.count += int(np.count_nonzero(structural))
        self._in_string = bool(inside[-1])
