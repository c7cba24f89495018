"""kvpress: KV-cache compression for Hugging Face transformers, with caches that physically hold less.

    import kvpress
    model, tokenizer = kvpress.load_model()            # the embedded SmolLM2-135M-Instruct
    with kvpress.patch(model, kvpress.policies.SnapKV(compression_ratio=0.5)):
        out = model.generate(**inputs, max_new_tokens=32)
"""

from kvpress import policies
from kvpress.cache import CompressedLayer, KVPressCache, LayerReport
from kvpress.compat import cache_argument, cache_kwargs, output_cache
from kvpress.context import LayerContext
from kvpress.models import DEFAULT_MODEL, load_model
from kvpress.persist import CacheFileError, load_cache
from kvpress.patching import SUPPORTED_ATTENTION, SUPPORTED_MODEL_TYPES, PatchSession, patch
from kvpress.policies import (
    H2O,
    TOVA,
    AdaKV,
    DecodingBudget,
    KeyNorm,
    KVzip,
    Pipeline,
    Policy,
    PyramidKV,
    ScorePolicy,
    SnapKV,
    StreamingLLM,
    get_policy,
)
from kvpress.quant import KVQuant

__version__ = "0.1.0"

__all__ = [
    "patch",
    "load_model",
    "DEFAULT_MODEL",
    "KVPressCache",
    "CompressedLayer",
    "LayerReport",
    "LayerContext",
    "PatchSession",
    "Policy",
    "ScorePolicy",
    "Pipeline",
    "SnapKV",
    "StreamingLLM",
    "H2O",
    "TOVA",
    "KeyNorm",
    "KVzip",
    "AdaKV",
    "PyramidKV",
    "DecodingBudget",
    "KVQuant",
    "get_policy",
    "load_cache",
    "CacheFileError",
    "cache_argument",
    "cache_kwargs",
    "output_cache",
    "policies",
    "SUPPORTED_ATTENTION",
    "SUPPORTED_MODEL_TYPES",
]
