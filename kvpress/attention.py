"""Attention over a compressed layer: masks in absolute positions, GQA without repeating K/V, rotations.

transformers builds its attention mask over absolute positions ``0..seen+q_len-1`` (the cache reports that
size). A compressed layer holds only some of those positions, so the mask columns of the slots it holds are
gathered; ragged padding slots are masked out. When nothing was evicted, attention is left to the model's
own implementation with the original arguments, which keeps the uncompressed path bit-identical.

Decode steps (at most :data:`DECODE_MAX_QUERIES` query tokens) over a quantized or ragged layer read the held
form directly (:class:`~kvpress.storage.LazyAttentionView` ``decode``: fused Triton kernels on CUDA, chunked
torch paths on CPU, see :mod:`kvpress.kernels`); longer forwards (prefill, extend) build the view's tensors and
use SDPA.
"""

from __future__ import annotations

import torch

from kvpress.kernels import dense_attention
from kvpress.storage import AttentionView, LazyAttentionView

# Query tokens per forward up to which a lazy (quantized / ragged) view is attended through its decode path.
DECODE_MAX_QUERIES = 16


def allowed_slots(
    attention_mask: torch.Tensor | None,
    view: AttentionView,
    q_start: int,
    q_len: int,
    last_n: int | None = None,
    offset: int = 0,
    window: int | None = None,
) -> torch.Tensor | None:
    """Which held slot each of the last ``last_n`` queries may attend to.

    Args:
        attention_mask: the model's mask over absolute positions, ``[batch|1, 1, q_len, seen+q_len]`` (bool,
            or additive float where 0 means allowed), or ``None`` for plain causal attention.
        view: the layer's attention view (positions ``[batch, kv_heads, seq]`` or ``None`` = ``0..seq-1``).
        q_start: absolute position of the first query of this forward.
        q_len: number of queries in this forward.
        last_n: restrict to the last ``last_n`` queries (default: all).
        offset: absolute position of the mask's first column (a sliding-window layer's mask starts at its
            window, see :class:`~kvpress.cache.SlidingLayer`); slots before it are not allowed.
        window: the layer's sliding window: query ``p`` may attend to positions ``p - window + 1 .. p`` (applied
            when there is no mask; a sliding layer's mask already encodes it). ``None`` for full attention.

    Returns:
        ``[batch, kv_heads, n, seq]`` bool, or ``None`` when every query may attend to every slot.
    """
    n = q_len if last_n is None else min(last_n, q_len)
    batch, heads, seq = view.shape[:3]
    device = view.device
    if attention_mask is None:
        # One causal query: every held slot is in its past (a cache holds only tokens already fed), so a single
        # decode query needs no mask (within a sliding window, once every held slot is inside it); the last of
        # several queries does once it is past every held position.
        q_last = q_start + q_len - 1
        if (n == 1 and view.valid is None and (q_len == 1 or _all_in_past(view, q_last, seq))
                and (window is None or _all_in_window(view, q_last, window))):
            return None
        positions = view.positions if view.positions is not None else torch.arange(seq, device=device).expand(batch, heads, seq)
        q_abs = torch.arange(q_start + q_len - n, q_start + q_len, device=device).view(1, 1, n, 1)
        allowed = positions.unsqueeze(2) <= q_abs
        if window is not None:
            allowed = allowed & (positions.unsqueeze(2) > q_abs - window)
    else:
        mask = attention_mask[..., -n:, :]
        allowed_abs = mask if mask.dtype == torch.bool else mask == 0
        allowed_abs = allowed_abs[:, 0].expand(batch, n, allowed_abs.shape[-1])  # [batch, n, columns]
        if view.positions is None and offset == 0:
            allowed = allowed_abs[..., :seq].unsqueeze(1).expand(batch, heads, n, seq)
        else:
            columns = allowed_abs.shape[-1]
            positions = view.positions if view.positions is not None else torch.arange(seq, device=device).expand(batch, heads, seq)
            column = positions - offset
            inside = (column >= 0) & (column < columns)
            index = column.clamp(0, columns - 1).unsqueeze(2).expand(batch, heads, n, seq)
            allowed = allowed_abs.unsqueeze(1).expand(batch, heads, n, columns).gather(-1, index)
            allowed = allowed & inside.unsqueeze(2)
    if view.valid is not None:
        allowed = allowed & view.valid.unsqueeze(2)
    return allowed


def _all_in_window(view: AttentionView, q_abs: int, window: int) -> bool:
    if view.positions is None:
        return q_abs - window < 0
    return bool((view.positions > q_abs - window).all())


def _all_in_past(view: AttentionView, q_abs: int, seq: int) -> bool:
    if view.positions is None:
        return seq <= q_abs + 1
    return bool((view.positions <= q_abs).all())


def plain_causal_prefill(attention_mask: torch.Tensor | None, view: AttentionView, q_len: int) -> bool:
    """Whether ``q_len`` queries over ``view`` are a plain causal prefill: no mask from the model, every slot a
    token of this forward (nothing evicted, no padding), and read as tensors (not through ``decode``)."""
    return (attention_mask is None and view.positions is None and view.valid is None and q_len == view.shape[2]
            and not reads_held_form(view, q_len))


def reads_held_form(view: AttentionView, q_len: int) -> bool:
    """Whether :func:`attend` reads ``view`` through its lazy ``decode`` path (not built tensors + SDPA)."""
    return isinstance(view, LazyAttentionView) and not view.is_materialised and q_len <= DECODE_MAX_QUERIES


def attend(
    query: torch.Tensor, view: AttentionView, allowed: torch.Tensor | None, scaling: float, causal: bool = False
) -> torch.Tensor:
    """Scaled dot-product attention of ``query`` over a compressed view.

    Args:
        query: ``[batch, q_heads, q_len, head_dim]`` post-RoPE queries (unrotated).
        view: keys/values ``[batch, kv_heads, seq, head_dim]``, possibly held rotated.
        allowed: ``[batch, kv_heads, q_len, seq]`` bool or ``None``.
        scaling: softmax scale.
        causal: the queries are every held token, nothing evicted, plain causal mask (``allowed`` is ``None``):
            SDPA's causal kernel instead of a built mask (prefill over quantized storage).

    Returns:
        ``[batch, q_len, q_heads, head_dim]``, the layout transformers' attention functions return.
    """
    q_len = query.shape[2]
    if allowed is not None:
        # A query with no allowed slot (a padding query) attends to everything instead of producing NaN.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    if reads_held_form(view, q_len):
        return view.decode(query, allowed, scaling)
    return dense_attention(query, view.keys, view.values, allowed, scaling, view.key_rotation, view.value_rotation,
                           causal=causal)
