"""DuoAttention (Xiao et al., 2024): retrieval heads keep the whole cache, streaming heads sinks + a recent window.

Which (layer, KV head) is which comes from a pattern of gates identified on the model (:mod:`kvpress.duo`): the
``sparsity`` fraction of heads with the lowest gates (over the layers the policy acts on: on a model with
sliding-window layers, its full-attention layers unless ``sliding_layers=True``) are streaming heads, or the heads
whose gate is below ``threshold``. Applied after every forward (prefill, chunks, each decoding step), so streaming heads
hold at most ``n_sink + window`` tokens however long the generation; retrieval heads keep every token. Heads of one
layer then hold different numbers of tokens: the layer is stored ragged (no padding held).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvpress.context import ForwardContext, LayerContext
from kvpress.policies.base import Policy, RatioSized, check_fraction, check_int, check_ratio
from kvpress.storage import StorageNotReady


class DuoAttention(RatioSized, Policy):
    """Streaming heads keep the first ``n_sink`` real tokens and the last ``window``; retrieval heads keep all.

    Args:
        pattern: ``"auto"`` (the pattern shipped for the patched model, e.g. SmolLM2-135M), a path to a pattern file
            (``kvpress duo identify``), a :class:`~kvpress.duo.DuoPattern`, or a ``[layers, kv_heads]`` gate tensor.
        sparsity: fraction of the heads made streaming (lowest gates first), in [0, 1], among the layers the policy
            acts on (full-attention ones unless ``sliding_layers=True``).
        n_sink / window: what a streaming head keeps (``window >= 1``).
        threshold: instead of ``sparsity``: heads with a gate below it stream.
        compression_ratio: instead of ``sparsity`` (as in NVIDIA kvpress): the sparsity is sized at the first forward
            on each fresh cache (``n`` tokens), so that this forward keeps ``1 - r`` of its tokens: with a
            streaming head's span ``c = (n_sink + window) / n < 1``, ``sparsity = min(1, r / (1 - c))``; when
            ``n <= n_sink + window`` nothing is evicted yet and ``sparsity = r``. :meth:`size_for` fixes it from a
            known length instead.
        retrieval_policy: optional eviction policy applied to the retrieval heads only (e.g. ``SnapKV(0.5)``);
            streaming heads keep sinks + window regardless. Policies that evict in ``after_forward`` (KVzip,
            Learned in ratio mode) are refused.

    Original positions are kept (no repositioning): retrieval heads need them, and a streaming head's window is
    short. Storage: ragged; with a quantizer (``DuoAttention(...) | KVQuant(bits=4)``) each layer holds its
    streaming and its retrieval heads in two quantized storages (:mod:`kvpress.storage.head_split`), so no head is
    padded to the other group's length.
    """

    name = "duo_attention"
    size_parameters = ("compression_ratio", "sparsity", "threshold")
    needs_ragged = True

    def __init__(
        self,
        pattern: Any = "auto",
        sparsity: float | None = None,
        n_sink: int = 16,
        window: int = 128,
        threshold: float | None = None,
        retrieval_policy: Policy | None = None,
        compression_ratio: float | None = None,
    ):
        given = [k for k, v in (("sparsity", sparsity), ("threshold", threshold),
                                ("compression_ratio", compression_ratio)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of sparsity, threshold or compression_ratio, got {' and '.join(given)}")
        self.threshold: float | None = None if threshold is None else check_fraction("threshold", threshold)
        self.compression_ratio: float | None = None if compression_ratio is None else check_ratio(
            "compression_ratio", compression_ratio)
        self.sparsity: float | None = None if sparsity is None else check_fraction("sparsity", sparsity)
        if not given:
            self.sparsity = 0.5
        self._fixed = compression_ratio is None
        self._sized_for: int | None = None
        self.n_sink = check_int("n_sink", n_sink, 0)
        self.window = check_int("window", window, 1)
        if retrieval_policy is not None:
            if not isinstance(retrieval_policy, Policy):
                raise ValueError(f"retrieval_policy must be a kvpress Policy, got {retrieval_policy!r}")
            if type(retrieval_policy).after_forward is not Policy.after_forward:
                raise ValueError(f"{type(retrieval_policy).__name__} evicts after the whole forward (across layers); "
                                 "DuoAttention's retrieval_policy must decide per layer (SnapKV, KeyNorm, H2O, TOVA...)")
            if getattr(retrieval_policy, "reposition", False):
                raise ValueError("retrieval_policy must keep original positions (reposition=False)")
        self.retrieval_policy = retrieval_policy
        self.wants_attention_mass = bool(getattr(retrieval_policy, "wants_attention_mass", False))
        self.pattern_spec = pattern
        self.pattern = None
        if not (isinstance(pattern, str) and pattern == "auto"):
            from kvpress.duo.pattern import as_pattern

            self.pattern = as_pattern(pattern)  # a missing or malformed file fails here, at construction
        self._streaming: torch.Tensor | None = None
        self._eligible: torch.Tensor | None = None  # [layers] bool: the layers this policy acts on (set at attach)
        self._apply_pattern()

    def _apply_pattern(self) -> None:
        if self.pattern is not None and (self.sparsity is not None or self.threshold is not None):
            self._streaming = self.pattern.streaming(sparsity=self.sparsity, threshold=self.threshold,
                                                     eligible=self._eligible)

    def _size(self, n_tokens: int) -> None:
        if n_tokens == self._sized_for:
            return
        span = (self.n_sink + self.window) / check_int("n_tokens", n_tokens, 1)
        r = self.compression_ratio
        self.sparsity = r if span >= 1.0 else min(1.0, r / (1.0 - span))
        self._sized_for = n_tokens
        self._apply_pattern()

    # -- setup -----------------------------------------------------------------------------------------------
    def attach(self, model: Any) -> None:
        from kvpress.duo.pattern import embedded_pattern, layer_types, load_pattern

        if self.pattern is None:
            self.pattern = load_pattern(embedded_pattern(model))
        self.pattern.check(model)
        # Heads are ranked among the layers acted on: full-attention ones unless told sliding_layers=True (a
        # sliding layer's ring is bounded already, so "sparsity" means the share of the growing layers' heads).
        self._eligible = torch.tensor([self.acts_on(kind) for kind in layer_types(model)])
        self._apply_pattern()
        if self.retrieval_policy is not None:
            self.retrieval_policy.attach(model)

    @property
    def streaming_heads(self) -> torch.Tensor:
        """``[layers, kv_heads]`` bool, True for streaming heads (known once a pattern is loaded)."""
        if self._streaming is None:
            if self.pattern is not None:  # the cache builds its layers' storage once kvpress.patch has sized us
                raise StorageNotReady("DuoAttention(compression_ratio=...) knows its streaming heads after its first "
                                      "forward (or size_for(n_tokens))")
            raise RuntimeError("DuoAttention(pattern='auto') has no pattern yet: kvpress.patch attaches it to the model")
        return self._streaming

    # -- policy ----------------------------------------------------------------------------------------------
    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        self.size_at(ctx, self.sparsity is None and self.threshold is None)
        streaming = self.streaming_heads
        if ctx.layer_idx >= streaming.shape[0] or ctx.num_kv_heads != streaming.shape[1]:
            raise ValueError(f"the DuoAttention pattern is {tuple(streaming.shape)} (layers, KV heads); layer "
                             f"{ctx.layer_idx} has {ctx.num_kv_heads} KV heads")
        inner = self.retrieval_policy.select(ctx) if self.retrieval_policy is not None else None
        heads = streaming[ctx.layer_idx].to(ctx.positions.device)
        if not bool(heads.any()) and inner is None:
            return None
        valid = ctx.key_valid
        rank_among_valid = valid.long().cumsum(dim=-1) - 1
        sinks_and_window = valid & ((rank_among_valid < self.n_sink) | (ctx.positions >= ctx.seq_len - self.window))
        retrieval = torch.ones_like(valid) if inner is None else inner
        keep = torch.where(heads.view(1, -1, 1), sinks_and_window, retrieval)
        if ctx.held is not None:
            keep = keep & ctx.held
            if torch.equal(keep, ctx.held):
                return None
        elif bool(keep.all()):
            return None
        return keep

    def after_forward(self, fwd: ForwardContext) -> None:
        return None

    def split_storage(self, spec: Any) -> Any:
        """``spec`` (e.g. a :class:`~kvpress.quant.KVQuant`) wrapped so that each layer holds its streaming heads
        and its retrieval heads in two storages of that kind: heads are never padded to the other group's length.
        Called by the pipeline for ``DuoAttention(...) | KVQuant(...)``."""
        from kvpress.storage.dense import DenseSpec
        from kvpress.storage.head_split import HeadSplitSpec
        from kvpress.storage.sink_window import SinkWindowSpec

        if isinstance(spec, HeadSplitSpec):  # already split (a pipeline re-built from another's stages)
            return spec

        def groups_of(layer_idx: int) -> list[torch.Tensor]:
            heads = self.streaming_heads[layer_idx]
            return [heads.nonzero().flatten(), (~heads).nonzero().flatten()]

        # Streaming heads keep their sinks and window themselves between forwards, so decode steps need no policy
        # call (acts_at); retrieval heads only grow: dense ones get room past their tokens, no copy per step.
        streaming = SinkWindowSpec(spec, self.n_sink, self.window)
        retrieval = DenseSpec(growable=True) if isinstance(spec, DenseSpec) else spec
        return HeadSplitSpec(spec, groups_of, [streaming, retrieval])

    def acts_at(self, phase: str) -> bool:
        """Not at decode steps, unless the retrieval heads' policy acts there: between forwards the streaming heads'
        storage (:class:`~kvpress.storage.sink_window.SinkWindowStorage`, from :meth:`split_storage`) applies the
        sinks-and-window rule itself."""
        if phase != "decode":
            return True
        return self.retrieval_policy is not None and self.retrieval_policy.acts_at("decode")

    # -- reporting -------------------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        spec = self.pattern_spec
        pattern = str(spec) if isinstance(spec, (str, Path)) else "custom"
        out: dict[str, Any] = {"pattern": pattern}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        else:
            out["sparsity"] = self.sparsity
        if self.compression_ratio is not None:
            out["compression_ratio"] = self.compression_ratio
        out.update(n_sink=self.n_sink, window=self.window)
        if self.retrieval_policy is not None:
            out["retrieval_policy"] = repr(self.retrieval_policy)
        return out
