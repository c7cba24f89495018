"""Dense storage: every head of the layer holds the same number of tokens."""

from __future__ import annotations

import torch

from typing import Any

from kvpress.storage.base import AttentionView, KVStorage, StorageState, optional_tensors

POSITION_DTYPE = torch.int32  # positions are held compactly; widened to int64 only transiently


class DenseStorage(KVStorage):
    """Keys and values as ``[batch, kv_heads, seq, head_dim]`` tensors.

    ``positions`` (``[batch, kv_heads, seq]`` int32) is only held once something was evicted; before that the
    tokens are exactly positions ``0..seq-1`` and holding them would waste bytes. Appending concatenates,
    exactly as transformers' ``DynamicLayer`` does, so an uncompressed kvpress cache returns bit-identical
    tensors to attention.
    """

    def __init__(
        self,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ):
        self.keys = keys
        self.values = values
        self.positions = positions

    # -- KVStorage -------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, start_position: int) -> None:
        if self.keys is None:
            self.keys, self.values = keys, values
            if start_position != 0:
                self.positions = _arange_positions(keys, start_position)
            return
        held = self.keys.shape[-2]
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)
        if self.positions is None and start_position != held:
            self.positions = _arange_positions(self.keys[..., :held, :], 0)
        if self.positions is not None:
            self.positions = torch.cat([self.positions, _arange_positions(keys, start_position)], dim=-1)

    def view(self) -> AttentionView:
        positions = None if self.positions is None else self.positions.long()
        return AttentionView(self.keys, self.values, positions, None)

    def select(self, keep: torch.Tensor) -> KVStorage:
        if bool(keep.all()):
            return self
        counts = keep.sum(dim=-1)
        positions = self.view_positions()
        if bool((counts == counts.flatten()[0]).all()):
            batch, heads, _ = keep.shape
            dim = self.keys.shape[-1]
            # Row indices into the flattened [batch * heads * seq, dim] layout: nonzero walks rows in order, so
            # tokens stay sorted by position within each head. index_select copies whole rows (a memcpy each),
            # several times faster than a gather over an index expanded to every channel.
            rows = keep.reshape(-1).nonzero().squeeze(1)
            return DenseStorage(
                self.keys.reshape(-1, dim).index_select(0, rows).view(batch, heads, -1, dim),
                self.values.reshape(-1, dim).index_select(0, rows).view(batch, heads, -1, dim),
                positions.reshape(-1).index_select(0, rows).view(batch, heads, -1).to(POSITION_DTYPE),
            )
        # Heads keep different counts: ragged storage (kvpress.storage.ragged, which builds on this module; found
        # through the storage registry so that the two modules do not import each other).
        return KVStorage.kinds["RaggedStorage"].from_padded(self.keys, self.values, positions, keep)

    def tensors(self) -> list[torch.Tensor]:
        held = [t for t in (self.keys, self.values, self.positions) if t is not None]
        return held

    def lengths(self) -> torch.Tensor:
        if self.keys is None:
            return torch.zeros(0, 0, dtype=torch.long)
        batch, heads, seq, _ = self.keys.shape
        return torch.full((batch, heads), seq, dtype=torch.long, device=self.keys.device)

    def index_batch(self, index: torch.Tensor) -> KVStorage:
        if self.keys is None:
            return DenseStorage()
        index = index.to(self.keys.device)
        return DenseStorage(
            self.keys.index_select(0, index),
            self.values.index_select(0, index),
            None if self.positions is None else self.positions.index_select(0, index),
        )

    def state(self) -> StorageState:
        return optional_tensors(keys=self.keys, values=self.values, positions=self.positions), {}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "DenseStorage":
        if ("keys" in tensors) != ("values" in tensors):
            raise ValueError("dense storage state needs both 'keys' and 'values' or neither")
        return cls(tensors.get("keys"), tensors.get("values"), tensors.get("positions"))

    # -- helpers ---------------------------------------------------------------------------------------------
    def view_positions(self) -> torch.Tensor:
        """``[batch, kv_heads, seq]`` int64 positions, materialised when none are held."""
        if self.positions is not None:
            return self.positions.long()
        return _arange_positions(self.keys, 0).long()

    def crop(self, n_tokens: int) -> None:
        """Drop the last ``n_tokens`` tokens of every head."""
        keep = self.keys.shape[-2] - n_tokens
        self.keys = self.keys[..., :keep, :].clone()
        self.values = self.values[..., :keep, :].clone()
        if self.positions is not None:
            self.positions = self.positions[..., :keep].clone()


def _arange_positions(like: torch.Tensor, start: int) -> torch.Tensor:
    """``[batch, kv_heads, seq]`` positions ``start..start+seq-1`` for a ``[batch, kv_heads, seq, dim]`` tensor."""
    batch, heads, seq = like.shape[:3]
    pos = torch.arange(start, start + seq, device=like.device, dtype=POSITION_DTYPE)
    return pos.expand(batch, heads, seq).contiguous()


class DenseSpec:
    """The storage spec of plain dense storage: what an eviction policy gets when no quantizer is given.

    A policy whose heads fall in fixed classes (DuoAttention) wraps it with its ``split_storage`` so that each
    class is held in its own dense storage (:class:`~kvpress.storage.head_split.HeadSplitStorage`)."""

    def create_storage(self, layer_idx: int) -> DenseStorage:
        return DenseStorage()

    def __repr__(self) -> str:
        return "DenseSpec()"

