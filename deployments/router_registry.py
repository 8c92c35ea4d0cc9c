"""The model-host routers of this process, by (app, deployment), for the ingress to read.

Serve creates a deployment's request router lazily, in the process whose handle calls it
(the ingress), from a copy of deployments/router.py that it pickles by value: that copy's
module globals are not the importable module's. This registry lives in its own module, which
is pickled by reference, so the router and the ingress see the same one.
"""

from __future__ import annotations

import weakref
from typing import Any

_ROUTERS: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()


def register(app: str, deployment: str, router: Any) -> None:
    """`router` now routes `app`'s `deployment` from this process."""
    _ROUTERS[(app, deployment)] = router


def router_for(app: str, deployment: str) -> Any | None:
    """This process's router for `app`'s `deployment` (a `ModelAffinityRouter`); None before
    the deployment's first request from here, or with Serve's default router."""
    return _ROUTERS.get((app, deployment))
