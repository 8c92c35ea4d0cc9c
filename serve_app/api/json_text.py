"""Parsing untrusted JSON text for every route: whatever the bytes, a failure is a 400.

`json.loads` raises more than `JSONDecodeError` on hostile input: `RecursionError` for
arrays nested past the interpreter's recursion limit, `ValueError` for integers of more than
4300 digits, `UnicodeDecodeError` for bytes that are not UTF-8. `parse_json()` turns all
of them into one typed error, so no body can reach the 500 handler through the parser.

It also takes a token budget: 8 KB of gzip can inflate to 8 MiB of `[0,0,0,...]` or
`[[],[],...]`, which `json.loads` needs 0.2-0.5 s of CPU (holding the GIL) to build. Before
parsing, `structural_tokens()` counts the commas and opening brackets outside strings
with C-speed byte counts and one vectorised pass, and a body with more than the caller's
budget (derived from the model's element limit) is refused without being parsed.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from serve_app.errors import BadRequest

_STRUCTURAL = (ord(","), ord("["), ord("{"))


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
    if max_tokens is not None and structural_tokens(raw, max_tokens) > max_tokens:
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
    """Commas, `[` and `{` outside JSON strings in `raw` (exact when over `budget`).

    The count of those bytes anywhere (C-speed `bytes.count`) is an upper bound; only when
    it passes `budget` are the ones inside strings told apart: escape pairs (`\\\\`,
    `\\"`) are blanked out left to right, as a JSON parser reads them, then a running XOR
    over the quote bytes marks what lies inside strings.
    """
    upper = sum(raw.count(bytes([c])) for c in _STRUCTURAL)
    if upper <= budget:
        return upper
    text = raw.replace(b"\\\\", b"  ").replace(b'\\"', b"  ") if b"\\" in raw else raw
    data = np.frombuffer(text, dtype=np.uint8)
    inside = np.bitwise_xor.accumulate((data == ord('"')).view(np.uint8))
    structural = data == _STRUCTURAL[0]
    for c in _STRUCTURAL[1:]:
        structural |= data == c
    structural &= inside == 0
    return int(np.count_nonzero(structural))
