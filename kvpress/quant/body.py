"""The quantized body of one layer's cache: the tokens that left the full-precision residual window.

Layout (every tensor has leading ``[batch, kv_heads]``; ``N`` body tokens per head, in position order):

    per token     k_codes  [B, H, N, words(D, key_bits)]    int32, packed along head_dim (kvpress.quant.packing)
                  v_codes  [B, H, N, words(D, value_bits)]  int32
                  v_scale, v_zero  [B, H, N, D // Gv]       values: per-token groups of Gv channels
                  k_left, v_left   [B, H, N, r]             GEAR low-rank left factor rows (optional)
                  k_out_val, v_out_val [B, H, N, k]         GEAR outliers, k per token row (optional)
                  k_out_idx, v_out_idx [B, H, N, k]         their channel indices (uint8 / int16)
    per key group k_scale, k_zero  [B, H, n_groups, D]      keys: per-channel groups of G consecutive tokens
                  group_len        [B, H, n_groups] int16   tokens of each group per head (None: all hold G)
                  group_block      [n_groups] int32         low-rank block of each group (with rank > 0)
    per block     k_right, v_right [B, H, n_blocks, D, r]   GEAR low-rank right factors (optional)

Everything is in the rotated basis when the storage rotates. A body token is reconstructed as
``zero + code * scale`` (+ ``left . right^T`` of its block, then its outliers written back).

Decode attention reads this layout in place (:mod:`kvpress.kernels`: the fused Triton kernel and its chunked
torch twin get these tensors, unchanged, in a :class:`kvpress.kernels.PackedBody`); change it only together with
``kvpress/kernels/quant_decode_triton.py`` and ``quant_decode_torch.py``. Strides are read, so a factor held
column-major (as QR returns it) needs no copy; codes, scales and zeros must be contiguous along their last axis.

Eviction never re-quantizes: :meth:`QuantizedBody.take` gathers the per-token tensors of the surviving tokens and
keeps every surviving key group's scale and zero, which stay valid for any subset of the group; ``group_len``
then records how many tokens each group still holds in each head, groups emptied in every head are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch

from kvpress.quant.lowrank import gear_quantize
from kvpress.quant.packing import unpack
from kvpress.quant.quantizer import QuantizedTensor

GROUP_LEN_DTYPE = torch.int16


@dataclass(frozen=True)
class BodyConfig:
    """Quantization parameters of a body (resolved from :class:`~kvpress.quant.KVQuant` and the head_dim)."""

    head_dim: int
    key_bits: int
    value_bits: int
    group_size: int  # G: tokens per key group
    value_group: int  # Gv: channels per value group
    rank: int = 0
    outlier_fraction: float = 0.0
    power_iters: int = 2
    seed: int = 0
    scale_dtype: torch.dtype = torch.float16
    factor_dtype: torch.dtype = torch.float16


class QuantSpec(Protocol):
    """What a :class:`~kvpress.quant.storage.QuantizedStorage` reads of its spec (:class:`~kvpress.quant.KVQuant`
    implements it; declared here so that the storage and the spec do not import each other)."""

    group_size: int
    residual: int
    outlier_reorder: bool
    n_sink: int
    rank: int
    lowrank_block: int
    fp_dtype: torch.dtype | None
    exact_new_tokens: bool

    @property
    def rotated(self) -> tuple[bool, bool]: ...

    def body_config(self, head_dim: int) -> BodyConfig: ...

    def rotations(self, head_dim: int, device: torch.device, sample_keys: torch.Tensor | None = None,
                  sample_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]: ...


_PER_TOKEN = ("k_codes", "v_codes", "v_scale", "v_zero", "k_left", "v_left", "k_out_val", "k_out_idx",
              "v_out_val", "v_out_idx")  # fmt: skip
_PER_GROUP = ("k_scale", "k_zero", "group_len")
_PER_BLOCK = ("k_right", "v_right")


@dataclass(frozen=True)
class QuantizedBody:
    """Quantized tokens of one layer (see the module docstring for the layout)."""

    cfg: BodyConfig
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    group_len: torch.Tensor | None = None
    group_block: torch.Tensor | None = None
    k_left: torch.Tensor | None = None
    v_left: torch.Tensor | None = None
    k_right: torch.Tensor | None = None
    v_right: torch.Tensor | None = None
    k_out_val: torch.Tensor | None = None
    k_out_idx: torch.Tensor | None = None
    v_out_val: torch.Tensor | None = None
    v_out_idx: torch.Tensor | None = None

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def quantize(
        cls,
        cfg: BodyConfig,
        keys: torch.Tensor,
        values: torch.Tensor,
        block: int,
        exclude: torch.Tensor | None = None,
    ) -> "QuantizedBody":
        """Quantize ``[B, H, n, D]`` keys/values (float32, rotated basis) in low-rank blocks of ``block`` tokens.

        ``n`` must be a multiple of ``block`` and ``block`` a multiple of the key group size. ``exclude``
        (``[B, H, n]`` bool) marks padding tokens: they widen no range and are dropped by the caller.
        """
        b, h, n, d = keys.shape
        if n % block or block % cfg.group_size:
            raise ValueError(f"internal: {n} tokens, block {block}, group {cfg.group_size}")
        nb = n // block
        shape5 = (b, h, nb, block, d)
        ex5 = None if exclude is None else exclude.unsqueeze(-1).expand(b, h, n, d).reshape(shape5)
        common = dict(
            rank=cfg.rank,
            outlier_fraction=cfg.outlier_fraction,
            iters=cfg.power_iters,
            seed=cfg.seed,
            scale_dtype=cfg.scale_dtype,
            factor_dtype=cfg.factor_dtype,
            outlier_dtype=cfg.scale_dtype,
            exclude=ex5,
        )
        gk = gear_quantize(keys.reshape(shape5), cfg.key_bits, cfg.group_size, "channel", **common)
        gv = gear_quantize(values.reshape(shape5), cfg.value_bits, cfg.value_group, "token", **common)

        def tok(t: torch.Tensor | None) -> torch.Tensor | None:  # [B, H, nb, block, ...] -> [B, H, n, ...]
            return None if t is None else t.reshape(b, h, n, *t.shape[4:])

        n_groups = n // cfg.group_size
        low_k, low_v, out_k, out_v = gk.lowrank, gv.lowrank, gk.outliers, gv.outliers
        return cls(
            cfg=cfg,
            k_codes=tok(gk.quant.codes),
            k_scale=gk.quant.scale.reshape(b, h, n_groups, d),
            k_zero=gk.quant.zero.reshape(b, h, n_groups, d),
            v_codes=tok(gv.quant.codes),
            v_scale=tok(gv.quant.scale),
            v_zero=tok(gv.quant.zero),
            group_block=None
            if low_k is None
            else (torch.arange(n_groups, device=keys.device) // (block // cfg.group_size)).to(torch.int32),
            k_left=None if low_k is None else tok(low_k.left),
            v_left=None if low_v is None else tok(low_v.left),
            k_right=None if low_k is None else low_k.right,
            v_right=None if low_v is None else low_v.right,
            k_out_val=None if out_k is None else tok(out_k.values),
            k_out_idx=None if out_k is None else tok(out_k.indices),
            v_out_val=None if out_v is None else tok(out_v.values),
            v_out_idx=None if out_v is None else tok(out_v.indices),
        )

    # -- sizes -----------------------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return self.k_codes.shape[2]

    @property
    def n_groups(self) -> int:
        return self.k_scale.shape[2]

    @property
    def n_blocks(self) -> int:
        return 0 if self.k_right is None else self.k_right.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out.append(value)
        return out

    # -- reading ---------------------------------------------------------------------------------------------
    def group_ids(self) -> torch.Tensor:
        """``[B, H, N]`` int64: the key group of every body token."""
        b, h, n = self.k_codes.shape[:3]
        t = torch.arange(n, device=self.k_codes.device)
        if self.group_len is None:
            return (t // self.cfg.group_size).expand(b, h, n)
        ends = self.group_len.long().cumsum(-1).contiguous()
        return torch.searchsorted(ends, t.expand(b, h, n).contiguous(), right=True)

    def _blocks_of(self, gid: torch.Tensor) -> torch.Tensor:
        return self.group_block.long()[gid]

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, N, D]`` in float32 (rotated basis)."""
        cfg = self.cfg
        b, h, n = self.k_codes.shape[:3]
        d = cfg.head_dim
        shape = (b, h, n, d)
        gid = None
        if self.group_len is None:
            keys = QuantizedTensor(
                self.k_codes, self.k_scale, self.k_zero, cfg.key_bits, cfg.group_size, "channel", shape,
                torch.float32,
            ).dequantize()
        else:
            gid = self.group_ids()
            index = gid.unsqueeze(-1).expand(*shape)
            codes = unpack(self.k_codes, cfg.key_bits, d).float()
            keys = torch.addcmul(
                self.k_zero.float().gather(2, index), codes, self.k_scale.float().gather(2, index)
            )
        values = QuantizedTensor(
            self.v_codes, self.v_scale, self.v_zero, cfg.value_bits, cfg.value_group, "token", shape, torch.float32
        ).dequantize()
        if self.k_left is not None:
            gid = self.group_ids() if gid is None else gid
            blk = self._blocks_of(gid)
            keys = keys + _lowrank_rows(self.k_left, self.k_right, blk)
            values = values + _lowrank_rows(self.v_left, self.v_right, blk)
        if self.k_out_val is not None:
            keys = keys.scatter(-1, self.k_out_idx.long(), self.k_out_val.float())
            values = values.scatter(-1, self.v_out_idx.long(), self.v_out_val.float())
        return keys, values

    # -- restructuring ---------------------------------------------------------------------------------------
    def _full_group_len(self) -> torch.Tensor:
        if self.group_len is not None:
            return self.group_len
        b, h = self.k_codes.shape[:2]
        return torch.full((b, h, self.n_groups), self.cfg.group_size, dtype=GROUP_LEN_DTYPE, device=self.k_codes.device)

    def cat(self, other: "QuantizedBody") -> "QuantizedBody":
        """This body followed by ``other`` (later tokens)."""
        out = {}
        for name in (*_PER_TOKEN, "k_scale", "k_zero", *_PER_BLOCK):
            a, c = getattr(self, name), getattr(other, name)
            out[name] = None if a is None else torch.cat([a, c], dim=2)
        if self.group_len is not None or other.group_len is not None:
            out["group_len"] = torch.cat([self._full_group_len(), other._full_group_len()], dim=2)
        if self.group_block is not None:
            out["group_block"] = torch.cat([self.group_block, other.group_block + self.n_blocks])
        return replace(self, **out)

    def take(self, index: torch.Tensor) -> "QuantizedBody":
        """Keep body tokens ``index`` (``[B, H, n]`` int64, non-decreasing per head; repeats allowed).

        Codes, per-token scales, low-rank rows and outliers are gathered; key groups keep their scale and zero
        (still valid for any subset of their tokens); ``group_len`` counts what each group keeps per head.
        """
        b, h, n = index.shape
        out: dict[str, torch.Tensor | None] = {}
        for name in _PER_TOKEN:
            t = getattr(self, name)
            if t is not None:
                out[name] = t.gather(2, index.view(b, h, n, 1).expand(b, h, n, t.shape[-1]))
        gsel = self.group_ids().gather(2, index)
        counts = torch.zeros(b, h, self.n_groups, dtype=torch.int64, device=index.device)
        counts.scatter_add_(2, gsel, torch.ones_like(gsel))
        alive = counts.sum((0, 1)) > 0
        out["k_scale"], out["k_zero"] = self.k_scale[:, :, alive], self.k_zero[:, :, alive]
        counts = counts[:, :, alive]
        out["group_len"] = None if bool((counts == self.cfg.group_size).all()) else counts.to(GROUP_LEN_DTYPE)
        if self.group_block is not None:
            blocks = self.group_block[alive]
            used = torch.unique(blocks)  # sorted
            out["group_block"] = torch.searchsorted(used, blocks).to(torch.int32)
            out["k_right"], out["v_right"] = self.k_right[:, :, used.long()], self.v_right[:, :, used.long()]
        return replace(self, **out)

    def index_batch(self, index: torch.Tensor) -> "QuantizedBody":
        out = {}
        for name in (*_PER_TOKEN, *_PER_GROUP, *_PER_BLOCK):
            t = getattr(self, name)
            if t is not None:
                out[name] = t.index_select(0, index)
        return replace(self, **out)


def _lowrank_rows(left: torch.Tensor, right: torch.Tensor, blk: torch.Tensor) -> torch.Tensor:
    """Per token ``left[t] @ right[block(t)]^T``: ``[B, H, N, r]`` x ``[B, H, nb, D, r]`` -> ``[B, H, N, D]``."""
    b, h, n, r = left.shape
    d = right.shape[-2]
    if n == 0 or r == 0:
        return left.new_zeros(b, h, n, d, dtype=torch.float32)
    rows = right.float().gather(2, blk.view(b, h, n, 1, 1).expand(b, h, n, d, r))
    return torch.einsum("bhnr,bhndr->bhnd", left.float(), rows)
