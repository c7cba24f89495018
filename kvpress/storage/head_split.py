"""Head-split storage: the KV heads of one layer in groups, each group in its own storage of any kind.

For policies whose heads fall in a few classes that each keep the same tokens (DuoAttention: streaming heads keep
sinks + window, retrieval heads everything), a storage that pads heads to the longest (quantized storage) would
hold every streaming head at the retrieval heads' length. Holding each group in its own storage keeps the saving:
``DuoAttention(...) | KVQuant(bits=4)`` quantizes each group separately and no head is padded to another group.

Attention reads one merged view ``[batch, kv_heads, max_slots, head_dim]`` (slots past a group's length are
filler, ``valid=False``). The merged view is lazy: decode steps attend each group where it is held (a lazy part
through its own ``decode``: kernels, no dequantization; a dense part by SDPA over its tensors in place) and
scatter the query heads back; merged keys/values are built (un-rotated to the plain basis, so groups with
different rotations can sit together) only if read (prefill, extend, a policy reading keys).

Plain ``DuoAttention`` holds its streaming and retrieval heads in two dense parts this way: each decode step
evicts only from the small streaming part, where ragged storage would rebuild the whole layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvpress import kernels
from kvpress.storage.base import (
    AttentionView,
    KVStorage,
    LazyAttentionView,
    StorageState,
    prefixed,
    storage_from_state,
    storage_state,
    under,
)


def _plain(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x`` held as ``x @ R`` back in the plain basis (``R`` orthonormal)."""
    return x if rotation is None else (x.float() @ rotation.float().transpose(-1, -2)).to(x.dtype)


