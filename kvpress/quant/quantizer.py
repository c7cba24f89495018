"""Asymmetric round-to-nearest min/max quantization of K/V tensors in groups.

For a group ``g`` of elements: ``zero = min(g)``, ``scale = (max(g) - min(g)) / (2**bits - 1)``,
``code = clamp(round((x - zero) / scale), 0, 2**bits - 1)`` and the reconstruction is ``zero + code * scale``.

Two grouping axes over a tensor ``[..., tokens, head_dim]`` (KIVI):

* ``axis="channel"`` (keys): a group is ``group_size`` consecutive *tokens* of one channel; scale and zero are
  ``[..., ceil(tokens / group_size), head_dim]``. A last partial group (tokens not a multiple of the group)
  gets its own min/max over the tokens it has.
* ``axis="token"`` (values): a group is ``group_size`` consecutive *head_dim* elements of one token; scale and
  zero are ``[..., tokens, head_dim // group_size]``; ``group_size`` must divide ``head_dim``.

Codes are always packed along ``head_dim`` (:mod:`kvpress.quant.packing`), ``[..., tokens, words]``, so a
token's codes never depend on later tokens and appending tokens never repacks old words.

Stored precision. Scale and zero are held in ``scale_dtype`` (fp16 by default). So that the error bound holds
for the *stored* numbers, ``zero`` is rounded down and ``scale`` rounded up to ``scale_dtype`` and the codes are
computed from those stored values: every element lies in ``[zero, zero + (2**bits - 1) * scale]`` and is
reconstructed to within half a stored step, ``|x - x_hat| <= scale / 2`` (plus float32 arithmetic rounding).
A constant group gets ``scale = 0`` (no division: the divisor is guarded) and is reconstructed exactly when its
value is representable in ``scale_dtype`` (always true for fp16 inputs with fp16 scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvpress.kernels.layout import check_scale_range
from kvpress.quant.packing import check_bits, pack, unpack

Axis = Literal["channel", "token"]
AXES = ("channel", "token")


def check_group_size(group_size: int, name: str = "group_size") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{name} must be a positive int, got {group_size!r}")
    return group_size


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _round_toward(value: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``value`` rounded to ``dtype`` in a fixed direction (up: result >= value; down: result <= value)."""
    r = value.to(dtype)
    back = r.to(value.dtype)
    wrong = back < value if up else back > value
    if bool(wrong.any()):
        target = torch.full_like(r, float("inf") if up else float("-inf"))
        r = torch.where(wrong, torch.nextafter(r, target), r)
    return r


