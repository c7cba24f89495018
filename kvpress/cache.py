"""The compressed cache: a transformers ``Cache`` whose full-attention layers physically hold less."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin

from kvpress.compat import cache_layer_specs

from kvpress.storage import AttentionView, DenseStorage, KVStorage, LazyAttentionView

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
        self.storage = storage_factory(layer_idx)
        self.layer_idx = layer_idx
        self.seen_tokens = 0
        self.is_initialized = False
        self.policy_state: dict[str, Any] = {}  # per-layer memory of a policy (e.g. accumulated scores)
        self.last_view: AttentionView | None = None  # what attention reads in the current forward
        self.last_mass: torch.Tensor | None = None  # attention mass of the current forward, if a policy asked
        self.last_hidden: torch.Tensor | None = None  # attention input of the current forward, if a policy asked

    # -- transformers layer API ------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_heads, new, head_dim]`` K/V and return what attention reads.

        A lazy view (quantized / ragged storage) is not built here: kvpress's attention reads ``last_view``, so
        the model is handed zero-stride stand-ins of the right shape and dtype (no memory) instead of tensors
        that would force a full dequantization or padding every step.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
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


@dataclass
class LayerReport:
    """Bytes and tokens held by one layer."""

    layer_idx: int
    kind: str  # storage class name, or the transformers layer class for layers kvpress leaves alone
    nbytes: int
    tokens_min: int
    tokens_max: int
    tokens_mean: float
    seen_tokens: int


class KVPressCache(Cache):
    """A transformers :class:`~transformers.Cache` that stores less.

    Full-attention layers are :class:`CompressedLayer` objects whose storage a policy may shrink. Layers of
    other types (sliding-window layers of Gemma 3, for instance) keep transformers' own layer class and its
    own rules: they are already bounded, and kvpress neither compresses them nor hides their bytes.

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
        """Indices of the layers kvpress compresses (the full-attention ones)."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, CompressedLayer)]

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
            if isinstance(layer, CompressedLayer) and layer.is_initialized:
                lengths = layer.storage.lengths().float()
                kind, seen = type(layer.storage).__name__, layer.seen_tokens
            else:
                keys = getattr(layer, "keys", None)
                n = 0 if keys is None or keys.dim() < 3 else keys.shape[-2]
                lengths = torch.tensor([float(n)])
                kind, seen = type(layer).__name__, layer.get_seq_length() if hasattr(layer, "get_seq_length") else n
            out.append(
                LayerReport(
                    idx, kind, _layer_nbytes(layer), int(lengths.min()), int(lengths.max()),
                    float(lengths.mean()), int(seen),
                )
            )
        return out

    def __repr__(self) -> str:
        """One line (layer count, storage kinds, tokens held, bytes): messages that print a cache stay short."""
        kinds: dict[str, int] = {}
        held, seen = 0, 0
        for layer in self.layers:
            compressed = isinstance(layer, CompressedLayer)
            kind = type(layer.storage).__name__ if compressed and layer.is_initialized else type(layer).__name__
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
        """Forget the tokens after the first ``n_tokens`` in every compressed layer, and put back the other
        layers (e.g. sliding-window ones) as :meth:`save_uncompressed_layers` saved them."""
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, CompressedLayer):
                layer.truncate(n_tokens)
            elif saved_layers is not None and idx in saved_layers:
                self.layers[idx] = copy.copy(saved_layers[idx])

    def save_uncompressed_layers(self) -> dict[int, Any]:
        """Shallow copies of the layers kvpress leaves to transformers (their tensors are replaced, not written,
        on update), to restore with :meth:`truncate` after forwards that must leave no trace."""
        return {i: copy.copy(layer) for i, layer in enumerate(self.layers) if not isinstance(layer, CompressedLayer)}

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
