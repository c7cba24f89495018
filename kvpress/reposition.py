"""Rotary re-positioning: attend as if evicted tokens had never been in the sequence.

transformers caches keys *after* RoPE, at their original positions, and gives new tokens positions that count
from the number of tokens seen. After eviction the query-to-key distances therefore keep growing with the text
(the sink tokens of StreamingLLM drift past the model's trained context). StreamingLLM instead assigns
positions *within the cache*: the ``n``-th held token sits at position ``n`` and a new token at the number of
tokens held.

RoPE rotations compose (``R(a) R(b) = R(a + b)`` for every rope type whose frequencies do not depend on the
sequence length), so this is done exactly at attention time, without touching what the cache stores: each held
key is rotated by ``rank - position`` and the queries by ``held - seen``. Stored tensors stay as they are, so
quantized storage is never re-quantized, and the correction is recomputed from the held positions each step.
"""

from __future__ import annotations

import torch
from torch import nn

from kvpress.storage import AttentionView

# Rope types whose inverse frequencies are fixed, so rotations compose exactly.
REPOSITION_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(model: nn.Module, layer_idx: int) -> torch.Tensor:
    """The inverse frequencies ``[head_dim // 2]`` of the RoPE used by layer ``layer_idx`` of ``model``.

    Raises:
        ValueError: the model has no rotary embedding kvpress can find, or its rope type rescales frequencies
            with the sequence length (``dynamic``, ``longrope``), so rotations do not compose.
    """
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    layer_type = layer_types[layer_idx] if layer_types else None
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        raise ValueError(f"reposition: found no rotary embedding in {type(model).__name__}")
    rope_type = rotary.rope_type
    if isinstance(rope_type, dict):  # one rope per layer type (Gemma 3)
        rope_type = rope_type[layer_type]
    if rope_type not in REPOSITION_ROPE_TYPES:
        raise ValueError(
            f"reposition needs a rope type with fixed frequencies ({', '.join(REPOSITION_ROPE_TYPES)}); this model "
            f"uses {rope_type!r}: pass reposition=False to the policy"
        )
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
    if inv_freq is None:
        inv_freq = rotary.inv_freq
    return inv_freq.detach().double()


def rotate(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Apply the RoPE rotation by ``shift`` positions to ``x`` (transformers' rotate-half layout).

    Args:
        x: ``[..., head_dim]``.
        shift: integer positions broadcastable to ``x.shape[:-1]``.
        inv_freq: ``[head_dim // 2]`` float64.
    """
    angle = shift.to(inv_freq.dtype).unsqueeze(-1) * inv_freq  # float64: large shifts stay exact enough
    angle = torch.cat((angle, angle), dim=-1)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def reposition(
    view: AttentionView, query: torch.Tensor, seen_tokens: int, inv_freq: torch.Tensor
) -> tuple[AttentionView, torch.Tensor]:
    """Move held keys to their rank in the cache and this forward's queries to just after them.

    Args:
        view: the layer's attention view after this forward's tokens were appended; ``positions`` ``None``
            means nothing was evicted and both are returned unchanged.
        query: ``[batch, q_heads, q_len, head_dim]`` post-RoPE queries at their original positions.
        seen_tokens: tokens seen by the layer, this forward's included.
        inv_freq: from :func:`rope_inv_freq`.

    Returns:
        the view with keys ``[batch, kv_heads, seq, head_dim]`` rotated to positions ``0..held-1`` per head (and
        held unrotated in the Hadamard sense: ``key_rotation`` is folded back), and the queries rotated to
        ``held - q_len .. held - 1``. ``positions`` keeps the original positions for masking.
    """
    if view.positions is None:
        return view, query
    keys = view.keys
    if view.key_rotation is not None:  # held as K @ R: undo R before rotating in RoPE space
        keys = keys @ view.key_rotation.to(keys.dtype).transpose(-1, -2)
    batch, kv_heads, seq = keys.shape[:3]
    if view.valid is None:
        rank = torch.arange(seq, device=keys.device).expand(batch, kv_heads, seq)
        held = torch.full((batch, kv_heads), seq, device=keys.device)
    else:
        rank = view.valid.long().cumsum(-1) - 1
        held = view.valid.sum(-1)
    keys = rotate(keys, rank - view.positions, inv_freq.to(keys.device))
    query_shift = (held - seen_tokens).repeat_interleave(query.shape[1] // kv_heads, dim=1)  # [batch, q_heads]
    query = rotate(query, query_shift[:, :, None], inv_freq.to(query.device))
    new_view = AttentionView(keys, view.values, view.positions, view.valid, None, view.value_rotation)
    return new_view, query
