"""What a KV cache holds, counted one way for every cache kind (kvpress and transformers baselines).

**Bytes** (:func:`cache_nbytes`): the bytes of the tensors the cache holds between forwards. A
:class:`kvpress.KVPressCache` reports them itself (``cache.nbytes()``: keys and values as stored, packed codes,
scales, full-precision windows, low-rank factors, positions). Any other ``transformers.Cache``: every tensor
reachable from each layer's attributes, each counted once (a ``DynamicCache`` layer holds its keys and values; a
``QuantizedCache`` layer also its quantized tensors' inner data, scales and zero points, and its residual).
Transient buffers inside a forward are never counted.

**Elements** (:func:`cache_elements`): the key and value entries the cache represents (tokens held x KV heads x
head_dim x 2, over every layer), the denominator of effective bits per element.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch


def cache_nbytes(cache: Any) -> int:
    """Bytes held by ``cache`` (see the module docstring)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    seen: set[int] = set()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in _reachable_tensors(vars(layer)):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _reachable_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        inner = getattr(obj, "__tensor_flatten__", None)
        if inner is not None and type(obj) is not torch.Tensor:  # tensor subclasses (quanto) hold inner tensors
            names, _ = inner()
            for name in names:
                yield from _reachable_tensors(getattr(obj, name), depth + 1)
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _reachable_tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _reachable_tensors(v, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        yield from _reachable_tensors(vars(obj), depth + 1)


def cache_elements(cache: Any, batch: int, kv_heads: int, head_dim: int) -> int:
    """Key and value elements ``cache`` represents: tokens held x ``kv_heads`` x ``head_dim`` x 2, over layers."""
    total = 0
    for layer in cache.layers:
        storage = getattr(layer, "storage", None)
        if storage is not None:  # kvpress: what each head really holds
            total += int(storage.lengths().sum()) * head_dim * 2 if layer.is_initialized else 0
        else:
            total += batch * kv_heads * layer.get_seq_length() * head_dim * 2
    return total


def effective_bits(cache: Any, batch: int, kv_heads: int, head_dim: int) -> float:
    """``8 * bytes / elements``: bits per key/value element held, all overheads included."""
    return 8.0 * cache_nbytes(cache) / max(cache_elements(cache, batch, kv_heads, head_dim), 1)
