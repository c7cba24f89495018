"""Ragged storage: each (batch row, KV head) holds its own number of tokens, with no padding held.

Layout (the varlen layout of AdaKV and flash-attention's varlen kernels): all tokens of all heads are
concatenated head after head in row-major ``(batch, kv_head)`` order, each head's tokens in increasing position,
followed by a dense *tail* of the tokens appended since the layout was last rebuilt (decode appends the same
tokens to every head, so they need no per-head offsets):

    keys      [total_tokens, head_dim]
    values    [total_tokens, head_dim]
    positions [total_tokens]            int32
    lengths   [batch, kv_heads]         int64, tokens held per head in the flat part
    tail_k, tail_v [batch, kv_heads, n_tail, head_dim], tail_positions [n_tail] int32 (after every head's segment)

Why the tail: rebuilding the flat layout moves every held token, so appending one decode token to it cost a
copy of the whole layer per step. The tail takes new tokens at the cost of copying only itself, and is folded
into the flat part when it reaches :data:`TAIL_TOKENS` tokens or before an eviction (amortised: one rebuild per
``TAIL_TOKENS`` steps). Nothing is held twice and no slack is allocated, so bytes stay exact.

Why evicted tokens may stay a while: a policy that evicts a token or two at every decode step (the learned scorer's
threshold mode, H2O) would rebuild the layout at every step. A select that drops few tokens
(:func:`~kvpress.storage.base.defers_eviction`) only marks them in ``masked``
``[batch, kv_heads, slots]`` (over the padded view's slots, which appends and folds never renumber); attention and
policies never see them, ``lengths()`` does not count them, ``nbytes()`` does until the select that passes the
limit drops every masked token in one rebuild.

Attention gets a :class:`~kvpress.storage.LazyAttentionView`: decode steps read the flat layout and the tail
directly (:func:`kvpress.kernels.ragged_decode`: a fused Triton varlen kernel on CUDA, a fused C++ kernel on CPU;
no padding read), and the padded ``[batch, kv_heads, max_len, head_dim]`` tensors plus a validity mask are built
only when something reads ``keys``/``values`` (a policy, a prefill or extend forward). The padding exists only
during that step and is never held by the cache.
"""

from __future__ import annotations

import copy

import torch

from kvpress import kernels
from typing import Any

from kvpress.memory import os_backed_empty
from kvpress.storage.base import AttentionView, KVStorage, LazyAttentionView, StorageState, defers_eviction
from kvpress.storage.dense import POSITION_DTYPE, DenseStorage

# Tokens the dense tail holds before it is folded into the flat layout.
TAIL_TOKENS = 64


