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
from typing import Any, Callable

import torch

# decode(query [batch, q_heads, q_len, head_dim], allowed [batch, kv_heads, q_len, seq] bool | None, scaling)
#   -> [batch, q_len, q_heads, head_dim]: attention read straight from a storage's held form.
Decoder = Callable[[torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


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
        decode_masks_padding: ``True`` when the view's ``decode`` skips its padding slots by itself (ragged
            storage reads per-head lengths), so a one-token causal decode step needs no mask at all.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor | None
    valid: torch.Tensor | None
    key_rotation: torch.Tensor | None = None
    value_rotation: torch.Tensor | None = None
    decode_masks_padding: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, kv_heads, seq, head_dim)`` of the view (without building keys for a lazy view)."""
        return tuple(self.keys.shape)

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def is_materialised(self) -> bool:
        """Whether ``keys``/``values`` exist as tensors (always, except for a :class:`LazyAttentionView`)."""
        return True


class LazyAttentionView(AttentionView):
    """An :class:`AttentionView` whose keys and values are built only when first read.

    Quantized and ragged storages hand attention this view: decode attention reads the held form directly
    through ``decode`` (fused kernels or chunked torch paths, :mod:`kvpress.kernels`), and ``keys``/``values``
    (the dequantized / padded ``[batch, kv_heads, seq, head_dim]`` tensors of the eager view) are built by
    ``materialise`` on first access only, e.g. when a policy reads them, then kept for the rest of the step.
    ``positions``, ``valid`` and the rotations are plain attributes, as in the eager view. ``shape`` and
    ``device`` are known without building anything.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        device: torch.device,
        materialise: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        decode: Decoder,
        positions: torch.Tensor | None,
        valid: torch.Tensor | None,
        key_rotation: torch.Tensor | None = None,
        value_rotation: torch.Tensor | None = None,
        rotate_exact_keys: Callable[[tuple[torch.Tensor, ...], Callable[[torch.Tensor], torch.Tensor]],
                                    "AttentionView | None"] | None = None,  # fmt: skip
        decode_masks_padding: bool = False,
    ):
        # AttentionView's dataclass __init__ is not called: keys/values are properties here.
        self._shape = tuple(shape)
        self._device = device
        self._materialise: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = materialise
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.decode = decode
        self.positions = positions
        self.valid = valid
        self.key_rotation = key_rotation
        self.value_rotation = value_rotation
        # rotate_exact_keys(where, fn): a view whose keys at slots `where` (a (batch, head, slot) index tuple) are
        # fn(keys) (fn maps [n, head_dim] float32 keys in the unrotated basis), still lazy; None when a slot in
        # `where` is not held exactly (e.g. quantized), so the caller builds the keys instead. Used by
        # kvpress.reposition to move StreamingLLM's sinks without dequantizing the layer.
        self.rotate_exact_keys = rotate_exact_keys
        self.decode_masks_padding = decode_masks_padding

    def _built(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kv is None:
            self._kv = self._materialise()
            self._materialise = None  # let what it captured go
        return self._kv

    @property
    def keys(self) -> torch.Tensor:  # type: ignore[override]
        return self._built()[0]

    @property
    def values(self) -> torch.Tensor:  # type: ignore[override]
        return self._built()[1]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_materialised(self) -> bool:
        return self._kv is not None

    def __repr__(self) -> str:
        state = "materialised" if self.is_materialised else "lazy"
        return f"LazyAttentionView(shape={self._shape}, {state})"

    __eq__ = object.__eq__
    __hash__ = object.__hash__


# A storage's saved form (kvpress.persist): its tensors by local name, and JSON-able metadata.
StorageState = tuple[dict[str, torch.Tensor], dict[str, Any]]


class StorageNotReady(RuntimeError):
    """A storage spec cannot build a layer's storage yet: it depends on something the first forward fixes (e.g.
    ``DuoAttention(compression_ratio=...)``'s streaming heads). The cache layer then builds it at its first update,
    after ``kvpress.patch`` has sized the policy from that forward's length."""


class KVStorage(ABC):
    """Physical storage of one layer's keys and values. One job: hold tokens, append, keep a subset.

    Every concrete kind is registered by class name (:data:`KVStorage.kinds`) so that a saved cache
    (:mod:`kvpress.persist`) names the kind of each layer and reads it back with that kind's :meth:`from_state`.
    """

    kinds: dict[str, type["KVStorage"]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KVStorage.kinds[cls.__name__] = cls

    @abstractmethod
    def state(self) -> StorageState:
        """``(tensors, meta)``: everything needed to rebuild this storage exactly, tensors by local name (as held,
        on their device) and JSON-able metadata (no objects). :meth:`from_state` is the inverse."""

    @classmethod
    @abstractmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "KVStorage":
        """The storage :meth:`state` described (tensors already on the target device)."""

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

    def settle(self, seen: int) -> "KVStorage":
        """Called after a forward in which no policy was called (a decode step of a policy that leaves its rule to
        the storage, e.g. DuoAttention's streaming heads), ``seen`` tokens seen: apply what the storage enforces
        itself. Returns the storage to use from now on; the default enforces nothing."""
        return self

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


def storage_state(storage: KVStorage) -> StorageState:
    """:meth:`KVStorage.state` with the kind's registered name added to the metadata (``meta["kind"]``)."""
    tensors, meta = storage.state()
    return tensors, {"kind": type(storage).__name__, **meta}


def storage_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> KVStorage:
    """Rebuild a storage saved by :func:`storage_state`, dispatching on ``meta["kind"]``."""
    kind = meta.get("kind")
    cls = KVStorage.kinds.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown storage kind {kind!r} (known: {sorted(KVStorage.kinds)})")
    return cls.from_state(tensors, meta)


# Evicted tokens per head that a select may only mask (held, invalid in views) before one select drops them all:
# at most DEFER_SLOTS, and at most 1/DEFER_FRACTION of the slots held (masked tokens add at most ~3% to the bytes).
# A policy evicting a token per decode step (StreamingLLM, H2O, the learned threshold) then pays a gather or
# rebuild of the layer every 32nd step instead of every step. Used by quantized and ragged storage.
DEFER_SLOTS = 32
DEFER_FRACTION = 32


def defers_eviction(masked_slots: int, dropped: int, keep: torch.Tensor) -> bool:
    """Whether a select that drops ``dropped`` more tokens (in the head dropping most) from a storage already
    masking ``masked_slots`` should only mask them (see :data:`DEFER_SLOTS`): within the limit, and every head keeps
    a token. ``keep``: ``[batch, kv_heads, slots]`` bool over the storage's slots."""
    limit = min(DEFER_SLOTS, keep.shape[-1] // DEFER_FRACTION)
    return masked_slots + dropped <= limit and bool(keep.any(-1).all())


def wrapped_state(inner: KVStorage, **meta: Any) -> StorageState:
    """The state of a storage wrapping ``inner`` (a ring, a sink-and-window trim): the inner storage's tensors
    under ``inner.``, its metadata under ``"inner"``, beside the wrapper's own ``meta``."""
    tensors, inner_meta = storage_state(inner)
    return prefixed(tensors, "inner."), {"inner": inner_meta, **meta}


def wrapped_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], needs: tuple[str, ...],
                       what: str) -> KVStorage:
    """The inner storage of a state from :func:`wrapped_state`, once ``meta`` is checked to hold ``needs``."""
    for key in ("inner", *needs):
        if key not in meta:
            raise ValueError(f"{what} state needs {key!r}")
    return storage_from_state(under(tensors, "inner."), meta["inner"])


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``tensors`` with every name prefixed by ``prefix`` (nested storages)."""
    return {prefix + name: t for name, t in tensors.items()}


def under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, the prefix removed (inverse of :func:`prefixed`)."""
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def optional_tensors(**named: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The named tensors that are not ``None``."""
    return {name: t for name, t in named.items() if t is not None}
