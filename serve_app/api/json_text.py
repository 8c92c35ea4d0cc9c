"""Parsing untrusted JSON text for every route: whatever the bytes, a failure is a 400.

`json.loads` raises more than `JSONDecodeError` on hostile input: `RecursionError` for
arrays nested past the interpreter's recursion limit, `ValueError` for integers of more than
4300 digits, `UnicodeDecodeError` for bytes that are not UTF-8. `parse_json()` turns all
of them into one typed error, so no body can reach the 500 handler through the parser.
"""

from __future__ import annotations

import json
from typing import Any

from serve_app.errors import BadRequest


def parse_json(raw: bytes | str, what: str, error: type[BadRequest] = BadRequest) -> Any:
    """`raw` parsed as JSON.

    Args:
        raw: the JSON text.
        what: what the text is, for the message ("the body", "the inference header").
        error: the `BadRequest` subclass to raise (e.g. `MalformedBody`).

    Raises:
        BadRequest: (`error`) unreadable, too deep, or with an unrepresentable number (400).
    """
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
