"""Dense storage: every head of the layer holds the same number of tokens."""

from __future__ import annotations

import torch

from typing import Any

from kvpress.storage.base import AttentionView, KVStorage, StorageState, optional_tensors

POSITION_DTYPE = torch.int32  # positions are held compactly; widened to int64 only transiently


class DenseStorage(KVStorage):
    """Keys and values as ``[batch, kv_heads, seq, head_dim]`` tensors.

    ``positions`` (``[batch, kv_heads, seq]`` int32) is only held once something was evicted; before that the
    tokens are exactly positions ``0..seq-1`` and holding them would waste bytes.

    Appending concatenates, exactly as transformers' ``DynamicLayer`` does (a copy of the whole layer per decode
    step), so an uncompressed kvpress cache (no policy) returns bit-identical tensors to attention. A
    ``growable`` storage (what eviction policies get) instead writes new tokens into room held past its tokens,
    allocated ``GROW_TOKENS`` at a time: one copy of the layer every ``GROW_TOKENS`` steps instead of every step.
    ``keys``/``values``/``positions`` are then views of that allocation: :meth:`nbytes` counts the tokens held,
    :meth:`storage_nbytes` the allocation (at most ``GROW_TOKENS - 1`` tokens more per layer). A shallow copy (a
    cloned cache) shares the allocation but not the right to write into it: its first append copies its tokens
    out first.
    """

    def __init__(
        self,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        growable: bool = False,
    ):
        self.keys = keys
        self.values = values
        self.positions = positions
        self.growable = growable
        self._room: _Room | None = None  # growable: the allocation keys/values/positions are views of

    # -- KVStorage -------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, start_position: int) -> None:
        if self.keys is None:
            self.keys, self.values = keys, values
            if start_position != 0:
                self.positions = _arange_positions(keys, start_position)
            return
        held = self.keys.shape[-2]
        if self.positions is None and start_position != held:
            self.positions = _arange_positions(self.keys, 0)
        new_positions = None if self.positions is None else _arange_positions(keys, start_position)
        if self.growable:
            self._write(keys, values, new_positions)
            return
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)
        if new_positions is not None:
            self.positions = torch.cat([self.positions, new_positions], dim=-1)

    def _write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None) -> None:
        """Growable append: into the room past the held tokens, reallocating (``GROW_TOKENS`` at a time) when
        there is none, or when the allocation is not this storage's to write (a shallow copy's)."""
        held, new = self.keys.shape[-2], keys.shape[-2]
        room = self._room
        if room is None or not room.holds(self, held + new, keys.dtype):
            capacity = -(-(held + new) // GROW_TOKENS) * GROW_TOKENS
            batch, heads, _, dim = self.keys.shape
            room = _Room(self.keys.new_zeros(batch, heads, capacity, dim), self.values.new_zeros(batch, heads, capacity, dim),
                         None if self.positions is None else self.positions.new_zeros(batch, heads, capacity), id(self))  # fmt: skip
            room.keys[..., :held, :] = self.keys
            room.values[..., :held, :] = self.values
            if room.positions is not None:
                room.positions[..., :held] = self.positions
            self._room = room
        room.keys[..., held : held + new, :] = keys
        room.values[..., held : held + new, :] = values
        self.keys, self.values = room.keys[..., : held + new, :], room.values[..., : held + new, :]
        if room.positions is not None:
            room.positions[..., held : held + new] = positions
            self.positions = room.positions[..., : held + new]

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
                growable=self.growable,
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
            return DenseStorage(growable=self.growable)
        index = index.to(self.keys.device)
        return DenseStorage(
            self.keys.index_select(0, index),
            self.values.index_select(0, index),
            None if self.positions is None else self.positions.index_select(0, index),
            growable=self.growable,
        )

    def state(self) -> StorageState:
        held = {name: None if t is None else t.contiguous() for name, t in
                (("keys", self.keys), ("values", self.values), ("positions", self.positions))}  # fmt: skip
        return optional_tensors(**held), {"growable": True} if self.growable else {}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "DenseStorage":
        if ("keys" in tensors) != ("values" in tensors):
            raise ValueError("dense storage state needs both 'keys' and 'values' or neither")
        return cls(tensors.get("keys"), tensors.get("values"), tensors.get("positions"), growable=bool(meta.get("growable")))

    # -- helpers ---------------------------------------------------------------------------------------------
    def view_positions(self) -> torch.Tensor:
        """``[batch, kv_heads, seq]`` int64 positions, materialised when none are held."""
        if self.positions is not None:
            return self.positions.long()
        return _arange_positions(self.keys, 0).long()

    def crop(self, n_tokens: int) -> None:
        """Drop the last ``n_tokens`` tokens of every head."""
        keep = self.keys.shape[-2] - n_tokens
        self._room = None
        self.keys = self.keys[..., :keep, :].clone()
        self.values = self.values[..., :keep, :].clone()
        if self.positions is not None:
            self.positions = self.positions[..., :keep].clone()


GROW_TOKENS = 128  # a growable storage's room, in tokens: reallocation every 128 steps, at most 127 tokens unused


class _Room:
    """The allocation behind a growable :class:`DenseStorage` (``[batch, kv_heads, capacity, ...]``) and the
    ``id`` of the storage allowed to write past its tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None, owner: int):
        self.keys, self.values, self.positions, self.owner = keys, values, positions, owner

    def backs(self, storage: DenseStorage) -> bool:
        """``storage``'s tensors are views at the start of this allocation, and it owns it."""
        return (self.owner == id(storage) and storage.keys is not None
                and storage.keys.data_ptr() == self.keys.data_ptr()
                and (storage.positions is None) == (self.positions is None)
                and (storage.positions is None or storage.positions.data_ptr() == self.positions.data_ptr()))  # fmt: skip

    def holds(self, storage: DenseStorage, n_tokens: int, dtype: torch.dtype) -> bool:
        """``storage`` may write up to ``n_tokens`` tokens of ``dtype`` here."""
        return self.backs(storage) and self.keys.shape[-2] >= n_tokens and self.keys.dtype == dtype


def _arange_positions(like: torch.Tensor, start: int) -> torch.Tensor:
    """``[batch, kv_heads, seq]`` positions ``start..start+seq-1`` for a ``[batch, kv_heads, seq, dim]`` tensor."""
    batch, heads, seq = like.shape[:3]
    pos = torch.arange(start, start + seq, device=like.device, dtype=POSITION_DTYPE)
    return pos.expand(batch, heads, seq).contiguous()


class DenseSpec:
    """The storage spec of plain dense storage: what an eviction policy gets when no quantizer is given.

    ``growable``: appends write into room held past the tokens instead of copying the layer (see
    :class:`DenseStorage`); the patch asks for it where no policy evicts during decoding (the storage then only
    grows), and keeps plain concatenation where one evicts at every step (room would be rebuilt each time).

    A policy whose heads fall in fixed classes (DuoAttention) wraps it with its ``split_storage`` so that each
    class is held in its own dense storage (:class:`~kvpress.storage.head_split.HeadSplitStorage`)."""

    def __init__(self, growable: bool = False):
        self.growable = growable

    def create_storage(self, layer_idx: int) -> DenseStorage:
        return DenseStorage(growable=self.growable)

    def __repr__(self) -> str:
        return "DenseSpec(growable=True)" if self.growable else "DenseSpec()"
