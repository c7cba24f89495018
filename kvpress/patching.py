"""``kvpress.patch(model, policy)``: run a Hugging Face causal LM on a compressed cache, then restore it.

Hooks used, all transformers extension points and all removed on exit:
  * an attention function registered with ``AttentionInterface`` (plus its mask builder with
    ``AttentionMaskInterface``) and selected with ``model.set_attn_implementation``;
  * a forward pre-hook on the decoder that hands it a :class:`~kvpress.cache.KVPressCache` whenever it would
    otherwise build a ``DynamicCache`` (plain forwards with ``use_cache=True``, ``generate``, pipelines).
"""

from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from kvpress.attention import allowed_slots, attend, plain_causal_prefill, reads_held_form
from kvpress.attention_mass import attention_with_mass
from kvpress.cache import CompressedLayer, KVPressCache, SlidingLayer, StorageFactory, dense_storage_factory
from kvpress.compat import (
    CACHE_ARGUMENT_NAMES,
    TRANSFORMERS_VERSION,
    cache_argument,
    cache_position_index,
    output_cache,
)
from kvpress.context import ForwardContext, LayerContext
from kvpress.memory import RELEASE_EVERY, release_freed_memory
from kvpress.policies.base import Policy, RatioSized
from kvpress.policies.interface import Pipeline, is_storage_spec
from kvpress.reposition import reposition, rope_inv_freqs
from kvpress.storage import LazyAttentionView
from kvpress.storage.dense import DenseSpec

SUPPORTED_ATTENTION = ("sdpa", "eager")
# Model types tested in the suite. Others that follow transformers' AttentionInterface design usually work:
# pass allow_untested=True to try one.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text")
_IMPL_NAME = {base: f"kvpress_{base}" for base in SUPPORTED_ATTENTION}

# attention module -> session; model -> session (one session per model at a time)
_MODULE_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, PatchSession]" = weakref.WeakKeyDictionary()
_MODEL_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, PatchSession]" = weakref.WeakKeyDictionary()


