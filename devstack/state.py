"""The local stack's record, `<state_dir>/stack.json`, and what every step of `up` and
`down` shares: the error they raise (`StackError`) and the progress line they print (`say`).

`up` records there the process ids it started (with their fingerprints), the ports, and the
local S3 keys, which are generated once and reused on every later `up`; the file has mode
0600 because of those keys. `down` stops exactly what it finds recorded. Other CLI commands
read the S3 variables from it (`load_stack_env`) to reach the local S3 without any setup.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devstack.process import write_private_file
from devstack.seaweed import SeaweedServer
from serve_app.errors import FleetError

STATE_FILE = "stack.json"
STATE_VERSION = 1


class StackError(FleetError):
    """The local stack could not be brought up or down; the message says what to do."""

    code = "local_stack_error"


def say(message: str) -> None:
    """A progress line for the person at the terminal (stderr, so stdout stays clean)."""
    print(f"==> {message}", file=sys.stderr, flush=True)


def state_path(state_dir: Path) -> Path:
    """`<state_dir>/stack.json`."""
    return Path(state_dir) / STATE_FILE


def load_state(state_dir: Path) -> dict[str, Any]:
    """The recorded stack state, or an empty dict when there is none."""
    path = state_path(state_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); remove it and run up again") from exc
    if not isinstance(data, dict):
        raise StackError(f"{path} does not hold a JSON object; remove it and run up again")
    return data


def save_state(state_dir: Path, state: Mapping[str, Any]) -> None:
    """Write the stack state atomically with mode 0600 (it holds the local S3 secret key)."""
    write_private_file(state_path(state_dir), json.dumps({**state, "version": STATE_VERSION}))


def load_stack_env(state_dir: Path) -> dict[str, str]:
    """The AWS_* variables of the running local S3 server of the stack in `state_dir`.

    Other CLI commands use it to default to the local stack when AWS_ENDPOINT_URL is unset.

    Returns:
        AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION, or an
        empty dict when no stack is recorded there or its S3 server is not running.
    """
    try:
        s3_state = load_state(state_dir).get("s3")
    except StackError:
        return {}
    if not s3_state or not s3_state.get("pid"):
        return {}
    server = SeaweedServer.from_state(s3_state)
    if not server.is_running():
        return {}
    return server.env()
