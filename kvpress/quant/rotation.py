"""Orthonormal rotations of head_dim that spread channel outliers before quantization (QuaRot / RotateKV).

A rotation is an explicit ``[head_dim, head_dim]`` orthonormal matrix ``R`` (fine for head_dim <= 256); a
tensor is rotated as ``x @ R`` and restored as ``y @ R.T``. Keys are stored as ``K @ R`` and attention uses
``q @ R`` (``(q R)(k R)^T = q k^T``); values are stored as ``V @ Rv`` and the attention output is multiplied by
``Rv^T`` (:class:`~kvpress.storage.base.AttentionView` carries both matrices).

Construction: ``R = P @ diag(s) @ H`` where

* ``P`` is a channel permutation (``(x @ P)[..., j] = x[..., perm[j]]``), identity unless given;
* ``s`` are random +-1 signs drawn from ``seed`` (or all +1 with ``signs=False``);
* ``H`` is a normalised Sylvester Hadamard matrix (entries +-1/sqrt(block)), block-diagonal when the block is
  smaller than head_dim.

Supported head_dim: any power of two gets one full Hadamard. Otherwise ``head_dim = 2**k * m`` (``m`` odd,
``2**k >= 2``) gets a block-diagonal Hadamard of ``m`` blocks of ``2**k`` channels (e.g. 96 -> 3 blocks of 32,
80 -> 5 blocks of 16); it only mixes channels inside a block. An odd head_dim raises ``ValueError``. A smaller
block can also be asked for explicitly (``block_size``, a power of two dividing head_dim).

Outlier-aware channel order (:func:`outlier_permutation`, after RotateKV's reordering): channels are ranked by
their mean ``|x|`` over calibration samples and dealt to the Hadamard blocks in snake order (block 0, 1, ...,
m-1, m-1, ..., 0, 0, 1, ...), so that the largest channels land in different blocks and every block gets a
similar share of the energy; inside a block channels keep their rank order. With a single full Hadamard block
the permutation cannot change how widely a channel is spread (every output already mixes every input), so it
matters only for block-diagonal rotations.
"""

from __future__ import annotations

import torch


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The normalised ``n x n`` Sylvester Hadamard matrix (``H @ H.T = I``); ``n`` a power of two."""
    if not isinstance(n, int) or not _is_power_of_two(n):
        raise ValueError(f"hadamard size n must be a power of two, got {n!r}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype=dtype, device=device)


def default_block_size(head_dim: int) -> int:
    """Largest power of two dividing ``head_dim`` (head_dim itself when it is a power of two)."""
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(
            f"head_dim={head_dim!r} is not supported by the Hadamard rotation: it needs an even head_dim "
            "(a power of two for a full Hadamard, or 2**k * m for a block-diagonal one with m blocks of 2**k)"
        )
    return head_dim & -head_dim


def _check_block(head_dim: int, block_size: int | None) -> int:
    default = default_block_size(head_dim)
    if block_size is None:
        return default
    if not isinstance(block_size, int) or not _is_power_of_two(block_size) or head_dim % block_size:
        raise ValueError(
            f"block_size must be a power of two dividing head_dim={head_dim}, got {block_size!r}"
        )
    return block_size


def block_hadamard(
    head_dim: int, block_size: int | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Block-diagonal normalised Hadamard ``[head_dim, head_dim]`` (one full block for a power of two)."""
    block = _check_block(head_dim, block_size)
    return torch.block_diag(*([hadamard(block, dtype)] * (head_dim // block)))


def random_signs(head_dim: int, seed: int) -> torch.Tensor:
    """``[head_dim]`` float64 of +-1 drawn from a dedicated generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (head_dim,), generator=g).to(torch.float64) * 2 - 1


def outlier_permutation(sample: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """Outlier-aware channel order from calibration samples ``[..., head_dim]`` (scheme in the module doc).

    Returns ``perm`` ``[head_dim]`` int64: rotated position ``j`` reads input channel ``perm[j]``.
    """
    head_dim = sample.shape[-1]
    block = _check_block(head_dim, block_size)
    n_blocks = head_dim // block
    magnitude = sample.detach().abs().to(torch.float64).reshape(-1, head_dim).mean(0)
    ranked = torch.argsort(magnitude, descending=True, stable=True)
    # Snake deal: rank r goes to round r // n_blocks, block r % n_blocks (reversed on odd rounds).
    r = torch.arange(head_dim)
    rnd, pos = r // n_blocks, r % n_blocks
    blk = torch.where(rnd % 2 == 0, pos, n_blocks - 1 - pos)
    slot = blk * block + rnd
    perm = torch.empty(head_dim, dtype=torch.int64)
    perm[slot] = ranked
    return perm


def permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """``P`` with ``(x @ P)[..., j] == x[..., perm[j]]`` (float64)."""
    d = perm.numel()
    if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(d)):
        raise ValueError("perm must be a permutation of 0..head_dim-1")
    p = torch.zeros(d, d, dtype=torch.float64)
    p[perm.cpu(), torch.arange(d)] = 1.0
    return p


def rotation_matrix(
    head_dim: int,
    seed: int | None = 0,
    perm: torch.Tensor | None = None,
    block_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``R = P @ diag(s) @ H`` (see the module docstring); ``seed=None`` means no random signs.

    Built in float64 and cast to ``dtype``.
    """
    r = block_hadamard(head_dim, block_size)
    if seed is not None:
        r = random_signs(head_dim, seed)[:, None] * r
    if perm is not None:
        if perm.shape != (head_dim,):
            raise ValueError(f"perm must have shape ({head_dim},), got {tuple(perm.shape)}")
        r = permutation_matrix(perm) @ r
    return r.to(dtype=dtype, device=device)


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x @ R`` in float32 (float64 for float64 input), returned in ``x``'s dtype."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(cdt) @ r.to(device=x.device, dtype=cdt)).to(x.dtype)


def unrotate(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``y @ R.T``: inverse of :func:`rotate` for an orthonormal ``R``."""
    return rotate(y, r.transpose(-1, -2))
