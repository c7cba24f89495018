"""Decode attention and quantize-and-pack kernels: fused Triton kernels, each beside its torch twin.

Below ``kvpress.storage`` and ``kvpress.quant``: tensors in, tensors out, no import from the rest of kvpress.

* :mod:`~kvpress.kernels.quant_decode_triton` / :mod:`~kvpress.kernels.quant_decode_torch`: decode attention
  over a packed quantized body (2/3/4/8-bit codes, KIVI axes, GEAR low-rank and outliers, GQA, masks), read
  in place, never dequantized whole.
* :mod:`~kvpress.kernels.ragged_decode_triton` / :mod:`~kvpress.kernels.ragged_decode_torch`: decode attention
  over ragged heads in the varlen layout, no padding read.
* :mod:`~kvpress.kernels.cpu_decode`: the fused C++ CPU kernels (quantized layer and ragged decode), built
  once with torch's extension tooling.
* :mod:`~kvpress.kernels.quant_pack_triton`: quantize-and-pack, bit-exact with ``kvpress.quant.quantize``.
* :mod:`~kvpress.kernels.dense_attention`: SDPA over dense K/V with grouped query heads (K/V never repeated).
* :mod:`~kvpress.kernels.partial`: partial attention states and their log-sum-exp merge.
* :mod:`~kvpress.kernels.dispatch`: which one runs (``KVPRESS_KERNELS=auto|torch|triton|cpp``).

Triton modules are imported only when a Triton path is chosen, so ``import kvpress`` never needs Triton.
"""

from kvpress.kernels.dense_attention import dense_attention
from kvpress.kernels.dispatch import (
    ENV_VAR,
    choose_backend,
    force_backend,
    quantized_decode,
    quantized_layer_decode,
    ragged_decode,
    requested_backend,
    triton_unsupported,
)
from kvpress.kernels.layout import PackedBody
from kvpress.kernels.partial import AttentionPartial, dense_partial, merge

__all__ = [
    "ENV_VAR",
    "AttentionPartial",
    "PackedBody",
    "choose_backend",
    "dense_attention",
    "dense_partial",
    "force_backend",
    "merge",
    "quantized_decode",
    "quantized_layer_decode",
    "ragged_decode",
    "requested_backend",
    "triton_unsupported",
]