def _check_not_empty(args: tuple, kwargs: dict) -> None:
    """Refuse a forward over 0 tokens (``input_ids`` ``[batch, 0]``) with an error naming the input, before
    transformers fails in a reshape."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    for name, tensor, dim in (("input_ids", ids, -1), ("inputs_embeds", embeds, 1)):
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[dim] == 0:
            raise ValueError(f"{name} holds 0 tokens (shape {tuple(tensor.shape)}): a prompt needs at least one "
                             "token (an empty string tokenizes to none without special tokens)")


def resolve_policy(policy: Any) -> tuple[Policy | None, StorageFactory]:
    """Split what the user passed into (eviction policy or None, storage factory)."""
    if policy is None:
        return None, dense_storage_factory
    if isinstance(policy, Pipeline):
        factory = policy.storage.create_storage if policy.storage is not None else _dense_factory(policy.policies)
        return (policy if policy.policies else None), factory
    if isinstance(policy, Policy):
        return policy, _dense_factory([policy])
    if is_storage_spec(policy):
        return None, policy.create_storage
    raise ValueError(
        f"policy must be None, a kvpress.policies.Policy, a storage spec (e.g. a quantizer) or a Pipeline "
        f"of them, got {policy!r}"
    )


def _dense_factory(policies: list[Policy]) -> StorageFactory:
    """Dense storage, growable where no policy evicts during decoding (no copy of the layer per step); split by
    head class when a policy keeps fixed classes of heads (DuoAttention): each class dense on its own, so evicting
    from one never rebuilds the other, where ragged storage would copy the layer."""
    splitters = [p for p in policies if callable(getattr(p, "split_storage", None))]
    if splitters:
        return splitters[0].split_storage(DenseSpec()).create_storage
    return DenseSpec(growable=not any(p.acts_at("decode") for p in policies)).create_storage


class PatchSession:
    """State of one ``kvpress.patch`` block. Yielded by :func:`patch`."""

    def __init__(self, model: PreTrainedModel, policy: Any):
        self.model = model
        self.policy, self.storage_factory = resolve_policy(policy)
        self.spec = policy
        self.text_config = model.config.get_text_config(decoder=True)
        self.num_layers = self.text_config.num_hidden_layers
        self.base_impl: str = model.config._attn_implementation
        self.decoder: nn.Module = model.base_model if model.base_model is not model else model
        # The decoder's own name for its cache argument ("cache" since transformers 5.24, "past_key_values" before).
        self.cache_arg = cache_argument(self.decoder)
        self.cache_index = cache_position_index(self.decoder)
        self.active_cache: KVPressCache | None = None
        self.forward_seen = False  # the decoder pre-hook ran for the forward in progress
        self.forwards = 0  # forwards through the kvpress cache in this block
        self.plain_causal = False  # the forward in progress has no padding and no custom mask
        self.seen = ""  # what the pre-hook saw, for error messages
        # Whole-model policy steps (Policy.after_forward): inputs of the outer forward, and while a policy runs
        # its own forwards, the per-layer observer that replaces the policy.
        self.forward_inputs: dict[str, Any] = {}
        self.observer: Callable[[LayerContext], None] | None = None
        self.in_policy_forward = False
        self._tokenizer: Any = None
        # Rotary frequencies per layer when the policy attends at positions within the cache.
        self.inv_freq: dict[int, torch.Tensor] = {}
        # A policy that accumulates attention mass (H2O) gets it from the attention computation itself:
        # "sum" (or "max" during a policy's own forwards, for KVzip), None for transformers' own attention.
        self.default_mass = "sum" if getattr(self.policy, "wants_attention_mass", False) else None
        self.mass_reduce: str | None = self.default_mass
        # A policy that scores from hidden states (the learned scorer) gets each attention module's input.
        self.wants_hidden = bool(getattr(self.policy, "wants_hidden_states", False))
        if self.policy is not None:
            self.policy.attach(model)
        storage_spec = policy.storage if isinstance(policy, Pipeline) else policy if is_storage_spec(policy) else None
        if callable(getattr(storage_spec, "attach", None)):  # e.g. KVQuant's rotate="auto" looks at the model
            storage_spec.attach(model)
        self.acts_at_decode = self.policy is not None and self.policy.acts_at("decode")
        if self.policy is not None and getattr(self.policy, "reposition", False):
            self.inv_freq = dict(enumerate(rope_inv_freqs(model)))

    def new_cache(self) -> KVPressCache:
        """An empty compressed cache for this model and policy, to pass to the model as its cache argument
        (``model(ids, **kvpress.cache_kwargs(model, cache))``; ``cache=`` on transformers >= 5.24)."""
        cache = KVPressCache(self.model.config, self.storage_factory)
        cache.source_model = weakref.ref(self.model)
        return cache

    # -- hooks -----------------------------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Hand the decoder a KVPressCache wherever transformers would use or build a plain one."""
        self.active_cache = None
        self.forward_seen = True
        _check_not_empty(args, kwargs)
        name = self.cache_arg
        for alias in CACHE_ARGUMENT_NAMES:  # a caller may use the other spelling; pass the declared one on
            if alias != name and alias in kwargs:
                value = kwargs.pop(alias)
                if value is not None:
                    if kwargs.get(name) is not None:
                        raise ValueError(f"both {name!r} and {alias!r} were passed to {type(module).__name__}.forward")
                    kwargs[name] = value
        positional = self.cache_index is not None and len(args) > self.cache_index
        cache = args[self.cache_index] if positional else kwargs.get(name)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config, "use_cache", True)
        self.seen = f"{name}={type(cache).__name__}"
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        # No padding and no custom mask: attention is plain causal, which lets kvpress skip building masks.
        self.plain_causal = mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool(mask.all()))
        if not self.in_policy_forward:
            self.forward_inputs = {
                "input_ids": kwargs.get("input_ids", args[0] if args else None),
                "attention_mask": mask,
                "fresh": not isinstance(cache, Cache) or cache.get_seq_length() == 0,
            }
            if self.forward_inputs["fresh"]:
                self._size_ratio_policies(args, kwargs)
        if isinstance(cache, KVPressCache):
            self.active_cache = cache
            return args, kwargs
        if cache is None and use_cache:
            replacement = self.new_cache()
        elif type(cache) is DynamicCache and cache.get_seq_length() == 0:
            replacement = self.new_cache()  # generate() prepares an empty DynamicCache; replace it with ours.
        elif isinstance(cache, Cache):
            raise ValueError(
                f"kvpress.patch: {name} is a {type(cache).__name__} that already holds tokens; "
                "pass a kvpress cache (session.new_cache()) or none"
            )
        else:
            return args, kwargs  # no caching in this forward
        self.active_cache = replacement
        if positional:
            args = (*args[: self.cache_index], replacement, *args[self.cache_index + 1 :])
        else:
            kwargs[name] = replacement
        return args, kwargs

    def _size_ratio_policies(self, args: tuple, kwargs: dict) -> None:
        """A fresh cache's first forward sizes the policies given a ``compression_ratio`` instead of their native
        size (StreamingLLM's window, DuoAttention's sparsity) before any layer runs, so that storage depending on
        it (DuoAttention's head groups) can be built at the layers' first update."""
        ids, embeds = kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")
        n = ids.shape[-1] if isinstance(ids, torch.Tensor) else embeds.shape[1] if isinstance(embeds, torch.Tensor) else 0
        stages = self.policy.policies if isinstance(self.policy, Pipeline) else [self.policy]
        for stage in stages:
            if isinstance(stage, RatioSized) and n > 0:
                stage.size_at_first_forward(n)

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Raise if this forward ran with caching on but not through kvpress (never a silent no-op)."""
        self.forward_seen = False
        cache = self.active_cache
        if cache is None:
            return
        returned = output_cache(output)
        if returned is not None and returned is not cache:
            self._not_applied(f"the decoder returned a {type(returned).__name__}, not the kvpress cache it was given")
        for layer in cache.layers:
            if isinstance(layer, CompressedLayer) and layer.last_view is not None:
                layer.last_view = None
                self._not_applied(
                    f"layer {layer.layer_idx} stored its keys in the kvpress cache but attention did not run "
                    f"through kvpress (attention implementation {self.model.config._attn_implementation!r})"
                )
        if self.policy is not None and not self.in_policy_forward:
            self.policy.after_forward(self._forward_context(cache))
        self.forwards += 1
        if self.forwards % RELEASE_EVERY == 0:  # pages freed by rebuilt layers back to the OS (kvpress.memory)
            release_freed_memory()

    def _forward_context(self, cache: KVPressCache) -> ForwardContext:
        inputs = self.forward_inputs
        mask = inputs.get("attention_mask")
        fresh = inputs.get("fresh", False)
        input_ids = inputs.get("input_ids")
        phase = "prefill" if fresh else ("decode" if input_ids is not None and input_ids.shape[-1] == 1 else "extend")
        return ForwardContext(
            cache=cache,
            phase=phase,
            input_ids=input_ids,
            attention_mask=mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
            num_layers=self.num_layers,
            run=lambda *a, **kw: self._policy_forward(cache, *a, **kw),
            tokenizer=self.tokenizer,
        )

    def _policy_forward(
        self,
        cache: KVPressCache,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        observer: Callable[[LayerContext], None] | None = None,
        mass: str | None = None,
    ) -> Any:
        """A decoder forward run by a policy on ``cache``: layers call ``observer`` instead of the policy, with
        ``ctx.attention_mass`` reduced by ``mass`` ("sum" / "max") when given."""
        outer_inputs, outer_active = self.forward_inputs, self.active_cache
        self.in_policy_forward, self.observer, self.mass_reduce = True, observer, mass
        try:
            return self.decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **{self.cache_arg: cache},
            )
        finally:
            self.in_policy_forward, self.observer, self.mass_reduce = False, None, self.default_mass
            self.forward_inputs, self.active_cache = outer_inputs, outer_active
            self.forward_seen = False

    def tokenizer(self) -> Any:
        """The model's tokenizer, from its local files (for policies that write prompts, e.g. KVzip)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            path = getattr(self.model, "name_or_path", None) or self.model.config._name_or_path
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"this policy needs the model's tokenizer and none was found at {path!r}; pass tokenizer=... "
                    "to the policy"
                ) from err
        return self._tokenizer

    def _not_applied(self, what: str) -> None:
        raise RuntimeError(
            f"kvpress.patch did not take effect on transformers {TRANSFORMERS_VERSION}: {what}; the decoder "
            f"forward was called with {self.seen} (kvpress passes its cache as {self.cache_arg!r}, the name "
            f"{type(self.decoder).__name__}.forward declares). Please report this with your transformers version."
        )

    def _capture_hidden(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Attention-module pre-hook: keep its input hidden states ``[batch, new, hidden]`` for the policy."""
        cache = self.active_cache
        if cache is None:
            return
        layer = cache.layers[module.layer_idx]
        if isinstance(layer, CompressedLayer) and self.acts_on(layer):
            layer.last_hidden = kwargs.get("hidden_states", args[0] if args else None)

    def acts_on(self, layer: CompressedLayer) -> bool:
        """Whether the policy (or the observer of a policy's own forward) sees ``layer``: full-attention layers
        always, sliding-window layers only for a policy told to act on them (:meth:`Policy.on_sliding_layers`)."""
        if self.policy is None:
            return False
        return self.policy.acts_on(layer.layer_type)

    def base_attention(self, module: nn.Module):
        if self.base_impl == "sdpa":
            return ALL_ATTENTION_FUNCTIONS["sdpa"]
        # transformers' eager attention is defined per model file (some add soft-capping, sinks, ...).
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")

    def after_attention(
        self, layer: CompressedLayer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
    ) -> None:
        view = layer.last_view
        layer.last_view = None  # the transient view is not held between steps
        if (self.policy is None and self.observer is None) or view is None or not self.acts_on(layer):
            layer.last_mass = layer.last_hidden = None
            return
        offset, window = _mask_frame(layer)
        q_len = query.shape[2]
        q_start = layer.seen_tokens - q_len
        phase = "prefill" if q_start == 0 else ("decode" if q_len == 1 else "extend")
        if self.observer is None and phase == "decode" and not self.acts_at_decode:
            # a prompt-only policy costs nothing per decode step; a rule the storage holds itself applies here
            layer.storage = layer.storage.settle(layer.seen_tokens)
            return
        if view.key_rotation is not None:
            query = query @ view.key_rotation.to(query.dtype)
        positions = view.positions
        if positions is None:
            batch, heads, seq = view.shape[:3]
            positions = torch.arange(seq, device=view.device).expand(batch, heads, seq)
        ctx = LayerContext(
            layer_idx=layer.layer_idx,
            num_layers=self.num_layers,
            phase=phase,
            queries=query,
            key_data=lambda: view.keys,  # built only if the policy reads them (lazy views stay undecoded)
            value_data=lambda: view.values,
            positions=positions,
            allowed_fn=lambda n: allowed_slots(attention_mask, view, q_start, q_len, last_n=n, offset=offset,
                                               window=window),
            scaling=scaling,
            seq_len=layer.seen_tokens,
            state=layer.policy_state,
            allowed_rows_fn=lambda a, b: allowed_slots(
                None if attention_mask is None else attention_mask[..., a:b, :], view, q_start + a, b - a,
                offset=offset, window=window,
            ),
            model_state=self.active_cache.model_state if self.active_cache is not None else {},
            held=view.valid,
            attention_mass=layer.last_mass,
            hidden_states=layer.last_hidden,
            layer_type=layer.layer_type,
        )
        layer.last_mass = layer.last_hidden = None
        if self.observer is not None:
            self.observer(ctx)
            return
        keep = self.policy.select(ctx)
        if keep is not None:
            layer.keep(keep)


def kvpress_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function registered with transformers while a model is patched."""
    session = _MODULE_SESSIONS.get(module)
    cache = session.active_cache if session is not None else None
    layer_idx = getattr(module, "layer_idx", None)
    layer = cache.layers[layer_idx] if cache is not None and layer_idx is not None else None
    if session is None:
        raise RuntimeError("kvpress attention called on a module that is not under kvpress.patch")
    if not session.forward_seen:
        session._not_applied(f"attention of layer {layer_idx} ran without the decoder pre-hook having run")
    base = session.base_attention(module)
    if isinstance(layer, CompressedLayer) and layer.last_view is None:
        session._not_applied(
            f"attention of layer {layer_idx} ran but the kvpress cache handed to the decoder was never updated "
            "(the model used another cache)"
        )
    if not isinstance(layer, CompressedLayer):
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    view = layer.last_view
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    sliding = isinstance(layer, SlidingLayer)
    offset, window = _mask_frame(layer)
    # A lazy (quantized / ragged) view always goes through kvpress's attention: `key`/`value` are stand-ins.
    # A sliding layer's dense ring with nothing evicted hands attention transformers' own tensors and mask.
    if sliding:
        untouched = layer.plain_view and view.valid is None and view.key_rotation is None
    else:
        untouched = view.positions is None and view.valid is None and view.key_rotation is None
    wants_mass = session.mass_reduce is not None and session.acts_on(layer)
    repositions = layer_idx in session.inv_freq and session.acts_on(layer)
    if wants_mass:  # the policy reads attention mass: compute it with the attention output
        if repositions:
            view = layer.last_view = reposition(view, layer.seen_tokens, session.inv_freq[layer_idx])
        q_len = query.shape[2]
        q_start = layer.seen_tokens - q_len
        causal_from = view.keys.shape[2] - q_len if untouched and session.plain_causal and not sliding else None
        rows = lambda a, b: allowed_slots(  # noqa: E731
            None if attention_mask is None else attention_mask[..., a:b, :], view, q_start + a, b - a,
            offset=offset, window=window)
        out, layer.last_mass = attention_with_mass(query, view, rows, scaling, causal_from,
                                                   reduce=session.mass_reduce)
        weights = None
    elif untouched and view.value_rotation is None and not isinstance(view, LazyAttentionView):
        out, weights = base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    else:
        if repositions:
            view = layer.last_view = reposition(view, layer.seen_tokens, session.inv_freq[layer_idx])
        q_len = query.shape[2]
        causal = False
        full_layer = window is None and offset == 0
        if (full_layer and q_len == 1 and attention_mask is None and view.decode_masks_padding
                and reads_held_form(view, q_len)):
            allowed = None  # one causal query sees every held (past) token; the decode path skips padding itself
        elif full_layer and plain_causal_prefill(attention_mask, view, q_len):
            allowed, causal = None, True  # SDPA's causal kernel: no [q_len, seq] mask built (quantized prefill)
        else:
            allowed = allowed_slots(attention_mask, view, layer.seen_tokens - q_len, q_len, offset=offset,
                                    window=window)
        out, weights = attend(query, view, allowed, scaling, causal=causal), None
    session.after_attention(layer, query, attention_mask, scaling)
    return out, weights


def _mask_frame(layer: CompressedLayer) -> tuple[int, int | None]:
    """``(offset, window)`` of a layer's mask for :func:`~kvpress.attention.allowed_slots`: a sliding-window
    layer's mask starts at ``mask_offset``; a full layer's at 0 with no window."""
    if isinstance(layer, SlidingLayer):
        return layer.mask_offset, layer.window
    return 0, None


def _register_attention(base: str) -> str:
    name = _IMPL_NAME[base]
    AttentionInterface.register(name, kvpress_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _unregister_attention_if_unused() -> None:
    if _MODEL_SESSIONS:
        return
    for name in _IMPL_NAME.values():
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]


def _check_supported(model: Any, allow_untested: bool) -> None:
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"kvpress.patch needs a transformers PreTrainedModel, got {type(model).__name__}")
    impl = model.config._attn_implementation
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"unsupported attention implementation {impl!r}; kvpress patches {', '.join(SUPPORTED_ATTENTION)} "
            "(load the model with attn_implementation='sdpa' or call model.set_attn_implementation('sdpa'))"
        )
    text_config = model.config.get_text_config(decoder=True)
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES and not allow_untested:
        raise ValueError(
            f"unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(pass allow_untested=True to try another decoder that uses transformers' AttentionInterface)"
        )
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        raise ValueError("models with attention logit soft-capping (e.g. Gemma 2) are not supported")
    if not _attention_modules(model):
        raise ValueError(f"found no attention modules with a layer_idx in {type(model).__name__}")


