"""KVzip (Kim et al., 2025): query-agnostic scores from how much each cached entry helps the model repeat its context.

After the prefill forward, the model reads a "Repeat the previous context exactly." prompt followed by the context
itself (teacher-forced, ``chunk_size`` tokens at a time), attending to the cached context. Each cached entry's
importance is the largest attention it receives from those reconstruction queries (max over the query heads
sharing its KV head and over the queries). The reconstruction forwards leave no trace (their tokens are
truncated from the cache, sliding-window layers restored), then the lowest-scoring entries are evicted.

Differences from the paper's code: the scores are the attention the reconstruction queries actually pay (the
softmax over everything they see), taken from the attention computation of the reconstruction forward itself
(:mod:`kvpress.attention_mass`), so scoring adds no second pass over the logits; the paper recomputes them over
the sinks, the chunk and the repeat only. With one chunk (contexts up to ``chunk_size``) the two coincide.
"""


from __future__ import annotations

from typing import Any, Literal

import torch

from kvpress.context import ForwardContext, LayerContext
from kvpress.policies.base import Policy, check_int, check_ratio, keep_count, keep_topk

BudgetScope = Literal["global", "layer", "head"]
_SCOPES = ("global", "layer", "head")
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
_SENTINEL = "\x00KVZIP\x00"


