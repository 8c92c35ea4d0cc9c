"""fleetserve core: registry, store, cache, loader and HTTP API, usable without Ray Serve."""

__version__ = "0.1.0"