class HeadSplitStorage(KVStorage):
    """KV heads ``groups[i]`` (index tensors partitioning ``0..kv_heads-1``) held by ``parts[i]``."""

    def __init__(self, groups: list[torch.Tensor], parts: list[KVStorage]):
        if len(groups) != len(parts) or not groups:
            raise ValueError("need one storage per head group")
        self.groups = [g.long() for g in groups]
        self.parts = parts
        self.kv_heads = sum(g.numel() for g in self.groups)
        self._slots: list[int] | None = None  # slots per group in the last merged view (what select's mask covers)

    # -- KVStorage ---------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, start_position: int) -> None:
        if keys.shape[1] != self.kv_heads:
            raise ValueError(f"head-split storage holds {self.kv_heads} KV heads, got {keys.shape[1]}")
        for group, part in zip(self.groups, self.parts):
            idx = group.to(keys.device)
            part.append(keys.index_select(1, idx), values.index_select(1, idx), start_position)
        self._slots = None

    def view(self) -> AttentionView:
        views = [part.view() for part in self.parts]
        self._slots = [v.shape[2] for v in views]
        batch, _, _, dim = views[0].shape
        device = views[0].device
        heads, slots = self.kv_heads, max(self._slots)
        positions = torch.zeros(batch, heads, slots, dtype=torch.long, device=device)
        valid = torch.zeros(batch, heads, slots, dtype=torch.bool, device=device)
        groups = [g.to(device) for g in self.groups]
        for group, v, n in zip(groups, views, self._slots):
            pos = torch.arange(n, device=device).expand(batch, group.numel(), n) if v.positions is None else v.positions
            positions[:, group, :n] = pos.long()
            valid[:, group, :n] = True if v.valid is None else v.valid
        all_valid = bool(valid.all())
        untouched = all_valid and all(v.positions is None for v in views)

        def materialise() -> tuple[torch.Tensor, torch.Tensor]:
            first = views[0]
            keys = first.keys.new_zeros(batch, heads, slots, dim)
            values = first.values.new_zeros(batch, heads, slots, dim)
            for group, v, n in zip(groups, views, self._slots_of(views)):
                keys[:, group, :n] = _plain(v.keys, v.key_rotation).to(keys.dtype)
                values[:, group, :n] = _plain(v.values, v.value_rotation).to(values.dtype)
            return keys, values

        out_positions = None if untouched else positions
        out_valid = None if all_valid else valid
        # Each group's decode skips its own padding (a dense part has none; a lazy part says so), so a plain
        # one-token decode step needs no merged mask.
        masks_padding = all(v.valid is None or v.decode_masks_padding for v in views)

        def decode(query: torch.Tensor, allowed: torch.Tensor | None, scaling: float) -> torch.Tensor:
            b, q_heads, q_len, d = query.shape
            per_kv = q_heads // heads
            out = query.new_empty(b, q_len, q_heads, d)
            for group, v, n in zip(groups, views, self._slots_of(views)):
                q_idx = (group.view(-1, 1) * per_kv + torch.arange(per_kv, device=device)).flatten()
                sub_allowed = None if allowed is None else allowed[:, group, :, :n]
                sub_query = query.index_select(1, q_idx)
                if isinstance(v, LazyAttentionView) and not v.is_materialised:
                    part_out = v.decode(sub_query, sub_allowed, scaling)
                else:  # a dense part: read in place (no merged copy), the query heads of its KV heads only
                    part_out = kernels.dense_attention(sub_query, v.keys, v.values, sub_allowed, scaling,
                                                       v.key_rotation, v.value_rotation)
                out[:, :, q_idx] = part_out.to(out.dtype)
            return out

        return LazyAttentionView((batch, heads, slots, dim), device, materialise, decode, out_positions, out_valid,
                                 decode_masks_padding=masks_padding)

    @staticmethod
    def _slots_of(views: list[Any]) -> list[int]:
        return [v.shape[2] for v in views]

    def select(self, keep: torch.Tensor) -> KVStorage:
        if self._slots is None:
            self.view()
        slots = self._slots
        parts = []
        for group, part, n in zip(self.groups, self.parts, slots):
            parts.append(part.select(keep.index_select(1, group.to(keep.device))[:, :, :n]))
        return HeadSplitStorage(self.groups, parts)

    def settle(self, seen: int) -> KVStorage:
        parts = [part.settle(seen) for part in self.parts]
        if all(new is old for new, old in zip(parts, self.parts)):
            return self
        return HeadSplitStorage(self.groups, parts)

    def tensors(self) -> list[torch.Tensor]:
        return [t for part in self.parts for t in part.tensors()]

    def lengths(self) -> torch.Tensor:
        lengths = [part.lengths() for part in self.parts]
        if any(length.numel() == 0 for length in lengths):
            return torch.zeros(0, 0, dtype=torch.long)
        out = torch.zeros(lengths[0].shape[0], self.kv_heads, dtype=torch.long, device=lengths[0].device)
        for group, length in zip(self.groups, lengths):
            out[:, group.to(out.device)] = length
        return out

    def index_batch(self, index: torch.Tensor) -> KVStorage:
        return HeadSplitStorage(self.groups, [part.index_batch(index) for part in self.parts])

    def state(self) -> StorageState:
        tensors: dict[str, torch.Tensor] = {}
        parts = []
        for i, (group, part) in enumerate(zip(self.groups, self.parts)):
            part_tensors, part_meta = storage_state(part)
            tensors.update(prefixed(part_tensors, f"parts.{i}."))
            tensors[f"groups.{i}"] = group
            parts.append(part_meta)
        return tensors, {"parts": parts}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "HeadSplitStorage":
        parts_meta = meta.get("parts")
        if not isinstance(parts_meta, list) or not parts_meta:
            raise ValueError("head-split storage state needs a non-empty 'parts' list")
        groups = [tensors[f"groups.{i}"] for i in range(len(parts_meta))]
        parts = [storage_from_state(under(tensors, f"parts.{i}."), m) for i, m in enumerate(parts_meta)]
        return cls(groups, parts)

    def __repr__(self) -> str:
        inner = ", ".join(f"{g.tolist()}: {type(p).__name__}" for g, p in zip(self.groups, self.parts))
        return f"HeadSplitStorage({inner})"


class HeadSplitSpec:
    """A storage spec: each layer's heads split by ``groups_of(layer_idx)`` (a list of head index tensors), group
    ``i`` in a storage from ``inners[i].create_storage(layer_idx)`` (default: ``inner`` for every group); one
    group only: that group's storage itself."""

    def __init__(self, inner: Any, groups_of: Callable[[int], list[torch.Tensor]], inners: list[Any] | None = None):
        self.inner = inner
        self.groups_of = groups_of
        self.inners = inners

    def create_storage(self, layer_idx: int) -> KVStorage:
        groups = self.groups_of(layer_idx)
        specs = self.inners or [self.inner] * len(groups)
        held = [(g, spec) for g, spec in zip(groups, specs) if g.numel()]
        if len(held) <= 1:
            return (held[0][1] if held else self.inner).create_storage(layer_idx)
        return HeadSplitStorage([g for g, _ in held], [spec.create_storage(layer_idx) for _, spec in held])

    def __getattr__(self, name: str) -> Any:  # bits, params... of the inner spec (reports, sweeps)
        if name in ("inner", "groups_of", "inners"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return repr(self.inner)
