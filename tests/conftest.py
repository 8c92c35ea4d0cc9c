"""Test-suite setup shared by every tier."""

from __future__ import annotations

import os

# NOTE: Ray reads this once at import. "0" keeps a local Ray instance on 127.0.0.1 (its
# single-machine mode) instead of the machine's network address; it must be set before
# anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