class KVzip(Policy):
    """Evict the cached context entries the model needs least to reconstruct it (see the module docstring).

    Args:
        compression_ratio: fraction of the context's real tokens removed, in [0, 1); or
        budget: tokens kept per head on average.
        scope: how the kept entries are shared out: ``"global"`` (the paper's default: the best entries over
            all layers and heads of a row, so heads and layers keep different amounts, stored ragged),
            ``"layer"`` (each layer keeps its share, its heads compete, as AdaKV) or ``"head"`` (every head keeps
            the same number).
        n_sink: the first real tokens of each row, always kept (attention sinks, the system prompt's start).
        chunk_size: context tokens reconstructed per extra forward (bounds its memory).
        tokenizer: the model's tokenizer; by default loaded from the model's own local files.

    Extra compute: one more forward over the context plus the prompt, attending to the context and itself (about
    one more prefill; measured in ``benchmarks/policy_overhead.py``). Only the first forward on a fresh cache
    (the prefill) is compressed.
    """

    name = "kvzip"

    def __init__(
        self,
        compression_ratio: float | None = None,
        budget: int | None = None,
        scope: BudgetScope = "global",
        n_sink: int = 4,
        chunk_size: int = 2048,
        tokenizer: Any = None,
    ):
        if compression_ratio is not None and budget is not None:
            raise ValueError("give either compression_ratio or budget, not both")
        if compression_ratio is None and budget is None:
            compression_ratio = 0.5
        self.compression_ratio = None if compression_ratio is None else check_ratio("compression_ratio", compression_ratio)
        self.budget = None if budget is None else check_int("budget", budget, 1)
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        self.scope = scope
        self.n_sink = check_int("n_sink", n_sink, 0)
        self.chunk_size = check_int("chunk_size", chunk_size, 8)
        self.tokenizer = tokenizer
        self._prompts: tuple[list[int], list[int], list[int]] | None = None

    # -- the policy ------------------------------------------------------------------------------------------
    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        return None  # evicts in after_forward, once every layer's scores are known

    def after_forward(self, fwd: ForwardContext) -> None:
        if fwd.phase != "prefill":
            return
        scores, valid = self.reconstruction_scores(fwd)
        for layer_idx, keep in self.keep_masks(scores, valid).items():
            fwd.cache.layers[layer_idx].keep_positions(keep)

    # -- scoring ---------------------------------------------------------------------------------------------
    def reconstruction_scores(self, fwd: ForwardContext) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Per compressed layer, over the context's absolute positions ``0..n_ctx-1``: scores
        ``[batch, kv_heads, n_ctx]`` and which positions each head holds as a real token, from chunked context
        reconstruction. The cache is left as it was."""
        if fwd.input_ids is None:
            raise ValueError("KVzip needs the prefill's input_ids (it was called with inputs_embeds)")
        cache = fwd.cache
        ids = fwd.input_ids
        batch, n_ctx = ids.shape
        device = ids.device
        real = fwd.attention_mask.bool() if fwd.attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        real = real[:, -n_ctx:]
        first, following, postfix = self._prompt_ids(fwd)
        scores: dict[int, torch.Tensor] = {}
        valid: dict[int, torch.Tensor] = {}
        saved = cache.save_uncompressed_layers()
        for start in range(0, n_ctx, self.chunk_size):
            end = min(start + self.chunk_size, n_ctx)
            lead = first if start == 0 else following + ids[0, max(0, start - 8):start].tolist()
            # every row repeats its own chunk; padding in the chunk stays padding in the repeat
            head = torch.tensor(lead + postfix, device=device).expand(batch, -1)
            new_ids = torch.cat([head, ids[:, start:end]], dim=1)
            new_real = torch.cat([torch.ones_like(head, dtype=torch.bool), real[:, start:end]], dim=1)
            mask = torch.cat([real, new_real], dim=1).long()
            positions = real.sum(-1, keepdim=True) + new_real.long().cumsum(-1) - 1
            observer = _ChunkObserver(scores, valid, real)
            padded = not bool(mask.all())  # without padding, plain causal attention (no mask to build or apply)
            try:
                fwd.run(new_ids, attention_mask=mask if padded else None,
                        position_ids=positions.clamp(min=0) if padded else None, observer=observer, mass="max")
            finally:
                cache.truncate(n_ctx, saved)
        return scores, valid

    def _prompt_ids(self, fwd: ForwardContext) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the first-chunk prompt, the later-chunks prompt and the end-of-turn + assistant header."""
        if self._prompts is None:
            tok = self.tokenizer if self.tokenizer is not None else fwd.tokenizer()
            postfix = "\n"
            if getattr(tok, "chat_template", None):
                text = tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                                               tokenize=False)
                postfix = text.split(_SENTINEL, 1)[1]
            encode = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
            self._prompts = (encode(FIRST_PROMPT), encode(NEXT_PROMPT), encode(postfix))
        return self._prompts

    # -- eviction --------------------------------------------------------------------------------------------
    def keep_masks(self, scores: dict[int, torch.Tensor], valid: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Keep masks ``[batch, kv_heads, seq]`` per layer over the context slots (the first ``n_ctx`` of each
        layer's view), or none for a layer that keeps everything. Separate from scoring so one scoring pass can
        serve several ratios."""
        if not scores:
            return {}
        layers = sorted(scores)
        stacked = torch.stack([scores[i].float() for i in layers])  # [layers, batch, heads, n_ctx]
        ok = torch.stack([valid[i] for i in layers])
        sinks = ok & (ok.long().cumsum(-1) <= self.n_sink)
        stacked = stacked.masked_fill(~ok, float("-inf")).masked_fill(sinks, float("inf"))
        n_real = ok.sum(-1)  # [layers, batch, heads]
        per_head = keep_count(n_real, self.compression_ratio, self.budget).maximum(sinks.sum(-1)).minimum(n_real)
        if bool((per_head == n_real).all()):
            return {}
        n_layers, batch, heads, seq = stacked.shape
        if self.scope == "head":
            keep = keep_topk(stacked, per_head)
        elif self.scope == "layer":
            pooled = stacked.reshape(n_layers, batch, 1, heads * seq)
            keep = keep_topk(pooled, per_head.sum(-1, keepdim=True)).reshape(stacked.shape)
        else:
            pooled = stacked.permute(1, 0, 2, 3).reshape(batch, 1, n_layers * heads * seq)
            total = per_head.sum(dim=(0, 2)).view(batch, 1)
            keep = keep_topk(pooled, total).reshape(batch, n_layers, heads, seq).permute(1, 0, 2, 3)
        keep = keep & ok
        return {layer: keep[i] for i, layer in enumerate(layers)}

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"budget": self.budget} if self.budget is not None else {
            "compression_ratio": self.compression_ratio}
        return {**out, "scope": self.scope, "n_sink": self.n_sink, "chunk_size": self.chunk_size}


class _ChunkObserver:
    """Per layer, during one reconstruction forward: the most attention each context position received.

    ``ctx.attention_mass`` is the max over the forward's queries and the query heads of each KV head, computed
    with the attention output itself (:mod:`kvpress.attention_mass`). Scores are kept over absolute positions,
    so a layer whose slots were already thinned (``StreamingLLM | KVzip``, a ragged view) is scored correctly."""

    def __init__(self, scores: dict, valid: dict, real: torch.Tensor):
        self.scores, self.valid, self.real = scores, valid, real  # real: [batch, n_ctx] context padding mask

    def __call__(self, ctx: LayerContext) -> None:
        batch, n_ctx = self.real.shape
        pos = ctx.positions.long()
        in_ctx = pos < n_ctx
        if ctx.held is not None:
            in_ctx = in_ctx & ctx.held
        at = pos.clamp(max=n_ctx - 1)
        real_slot = in_ctx & self.real.unsqueeze(1).expand(-1, ctx.num_kv_heads, -1).gather(-1, at)
        if ctx.layer_idx not in self.scores:
            self.scores[ctx.layer_idx] = torch.zeros(batch, ctx.num_kv_heads, n_ctx, device=pos.device)
            held = torch.zeros(batch, ctx.num_kv_heads, n_ctx, dtype=torch.uint8, device=pos.device)
            self.valid[ctx.layer_idx] = held.scatter_reduce(-1, at, real_slot.to(torch.uint8), reduce="amax").bool()
        slot_best = ctx.attention_mass.masked_fill(~real_slot, 0.0)
        self.scores[ctx.layer_idx].scatter_reduce_(-1, at, slot_best, reduce="amax")
