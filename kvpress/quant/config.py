"""``KVQuant``: the configuration object that turns a kvpress cache into a quantized one.

    with kvpress.patch(model, KVQuant(bits=2, rank=2)):                       # quantized storage only
    with kvpress.patch(model, SnapKV(compression_ratio=0.5) | KVQuant(4)):   # evict, then quantize

It is a *storage spec* for the core cache: ``create_storage(layer_idx)`` builds each compressed layer's
:class:`~kvpress.quant.storage.QuantizedStorage`.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvpress.quant.body import BodyConfig
from kvpress.quant.lowrank import check_outlier_fraction, check_rank
from kvpress.quant.packing import check_bits
from kvpress.quant.quantizer import check_group_size
from kvpress.quant.rotation import outlier_permutation, rotation_matrix


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


_ROTATE_CHOICES = ("auto", "keys", "values")  # besides True / False


@functools.lru_cache(maxsize=32)
def keys_normalised(model: Any) -> bool:
    """True if ``model``'s attention normalises each head's keys before RoPE (a ``k_norm`` module: Gemma 3, Qwen 3,
    OLMo 2)."""
    return any(hasattr(module, "k_norm") and hasattr(module, "k_proj") for module in model.modules())


def _shared_rotation(head_dim: int, seed: int, block: int | None, device: str) -> torch.Tensor:
    return rotation_matrix(head_dim, seed=seed, block_size=block, device=device)


@dataclass(frozen=True)
class KVQuant:
    """Quantized KV storage (KIVI axes + optional Hadamard rotation, attention sinks and GEAR correction).

    Args:
        bits: code width for keys and values (2, 3, 4 or 8); ``key_bits`` / ``value_bits`` override it.
        group_size: G, tokens per key group (per-channel scale and zero) and the default value group. On Gemma 3
            at 2 bits, ``group_size=16, value_group_size=32`` kept 96% of the uncompressed needle score against 80%
            with 32, at 0.192x against 0.187x the bytes (``fp_dtype=torch.float16``; ``benchmarks/RESULTS.md``).
        residual: R, most recent tokens kept in full precision (the window holds R to R + F - 1 tokens). Behind a
            policy that bounds each head to fewer than ``n_sink + R + F`` tokens (``StreamingLLM(window=64)``)
            nothing is ever quantized: composing them warns (:meth:`full_precision_capacity`).
        rotate: store keys and values Hadamard-rotated (random signs from ``seed``): ``True`` both, ``False``
            neither, ``"keys"`` or ``"values"`` only that one. ``"auto"`` (the default) rotates nothing at 3 bits
            or more, and at 2 bits (narrowest of ``key_bits``, ``value_bits``) the values, and the keys unless the
            model normalises each head's keys (QK-norm: Gemma 3, Qwen 3; known once ``kvpress.patch`` attaches
            the quantizer to the model). On SmolLM2 (no QK-norm) rotating both lowers 2-bit perplexity by 3.4%,
            while at 3-4 bits the change is within +-0.7% and flips sign between text lengths, so the matmuls
            are skipped; on Gemma-3-270M rotating its normalised keys at 2 bits kept 40% of the uncompressed
            needle score against 93% with the values only (``benchmarks/RESULTS.md``): per-channel key groups
            already follow the channel scales that the key norm's weights set, and a rotation mixes them.
        outlier_reorder: calibrate a channel permutation per layer from its first keys/values before the
            Hadamard (matters only for block-diagonal rotations, see ``rotation_block``).
        n_sink: the first ``n_sink`` tokens stay in full precision.
        rank: GEAR low-rank correction rank (0 = off), at most ``group_size``.
        outlier_fraction: GEAR sparse outliers, fraction of each token row kept exactly (0 = off).
        key_bits, value_bits: per-tensor code widths (e.g. K4V2); default ``bits``.
        value_group_size: channels per value group (per-token groups); default ``min(group_size, head_dim)``.
        lowrank_block: F, tokens per low-rank block when ``rank > 0`` (a multiple of ``group_size``); the
            residual is then flushed F tokens at a time.
        power_iters: subspace-iteration steps of the low-rank fit.
        rotation_block: Hadamard block size (a power of two dividing head_dim); default: the largest power of
            two dividing head_dim, i.e. one full Hadamard for power-of-two head dims.
        seed: seed of the rotation signs (keys use ``seed``, values ``seed + 1``) and of the low-rank start.
        scale_dtype: dtype of scales, zeros, low-rank factors and outlier values.
        fp_dtype: dtype in which the full-precision parts (sinks and residual window) are held; ``None`` = the
            model's dtype. ``torch.float16`` halves their bytes on a float32 model; :meth:`view` casts them back to
            the model's dtype, and they are quantized (when they leave the window) from the held, rounded values.
            float16 saturates beyond +-65504; ``torch.bfloat16`` has the range but 8 mantissa bits.
        exact_new_tokens: attend the tokens of the current forward exactly (see :mod:`kvpress.quant.storage`).
    """

    bits: int = 4
    group_size: int = 32
    residual: int = 128
    rotate: bool | str = "auto"
    outlier_reorder: bool = False
    n_sink: int = 4
    rank: int = 0
    outlier_fraction: float = 0.0
    key_bits: int | None = None
    value_bits: int | None = None
    value_group_size: int | None = None
    lowrank_block: int = 256
    power_iters: int = 2
    rotation_block: int | None = None
    seed: int = 0
    scale_dtype: torch.dtype = torch.float16
    fp_dtype: torch.dtype | None = None
    exact_new_tokens: bool = True

    name = "kvquant"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not (isinstance(self.rotate, bool) or (isinstance(self.rotate, str) and self.rotate in _ROTATE_CHOICES)):
            raise ValueError(f"rotate must be 'auto', True, False, 'keys' or 'values', got {self.rotate!r}")
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        check_group_size(self.group_size)
        if self.value_group_size is not None:
            check_group_size(self.value_group_size, "value_group_size")
        _check_count("residual", self.residual, 0)
        _check_count("n_sink", self.n_sink, 0)
        check_rank(self.rank)
        if self.rank > self.group_size:
            raise ValueError(f"rank={self.rank} must not exceed group_size={self.group_size}")
        check_outlier_fraction(self.outlier_fraction)
        _check_count("lowrank_block", self.lowrank_block, 1)
        if self.rank > 0 and self.lowrank_block % self.group_size:
            raise ValueError(
                f"lowrank_block={self.lowrank_block} must be a multiple of group_size={self.group_size}"
            )
        _check_count("power_iters", self.power_iters, 0)
        if self.rotation_block is not None:
            _check_count("rotation_block", self.rotation_block, 1)
        if not isinstance(self.scale_dtype, torch.dtype) or not self.scale_dtype.is_floating_point:
            raise ValueError(f"scale_dtype must be a floating torch dtype, got {self.scale_dtype!r}")
        if self.fp_dtype is not None and (
            not isinstance(self.fp_dtype, torch.dtype) or not self.fp_dtype.is_floating_point
        ):
            raise ValueError(f"fp_dtype must be None or a floating torch dtype, got {self.fp_dtype!r}")

    def attach(self, model: Any) -> None:
        """Called by ``kvpress.patch``: what ``rotate="auto"`` needs to know of the model (whether it normalises
        keys per head). Not part of the configuration (``params``, equality)."""
        object.__setattr__(self, "_keys_normalised", keys_normalised(model))

    @property
    def rotated(self) -> tuple[bool, bool]:
        """(rotate keys, rotate values), with ``rotate="auto"`` resolved from the code widths (and the model)."""
        if self.rotate == "auto":
            two_bit = min(self.key_bits or self.bits, self.value_bits or self.bits) <= 2
            return two_bit and not getattr(self, "_keys_normalised", False), two_bit
        if isinstance(self.rotate, str):
            return self.rotate == "keys", self.rotate == "values"
        return bool(self.rotate), bool(self.rotate)

    # -- the storage-spec protocol of the core cache ---------------------------------------------------------
    def create_storage(self, layer_idx: int):
        """An empty :class:`~kvpress.quant.storage.QuantizedStorage` for layer ``layer_idx``."""
        from kvpress.quant.storage import QuantizedStorage

        return QuantizedStorage(self, layer_idx)

    # -- helpers used by the storage -------------------------------------------------------------------------
    def body_config(self, head_dim: int) -> BodyConfig:
        """Resolve the per-layer quantization parameters once the head_dim is known (validates them)."""
        value_group = self.value_group_size or min(self.group_size, head_dim)
        if head_dim % value_group:
            which = "value_group_size" if self.value_group_size else "group_size"
            raise ValueError(
                f"{which}={value_group} must divide head_dim={head_dim} for per-token value groups "
                "(set value_group_size to a divisor of head_dim)"
            )
        if self.rank > head_dim:
            raise ValueError(f"rank={self.rank} must not exceed head_dim={head_dim}")
        return BodyConfig(
            head_dim=head_dim,
            key_bits=self.key_bits or self.bits,
            value_bits=self.value_bits or self.bits,
            group_size=self.group_size,
            value_group=value_group,
            rank=self.rank,
            outlier_fraction=self.outlier_fraction,
            power_iters=self.power_iters,
            seed=self.seed,
            scale_dtype=self.scale_dtype,
            factor_dtype=self.scale_dtype,
        )

    def rotations(
        self,
        head_dim: int,
        device: torch.device,
        sample_keys: torch.Tensor | None = None,
        sample_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(key rotation, value rotation, owned): shared constants, or per-layer ones calibrated on samples."""
        if sample_keys is None:
            dev = str(device)
            return (
                _shared_rotation(head_dim, self.seed, self.rotation_block, dev),
                _shared_rotation(head_dim, self.seed + 1, self.rotation_block, dev),
                False,
            )
        perm_k = outlier_permutation(sample_keys, self.rotation_block)
        perm_v = outlier_permutation(sample_values, self.rotation_block)
        rk = rotation_matrix(head_dim, self.seed, perm_k, self.rotation_block, device=device)
        rv = rotation_matrix(head_dim, self.seed + 1, perm_v, self.rotation_block, device=device)
        return rk, rv, True

    def full_precision_capacity(self) -> int:
        """The most tokens a head can hold with none of them quantized: the ``n_sink`` sinks plus a residual window
        just short of a flush (``residual + F - 1``, ``F`` = group_size, or lowrank_block with GEAR). A cache bounded
        below this by an eviction policy is never quantized at all."""
        flush = self.lowrank_block if self.rank > 0 else self.group_size
        return self.n_sink + self.residual + flush - 1

    # -- reporting and composition ---------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("scale_dtype", "fp_dtype"):
            if out[name] is not None:
                out[name] = str(out[name]).replace("torch.", "")
        return out

    def __or__(self, other: Any) -> Any:
        from kvpress.policies.interface import Pipeline

        return Pipeline(self, other)

    def __ror__(self, other: Any) -> Any:
        from kvpress.policies.interface import Pipeline

        return Pipeline(other, self)