def _group_view(x: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """Reshape ``[..., T, D]`` so that the reduction dim (-2 for channel, -1 for token) spans one group.

    channel: ``[..., n_groups, G, D]`` (a last partial group is padded by repeating its last token, which
    changes neither its min nor its max); token: ``[..., T, D // G, G]``.
    """
    t, d = x.shape[-2], x.shape[-1]
    if axis == "token":
        return x.reshape(*x.shape[:-1], d // group_size, group_size)
    n_groups = -(-t // group_size)
    padded = n_groups * group_size
    if padded != t:
        idx = torch.arange(padded, device=x.device).clamp_(max=t - 1)
        x = x.index_select(-2, idx)
    return x.reshape(*x.shape[:-2], n_groups, group_size, d)


def _reduce_dim(axis: str) -> int:
    return -2 if axis == "channel" else -1


def _ungroup(g: torch.Tensor, t: int, axis: str) -> torch.Tensor:
    """Inverse of :func:`_group_view` (drops channel-axis padding)."""
    if axis == "token":
        return g.reshape(*g.shape[:-2], g.shape[-2] * g.shape[-1])
    out = g.reshape(*g.shape[:-3], g.shape[-3] * g.shape[-2], g.shape[-1])
    return out[..., :t, :]


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor ``[..., tokens, head_dim]`` held as packed b-bit codes plus per-group scale and zero.

    Attributes:
        codes: ``[..., tokens, packed_words(head_dim, bits)]`` int32, packed along head_dim.
        scale, zero: per group, ``scale_dtype``; shapes in the module docstring.
        bits, group_size, axis: the quantization parameters.
        shape: the original shape; ``dtype``: the original dtype (default of :meth:`dequantize`).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def tokens(self) -> int:
        return self.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.shape[-1]

    def unpacked_codes(self) -> torch.Tensor:
        """``[..., tokens, head_dim]`` uint8 codes."""
        return unpack(self.codes, self.bits, self.head_dim)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``zero + code * scale`` computed in float32 (float64 for float64 sources), cast to ``dtype``."""
        cdt = _compute_dtype(self.dtype)
        codes = self.unpacked_codes().to(cdt)
        grouped = _group_view(codes, self.group_size, self.axis)
        dim = _reduce_dim(self.axis)
        x = torch.addcmul(
            self.zero.to(cdt).unsqueeze(dim), grouped, self.scale.to(cdt).unsqueeze(dim)
        )
        return _ungroup(x, self.tokens, self.axis).to(dtype or self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.zero]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: Axis,
    scale_dtype: torch.dtype = torch.float16,
    exclude: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` ``[..., tokens, head_dim]`` (see the module docstring for the grouping).

    Args:
        bits: 2, 3, 4 or 8.
        group_size: elements per group along the grouping axis.
        axis: ``"channel"`` (keys) or ``"token"`` (values).
        scale_dtype: dtype of the stored scale and zero.
        exclude: optional bool mask like ``x``; excluded elements (e.g. outliers held exactly elsewhere) do not
            widen their group's min/max. Their codes are clamped and meaningless.
    """
    check_bits(bits)
    check_group_size(group_size)
    _check_axis(axis)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be [..., tokens, head_dim], got shape {tuple(x.shape)}")
    if not scale_dtype.is_floating_point:
        raise ValueError(f"scale_dtype must be a floating dtype, got {scale_dtype}")
    t, d = x.shape[-2], x.shape[-1]
    if axis == "token" and d % group_size:
        raise ValueError(f"group_size={group_size} must divide head_dim={d} for per-token (value) groups")
    if exclude is not None and exclude.shape != x.shape:
        raise ValueError(f"exclude must have the shape of x {tuple(x.shape)}, got {tuple(exclude.shape)}")
    levels = (1 << bits) - 1
    cdt = _compute_dtype(x.dtype)
    xc = x.to(cdt)
    dim = _reduce_dim(axis)
    g = _group_view(xc, group_size, axis)
    if exclude is None:
        mn, mx = g.amin(dim), g.amax(dim)
    else:
        ex = _group_view(exclude, group_size, axis)
        mn = g.masked_fill(ex, float("inf")).amin(dim)
        mx = g.masked_fill(ex, float("-inf")).amax(dim)
        empty = torch.isinf(mn)  # every element of the group excluded
        mn = mn.masked_fill(empty, 0.0)
        mx = mx.masked_fill(empty, 0.0)
    zero = _round_toward(mn, scale_dtype, up=False)
    scale = _round_toward((mx - zero.to(cdt)).clamp_min(0) / levels, scale_dtype, up=True)
    check_scale_range(zero, scale, scale_dtype)
    s = scale.to(cdt).unsqueeze(dim)
    divisor = torch.where(s > 0, s, torch.ones_like(s))  # constant groups: x - zero == 0 there
    codes = torch.round((g - zero.to(cdt).unsqueeze(dim)) / divisor).clamp_(0, levels)
    codes = _ungroup(codes, t, axis).to(torch.uint8)
    return QuantizedTensor(
        codes=pack(codes, bits),
        scale=scale,
        zero=zero,
        bits=bits,
        group_size=group_size,
        axis=axis,
        shape=tuple(x.shape),
        dtype=x.dtype,
    )