def _take_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``source[index]`` along the first (token) axis, in memory freed whole when dropped (a layer rebuilt at
    a new size at every eviction would otherwise leave the heap fragmented: :mod:`kvpress.memory`)."""
    if source.requires_grad and torch.is_grad_enabled():  # out= does not differentiate
        return source.index_select(0, index)
    out = os_backed_empty((index.numel(), *source.shape[1:]), source.dtype, source.device)
    return torch.index_select(source, 0, index, out=out)


class RaggedStorage(KVStorage):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor):
        self.keys = keys
        self.values = values
        self.positions = positions
        self.lengths_ = lengths
        self.tail_k: torch.Tensor | None = None
        self.tail_v: torch.Tensor | None = None
        self.tail_positions: torch.Tensor | None = None
        self.masked: torch.Tensor | None = None  # [batch, kv_heads, <= slots] bool: evicted, still held
        self.masked_slots = 0  # masked tokens in the head masking most

    @classmethod
    def from_padded(
        cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor
    ) -> "RaggedStorage":
        """Build from padded ``[batch, kv_heads, seq, head_dim]`` tensors, keeping slots where ``keep`` is True."""
        # Boolean indexing walks (batch, head, seq) in row-major order: exactly the flat layout.
        return cls(
            keys[keep].contiguous(),
            values[keep].contiguous(),
            positions[keep].to(POSITION_DTYPE).contiguous(),
            keep.sum(dim=-1).to(torch.long),
        )

    @property
    def n_tail(self) -> int:
        return 0 if self.tail_k is None else self.tail_k.shape[2]

    def lengths(self) -> torch.Tensor:
        held = self.lengths_ + self.n_tail
        return held if self.masked is None else held - self.masked.sum(-1)

    def tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.tail_k, self.tail_v, self.tail_positions, self.masked) if t is not None]
        return [self.keys, self.values, self.positions, self.lengths_, *extra]

    def _slot_valid(self) -> torch.Tensor:
        """``[batch, kv_heads, max_len]``: the slots holding a token (masked ones included)."""
        lengths = self.lengths_ + self.n_tail
        max_len = int(lengths.max()) if lengths.numel() else 0
        slots = torch.arange(max_len, device=lengths.device)
        return slots < lengths.unsqueeze(-1)

    def _masked_slots(self, max_len: int) -> torch.Tensor | None:
        """``masked`` over ``max_len`` slots (slots appended since it was set are not masked)."""
        if self.masked is None:
            return None
        return torch.nn.functional.pad(self.masked, (0, max_len - self.masked.shape[-1]))

    def _tail_slots(self) -> torch.Tensor:
        """``[batch, kv_heads, n_tail]`` slot of each tail token in the padded view (right after its head's flat
        segment)."""
        return self.lengths_.unsqueeze(-1) + torch.arange(self.n_tail, device=self.lengths_.device)

    def view(self) -> AttentionView:
        held = self._slot_valid()
        batch, heads, max_len = held.shape
        masked = self._masked_slots(max_len)
        valid = held if masked is None else held & ~masked
        n_tail = self.n_tail
        flat_valid = held if not n_tail else torch.arange(max_len, device=held.device) < self.lengths_.unsqueeze(-1)
        positions = torch.zeros(batch, heads, max_len, dtype=torch.long, device=self.keys.device)
        positions[flat_valid] = self.positions.long()
        tail_slots = self._tail_slots() if n_tail else None
        if n_tail:
            positions.scatter_(2, tail_slots, self.tail_positions.long().expand(batch, heads, n_tail))
        keys, values, lengths = self.keys, self.values, self.lengths_
        tail_k, tail_v = self.tail_k, self.tail_v

        def materialise() -> tuple[torch.Tensor, torch.Tensor]:
            dim = keys.shape[-1]
            padded_k = keys.new_zeros(batch, heads, max_len, dim)
            padded_v = values.new_zeros(batch, heads, max_len, dim)
            padded_k[flat_valid] = keys
            padded_v[flat_valid] = values
            if n_tail:
                index = tail_slots.unsqueeze(-1).expand(batch, heads, n_tail, dim)
                padded_k.scatter_(2, index, tail_k)
                padded_v.scatter_(2, index, tail_v)
            return padded_k, padded_v

        def decode(query: torch.Tensor, allowed: torch.Tensor | None, scaling: float) -> torch.Tensor:
            b, q_heads, q_len, d = query.shape
            groups = q_heads // heads
            q = (query.float() * scaling).reshape(b, heads, groups * q_len, d)
            mask = tail_mask = None
            if allowed is not None:
                mask = allowed.transpose(-1, -2)[flat_valid]  # [flat tokens, q_len]
                if n_tail:
                    tail_mask = allowed.gather(3, tail_slots.unsqueeze(2).expand(b, heads, q_len, n_tail))
            tail = (tail_k, tail_v, tail_mask) if n_tail else None
            part = kernels.ragged_decode(q, keys, values, lengths, mask, max_length=max_len, tail=tail)
            out = part.out.view(b, heads, groups, q_len, d).reshape(b, q_heads, q_len, d)
            return out.transpose(1, 2).to(query.dtype)

        return LazyAttentionView(
            shape=(batch, heads, max_len, self.keys.shape[-1]),
            device=self.keys.device,
            materialise=materialise,
            decode=decode,
            positions=positions,
            valid=valid,
            decode_masks_padding=masked is None,  # masked tokens are masked by attention's mask
        )

    def append(self, keys: torch.Tensor, values: torch.Tensor, start_position: int) -> None:
        new = keys.shape[2]
        pos = torch.arange(start_position, start_position + new, device=keys.device, dtype=POSITION_DTYPE)
        if self.tail_k is None:
            self.tail_k, self.tail_v, self.tail_positions = keys.clone(), values.clone(), pos
        else:
            self.tail_k = torch.cat([self.tail_k, keys], dim=2)
            self.tail_v = torch.cat([self.tail_v, values], dim=2)
            self.tail_positions = torch.cat([self.tail_positions, pos])
        if self.n_tail >= TAIL_TOKENS:
            self.fold_tail()

    def fold_tail(self) -> None:
        """Move the tail into the flat layout (every held token moves once; positions and order unchanged)."""
        if self.tail_k is None:
            return
        batch, heads, new, dim = self.tail_k.shape
        old_lengths = self.lengths_.flatten()
        n_segments = old_lengths.numel()
        new_lengths = old_lengths + new
        new_starts = torch.cumsum(new_lengths, 0) - new_lengths
        device = self.keys.device
        # Every token of segment s moves right by s * new (each earlier segment grew by `new` tokens).
        segment_of_token = torch.repeat_interleave(torch.arange(n_segments, device=device), old_lengths)
        old_dest = torch.arange(self.keys.shape[0], device=device) + segment_of_token * new
        new_dest = ((new_starts + old_lengths).unsqueeze(-1) + torch.arange(new, device=device)).flatten()

        total = self.keys.shape[0] + n_segments * new
        out_k = os_backed_empty((total, dim), self.keys.dtype, device)
        out_v = os_backed_empty((total, dim), self.values.dtype, device)
        out_p = os_backed_empty((total,), self.positions.dtype, device)
        out_k[old_dest] = self.keys
        out_v[old_dest] = self.values
        out_p[old_dest] = self.positions
        out_k[new_dest] = self.tail_k.reshape(n_segments * new, dim)
        out_v[new_dest] = self.tail_v.reshape(n_segments * new, dim)
        out_p[new_dest] = self.tail_positions.repeat(n_segments)
        self.keys, self.values, self.positions = out_k, out_v, out_p
        self.lengths_ = new_lengths.view(batch, heads)
        self.tail_k = self.tail_v = self.tail_positions = None

    def select(self, keep: torch.Tensor) -> KVStorage:
        held = self._slot_valid()
        masked = self._masked_slots(held.shape[-1])
        valid = held if masked is None else held & ~masked
        keep = keep & valid
        dropped = int((valid & ~keep).sum(-1).max()) if keep.numel() else 0
        if dropped == 0:
            return self
        if defers_eviction(self.masked_slots, dropped, keep):
            out = copy.copy(self)  # mask now, drop with a later select
            out.masked, out.masked_slots = held & ~keep, self.masked_slots + dropped
            return out
        self.fold_tail()  # the padded view's slots are the same before and after folding
        flat_index = keep[held].nonzero().squeeze(1)
        lengths = keep.sum(dim=-1).to(torch.long)
        keys, values = _take_rows(self.keys, flat_index), _take_rows(self.values, flat_index)
        positions = _take_rows(self.positions, flat_index)
        if bool((lengths == lengths.flatten()[0]).all()):
            batch, heads = lengths.shape
            n = int(lengths.flatten()[0])
            dim = keys.shape[-1]
            return DenseStorage(
                keys.view(batch, heads, n, dim).contiguous(),
                values.view(batch, heads, n, dim).contiguous(),
                positions.view(batch, heads, n).contiguous(),
            )
        return RaggedStorage(keys.contiguous(), values.contiguous(), positions.contiguous(), lengths)

    def index_batch(self, index: torch.Tensor) -> KVStorage:
        view = self.view()
        index = index.to(view.keys.device)
        return RaggedStorage.from_padded(
            view.keys.index_select(0, index),
            view.values.index_select(0, index),
            view.positions.index_select(0, index),
            view.valid.index_select(0, index),
        )

    def state(self) -> StorageState:
        fold = getattr(self, "fold_tail", None)  # recently decoded tokens held beside the body, if any
        if callable(fold):
            fold()
        tensors = {"keys": self.keys, "values": self.values, "positions": self.positions, "lengths": self.lengths_}
        if self.masked is not None:
            tensors["masked"] = self.masked
        return tensors, {"masked_slots": self.masked_slots}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "RaggedStorage":
        missing = [n for n in ("keys", "values", "positions", "lengths") if n not in tensors]
        if missing:
            raise ValueError(f"ragged storage state lacks {missing}")
        if int(tensors["lengths"].sum()) != tensors["keys"].shape[0]:
            raise ValueError("ragged storage state: lengths do not add up to the number of tokens held")
        out = cls(tensors["keys"], tensors["values"], tensors["positions"], tensors["lengths"])
        masked = tensors.get("masked")
        if masked is not None:
            if masked.dtype != torch.bool or masked.shape[:2] != out.lengths_.shape:
                raise ValueError("ragged storage state: masked must be bool [batch, kv_heads, slots]")
            out.masked, out.masked_slots = masked, int(meta.get("masked_slots", 0))
        return out
