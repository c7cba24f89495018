"""KV-cache quantization: packing, asymmetric group quantization, Hadamard rotation, GEAR error correction,
and the quantized cache storage built from them (:class:`KVQuant` -> :class:`QuantizedStorage`)."""

from kvpress.quant.body import QuantizedBody
from kvpress.quant.config import KVQuant
from kvpress.quant.lowrank import GearTensor, LowRank, Outliers, gear_quantize, lowrank, select_outliers
from kvpress.quant.packing import ALLOWED_BITS, pack, packed_words, unpack
from kvpress.quant.quantizer import QuantizedTensor, quantize
from kvpress.quant.rotation import hadamard, outlier_permutation, rotate, rotation_matrix, unrotate
from kvpress.quant.storage import QuantizedStorage

__all__ = [
    "ALLOWED_BITS",
    "GearTensor",
    "KVQuant",
    "LowRank",
    "Outliers",
    "QuantizedBody",
    "QuantizedStorage",
    "QuantizedTensor",
    "gear_quantize",
    "hadamard",
    "lowrank",
    "outlier_permutation",
    "pack",
    "packed_words",
    "quantize",
    "rotate",
    "rotation_matrix",
    "select_outliers",
    "unpack",
    "unrotate",
]
