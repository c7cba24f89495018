"""The storage seam: how one layer's cached keys and values are physically held.

A :class:`KVStorage` holds the K/V of one attention layer for a batch, ``[batch, kv_heads, seq, head_dim]`` in
the logical view. Concrete kinds: :class:`~kvpress.storage.dense.DenseStorage` (one tensor per K and V),
:class:`~kvpress.storage.ragged.RaggedStorage` (heads hold different numbers of tokens, no padding held), and
quantized storage in :mod:`kvpress.quant` (packed integer codes plus scales).

Every storage keeps its tokens in increasing position order and knows each token's absolute position in the
sequence (the index of the token among all tokens fed to the model), so eviction never confuses positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionView:
    """What attention reads from a storage at one step (transient, not held by the cache).

    Attributes:
        keys: ``[batch, kv_heads, seq, head_dim]`` in the compute dtype.
        values: ``[batch, kv_heads, seq, head_dim]``.
        positions: ``[batch, kv_heads, seq]`` absolute positions (int64), or ``None`` when the storage holds
            exactly the positions ``0..seq-1`` for every head (nothing was ever evicted).
        valid: ``[batch, kv_heads, seq]`` bool, ``False`` at padding added only for this view (ragged
            storage), or ``None`` when every slot is a real token.
        key_rotation: ``[head_dim, head_dim]`` orthonormal ``R`` when the keys are held rotated (``K @ R``);
            attention then uses ``q @ R`` so that ``q . k`` is unchanged. ``None`` when not rotated.
        value_rotation: ``[head_dim, head_dim]`` orthonormal ``Rv`` when values are held as ``V @ Rv``;
            attention multiplies its output by ``Rv^T``. ``None`` when not rotated.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor | None
    valid: torch.Tensor | None
    key_rotation: torch.Tensor | None = None
    value_rotation: torch.Tensor | None = None


class KVStorage(ABC):
    """Physical storage of one layer's keys and values. One job: hold tokens, append, keep a subset."""

    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor, start_position: int) -> None:
        """Append new tokens ``[batch, kv_heads, new, head_dim]`` whose positions start at ``start_position``."""

    @abstractmethod
    def view(self) -> AttentionView:
        """The cached tokens as attention reads them (dequantised / padded transiently where needed)."""

    @abstractmethod
    def select(self, keep: torch.Tensor) -> "KVStorage":
        """Keep only the tokens where ``keep`` (``[batch, kv_heads, seq]`` bool over the :meth:`view` slots) is
        True. Returns the storage to use from now on: possibly another kind (dense becomes ragged when heads
        keep different counts)."""

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this storage holds (for byte accounting)."""

    @abstractmethod
    def lengths(self) -> torch.Tensor:
        """``[batch, kv_heads]`` int64: the number of tokens each head holds."""

    @abstractmethod
    def index_batch(self, index: torch.Tensor) -> "KVStorage":
        """A storage holding batch rows ``index`` (beam search reorder, batch selection/repeat)."""

    def nbytes(self) -> int:
        """Physical bytes of every tensor held."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def storage_nbytes(self) -> int:
        """Bytes of the underlying allocations (catches views that keep a larger tensor alive)."""
        seen: set[int] = set()
        total = 0
        for t in self.tensors():
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
        return total

    @property
    def max_length(self) -> int:
        lengths = self.lengths()
        return int(lengths.max()) if lengths.numel() else 0

    def clone(self) -> "KVStorage":
        """A deep copy (for fanning one prefill out to several compression settings)."""
        return self.index_batch(torch.arange(int(self.lengths().shape[0]), device=self.lengths().device))
