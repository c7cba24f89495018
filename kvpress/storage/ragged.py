"""Ragged storage: each (batch row, KV head) holds its own number of tokens, with no padding held.

Layout (the varlen layout of AdaKV and flash-attention's varlen kernels): all tokens of all heads are
concatenated head after head in row-major ``(batch, kv_head)`` order, each head's tokens in increasing position:

    keys      [total_tokens, head_dim]
    values    [total_tokens, head_dim]
    positions [total_tokens]            int32
    lengths   [batch, kv_heads]         int64, tokens held per head

Attention gets a :class:`~kvpress.storage.LazyAttentionView`: decode steps read the flat layout directly
(:func:`kvpress.kernels.ragged_decode`: a fused Triton varlen kernel on CUDA, a chunked torch path on CPU; no
padding read), and the padded ``[batch, kv_heads, max_len, head_dim]`` tensors plus a validity mask are built
only when something reads ``keys``/``values`` (a policy, a prefill or extend forward). The padding exists only
during that step and is never held by the cache.
"""

from __future__ import annotations

import torch

from kvpress import kernels
from typing import Any

from kvpress.storage.base import AttentionView, KVStorage, LazyAttentionView, StorageState
from kvpress.storage.dense import POSITION_DTYPE, DenseStorage


class RaggedStorage(KVStorage):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor):
        self.keys = keys
        self.values = values
        self.positions = positions
        self.lengths_ = lengths

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

    def lengths(self) -> torch.Tensor:
        return self.lengths_

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values, self.positions, self.lengths_]

    def _slot_valid(self) -> torch.Tensor:
        max_len = int(self.lengths_.max()) if self.lengths_.numel() else 0
        slots = torch.arange(max_len, device=self.lengths_.device)
        return slots < self.lengths_.unsqueeze(-1)

    def view(self) -> AttentionView:
        valid = self._slot_valid()
        batch, heads, max_len = valid.shape
        positions = torch.zeros(batch, heads, max_len, dtype=torch.long, device=self.keys.device)
        positions[valid] = self.positions.long()
        keys, values, lengths = self.keys, self.values, self.lengths_

        def materialise() -> tuple[torch.Tensor, torch.Tensor]:
            dim = keys.shape[-1]
            padded_k = keys.new_zeros(batch, heads, max_len, dim)
            padded_v = values.new_zeros(batch, heads, max_len, dim)
            padded_k[valid] = keys
            padded_v[valid] = values
            return padded_k, padded_v

        def decode(query: torch.Tensor, allowed: torch.Tensor | None, scaling: float) -> torch.Tensor:
            b, q_heads, q_len, d = query.shape
            groups = q_heads // heads
            q = (query.float() * scaling).reshape(b, heads, groups * q_len, d)
            mask = None if allowed is None else allowed.transpose(-1, -2)[valid]  # [total_tokens, q_len]
            part = kernels.ragged_decode(q, keys, values, lengths, mask, max_length=max_len)
            out = part.out.view(b, heads, groups, q_len, d).reshape(b, q_heads, q_len, d)
            return out.transpose(1, 2).to(query.dtype)

        return LazyAttentionView(
            shape=(batch, heads, max_len, self.keys.shape[-1]),
            device=self.keys.device,
            materialise=materialise,
            decode=decode,
            positions=positions,
            valid=valid,
        )

    def append(self, keys: torch.Tensor, values: torch.Tensor, start_position: int) -> None:
        batch, heads, new, dim = keys.shape
        old_lengths = self.lengths_.flatten()
        n_segments = old_lengths.numel()
        new_lengths = old_lengths + new
        new_starts = torch.cumsum(new_lengths, 0) - new_lengths
        # Every token of segment s moves right by s * new (each earlier segment grew by `new` tokens).
        segment_of_token = torch.repeat_interleave(torch.arange(n_segments, device=keys.device), old_lengths)
        old_dest = torch.arange(self.keys.shape[0], device=keys.device) + segment_of_token * new
        new_dest = ((new_starts + old_lengths).unsqueeze(-1) + torch.arange(new, device=keys.device)).flatten()

        total = self.keys.shape[0] + n_segments * new
        out_k = self.keys.new_empty(total, dim)
        out_v = self.values.new_empty(total, dim)
        out_p = self.positions.new_empty(total)
        out_k[old_dest] = self.keys
        out_v[old_dest] = self.values
        out_p[old_dest] = self.positions
        out_k[new_dest] = keys.reshape(n_segments * new, dim)
        out_v[new_dest] = values.reshape(n_segments * new, dim)
        new_pos = torch.arange(start_position, start_position + new, device=keys.device, dtype=POSITION_DTYPE)
        out_p[new_dest] = new_pos.repeat(n_segments)
        self.keys, self.values, self.positions = out_k, out_v, out_p
        self.lengths_ = new_lengths.view(batch, heads)

    def select(self, keep: torch.Tensor) -> KVStorage:
        valid = self._slot_valid()
        keep = keep & valid
        flat_keep = keep[valid]
        lengths = keep.sum(dim=-1).to(torch.long)
        keys, values, positions = self.keys[flat_keep], self.values[flat_keep], self.positions[flat_keep]
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
        return {"keys": self.keys, "values": self.values, "positions": self.positions, "lengths": self.lengths_}, {}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "RaggedStorage":
        missing = [n for n in ("keys", "values", "positions", "lengths") if n not in tensors]
        if missing:
            raise ValueError(f"ragged storage state lacks {missing}")
        if int(tensors["lengths"].sum()) != tensors["keys"].shape[0]:
            raise ValueError("ragged storage state: lengths do not add up to the number of tokens held")
        return cls(tensors["keys"], tensors["values"], tensors["positions"], tensors["lengths"])
