"""The attention function of DuoAttention head identification (both identifiers, :mod:`kvpress.duo.identify` and
:mod:`kvpress.duo.cheap`, run the model through it): the model's own SDPA output, alpha-mixed per (layer, KV head)
with sink + window attention (gate training), or recording the attention mass some query rows put on some key
columns (the needle identifier). Registered with transformers' ``AttentionInterface`` for the duration of
:func:`identification_attention` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn import functional as F

_IMPL = "kvpress_duo_identify"


class MixState:
    """What the identification attention does at each layer.

    ``alpha()`` gives ``[layers, kv_heads]`` gates (mode ``"mix"``); ``record`` (mode ``"needle"``) collects, per
    layer, the attention mass ``[kv_heads]`` that the query rows ``rows`` put on the key columns ``columns``.
    """

    def __init__(self, n_sink: int, window: int, alpha: Callable[[], torch.Tensor] | None = None,
                 rows: slice | None = None, columns: torch.Tensor | None = None):
        self.n_sink, self.window = n_sink, window
        self.alpha = alpha
        self.rows, self.columns = rows, columns
        self.record: dict[int, torch.Tensor] = {}
        self._masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def streaming_mask(self, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
        """``[q_len, kv_len]`` bool: causal, and within the first ``n_sink`` keys or the last ``window`` ones."""
        key = (q_len, kv_len, device)
        if key not in self._masks:
            q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
            k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
            self._masks[key] = (k_pos <= q_pos) & ((k_pos < self.n_sink) | (q_pos - k_pos < self.window))
        return self._masks[key]


_STATE: dict[int, MixState] = {}  # id(model's attention module) -> state of the running identification


def _padding_allowed(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0


def duo_identify_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's own SDPA attention, plus (mode ``"mix"``) the alpha-mix with sink + window attention or (mode
    ``"needle"``) a record of attention on needle columns. With alpha = 1 the output is the model's, bit for bit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    full, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                              dropout=dropout, **kwargs)  # [b, q, heads, d]
    state = _STATE.get(id(module))
    if state is None:
        return full, None
    layer = module.layer_idx
    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = d**-0.5 if scaling is None else scaling
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    if state.alpha is not None:
        allowed = state.streaming_mask(q_len, k.shape[2], query.device)
        padding = _padding_allowed(attention_mask)
        if padding is not None:
            allowed = allowed & padding
        stream = F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, scale=scaling).transpose(1, 2)
        alpha = state.alpha()[layer].to(full.dtype).repeat_interleave(groups).view(1, 1, heads, 1)
        return alpha * full + (1 - alpha) * stream, None
    if state.columns is not None and state.rows is not None:
        with torch.no_grad():
            q_abs = torch.arange(k.shape[2] - q_len, k.shape[2], device=query.device)[state.rows]
            logits = query[:, :, state.rows].float() @ k.float().transpose(-1, -2) * scaling
            causal = torch.arange(k.shape[2], device=query.device).view(1, -1) <= q_abs.view(-1, 1)
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            mass = probs[..., state.columns].sum(-1).mean(-1)  # [b, heads]
            mass = mass.view(b, kv_heads, groups).mean((0, 2))
            state.record[layer] = state.record.get(layer, 0) + mass
    return full, None


@contextmanager
def identification_attention(model: Any, state: MixState) -> Iterator[None]:
    """Run ``model``'s attention through :func:`duo_identify_attention` with ``state`` inside the block."""
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )
    from transformers.modeling_utils import AttentionInterface

    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not modules:
        raise ValueError(f"found no attention modules with a layer_idx in {type(model).__name__}")
    original = model.config._attn_implementation
    AttentionInterface.register(_IMPL, duo_identify_attention)
    AttentionMaskInterface.register(_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        for module in modules:
            _STATE[id(module)] = state
        model.set_attn_implementation(_IMPL)
        yield
    finally:
        for module in modules:
            _STATE.pop(id(module), None)
        model.set_attn_implementation(original)


def _decoder(model: Any) -> Any:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def final_hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """``[1, n, hidden]`` the decoder's last hidden states of ``ids`` (no cache)."""
    return _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
