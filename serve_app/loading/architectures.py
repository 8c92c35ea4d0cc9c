"""Plain torch modules that a manifest can describe: a name and validated parameters.

A `torch-module` manifest carries `architecture: {"kind": "mlp", ...}`; the loader builds the
module from this table and adopts the safetensors weights. No code or pickle ever comes from
the store, so a model file cannot execute anything in the server.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from serve_app.errors import ModelLoadFailed


class MlpSpec(BaseModel):
    """A feed-forward network over a fixed number of tabular features."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mlp"] = "mlp"
    input_dim: int = Field(ge=1, le=100_000)
    hidden_dims: list[int] = Field(default_factory=list, max_length=32)
    output_dim: int = Field(1, ge=1, le=100_000)
    activation: Literal["relu", "gelu", "tanh"] = "relu"


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


def build_mlp(spec: MlpSpec) -> nn.Sequential:
    """Linear layers with activations between them; weights keyed `layers.<i>.weight`."""
    dims = [spec.input_dim, *spec.hidden_dims, spec.output_dim]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(_ACTIVATIONS[spec.activation]())
    return nn.Sequential(*layers)


_BUILDERS: dict[str, tuple[type[BaseModel], Callable[[Any], nn.Module]]] = {
    "mlp": (MlpSpec, build_mlp),
}


def build_module(architecture: dict[str, Any]) -> nn.Module:
    """Build the (uninitialised) module a manifest describes.

    Raises:
        ModelLoadFailed: unknown kind or invalid parameters.
    """
    kind = architecture.get("kind")
    if kind not in _BUILDERS:
        raise ModelLoadFailed(
            f"unknown torch-module architecture {kind!r}; known: {sorted(_BUILDERS)}"
        )
    spec_cls, builder = _BUILDERS[kind]
    try:
        spec = spec_cls.model_validate(architecture)
    except ValidationError as exc:
        raise ModelLoadFailed(f"invalid {kind} architecture: {exc.error_count()} error(s)") from exc
    return builder(spec)


def input_width(architecture: dict[str, Any] | None) -> int | None:
    """Number of features a tabular model expects, if the architecture says."""
    if not architecture:
        return None
    value = architecture.get("input_dim")
    return value if isinstance(value, int) else None
