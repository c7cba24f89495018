"""Physical storage kinds for one layer's K/V: dense, ragged (per-head lengths), and (in kvpress.quant) quantized."""

from kvpress.storage.base import AttentionView, KVStorage, LazyAttentionView
from kvpress.storage.dense import DenseStorage
from kvpress.storage.ragged import RaggedStorage

__all__ = ["AttentionView", "KVStorage", "LazyAttentionView", "DenseStorage", "RaggedStorage"]
