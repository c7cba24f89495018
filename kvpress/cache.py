"""The compressed cache: a transformers ``Cache`` whose layers physically hold less.

Full-attention layers are :class:`CompressedLayer` objects (any storage kind, shrunk by eviction policies);
sliding-window layers are :class:`SlidingLayer` objects, the same with a bounded ring
(:class:`~kvpress.storage.SlidingWindowStorage`) of the last ``window - 1`` tokens, so that quantization and the
byte report cover every layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin

from kvpress.compat import cache_layer_specs

from kvpress.storage import (
    AttentionView,
    DenseStorage,
    KVStorage,
    LazyAttentionView,
    SlidingWindowStorage,
    StorageNotReady,
)
from kvpress.storage.sliding import check_window

StorageFactory = Callable[[int], KVStorage]


def dense_storage_factory(layer_idx: int) -> KVStorage:
    return DenseStorage()


# Architecture fields of a model config that a cache's shapes depend on (what a saved cache is checked against).
SIGNATURE_FIELDS = (
    "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "sliding_window", "layer_types",
)  # fmt: skip

# Writes a cache to a file: kvpress.persist.save_cache, registered by that module (it sits above this one and
# reads caches; this module never imports it).
_CACHE_WRITER: Callable[..., int] | None = None


def set_cache_writer(writer: Callable[..., int]) -> None:
    """Register the function behind :meth:`KVPressCache.save` (called once by :mod:`kvpress.persist`)."""
    global _CACHE_WRITER
    _CACHE_WRITER = writer


def config_signature(config: Any) -> dict[str, Any]:
    """Architecture fields of a model config (its text config) that a cache's shapes depend on."""
    text = config.get_text_config(decoder=True)
    out: dict[str, Any] = {}
    for name in SIGNATURE_FIELDS:
        value = getattr(text, name, None)
        out[name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


class CompressedLayer(CacheLayerMixin):
    """One full-attention layer: a :class:`~kvpress.storage.KVStorage` plus the true number of tokens seen.

    ``get_seq_length()`` is the number of tokens fed to the model so far, not the number held, so rotary
    positions and masks of new tokens keep counting from the true sequence length after eviction.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, storage_factory: StorageFactory, layer_idx: int):
        # CacheLayerMixin.__init__ would set `keys`/`values` attributes; here they are views of the storage.
        self.storage_factory = storage_factory
        try:
            self.storage = storage_factory(layer_idx)
            self.storage_pending = False
        except StorageNotReady:  # built at the first update, once the policy is sized (an empty stand-in until then)
            self.storage = DenseStorage()
            self.storage_pending = True
        self.layer_idx = layer_idx
        self.seen_tokens = 0
        self.is_initialized = False
        self.policy_state: dict[str, Any] = {}  # per-layer memory of a policy (e.g. accumulated scores)
        self.last_view: AttentionView | None = None  # what attention reads in the current forward
        self.last_mass: torch.Tensor | None = None  # attention mass of the current forward, if a policy asked
        self.last_hidden: torch.Tensor | None = None  # attention input of the current forward, if a policy asked

    # -- transformers layer API ------------------------------------------------------------------------------
    layer_type = "full_attention"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        # bytes one token takes in an uncompressed layer (K and V of every batch row and head), for report ratios
        self.token_nbytes = batch * heads * dim * 2 * key_states.element_size()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_heads, new, head_dim]`` K/V and return what attention reads.

        A lazy view (quantized / ragged storage) is not built here: kvpress's attention reads ``last_view``, so
        the model is handed zero-stride stand-ins of the right shape and dtype (no memory) instead of tensors
        that would force a full dequantization or padding every step.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.storage_pending:
            self.storage = self.storage_factory(self.layer_idx)
            self.storage_pending = False
        self.storage.append(key_states, value_states, self.seen_tokens)
        self.seen_tokens += key_states.shape[-2]
        self.last_view = self.storage.view()
        if isinstance(self.last_view, LazyAttentionView) and not self.last_view.is_materialised:
            stand_in = key_states.new_zeros(()).expand(self.last_view.shape)
            return stand_in, stand_in
        return self.last_view.keys, self.last_view.values

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks are built over absolute positions; attention gathers the columns of the slots it holds.
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def keys(self) -> torch.Tensor | None:
        return None if not self.is_initialized else self.storage.view().keys

    @property
    def values(self) -> torch.Tensor | None:
        return None if not self.is_initialized else self.storage.view().values

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the slots where ``mask`` (``[batch, kv_heads, seq]`` bool over the view) is True."""
        self.storage = self.storage.select(mask)
        self.last_view = None

    def reset(self) -> None:
        self.storage = self.storage_factory(self.layer_idx)
        self.seen_tokens = 0
        self.is_initialized = False
        self.policy_state = {}
        self.last_view = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if not isinstance(self.storage, DenseStorage) or self.storage.positions is not None:
            raise NotImplementedError("crop is only supported on a layer from which nothing was evicted")
        self.storage.crop(n)
        self.seen_tokens -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            batch = int(self.storage.lengths().shape[0])
            self._index_batch(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(indices)

    def _index_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index``, in the storage and in every per-row tensor of the policy's memory."""
        if not self.is_initialized:
            return
        batch = int(self.storage.lengths().shape[0])
        self.storage = self.storage.index_batch(index)
        self.policy_state = _index_rows(self.policy_state, index, batch)

    def offload(self) -> None:  # offloading is not supported; keep storage where it is
        pass

    def prefetch(self) -> None:
        pass

    # -- kvpress ---------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the held K/V (and positions) plus any per-slot memory a policy keeps (H2O's scores)."""
        return (self.storage.nbytes() if self.is_initialized else 0) + self.state_nbytes()

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors_in(self.policy_state))

    def full_nbytes(self) -> int:
        """Bytes the uncompressed layer would hold now (transformers' ``DynamicLayer``: every token seen)."""
        return self.seen_tokens * self.token_nbytes if self.is_initialized else 0

    def keep_positions(self, keep: torch.Tensor) -> None:
        """Keep the held tokens whose absolute position ``p`` has ``keep[b, h, p]`` (``[batch, kv_heads, n]`` bool;
        positions ``>= n`` are kept): eviction decided over positions rather than over the current slots."""
        view = self.storage.view()
        positions = view.positions if view.positions is not None else torch.arange(
            view.keys.shape[2], device=view.keys.device).expand(view.keys.shape[:3])
        n = keep.shape[-1]
        slot_keep = keep.gather(-1, positions.clamp(max=n - 1)) | (positions >= n)
        if view.valid is not None:
            slot_keep = slot_keep & view.valid
        self.keep(slot_keep)

    def truncate(self, n_tokens: int) -> None:
        """Forget every token at position ``>= n_tokens`` and count ``n_tokens`` as seen: undoes forwards that
        were run only to read the cache (KVzip's reconstruction), whatever the storage kind."""
        if not self.is_initialized or self.seen_tokens <= n_tokens:
            return
        dense_untouched = isinstance(self.storage, DenseStorage) and self.storage.positions is None
        if dense_untouched:
            self.storage.crop(self.seen_tokens - n_tokens)
        else:
            view = self.storage.view()
            positions = view.positions if view.positions is not None else torch.arange(
                view.keys.shape[2], device=view.keys.device).expand(view.keys.shape[:3])
            keep = positions < n_tokens
            if view.valid is not None:
                keep = keep & view.valid
            self.storage = self.storage.select(keep)
        self.seen_tokens = n_tokens
        self.last_view = None

    def __repr__(self) -> str:
        return f"CompressedLayer({type(self.storage).__name__}, seen={self.seen_tokens})"


class SlidingLayer(CompressedLayer):
    """One sliding-window layer: a :class:`~kvpress.storage.SlidingWindowStorage` ring over the storage the
    factory builds (dense or quantized), with transformers' sliding-window semantics.

    Between forwards it holds the last ``window - 1`` tokens (fewer at the start); a forward's queries attend to
    those plus the forward's own tokens, each query to the last ``window`` positions up to itself. The mask
    transformers builds for the layer covers the positions ``mask_offset .. mask_offset + kv_length - 1``
    (:meth:`get_mask_sizes`, identical to ``DynamicSlidingWindowLayer``'s), and attention reads it at each slot's
    position minus ``mask_offset``. Policies leave these layers alone unless they are told to act on them.
    """

    is_sliding = True
    layer_type = "sliding_attention"

    def __init__(self, storage_factory: StorageFactory, layer_idx: int, window: int):
        self.window = check_window(window)
        self.inner_factory = storage_factory
        super().__init__(lambda idx: SlidingWindowStorage(storage_factory(idx), self.window), layer_idx)
        self.mask_offset = 0  # absolute position of the first column of this forward's mask

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.mask_offset = max(self.seen_tokens - self.window + 1, 0)
        return super().update(key_states, value_states, *args, **kwargs)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.seen_tokens >= self.window:
            return self.window - 1 + query_length, self.seen_tokens - self.window + 1
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return self.window

    @property
    def plain_view(self) -> bool:
        """The view of the forward in progress is dense and contiguous: transformers' own key/value tensors."""
        return self.storage.step_plain

    def full_nbytes(self) -> int:
        """Bytes transformers' ``DynamicSlidingWindowLayer`` would hold now (the last ``window - 1`` tokens)."""
        return min(self.seen_tokens, self.window - 1) * self.token_nbytes if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("crop is not supported on a sliding-window layer (its window has slid)")

    def truncate(self, n_tokens: int) -> None:
        raise NotImplementedError(
            "a sliding-window layer cannot be truncated (tokens that slid out are gone): snapshot it with "
            "KVPressCache.save_uncompressed_layers() and restore it with KVPressCache.truncate(n, saved)"
        )

    def snapshot(self) -> "SlidingLayer":
        """A copy sharing the held tensors, to restore after forwards that must leave no trace."""
        out = copy.copy(self)
        out.storage = self.storage.snapshot()
        out.policy_state = dict(self.policy_state)
        out.last_view = None
        return out

    def __repr__(self) -> str:
        return f"SlidingLayer({type(self.storage.inner).__name__}, window={self.window}, seen={self.seen_tokens})"


@dataclass
class LayerReport:
    """Bytes and tokens held by one layer.

    ``full_nbytes`` is what the same layer would hold uncompressed (transformers' own layer: every token for a
    full-attention layer, the last ``window - 1`` for a sliding one), so ``nbytes / full_nbytes`` is the layer's
    bytes ratio.
    """

    layer_idx: int
    kind: str  # storage class name, or the transformers layer class for layers kvpress leaves alone
    nbytes: int
    tokens_min: int
    tokens_max: int
    tokens_mean: float
    seen_tokens: int
    layer_type: str = "full_attention"  # "full_attention", "sliding_attention", or transformers' name
    full_nbytes: int = 0


class KVPressCache(Cache):
    """A transformers :class:`~transformers.Cache` that stores less.

    Full-attention layers are :class:`CompressedLayer` objects whose storage a policy may shrink;
    sliding-window layers are :class:`SlidingLayer` rings over the same storage kinds (quantized under
    ``KVQuant``), bounded by their window. Layers of other types (chunked attention, linear attention) keep
    transformers' own layer class and rules, and their bytes are counted too.

    Args:
        config: the model config (its text config is used).
        storage_factory: builds each compressed layer's storage from its layer index (dense by default;
            a quantizer's ``create_storage`` for quantized storage).
    """

    def __init__(self, config: PretrainedConfig, storage_factory: StorageFactory | None = None):
        self.storage_factory = storage_factory or dense_storage_factory
        text_config = config.get_text_config(decoder=True)
        layers: list[Any] = []
        for idx, (kind, kwargs) in enumerate(cache_layer_specs(text_config)):
            if kind == "full_attention":
                layers.append(CompressedLayer(self.storage_factory, idx))
            elif kind == "sliding_attention":
                layers.append(SlidingLayer(self.storage_factory, idx, kwargs["sliding_window"]))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
        super().__init__(layers=layers)
        self.model_state: dict[str, Any] = {}  # memory a policy keeps across layers (e.g. a global budget)
        # What a saved file records (kvpress.persist): the model's architecture, the model itself when known
        # (a weak reference set by kvpress.patch), and optionally the policy expression and prompt length.
        self.config_signature = config_signature(config)
        self.source_model: Any = None
        self.policy_expression: str | None = None
        self.prompt_tokens: int | None = None
        self.extra: dict[str, Any] = {}

    @property
    def compressed_layers(self) -> list[int]:
        """Indices of the layers held in kvpress storage (full-attention and sliding-window ones)."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, CompressedLayer)]

    def layer_types(self) -> list[str]:
        """``"full_attention"`` / ``"sliding_attention"`` (or transformers' layer class name) per layer."""
        return [getattr(layer, "layer_type", type(layer).__name__) for layer in self.layers]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (not tokens held): what positions of new tokens count from."""
        return super().get_seq_length(layer_idx)

    def layer_nbytes(self) -> list[int]:
        """Physical bytes held by each layer."""
        return [_layer_nbytes(layer) for layer in self.layers]

    def nbytes(self) -> int:
        """Physical bytes of every tensor the cache holds."""
        return sum(self.layer_nbytes())

    def storage_nbytes(self) -> int:
        """Bytes of the allocations behind those tensors (equal to :meth:`nbytes` unless a view pins more)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                total += (layer.storage.storage_nbytes() if layer.is_initialized else 0) + layer.state_nbytes()
            else:
                total += sum(t.untyped_storage().nbytes() for t in _plain_tensors(layer))
        return total

    def report(self) -> list[LayerReport]:
        """Per-layer bytes and tokens held."""
        out = []
        for idx, layer in enumerate(self.layers):
            full = None
            if isinstance(layer, CompressedLayer) and layer.is_initialized:
                lengths = layer.storage.lengths().float()
                kind, seen, full = _storage_kind(layer.storage), layer.seen_tokens, layer.full_nbytes()
            else:
                keys = getattr(layer, "keys", None)
                n = 0 if keys is None or keys.dim() < 3 else keys.shape[-2]
                lengths = torch.tensor([float(n)])
                kind, seen = type(layer).__name__, layer.get_seq_length() if hasattr(layer, "get_seq_length") else n
            nbytes = _layer_nbytes(layer)
            out.append(
                LayerReport(
                    idx, kind, nbytes, int(lengths.min()), int(lengths.max()), float(lengths.mean()), int(seen),
                    getattr(layer, "layer_type", type(layer).__name__), nbytes if full is None else full,
                )
            )
        return out

    def bytes_ratios(self) -> dict[str, float | None]:
        """Bytes held over bytes the uncompressed cache would hold: ``"whole"`` (every layer) and per layer type
        (``"full_attention"``, ``"sliding_attention"``, ...); ``None`` for a group that holds nothing yet.

        A policy that acts on full-attention layers only is sized by the ``"full_attention"`` ratio; the memory
        saved is the ``"whole"`` one.
        """
        held: dict[str, int] = {}
        full: dict[str, int] = {}
        for row in self.report():
            for key in ("whole", row.layer_type):
                held[key] = held.get(key, 0) + row.nbytes
                full[key] = full.get(key, 0) + row.full_nbytes
        return {key: (held[key] / full[key] if full[key] else None) for key in held}

    def __repr__(self) -> str:
        """One line (layer count, storage kinds, tokens held, bytes): messages that print a cache stay short."""
        kinds: dict[str, int] = {}
        held, seen = 0, 0
        for layer in self.layers:
            compressed = isinstance(layer, CompressedLayer)
            kind = _storage_kind(layer.storage) if compressed and layer.is_initialized else type(layer).__name__
            kinds[kind] = kinds.get(kind, 0) + 1
            if compressed and layer.is_initialized:
                held = max(held, layer.storage.max_length)
                seen = max(seen, layer.seen_tokens)
        kinds_text = ", ".join(f"{n}x {k}" for k, n in kinds.items())
        return (
            f"KVPressCache({len(self.layers)} layers: {kinds_text}; at most {held} of {seen} tokens held per head; "
            f"{self.nbytes():,} bytes)"
        )

    def truncate(self, n_tokens: int, saved_layers: dict[int, Any] | None = None) -> None:
        """Forget the tokens after the first ``n_tokens`` in every full-attention layer, and put back the other
        layers (sliding-window ones, whose window slid) as :meth:`save_uncompressed_layers` saved them."""
        for idx, layer in enumerate(self.layers):
            if saved_layers is not None and idx in saved_layers:
                saved = saved_layers[idx]
                self.layers[idx] = saved.snapshot() if isinstance(saved, SlidingLayer) else copy.copy(saved)
            elif isinstance(layer, SlidingLayer):
                if layer.seen_tokens > n_tokens:
                    layer.truncate(n_tokens)  # raises: the window slid and nothing was saved
            elif isinstance(layer, CompressedLayer):
                layer.truncate(n_tokens)

    def save_uncompressed_layers(self) -> dict[int, Any]:
        """Copies of the layers that cannot be truncated (sliding-window rings, layers kvpress leaves to
        transformers), sharing their tensors (replaced, not written, on update), to restore with :meth:`truncate`
        after forwards that must leave no trace."""
        return {
            i: layer.snapshot() if isinstance(layer, SlidingLayer) else copy.copy(layer)
            for i, layer in enumerate(self.layers)
            if isinstance(layer, SlidingLayer) or not isinstance(layer, CompressedLayer)
        }

    def save(self, path: Any, **kwargs: Any) -> int:
        """Write this cache to ``path`` (safetensors; see :func:`kvpress.persist.save_cache` for the keyword
        arguments: ``model``, ``policy``, ``prompt_tokens``, ``extra``); returns the file's bytes. Read it back
        with :func:`kvpress.load_cache`."""
        if _CACHE_WRITER is None:  # kvpress.persist registers itself on import (``import kvpress`` does it)
            raise RuntimeError("kvpress.persist is not imported: import kvpress (or kvpress.persist) to save caches")
        return _CACHE_WRITER(self, path, **kwargs)

    def clone(self) -> "KVPressCache":
        """A deep copy: fan one prefill out to several compression settings.

        A cache filled with gradients enabled holds tensors of an autograd graph, which ``copy.deepcopy`` refuses;
        the clone holds detached copies of those (same values), and the original is left as it was."""
        memo: dict[int, Any] = {}
        for tensor in _graph_tensors(self):
            memo[id(tensor)] = tensor.detach().clone()
        return copy.deepcopy(self, memo)


def _storage_kind(storage: KVStorage) -> str:
    if isinstance(storage, SlidingWindowStorage):
        return f"SlidingWindow[{type(storage.inner).__name__}]"
    return type(storage).__name__


def _index_rows(value: Any, index: torch.Tensor, batch: int) -> Any:
    """``value`` with every tensor whose first axis is the batch (size ``batch``) indexed by ``index``."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index.to(value.device)) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _index_rows(v, index, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_index_rows(v, index, batch) for v in value)
    return value


def _graph_tensors(root: Any) -> list[torch.Tensor]:
    """The tensors reachable from ``root`` (through attributes, dicts, lists, tuples and sets) that belong to an
    autograd graph (``grad_fn`` set): the ones ``copy.deepcopy`` cannot copy."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.grad_fn is not None:
                found.append(obj)
        elif isinstance(obj, torch.nn.Module):
            continue  # parameters are graph leaves, which deepcopy copies
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            for name in getattr(type(obj), "__slots__", ()):
                stack.append(getattr(obj, name, None))
    return found


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _plain_tensors(layer: Any) -> list[torch.Tensor]:
    return [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]


def _layer_nbytes(layer: Any) -> int:
    if isinstance(layer, CompressedLayer):
        return layer.nbytes()
    return sum(t.numel() * t.element_size() for t in _plain_tensors(layer))
