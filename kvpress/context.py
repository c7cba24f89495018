"""What a policy sees when it decides which tokens a layer keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator, Literal

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
        key_data / value_data: the cached keys / values attention just read (this forward's included),
            ``[batch, kv_heads, seq, head_dim]``, or a zero-argument function building them: read them as
            :attr:`keys` / :attr:`values`, built on first access only (a quantized layer is then dequantized), so a
            policy that never reads them (StreamingLLM, H2O with its attention mass) costs no dequantization.
        positions: ``[batch, kv_heads, seq]`` int64 absolute position of every cached slot.
        allowed_fn: ``allowed_fn(n)`` builds ``[batch, kv_heads, n, seq]`` bool for the last ``n`` queries:
            which cached slot each may attend to (causality, padding, ragged slots), or ``None`` when they
            attend to every slot. Built only when a policy asks.
        scaling: softmax scale of the attention logits.
        seq_len: number of tokens seen so far, this forward included.
        state: a dict kept per cache layer across steps, for policies with memory (e.g. accumulated scores).
        allowed_rows_fn: ``allowed_rows_fn(start, stop)`` is ``allowed_fn`` for the queries ``start..stop-1`` of
            this forward (``[batch, kv_heads, stop - start, seq]`` bool or ``None``), so that long prefills can be
            scored in query chunks without building a ``[q, seq]`` mask. Derived from ``allowed_fn`` if not given.
        model_state: a dict shared by every layer of one cache (e.g. a policy's view of the whole model).
        held: ``[batch, kv_heads, seq]`` bool, ``False`` at filler slots of a ragged view (not tokens at all), or
            ``None`` when every slot holds a token. Unlike :attr:`key_valid` it ignores padding and causality.
        attention_mass: ``[batch, kv_heads, seq]`` float32, the attention each slot received from this forward's
            queries (summed over queries and the query heads of its KV head), when the policy declared
            ``wants_attention_mass`` (computed with the attention output, nearly free); else ``None``.
        hidden_states: ``[batch, q_len, hidden]`` the attention module's input for this forward's tokens, when the
            policy declared ``wants_hidden_states``; else ``None``.
        layer_type: ``"full_attention"``, or ``"sliding_attention"`` for a sliding-window layer (reached only by
            policies with ``sliding_layers=True``; its view holds at most ``window - 1`` earlier tokens).
    """

    layer_idx: int
    num_layers: int
    phase: Phase
    queries: torch.Tensor
    key_data: torch.Tensor | Callable[[], torch.Tensor]
    value_data: torch.Tensor | Callable[[], torch.Tensor]
    positions: torch.Tensor
    allowed_fn: Callable[[int], torch.Tensor | None]
    scaling: float
    seq_len: int
    state: dict[str, Any] = field(default_factory=dict)
    allowed_rows_fn: Callable[[int, int], torch.Tensor | None] | None = None
    model_state: dict[str, Any] = field(default_factory=dict)
    held: torch.Tensor | None = None
    attention_mass: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    layer_type: str = "full_attention"

    @property
    def keys(self) -> torch.Tensor:
        """``[batch, kv_heads, seq, head_dim]`` cached keys (built on first access)."""
        if callable(self.key_data):
            self.key_data = self.key_data()
        return self.key_data

    @property
    def values(self) -> torch.Tensor:
        """``[batch, kv_heads, seq, head_dim]`` cached values (built on first access)."""
        if callable(self.value_data):
            self.value_data = self.value_data()
        return self.value_data

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.positions.shape[1]

    @property
    def num_cached(self) -> int:
        """Slots per head in the attention view (max over heads for ragged storage)."""
        return self.positions.shape[2]

    @property
    def gqa_groups(self) -> int:
        return self.queries.shape[1] // self.num_kv_heads

    @property
    def q_len(self) -> int:
        """Queries in this forward."""
        return self.queries.shape[2]

    def allowed_rows(self, start: int, stop: int) -> torch.Tensor | None:
        """``[batch, kv_heads, stop - start, seq]`` bool: the slots queries ``start..stop-1`` may attend to."""
        if self.allowed_rows_fn is not None:
            return self.allowed_rows_fn(start, stop)
        allowed = self.allowed_fn(self.q_len)
        return None if allowed is None else allowed[:, :, start:stop]

    @cached_property
    def real_tokens(self) -> torch.Tensor:
        """``[batch, kv_heads]`` int64: slots holding a real token (padding and ragged filler excluded)."""
        return self.key_valid.sum(-1)

    @cached_property
    def key_valid(self) -> torch.Tensor:
        """``[batch, kv_heads, seq]`` bool: slots holding a real token the latest query may attend to."""
        allowed = self.allowed_fn(1)
        if allowed is None:
            return torch.ones(self.positions.shape, dtype=torch.bool, device=self.positions.device)
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

    def iter_attention_probs(self, chunk: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
        """Softmax attention of every query of this forward, ``chunk`` queries at a time, in float32.

        Yields ``(start, probs)`` with ``probs`` ``[batch, kv_heads, groups, n, width]`` for queries
        ``start..start+n-1`` over the first ``width`` slots; the slots past ``width`` get no attention from
        these queries (causally in their future) and are left out. Peak memory is ``O(chunk * seq)``, never the
        ``[q, seq]`` matrix.
        """
        keys = self.keys.float()
        for start in range(0, self.q_len, chunk):
            stop = min(start + chunk, self.q_len)
            q = rearrange(self.queries[:, :, start:stop].float(), "b (h g) n d -> b h g n d", h=self.num_kv_heads)
            allowed = self.allowed_rows(start, stop)
            width = keys.shape[2]
            if allowed is not None:  # trim columns no query of the chunk may see (the causal future)
                seen = allowed.any(dim=2).any(dim=(0, 1)).nonzero()
                width = int(seen.max()) + 1 if seen.numel() else 0
                allowed = allowed[..., :width]
            logits = torch.einsum("bhgnd,bhsd->bhgns", q, keys[:, :, :width]).mul_(self.scaling)
            if allowed is not None:
                logits.masked_fill_(~allowed.unsqueeze(2), float("-inf"))
                if not bool(allowed.any(-1).all()):  # a query with no allowed slot (padding) gets no attention
                    logits.masked_fill_(~allowed.any(-1, keepdim=True).unsqueeze(2), 0.0)
                    yield start, torch.softmax(logits, dim=-1).mul_(allowed.unsqueeze(2))
                    continue
            yield start, torch.softmax(logits, dim=-1)

    # -- per-slot memory of a policy, kept aligned with the held slots whatever was evicted ------------------
    def remember(self, name: str, values: torch.Tensor) -> None:
        """Store ``values`` ``[batch, kv_heads, seq]`` (one per slot of this view) under ``name`` in ``state``."""
        self.state[name] = (self.positions.to(torch.int32), values, self.key_valid.clone())

    def recall(self, name: str, fill: float = 0.0) -> torch.Tensor:
        """The values last :meth:`remember`-ed under ``name``, aligned to this view's slots by absolute position.

        Slots evicted since are gone; slots new since (this forward's tokens) get ``fill``. Works whatever evicted
        them (another stage of a pipeline, a storage switching from dense to ragged or quantized layouts).

        Returns:
            ``[batch, kv_heads, seq]`` float.
        """
        positions = self.positions
        stored = self.state.get(name)
        if stored is None:
            return torch.full(positions.shape, fill, dtype=torch.float32, device=positions.device)
        old_pos, old_values, old_valid = stored
        n_old, n_now = old_pos.shape[-1], positions.shape[-1]
        if (old_pos.shape[:-1] == positions.shape[:-1] and n_old <= n_now
                and torch.equal(old_pos, positions[..., :n_old].to(old_pos.dtype))):
            # Remembered over these very slots (earlier in this forward, or before this step's tokens were
            # appended and nothing was evicted): aligned as they are, new slots filled.
            values = torch.full(positions.shape, fill, dtype=torch.float32, device=positions.device)
            values[..., :n_old] = old_values.float().masked_fill(~old_valid, fill)
            return values.masked_fill(~self.key_valid, fill)
        old_pos = old_pos.long().masked_fill(~old_valid, torch.iinfo(torch.int64).max)  # filler sorts last
        if bool((old_pos[..., 1:] >= old_pos[..., :-1]).all()):
            # Storages hold tokens in increasing position order, so this is the rule: no sort needed.
            old_sorted, order = old_pos, None
        else:
            order = old_pos.argsort(dim=-1, stable=True)
            old_sorted = old_pos.gather(-1, order)
        idx = torch.searchsorted(old_sorted.contiguous(), positions.long().contiguous()).clamp_max(old_pos.shape[-1] - 1)
        found = old_sorted.gather(-1, idx) == positions.long()
        values = old_values.gather(-1, idx if order is None else order.gather(-1, idx))
        return torch.where(found & self.key_valid, values.float(), torch.full_like(values.float(), fill))


@dataclass
class ForwardContext:
    """One whole-model forward, after every layer ran (see :meth:`kvpress.policies.Policy.after_forward`).

    Attributes:
        cache: the :class:`~kvpress.cache.KVPressCache` the forward ran on.
        phase: ``"prefill"`` when the cache was empty before this forward, else ``"decode"`` / ``"extend"``.
        input_ids: ``[batch, new]`` token ids of this forward, or ``None`` (``inputs_embeds`` were passed).
        attention_mask: ``[batch, seen]`` 2-D padding mask over every token seen, or ``None`` (no padding).
        num_layers: decoder layers of the model.
        run: ``run(input_ids, attention_mask=None, position_ids=None, observer=None, mass=None)`` runs the
            decoder on ``cache`` (no LM head); while it runs, each compressed layer calls ``observer(ctx)`` with
            its :class:`LayerContext` instead of the policy, with ``ctx.attention_mass`` reduced by ``mass``
            (``"sum"`` or ``"max"``) when given. What it appends stays in the cache: undo it with
            :meth:`~kvpress.cache.KVPressCache.truncate`.
        tokenizer: ``tokenizer()`` is the model's tokenizer, loaded from its local files on first use.
    """

    cache: Any
    phase: Phase
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    num_layers: int
    run: Callable[..., Any]
    tokenizer: Callable[[], Any]

