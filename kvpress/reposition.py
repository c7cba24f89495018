"""Rotary re-positioning: attend as if evicted tokens had never been in the sequence.

transformers caches keys *after* RoPE, at their original positions, and gives new tokens positions that count
from the number of tokens seen. After eviction the query-to-key distances therefore keep growing with the text
(the sink tokens of StreamingLLM drift past the model's trained context). StreamingLLM instead assigns
positions *within the cache*: the ``n``-th held token sits at position ``n`` and a new token at the number of
tokens held.

RoPE rotations compose (``R(a) R(b) = R(a + b)`` for every rope type whose frequencies do not depend on the
sequence length), so this is done exactly at attention time, without touching what the cache stores: the keys
whose offset (``rank - position``) differs from that of the newest tokens are rotated by the difference, in a
transient copy.
Stored tensors stay as they are, so quantized storage is never re-quantized, and the correction is recomputed
from the held positions each step.
"""

from __future__ import annotations

import torch
from torch import nn

from kvpress.storage import AttentionView, LazyAttentionView

# Rope types whose inverse frequencies are fixed, so rotations compose exactly.
REPOSITION_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freqs(model: nn.Module) -> list[torch.Tensor]:
    """The RoPE inverse frequencies ``[head_dim // 2]`` (float64) of every decoder layer of ``model``.

    Layers of one type share one tensor (Gemma 3 has a rope per layer type; the others one for all layers).

    Raises:
        ValueError: the model has no rotary embedding kvpress can find, or its rope type rescales frequencies
            with the sequence length (``dynamic``, ``longrope``), so rotations do not compose.
    """
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        raise ValueError(f"reposition: found no rotary embedding in {type(model).__name__}")
    by_type: dict[str | None, torch.Tensor] = {}
    for layer_type in dict.fromkeys(layer_types):
        rope_type = rotary.rope_type
        if isinstance(rope_type, dict):  # one rope per layer type (Gemma 3)
            rope_type = rope_type[layer_type]
        if rope_type not in REPOSITION_ROPE_TYPES:
            raise ValueError(
                f"reposition needs a rope type with fixed frequencies ({', '.join(REPOSITION_ROPE_TYPES)}); this "
                f"model uses {rope_type!r}: pass reposition=False to the policy"
            )
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
        by_type[layer_type] = (rotary.inv_freq if inv_freq is None else inv_freq).detach().double()
    return [by_type[layer_type] for layer_type in layer_types]


def rotate(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Apply the RoPE rotation by ``shift`` positions to ``x`` (transformers' rotate-half layout).

    Args:
        x: ``[..., head_dim]``.
        shift: integer positions broadcastable to ``x.shape[:-1]``.
        inv_freq: ``[head_dim // 2]`` float64.
    """
    angle = shift.to(inv_freq.dtype).unsqueeze(-1) * inv_freq  # float64: large shifts stay exact enough
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def reposition(view: AttentionView, seen_tokens: int, inv_freq: torch.Tensor) -> AttentionView:
    """Make attention over ``view`` see every held key at its rank in the cache, the queries just after them.

    Only relative positions matter to RoPE attention, and this forward's queries and newest keys already share
    one offset (``held - seen``: they sit exactly ``seen - held`` positions above where re-positioning puts
    them). So the queries are left as they are and each held key is rotated by the difference between its own
    offset (``rank - position``) and that one. Keys already at the shared offset are untouched: for
    StreamingLLM only the sinks move, which keeps the per-step cost at ``n_sink`` rotations.

    Args:
        view: the layer's attention view after this forward's tokens were appended; ``positions`` ``None``
            means nothing was evicted and it is returned unchanged.
        seen_tokens: tokens seen by the layer, this forward's included.
        inv_freq: the layer's entry of :func:`rope_inv_freqs`.

    Returns:
        a view whose keys ``[batch, kv_heads, seq, head_dim]`` are rotated where needed (a copy; the stored
        tensors are never modified). ``positions`` keeps the original positions, which masks still use. A lazy
        quantized view whose moved keys are all held exactly (sinks, window) stays lazy: only those keys are
        rotated and decode keeps reading the packed body; otherwise the view's keys are built and rotated.
    """
    if view.positions is None:
        return view
    batch, kv_heads, seq = view.shape[:3]
    if view.valid is None:
        rank = torch.arange(seq, device=view.device)
        newest = seq - seen_tokens  # held - seen, the same for every head
        shift = rank - view.positions - newest  # [batch, kv_heads, seq]
        moved = shift != 0
    else:
        rank = view.valid.long().cumsum(-1) - 1
        newest = (view.valid.sum(-1) - seen_tokens).unsqueeze(-1)
        shift = rank - view.positions - newest
        moved = view.valid & (shift != 0)
    where = moved.nonzero(as_tuple=True)  # one host sync; the slots to rotate
    if where[0].numel() == 0:
        return view
    shift = shift[where]  # [n_moved]
    if isinstance(view, LazyAttentionView) and not view.is_materialised and view.rotate_exact_keys is not None:
        # A quantized layer whose moved keys are all held exactly (StreamingLLM's sinks): rotate just those, the
        # body stays packed and decode still reads it in place.
        freq = inv_freq.to(view.device)
        moved_view = view.rotate_exact_keys(where, lambda x: rotate(x, shift, freq))
        if moved_view is not None:
            return moved_view
    keys = view.keys
    picked = keys[where]  # [n_moved, head_dim]
    if view.key_rotation is not None:  # held as K @ R: rotate in RoPE space, then back into the held basis
        rotation = view.key_rotation.to(keys.dtype)
        picked = rotate(picked @ rotation.transpose(-1, -2), shift, inv_freq.to(keys.device)) @ rotation
    else:
        picked = rotate(picked, shift, inv_freq.to(keys.device))
    keys = keys.index_put(where, picked)  # out of place: the held tensor is never written
    return AttentionView(keys, view.values, view.positions, view.valid, view.key_rotation, view.value_rotation)
