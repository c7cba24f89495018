"""The policy interface and its composition: :class:`Policy` decides, per layer and KV head, which cached tokens
stay; ``a | b`` composes policies (and at most one storage spec, e.g. a quantizer) into a :class:`Pipeline`.
One module, so that the operator and the class it builds do not import each other."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from kvpress.context import ForwardContext, LayerContext

# The parameters through which a policy is sized (how much it keeps); everything else says how it scores.
SIZE_PARAMETERS: tuple[str, ...] = ("compression_ratio", "budget")


class Policy(ABC):
    """An eviction policy. Implement :meth:`select`; everything else is optional.

    ``select`` is called for every compressible layer after attention ran in a forward pass, with a
    :class:`~kvpress.context.LayerContext` (``ctx.phase`` says prefill / extend / decode). It returns a keep
    mask ``[batch, kv_heads, seq]`` (bool over the cached slots) or ``None`` to keep everything. Heads may keep
    different numbers of tokens: the cache then switches that layer to ragged storage (no padding held).
    """

    name: ClassVar[str] = "policy"
    # True: after eviction, attend at positions within the cache (see kvpress.reposition), not the original ones.
    reposition: bool = False
    # True: heads keep different numbers of tokens by design, which saves memory only in ragged storage.
    needs_ragged: ClassVar[bool] = False
    # True: attention computes ctx.attention_mass (per-slot attention received) along with its output.
    wants_attention_mass: bool = False
    # The parameters that say how much the policy keeps (a shared ratio reaches a stage that sets none of them).
    size_parameters: ClassVar[tuple[str, ...]] = SIZE_PARAMETERS
    # Which layers the policy evicts from: full-attention layers only (False, the default: a sliding-window layer
    # is already bounded by its window, so a ratio there saves little and cuts the local context the model was
    # trained with), or sliding-window layers too (True, set with :meth:`on_sliding_layers`).
    sliding_layers: bool = False

    @abstractmethod
    def select(self, ctx: LayerContext) -> torch.Tensor | None: ...

    def on_sliding_layers(self, include: bool = True) -> "Policy":
        """Also evict from sliding-window layers (``include=True``), inside their window; returns ``self``.

        By default a policy acts on full-attention layers only. Its ratio or budget then applies to each sliding
        layer's window as it does to a full layer's tokens (``ctx.layer_type`` tells the layers apart).
        """
        if not isinstance(include, bool):
            raise ValueError(f"include must be a bool, got {include!r}")
        self.sliding_layers = include
        return self

    def acts_on(self, layer_type: str) -> bool:
        """Whether :meth:`select` is called for a layer of ``layer_type`` (``"full_attention"`` /
        ``"sliding_attention"``)."""
        return layer_type == "full_attention" or (layer_type == "sliding_attention" and self.sliding_layers)

    def acts_at(self, phase: str) -> bool:
        """Whether :meth:`select` can do anything in a forward of this ``phase`` (prefill / extend / decode).
        ``False`` lets the patch skip the policy entirely in that phase (no context built, nothing called): a
        policy that only compresses the prompt then costs nothing per decode step. Default: always acts."""
        return True

    def attach(self, model: Any) -> None:
        """Called once by :func:`kvpress.patch` with the model, before any forward: a policy that needs the model
        (a predictor trained for it) loads and checks what it needs here; the default does nothing."""

    def after_forward(self, fwd: ForwardContext) -> None:
        """Called once the whole model finished a forward (after every layer's :meth:`select`), with a handle
        that can run extra forwards on the cache. Policies that need the whole model (KVzip's context
        reconstruction) evict here; the default does nothing."""

    def max_held(self) -> int | None:
        """The most tokens any head holds under this policy, whatever the stream's length, or ``None`` if
        unbounded (a ratio scales with the prompt). Compositions use it to check that a quantizer can act."""
        return None

    def params(self) -> dict[str, Any]:
        """Parameters that identify this configuration (for reports and result files)."""
        return {}

    def __or__(self, other: Any) -> "Pipeline":
        return Pipeline(self, other)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


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
        self._check_quantizer_acts()
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

    def max_held(self) -> int | None:
        bounds = [b for b in (p.max_held() for p in self.policies) if b is not None]
        return min(bounds) if bounds else None

    def _check_quantizer_acts(self) -> None:
        """Warn when an eviction bound keeps every head within the quantizer's full-precision part (sinks and
        residual window): such a composition holds exactly the bytes of full precision, nothing is quantized."""
        capacity = getattr(self.storage, "full_precision_capacity", None)
        bound = self.max_held()
        if bound is None or not callable(capacity) or bound > capacity():
            return
        spec = self.storage
        warnings.warn(
            f"{' | '.join(repr(p) for p in self.policies)} holds at most {bound} tokens per head, and "
            f"{type(spec).__name__} keeps up to {capacity()} in full precision (n_sink={spec.n_sink} + "
            f"residual={spec.residual} + a flush block - 1): nothing would ever be quantized, so this composition "
            f"saves no bytes over the eviction alone. Give the quantizer a smaller residual (residual <= "
            f"{max(0, bound - spec.n_sink - (capacity() - spec.n_sink - spec.residual) - 1)}) or the policy a larger "
            "window / budget.",
            UserWarning,
            stacklevel=4,
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

    def acts_at(self, phase: str) -> bool:
        return any(p.acts_at(phase) for p in self.policies)

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
