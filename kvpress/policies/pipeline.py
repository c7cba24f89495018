"""Composition: eviction stages plus at most one storage (e.g. a quantizer), written ``a | b``."""

from __future__ import annotations

from typing import Any

import torch

from kvpress.context import ForwardContext, LayerContext
from kvpress.policies.base import Policy


def is_storage_spec(obj: Any) -> bool:
    """A storage spec builds each layer's storage: it has ``create_storage(layer_idx) -> KVStorage``."""
    return callable(getattr(obj, "create_storage", None))


class Pipeline(Policy):
    """Eviction policies applied together, and optionally a storage spec (quantizer) for what is kept.

    ``SnapKV(compression_ratio=0.5) | KVQuant(bits=2)`` evicts with SnapKV and stores the survivors as 2-bit
    codes. With several eviction stages a token stays only if every stage keeps it.
    """

    name = "pipeline"

    def __init__(self, *stages: Any):
        flat: list[Any] = []
        for stage in stages:
            flat.extend(stage.stages if isinstance(stage, Pipeline) else [stage])
        self.policies: list[Policy] = []
        self.storage: Any = None
        for stage in flat:
            if stage is None:
                continue
            if isinstance(stage, Policy):
                self.policies.append(stage)
            elif is_storage_spec(stage):
                if self.storage is not None:
                    raise ValueError("a pipeline takes at most one storage spec (quantizer)")
                self.storage = stage
            else:
                raise ValueError(f"pipeline stages must be kvpress policies or storage specs, got {stage!r}")
        ragged = [p for p in self.policies if getattr(p, "needs_ragged", False)]
        if ragged and self.storage is not None and not getattr(self.storage, "ragged", False):
            # Heads in fixed classes (DuoAttention) can hold each class in its own storage instead.
            splitters = [p for p in ragged if callable(getattr(p, "split_storage", None))]
            if len(ragged) == 1 and splitters:
                self.storage = splitters[0].split_storage(self.storage)
                return
            raise ValueError(
                f"{type(ragged[0]).__name__} gives heads different lengths and saves memory only in ragged storage; "
                f"{type(self.storage).__name__} pads every head to the longest, so it cannot hold it ragged"
            )

    @property
    def reposition(self) -> bool:  # type: ignore[override]
        return any(p.reposition for p in self.policies)

    @property
    def wants_attention_mass(self) -> bool:
        return any(getattr(p, "wants_attention_mass", False) for p in self.policies)

    @property
    def stages(self) -> list[Any]:
        return [*self.policies, *([self.storage] if self.storage is not None else [])]

    def acts_on(self, layer_type: str) -> bool:
        return any(p.acts_on(layer_type) for p in self.policies)

    def on_sliding_layers(self, include: bool = True) -> "Pipeline":
        """Every eviction stage also acts on sliding-window layers (see :meth:`Policy.on_sliding_layers`)."""
        for policy in self.policies:
            policy.on_sliding_layers(include)
        return self

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        keep = None
        for policy in self.policies:
            if not policy.acts_on(ctx.layer_type):
                continue
            mask = policy.select(ctx)
            if mask is not None:
                keep = mask if keep is None else keep & mask
        return keep

    @property
    def wants_hidden_states(self) -> bool:
        return any(getattr(p, "wants_hidden_states", False) for p in self.policies)

    def attach(self, model: Any) -> None:
        for policy in self.policies:
            policy.attach(model)

    def after_forward(self, fwd: ForwardContext) -> None:
        for policy in self.policies:
            policy.after_forward(fwd)

    def params(self) -> dict[str, Any]:
        return {"stages": [repr(s) for s in self.stages]}

    def __repr__(self) -> str:
        return " | ".join(repr(s) for s in self.stages)