@contextmanager
def patch(model: PreTrainedModel, policy: Any = None, *, allow_untested: bool = False) -> Iterator[PatchSession]:
    """Run ``model`` on a compressed KV cache inside the ``with`` block.

    Args:
        model: a transformers causal LM using ``sdpa`` or ``eager`` attention.
        policy: ``None`` (uncompressed: identical outputs to the unpatched model), an eviction
            :class:`~kvpress.policies.Policy`, a storage spec such as a quantizer, or a
            :class:`~kvpress.policies.Pipeline` (``evict | quantize``).
        allow_untested: allow model types outside :data:`SUPPORTED_MODEL_TYPES`.

    Yields:
        the :class:`PatchSession` (``session.new_cache()`` gives an empty compressed cache).

    The model's attention implementation and hooks are restored on exit, also when the block raises.
    Patching a model that is already patched (nested or concurrent) raises ``RuntimeError``.
    """
    if model in _MODEL_SESSIONS:
        raise RuntimeError("this model is already under kvpress.patch; nested or concurrent patching is refused")
    _check_supported(model, allow_untested)
    session = PatchSession(model, policy)
    modules = _attention_modules(model)
    original_impl = session.base_impl

    _MODEL_SESSIONS[model] = session
    handles = []
    try:
        name = _register_attention(original_impl)
        for module in modules:
            _MODULE_SESSIONS[module] = session
        handles.append(session.decoder.register_forward_pre_hook(session._pre_forward, with_kwargs=True))
        handles.append(session.decoder.register_forward_hook(session._post_forward))
        if session.wants_hidden:
            handles += [m.register_forward_pre_hook(session._capture_hidden, with_kwargs=True) for m in modules]
        model.set_attn_implementation(name)
        yield session
    finally:
        for handle in handles:
            handle.remove()
        if model.config._attn_implementation != original_impl:
            model.set_attn_implementation(original_impl)
        for module in modules:
            _MODULE_SESSIONS.pop(module, None)
        _MODEL_SESSIONS.pop(model, None)
        session.active_cache = None
        _unregister_attention_if_unused()
