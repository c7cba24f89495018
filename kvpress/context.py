"""What a policy sees when it decides which tokens a layer keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Literal

import torch
from einops import rearrange

Phase = Literal["prefill", "extend", "decode"]


@dataclass
class LayerContext:
    """One layer, one forward pass, right after attention ran on the cached tokens.

    Attributes:
        layer_idx: index of the decoder layer.
        num_layers: number of decoder layers of the model.
        phase: ``"prefill"`` for the first forward on a fresh cache, ``"decode"`` for a one-token step,
            ``"extend"`` for a later multi-token forward (a question appended to a compressed context, a chunk).
        queries: ``[batch, q_heads, q_len, head_dim]`` post-RoPE queries of this forward.
        keys: ``[batch, kv_heads, seq, head_dim]`` cached keys attention just read (this forward's included).
        values: ``[batch, kv_heads, seq, head_dim]``.
        positions: ``[batch, kv_heads, seq]`` int64 absolute position of every cached slot.
        allowed_fn: ``allowed_fn(n)`` builds ``[batch, kv_heads, n, seq]`` bool for the last ``n`` queries:
            which cached slot each may attend to (causality, padding, ragged slots), or ``None`` when they
            attend to every slot. Built only when a policy asks.
        scaling: softmax scale of the attention logits.
        seq_len: number of tokens seen so far, this forward included.
        state: a dict kept per cache layer across steps, for policies with memory (e.g. accumulated scores).
    """

    layer_idx: int
    num_layers: int
    phase: Phase
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    allowed_fn: Callable[[int], torch.Tensor | None]
    scaling: float
    seq_len: int
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def num_cached(self) -> int:
        """Slots per head in the attention view (max over heads for ragged storage)."""
        return self.keys.shape[2]

    @property
    def gqa_groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    @cached_property
    def key_valid(self) -> torch.Tensor:
        """``[batch, kv_heads, seq]`` bool: slots holding a real token the latest query may attend to."""
        allowed = self.allowed_fn(1)
        if allowed is None:
            return torch.ones(self.keys.shape[:3], dtype=torch.bool, device=self.keys.device)
        return allowed[:, :, -1, :]

    def attention_probs(self, last_n: int | None = None) -> torch.Tensor:
        """Softmax attention of the last ``last_n`` queries over the cached slots, in float32.

        Returns:
            ``[batch, kv_heads, groups, n, seq]``: the query heads sharing each KV head are kept apart on the
            ``groups`` axis so GQA-aware policies can pool over it.
        """
        q = self.queries if last_n is None else self.queries[:, :, -last_n:, :]
        n = q.shape[2]
        q = rearrange(q.float(), "b (h g) n d -> b h g n d", h=self.num_kv_heads)
        logits = torch.einsum("bhgnd,bhsd->bhgns", q, self.keys.float()) * self.scaling
        allowed = self.allowed_fn(n)
        if allowed is not None:
            logits = logits.masked_fill(~allowed.unsqueeze(2), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.nan_to_num(probs, nan=0.0)  # rows with no allowed slot (padding queries)
