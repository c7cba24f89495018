"""Running one prompt through a (compressed) cache: prefill, then greedy decoding.

Two evaluation modes (see :mod:`kvpress.eval.tasks.base` for the two prompt pieces):

* ``query-agnostic`` (default): the context alone is the first forward, so a prefill policy compresses it
  without seeing the question; the question and the answer then run through the compressed cache.
* ``query-aware``: context and question form the first (compressed) forward.

Fan-out: a :class:`~kvpress.policies.ScorePolicy` that compresses only at prefill scores tokens independently
of its ratio, so :func:`run_fanout` prefills once with a :class:`ScoreRecorder` (which records each layer's
scores and evicts nothing), then for every ratio clones the cache and keeps each layer's top-k, exactly as
the policy's own ``select`` would have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

import kvpress
from kvpress.compat import cache_kwargs
from kvpress.context import LayerContext
from kvpress.policies import Policy, ScorePolicy
from kvpress.policies.base import SIZE_PARAMETERS
from kvpress.policies.global_budget import GlobalScorePolicy

MODES = ("query-agnostic", "query-aware")


@dataclass
class Generation:
    tokens: list[int]
    text: str
    kv_bytes: int  # bytes held right after the compressed (first) forward
    kv_bytes_end: int  # bytes held after the answer was generated
    seconds: float  # wall time of this configuration: its prefill included, except a shared (fan-out) one
    prefill_seconds: float  # time of the first forward (shared by every configuration under fan-out)
    fanout: bool = False
    # bytes held right after the first forward per layer type ("full_attention", "sliding_attention", ...)
    kv_bytes_by_type: dict[str, int] = field(default_factory=dict)


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: EOS of the tokenizer and generation config, and the chat end-of-turn."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if isinstance(tid, int):
            ids.add(tid)
    return ids


@torch.no_grad()
def forward_last(model, ids: Sequence[int], cache) -> torch.Tensor:
    """Run ``ids`` through ``cache``; logits of the last position only."""
    device = model.device
    out = model(
        input_ids=torch.tensor([list(ids)], device=device), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1
    )
    return out.logits[0, -1]


@torch.no_grad()
def greedy_decode(model, cache, logits: torch.Tensor, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy continuation from ``logits`` (the next-token logits) through ``cache``."""
    tokens: list[int] = []
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        if token in stop_ids:
            break
        tokens.append(token)
        if step + 1 < max_new_tokens:
            logits = forward_last(model, [token], cache)
    return tokens


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def first_forward_ids(prefix_ids: Sequence[int], suffix_ids: Sequence[int], mode: str) -> list[int]:
    """The tokens of the first (compressed) forward in ``mode``."""
    _check_mode(mode)
    return list(prefix_ids) + (list(suffix_ids) if mode == "query-aware" else [])


def bytes_by_layer_type(cache) -> dict[str, int]:
    """Bytes ``cache`` holds per layer type (``"full_attention"``, ``"sliding_attention"``, ...)."""
    out: dict[str, int] = {}
    for row in cache.report():
        out[row.layer_type] = out.get(row.layer_type, 0) + row.nbytes
    return out


def _finish(model, tokenizer, cache, logits, suffix_ids, mode, max_new_tokens, stop_ids, kv_bytes, t0, prefill_s, fanout):
    by_type = bytes_by_layer_type(cache)  # still right after the first forward
    if mode == "query-agnostic":
        logits = forward_last(model, suffix_ids, cache)
    tokens = greedy_decode(model, cache, logits, max_new_tokens, stop_ids)
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return Generation(tokens, text, kv_bytes, cache.nbytes(), time.perf_counter() - t0, prefill_s, fanout, by_type)


def run_direct(model, tokenizer, policy: Any, prefix_ids, suffix_ids, mode: str, max_new_tokens: int) -> Generation:
    """Evaluate one prompt under ``kvpress.patch(model, policy)`` (``policy=None``: uncompressed)."""
    stop_ids = stop_token_ids(model, tokenizer)
    first = first_forward_ids(prefix_ids, suffix_ids, mode)
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        t0 = time.perf_counter()
        logits = forward_last(model, first, cache)
        prefill_s = time.perf_counter() - t0
        kv_bytes = cache.nbytes()
        return _finish(model, tokenizer, cache, logits, suffix_ids, mode, max_new_tokens, stop_ids, kv_bytes, t0,
                       prefill_s, False)


# ---------------------------------------------------------------------------------------------------- fan-out
def supports_fanout(policy: Any) -> bool:
    """True for a policy whose prefill decision is a ranking that any ratio can reuse: a :class:`ScorePolicy`
    that evicts only at prefill through :meth:`ScorePolicy.keep_from_scores`, or a :class:`GlobalScorePolicy`
    whose decision is a ratio of its prefill scores."""
    if isinstance(policy, GlobalScorePolicy):
        return policy.fanout_ready
    return (
        isinstance(policy, ScorePolicy)
        and not policy.every_chunk
        and type(policy).select is ScorePolicy.select
        and type(policy).applies_to is ScorePolicy.applies_to
    )


