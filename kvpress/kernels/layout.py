"""What the quantized-decode kernels read: the packed body of one layer, as ``kvpress.quant.body`` holds it.

The kernels package sits below ``kvpress.quant`` and imports nothing from it, so the storage hands its tensors
over in this plain container (no copies: the same tensors). Layout, every tensor with leading
``[batch, kv_heads]`` and ``N`` body tokens per head in position order (see ``kvpress/quant/body.py`` and
``kvpress/quant/packing.py`` for the full description):

    k_codes [B, H, N, words(D, key_bits)]   int32, codes packed along head_dim, little-endian bit stream
    v_codes [B, H, N, words(D, value_bits)] int32
    k_scale, k_zero [B, H, n_groups, D]     keys: per-channel groups of ``group_size`` consecutive tokens
    v_scale, v_zero [B, H, N, D // value_group]  values: per-token groups of ``value_group`` channels
    group_ids [B, H, N] int32               key group of each token; None when token t is in group t // G
    group_block [n_groups] int32            low-rank block of each key group (with low-rank factors)
    k_left, v_left [B, H, N, r]             GEAR low-rank left rows;  k_right, v_right [B, H, n_blocks, D, r]
    k_out_val, v_out_val [B, H, N, k]       GEAR outliers (exact values) at channels k_out_idx, v_out_idx

A token reconstructs as ``zero + code * scale`` (+ ``left[t] . right[block(t)]^T``), then its outliers are
written over their channels. Everything is in the storage's rotated basis when it rotates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def check_scale_range(zero: torch.Tensor, scale: torch.Tensor, scale_dtype: torch.dtype) -> None:
    """Raise when a quantizer's zero or scale came out non-finite: the input was not finite, or a group's range does
    not fit ``scale_dtype`` (one check and message for the torch quantizer and the fused kernels)."""
    if not (bool(torch.isfinite(zero).all()) and bool(torch.isfinite(scale).all())):
        raise ValueError(
            f"x is not finite or its range does not fit scale_dtype={scale_dtype}; use scale_dtype=torch.float32"
        )


@dataclass(frozen=True)
class PackedBody:
    """The packed body tensors of one layer (layout in the module docstring) and how many tokens to attend.

    ``n_tokens`` may be smaller than the held ``N`` (the first ``n_tokens`` are attended): the storage shows the
    newest tokens exactly on the step they arrive, so those slots are left out of the body.
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    key_bits: int
    value_bits: int
    group_size: int
    value_group: int
    n_tokens: int
    group_ids: torch.Tensor | None = None
    group_block: torch.Tensor | None = None
    k_left: torch.Tensor | None = None
    v_left: torch.Tensor | None = None
    k_right: torch.Tensor | None = None
    v_right: torch.Tensor | None = None
    k_out_val: torch.Tensor | None = None
    k_out_idx: torch.Tensor | None = None
    v_out_val: torch.Tensor | None = None
    v_out_idx: torch.Tensor | None = None

    @property
    def head_dim(self) -> int:
        return self.k_scale.shape[-1]

    @property
    def batch(self) -> int:
        return self.k_codes.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k_codes.shape[1]

    @property
    def rank(self) -> int:
        return 0 if self.k_left is None else self.k_left.shape[-1]

    @property
    def n_outliers(self) -> int:
        return 0 if self.k_out_val is None else self.k_out_val.shape[-1]

    def token_groups(self, start: int, stop: int) -> torch.Tensor:
        """``[B, H, stop - start]`` int64 key group of tokens ``start..stop-1``."""
        if self.group_ids is not None:
            return self.group_ids[:, :, start:stop].long()
        t = torch.arange(start, stop, device=self.k_codes.device) // self.group_size
        return t.expand(self.batch, self.kv_heads, stop - start)

    def nbytes_read(self) -> int:
        """Bytes a decode step over the attended tokens reads from this body (for bandwidth figures)."""
        n, total = self.n_tokens, 0
        held = self.k_codes.shape[2]
        for t in (self.k_codes, self.v_codes, self.v_scale, self.v_zero, self.group_ids, self.k_left,
                  self.v_left, self.k_out_val, self.k_out_idx, self.v_out_val, self.v_out_idx):  # fmt: skip
            if t is not None:
                total += t.numel() * t.element_size() * n // max(held, 1)
        for t in (self.k_scale, self.k_zero, self.k_right, self.v_right, self.group_block):
            if t is not None:
                total += t.numel() * t.element_size()
        return total
