"""GEAR-style error correction: ``X ~= Q(X) + L + S``.

* ``S`` (:class:`Outliers`): the ``ceil(outlier_fraction * D)`` largest ``|x|`` entries of every *token row*
  (``[..., D]``) are taken out before quantization (they do not widen any group's min/max) and kept exactly:
  values (the input dtype unless told) plus their channel indices (uint8 when ``D <= 256``, else int16);
  both count as held bytes. Row-wise selection (GEAR picks the top entries of a whole block) keeps a fixed
  number per token, so evicting a token simply drops its row of outliers.
* ``Q(X)``: the quantizer of :mod:`kvpress.quant.quantizer` with the outliers excluded.
* ``L`` (:class:`LowRank`): a rank-``r`` approximation of the remaining error ``E = X - Q(X)`` (zero at the
  outliers) over each block ``[n, D]`` of tokens, by subspace (power) iteration.

Every leading index (batch element, head, and whatever block of tokens the caller passes as the last-but-one
axis) gets its own basis: the iteration is batched over all leading dims, nothing is shared between them.

Subspace iteration: start from ``Q0 = randn(r, D)^T`` drawn from ``seed`` (the first ``r`` rows are the same for
every rank, so starts are nested), ``P = orth(E Q0)``, then ``iters`` times ``Z = orth(E^T P)``,
``P = orth(E Z)``; finally ``L = P (E^T P)^T``, held as ``left = P`` ``[..., n, r]`` (one row per token) and
``right = E^T P`` ``[..., D, r]`` (one per block). QR keeps the span of the leading columns, so the rank-``r``
subspace is contained in the rank-``r+1`` one and ``||E - L||_F`` never grows with the rank (up to the rounding
of the stored factors). Bytes: ``(n + D) * r`` factor entries per block per head (``factor_dtype``, fp16 by
default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpress.quant.quantizer import Axis, QuantizedTensor, quantize


def check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    return rank


def check_outlier_fraction(outlier_fraction: float) -> float:
    if isinstance(outlier_fraction, bool) or not isinstance(outlier_fraction, (int, float)):
        raise ValueError(f"outlier_fraction must be a number in [0, 1), got {outlier_fraction!r}")
    if not 0.0 <= outlier_fraction < 1.0:
        raise ValueError(f"outlier_fraction must be in [0, 1), got {outlier_fraction!r}")
    return float(outlier_fraction)


def _check_iters(iters: int) -> int:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    return iters


def _held(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class LowRank:
    """``L = left @ right^T`` with ``left`` ``[..., n, r]`` and ``right`` ``[..., D, r]``."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.left.to(cdt) @ self.right.to(cdt).transpose(-1, -2)).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.left, self.right]


def lowrank(
    e: torch.Tensor,
    rank: int,
    iters: int = 2,
    seed: int = 0,
    factor_dtype: torch.dtype = torch.float16,
) -> LowRank:
    """Rank-``rank`` approximation of ``e`` ``[..., n, D]`` per leading index (capped at ``min(n, D)``)."""
    check_rank(rank)
    _check_iters(iters)
    n, d = e.shape[-2], e.shape[-1]
    r = min(rank, n, d)
    cdt = torch.float64 if e.dtype == torch.float64 else torch.float32
    a = e.to(cdt)
    if r == 0:
        return LowRank(
            left=a.new_zeros(*a.shape[:-1], 0).to(factor_dtype),
            right=a.new_zeros(*a.shape[:-2], d, 0).to(factor_dtype),
        )
    g = torch.Generator().manual_seed(seed)
    q0 = torch.randn(r, d, generator=g, dtype=torch.float64).T.to(device=a.device, dtype=cdt)
    at = a.transpose(-1, -2)
    p = torch.linalg.qr(a @ q0).Q
    for _ in range(iters):
        z = torch.linalg.qr(at @ p).Q
        p = torch.linalg.qr(a @ z).Q
    return LowRank(left=p.to(factor_dtype), right=(at @ p).to(factor_dtype))


@dataclass(frozen=True)
class Outliers:
    """The largest-``|x|`` entries of every token row: ``values`` and channel ``indices``, both ``[..., n, k]``."""

    values: torch.Tensor
    indices: torch.Tensor

    def mask(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Bool mask of ``shape`` ``[..., n, D]``, True at the outliers."""
        out = torch.zeros(shape, dtype=torch.bool, device=self.values.device)
        return out.scatter_(-1, self.indices.long(), True)

    def scatter_into(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., n, D]`` with the outliers written back exactly (a new tensor)."""
        return x.scatter(-1, self.indices.long(), self.values.to(x.dtype))

    def tensors(self) -> list[torch.Tensor]:
        return [self.values, self.indices]


def outliers_per_row(head_dim: int, fraction: float) -> int:
    """Outliers kept per token row: ``ceil(fraction * head_dim)``."""
    check_outlier_fraction(fraction)
    return min(math.ceil(fraction * head_dim), head_dim)


def select_outliers(x: torch.Tensor, fraction: float, dtype: torch.dtype | None = None) -> Outliers:
    """The ``ceil(fraction * D)`` largest ``|x|`` entries of every row ``[..., D]`` of ``x``.

    Values are held in ``dtype`` (default: ``x.dtype``, i.e. exactly).
    """
    k = outliers_per_row(x.shape[-1], fraction)
    idx = x.abs().topk(k, dim=-1, sorted=False).indices.sort(-1).values
    index_dtype = torch.uint8 if x.shape[-1] <= 256 else torch.int16
    return Outliers(values=x.gather(-1, idx).to(dtype or x.dtype), indices=idx.to(index_dtype))


@dataclass(frozen=True)
class GearTensor:
    """``Q(X) + L + S`` for a block ``[..., n, D]`` (``lowrank`` / ``outliers`` ``None`` when unused)."""

    quant: QuantizedTensor
    lowrank: LowRank | None
    outliers: Outliers | None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.quant.dtype
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        x = self.quant.dequantize(cdt)
        if self.lowrank is not None:
            x = x + self.lowrank.reconstruct(cdt)
        if self.outliers is not None:
            x = self.outliers.scatter_into(x)
        return x.to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        out = self.quant.tensors()
        if self.lowrank is not None:
            out += self.lowrank.tensors()
        if self.outliers is not None:
            out += self.outliers.tensors()
        return out

    def nbytes(self) -> int:
        return _held(*self.tensors())


def gear_quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: Axis,
    rank: int = 0,
    outlier_fraction: float = 0.0,
    iters: int = 2,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
    factor_dtype: torch.dtype = torch.float16,
    outlier_dtype: torch.dtype | None = None,
    exclude: torch.Tensor | None = None,
) -> GearTensor:
    """Quantize the block ``x`` ``[..., n, D]`` with optional outliers and low-rank error correction.

    ``exclude`` (bool like ``x``) marks padding: it widens no group range and its error is not fitted.
    """
    check_rank(rank)
    check_outlier_fraction(outlier_fraction)
    _check_iters(iters)
    outliers = select_outliers(x, outlier_fraction, outlier_dtype) if outlier_fraction > 0 else None
    if outliers is not None:
        mask = outliers.mask(x.shape)
        exclude = mask if exclude is None else exclude | mask
    q = quantize(x, bits, group_size, axis, scale_dtype=scale_dtype, exclude=exclude)
    low = None
    if rank > 0:
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        err = x.to(cdt) - q.dequantize(cdt)
        if exclude is not None:
            err = err.masked_fill(exclude, 0.0)
        low = lowrank(err, rank, iters=iters, seed=seed, factor_dtype=factor_dtype)
    return GearTensor(quant=q, lowrank=low, outliers=outliers)