def fanout_key(policy: Any) -> tuple | None:
    """Policies with equal keys score tokens identically (they differ only in ratio or budget)."""
    if not supports_fanout(policy) or getattr(policy, "sliding_layers", False):
        return None  # the recorder scores full-attention layers only: sliding-layer eviction runs directly
    params = {k: v for k, v in policy.params().items() if k not in SIZE_PARAMETERS}
    return (type(policy), tuple(sorted((k, repr(v)) for k, v in params.items())))


class ScoreRecorder(Policy):
    """Wraps a fan-out-capable :class:`ScorePolicy`: at prefill it records the policy's scores per layer and
    keeps everything; in later phases it defers to :attr:`active` (the configuration being continued)."""

    name = "score_recorder"

    def __init__(self, scorer: ScorePolicy):
        if not supports_fanout(scorer) or isinstance(scorer, GlobalScorePolicy):
            raise ValueError(f"{scorer!r} cannot be fanned out by score recording")
        self.scorer = scorer
        self.scores: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # layer -> (scores, valid, layers)
        self.active: Policy | None = None

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        if ctx.phase == "prefill":
            self.scores[ctx.layer_idx] = (self.scorer.score(ctx), ctx.key_valid, ctx.num_layers)
            return None
        return None if self.active is None else self.active.select(ctx)

    def apply(self, cache, policy: ScorePolicy | None) -> None:
        """Evict from ``cache`` what ``policy`` would have evicted at prefill, given the recorded scores."""
        if policy is None:
            return
        for layer_idx, (layer_scores, valid, num_layers) in self.scores.items():
            keep = policy.keep_from_scores(layer_scores, valid, layer_idx, num_layers)
            if keep is not None:
                cache.layers[layer_idx].keep(keep)


class GlobalScoreRecorder(Policy):
    """Wraps a :class:`GlobalScorePolicy` (KVzip, the learned scorer): at prefill it lets the policy score every
    layer (its ``select`` records, KVzip's reconstruction runs) and evicts nothing; :meth:`apply` then evicts
    for any ratio from those scores."""

    name = "global_score_recorder"

    def __init__(self, policy: GlobalScorePolicy):
        self.policy = policy
        self.scores: tuple[dict, dict] | None = None
        self.active: Policy | None = None
        self.reposition = policy.reposition
        self.wants_attention_mass = getattr(policy, "wants_attention_mass", False)
        self.wants_hidden_states = getattr(policy, "wants_hidden_states", False)

    def attach(self, model) -> None:
        self.policy.attach(model)

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        if ctx.phase == "prefill":
            return self.policy.select(ctx)  # records per-layer scores where the policy does so
        return None if self.active is None else self.active.select(ctx)

    def after_forward(self, fwd) -> None:
        if fwd.phase == "prefill":
            self.scores = self.policy.prefill_scores(fwd)
        elif self.active is not None:
            self.active.after_forward(fwd)

    def apply(self, cache, policy: GlobalScorePolicy | None) -> None:
        if policy is not None:
            policy.evict(cache, *self.scores)


def make_recorder(policy: Any) -> ScoreRecorder | GlobalScoreRecorder:
    return GlobalScoreRecorder(policy) if isinstance(policy, GlobalScorePolicy) else ScoreRecorder(policy)


def run_fanout(
    model, tokenizer, policies: Sequence[ScorePolicy | None], prefix_ids, suffix_ids, mode: str, max_new_tokens: int
) -> list[Generation]:
    """Evaluate one prompt under several configurations of one scoring policy (``None`` = uncompressed)
    with a single prefill. The results equal :func:`run_direct` for each policy."""
    scorers = [p for p in policies if p is not None]
    if not scorers:
        raise ValueError("fan-out needs at least one scoring policy")
    keys = {fanout_key(p) for p in scorers}
    if None in keys or len(keys) != 1:
        raise ValueError("fan-out policies must be prefill ScorePolicies (or KVzip) differing only in ratio or budget")
    stop_ids = stop_token_ids(model, tokenizer)
    recorder = make_recorder(scorers[0])
    first = first_forward_ids(prefix_ids, suffix_ids, mode)
    results = []
    with kvpress.patch(model, recorder) as session:
        full = session.new_cache()
        t0 = time.perf_counter()
        logits = forward_last(model, first, full)
        prefill_s = time.perf_counter() - t0
        for i, policy in enumerate(policies):
            t0 = time.perf_counter()
            cache = full if i == len(policies) - 1 else full.clone()  # the last one may consume the original
            recorder.apply(cache, policy)
            if policy is not None:
                policy.attach(model)  # it decodes under the recorder's patch, which attached only the recorder's
            recorder.active = policy
            results.append(
                _finish(model, tokenizer, cache, logits, suffix_ids, mode, max_new_tokens, stop_ids, cache.nbytes(),
                        t0, prefill_s, True)
            )
    return results
