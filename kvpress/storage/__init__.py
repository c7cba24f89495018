"""Physical storage kinds for one layer's K/V: dense, ragged (per-head lengths), sliding-window rings, sink-and-window
heads (DuoAttention's streaming heads), and (in kvpress.quant) quantized."""

from kvpress.storage.base import AttentionView, KVStorage, LazyAttentionView, StorageNotReady
from kvpress.storage.dense import DenseStorage
from kvpress.storage.ragged import RaggedStorage
from kvpress.storage.sink_window import SinkWindowSpec, SinkWindowStorage
from kvpress.storage.sliding import SlidingWindowStorage

__all__ = ["AttentionView", "KVStorage", "StorageNotReady", "LazyAttentionView", "DenseStorage", "RaggedStorage",
           "SinkWindowSpec", "SinkWindowStorage", "SlidingWindowStorage"]
