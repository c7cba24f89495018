"""``QuantizedStorage``: one layer's K/V held as packed low-bit codes (KIVI axes, optional rotation and GEAR).

Segments, each in position order, per ``[batch, kv_head]``:

    sinks     the first ``n_sink`` tokens, full precision, never quantized
    body      :class:`~kvpress.quant.body.QuantizedBody`: keys per-channel in groups of G tokens, values per-token
    residual  the most recent tokens, full precision: between ``residual`` and ``residual + F - 1`` of them
              (``F`` = group_size, or ``lowrank_block`` with low-rank correction)

"Full precision" is ``KVQuant.fp_dtype``: the model's dtype by default, or e.g. float16 to halve those bytes on a
float32 model (views cast them back to the model's dtype).

New tokens go to the residual; when it reaches ``residual + F`` tokens, its oldest whole multiple of ``F`` tokens
is quantized in one go (rotated first). A token is quantized once, from its value as held in the window (exact,
or rounded to ``fp_dtype``): nothing dequantized is ever quantized again (eviction gathers codes, see
:meth:`QuantizedStorage.select`).

Rotation: keys are quantized as ``K @ R`` and values as ``V @ Rv``. :meth:`~QuantizedStorage.view` returns
keys and values in that rotated basis with ``key_rotation=R`` / ``value_rotation=Rv`` so attention rotates the
query and un-rotates its output. Sinks and residual are held unrotated and rotated on the fly (exact tokens
keep the precision of ``fp_dtype``). ``rotate="auto"`` (the default) rotates both at 2 bits, neither above.
Without outlier reordering ``R`` is a constant shared by every layer (like a weight, not counted in a layer's
bytes); with reordering it is calibrated per layer from the first keys and values appended and counted.

Exact new tokens: the tokens of an ``append`` are in hand when attention runs right after it, so (with
``exact_new_tokens``, the default) the first :meth:`view` after an append shows them exactly, as KIVI and
transformers' ``QuantizedCache`` attend the prefill in full precision; that view drops the exact copy, so
nothing beyond the stored form outlives the step. Later views show what is stored.

Eviction (:meth:`QuantizedStorage.select`, for ``policy | KVQuant`` pipelines) gathers codes and keeps key-group
scales; heads may keep different numbers of tokens (padded slots, marked invalid in the view).

Attention reads the held form: :meth:`view` returns a :class:`~kvpress.storage.LazyAttentionView`. Decode steps
attend through its ``decode`` (:meth:`QuantizedStorage._decode`): the exact segments (sinks, window, this step's
tokens, unrotated) and the packed body through :func:`kvpress.kernels.quantized_layer_decode` (fused Triton kernel
on CUDA, fused C++ kernel on CPU, chunked torch path otherwise: the body is never dequantized whole), merged by
log-sum-exp.
The dequantized ``keys``/``values`` tensors of the view are built only if something reads them (a policy, a
re-positioning layer, a prefill or extend forward). The window is flushed by a fused quantize-and-pack kernel
(Triton on CUDA, C++ on CPU) when the body has no GEAR terms (bit-exact with
:func:`kvpress.quant.quantizer.quantize`).

Limits: keys are rotated after RoPE with one matrix per layer shared by all heads (no pre-RoPE grouped-head
rotation); ``crop`` (assisted decoding) is not supported.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from kvpress import kernels
from kvpress.kernels.dispatch import pack_backend, quantize_pack
from kvpress.quant.body import BodyConfig, QuantizedBody, QuantSpec
from kvpress.storage.base import AttentionView, KVStorage, LazyAttentionView, StorageState, defers_eviction

POSITION_DTYPE = torch.int32
# Re-positioning's keys to replace: slots ``where`` (a (batch, head, slot) index tuple) get ``fn(keys)``, keys in the
# unrotated basis (float32).
MovedKeys = tuple[tuple[torch.Tensor, ...], Callable[[torch.Tensor], torch.Tensor]]


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """``a`` then ``b`` along the token axis, always a new tensor (a slice of the caller's K/V would keep the
    whole of it alive)."""
    return b.clone(memory_format=torch.contiguous_format) if a is None else torch.cat([a, b], dim=2)


def packed_body(
    body: QuantizedBody, n_tokens: int | None = None, group_ids: torch.Tensor | None = None
) -> kernels.PackedBody:
    """``body``'s tensors as the kernels read them (:class:`kvpress.kernels.PackedBody`; no copies).

    Args:
        n_tokens: attend the first ``n_tokens`` body tokens (default all).
        group_ids: ``[B, H, N]`` int32 key group of each token when groups were thinned by eviction (computed
            when ``None`` and needed).
    """
    if body.group_len is not None and group_ids is None:
        group_ids = body.group_ids().to(torch.int32).contiguous()
    cfg = body.cfg
    return kernels.PackedBody(
        k_codes=body.k_codes, k_scale=body.k_scale, k_zero=body.k_zero,
        v_codes=body.v_codes, v_scale=body.v_scale, v_zero=body.v_zero,
        key_bits=cfg.key_bits, value_bits=cfg.value_bits, group_size=cfg.group_size, value_group=cfg.value_group,
        n_tokens=body.n_tokens if n_tokens is None else n_tokens,
        group_ids=group_ids if body.group_len is not None else None, group_block=body.group_block,
        k_left=body.k_left, v_left=body.v_left, k_right=body.k_right, v_right=body.v_right,
        k_out_val=body.k_out_val, k_out_idx=body.k_out_idx, v_out_val=body.v_out_val, v_out_idx=body.v_out_idx,
    )  # fmt: skip


class QuantizedStorage(KVStorage):
    """Quantized storage of one layer (see the module docstring). Built by :meth:`KVQuant.create_storage`."""

    def __init__(self, spec: QuantSpec, layer_idx: int = 0):
        self.spec = spec
        self.layer_idx = layer_idx
        self.cfg: BodyConfig | None = None
        self.dtype: torch.dtype | None = None  # the model's (compute) dtype: what views return
        self.fp_dtype: torch.dtype | None = None  # dtype of the held sinks and residual window
        self.key_rotation: torch.Tensor | None = None
        self.value_rotation: torch.Tensor | None = None
        self.rotation_owned = False  # per-layer (calibrated) rotations are held, and counted, by the layer
        self.sink_k: torch.Tensor | None = None  # [B, H, s, D] fp_dtype, unrotated
        self.sink_v: torch.Tensor | None = None
        self.body: QuantizedBody | None = None
        self.res_k: torch.Tensor | None = None  # [B, H, r, D] fp_dtype, unrotated
        self.res_v: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [B, H, N] int32; None: slots are positions 0..N-1
        self.valid: torch.Tensor | None = None  # [B, H, N] bool; None: every slot is a real token
        self.fresh: tuple[torch.Tensor, torch.Tensor] | None = None  # exact tokens of the last append
        self.kernels: str | None = None  # kernel backend for this layer ("auto"/"torch"/"triton"; None: global)
        # body -> its token groups (int32); one dict shared by the snapshots views take (copy.copy), so that
        # decode steps between two flushes or selects compute them once
        self._group_ids: dict[str, QuantizedBody | torch.Tensor] = {}
        self.masked_slots = 0  # evicted tokens still held, masked (valid False), in the head masking most

    # -- sizes -----------------------------------------------------------------------------------------------
    @property
    def n_sink_slots(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    @property
    def n_body_slots(self) -> int:
        return 0 if self.body is None else self.body.n_tokens

    @property
    def n_residual_slots(self) -> int:
        return 0 if self.res_k is None else self.res_k.shape[2]

    @property
    def n_slots(self) -> int:
        return self.n_sink_slots + self.n_body_slots + self.n_residual_slots

    @property
    def flush_block(self) -> int:
        """Tokens quantized together: a key group, or a low-rank block when low-rank correction is on."""
        return self.spec.lowrank_block if self.spec.rank > 0 else self.spec.group_size

    def _shape(self) -> tuple[int, int]:
        ref = next(t for t in (self.sink_k, self.res_k) if t is not None)
        return ref.shape[0], ref.shape[1]

    # -- KVStorage -------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, start_position: int) -> None:
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(f"keys/values must both be [batch, kv_heads, new, head_dim], got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")  # fmt: skip
        if self.cfg is None:
            self._initialise(keys, values)
        b, h, new, _ = keys.shape
        held = self.n_slots
        if self.positions is None and start_position != held:
            self.positions = torch.arange(held, device=keys.device, dtype=POSITION_DTYPE).expand(b, h, held)
        if self.positions is not None:
            pos = torch.arange(start_position, start_position + new, device=keys.device, dtype=POSITION_DTYPE)
            self.positions = torch.cat([self.positions, pos.expand(b, h, new)], dim=2)
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(b, h, new)], dim=2)
        k, v = keys.to(self.fp_dtype), values.to(self.fp_dtype)
        take = 0
        if self.n_body_slots == 0 and self.n_residual_slots == 0:
            take = min(self.spec.n_sink - self.n_sink_slots, new)
            if take > 0 or self.sink_k is None:
                self.sink_k, self.sink_v = _cat(self.sink_k, k[:, :, :take]), _cat(self.sink_v, v[:, :, :take])
        self.res_k, self.res_v = _cat(self.res_k, k[:, :, take:]), _cat(self.res_v, v[:, :, take:])
        self._flush()
        self.fresh = (keys.to(self.dtype), values.to(self.dtype)) if self.spec.exact_new_tokens else None

    def view(self) -> AttentionView:
        """The layer as attention reads it: a lazy view (see the module docstring); consumes the exact copy of
        the last append."""
        fresh, self.fresh = self.fresh, None
        if fresh is not None and fresh[0].shape[2] == self.n_slots:
            # Everything held came with this append (a prefill): attention reads the exact tokens as they are,
            # unrotated, so neither they nor the queries and outputs go through the rotation.
            positions = None if self.positions is None else self.positions.long()
            return AttentionView(fresh[0], fresh[1], positions, self.valid)
        return copy.copy(self)._lazy_view(fresh)  # a snapshot: appends and selects replace tensors, never write

    def _lazy_view(
        self, fresh: tuple[torch.Tensor, torch.Tensor] | None, moved: MovedKeys | None = None
    ) -> AttentionView:
        """The lazy view of this snapshot; ``moved = (where, fn)``: keys at slots ``where`` replaced by ``fn(keys)``
        (unrotated basis), see :meth:`_rotate_exact_keys`."""
        b, h = self._shape()
        return LazyAttentionView(
            shape=(b, h, self.n_slots, self.cfg.head_dim),
            device=self.sink_k.device,
            materialise=lambda: self._materialise(fresh, moved),
            decode=lambda query, allowed, scaling: self._decode(fresh, query, allowed, scaling, moved),
            positions=None if self.positions is None else self.positions.long(),
            valid=self.valid,
            key_rotation=self.key_rotation,
            value_rotation=self.value_rotation,
            rotate_exact_keys=None if moved is not None else (
                lambda where, fn: self._rotate_exact_keys(fresh, where, fn)
            ),
        )

    def _rotate_exact_keys(self, fresh, where, fn) -> AttentionView | None:
        """A lazy view with the keys of slots ``where`` replaced by ``fn(keys)``, or ``None`` when one of those
        slots is a quantized body token (re-positioning then builds the whole view)."""
        slot = where[2]
        s, nq = self.n_sink_slots, self.n_body_slots
        cut = self.n_slots - (0 if fresh is None else fresh[0].shape[2])
        if bool(((slot >= s) & (slot < s + nq) & (slot < cut)).any()):
            return None
        return self._lazy_view(fresh, (where, fn))

    def _materialise(
        self, fresh: tuple[torch.Tensor, torch.Tensor] | None, moved: MovedKeys | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's key and value ``[B, H, N, D]`` in the compute dtype, rotated basis (body dequantized
        unless this append's exact tokens cover every slot, as after a prefill); ``moved`` keys replaced."""
        n = 0 if fresh is None else fresh[0].shape[2]
        if n and n == self.n_slots:
            keys, values = self._rotate(fresh[0], self.key_rotation), self._rotate(fresh[1], self.value_rotation)
        else:
            keys, values = self._rotated32()
            if n:
                keys[:, :, -n:] = self._rotate(fresh[0], self.key_rotation)
                values[:, :, -n:] = self._rotate(fresh[1], self.value_rotation)
        if moved is not None:
            where, fn = moved
            picked = self._rotate(fn(self._unrotate(keys[where], self.key_rotation)), self.key_rotation)
            keys = keys.index_put(where, picked)
        return keys.to(self.dtype), values.to(self.dtype)

    def _decode(
        self,
        fresh: tuple[torch.Tensor, torch.Tensor] | None,
        query: torch.Tensor,
        allowed: torch.Tensor | None,
        scaling: float,
        moved: MovedKeys | None = None,
    ) -> torch.Tensor:
        """Decode attention read from the held form.

        Args:
            fresh: this step's exact tokens (they replace the last slots), or ``None``.
            moved: ``(where, fn)``: keys of exact slots ``where`` replaced by ``fn(keys)`` (re-positioning).
            query: ``[B, q_heads, L, D]`` post-RoPE queries (unrotated).
            allowed: ``[B, H, L, N]`` bool over the slots (every row with at least one True) or ``None``.
            scaling: softmax scale.

        Returns:
            ``[B, L, q_heads, D]`` in the query's dtype.
        """
        b, q_heads, q_len, d = query.shape
        h = self._shape()[1]
        groups = q_heads // h
        q = (query.float() * scaling).reshape(b, h, groups * q_len, d)
        s, nq, n = self.n_sink_slots, self.n_body_slots, self.n_slots
        n_fresh = 0 if fresh is None else fresh[0].shape[2]
        cut = n - n_fresh  # slots from `cut` on are shown exactly from `fresh`
        n_sink, n_body, n_res = min(s, cut), min(nq, max(0, cut - s)), max(0, cut - s - nq)
        ex_k = [self.sink_k[:, :, :n_sink], self.res_k[:, :, :n_res]]
        ex_v = [self.sink_v[:, :, :n_sink], self.res_v[:, :, :n_res]]
        if n_fresh:
            ex_k.append(fresh[0])
            ex_v.append(fresh[1])
        mask = None
        if allowed is not None:
            device = allowed.device
            cols = torch.cat([torch.arange(n_sink, device=device), torch.arange(s + nq, s + nq + n_res, device=device),
                              torch.arange(cut, n, device=device)])  # fmt: skip
            mask = allowed.index_select(-1, cols)
        exact_keys = torch.cat(ex_k, dim=2)
        if moved is not None:
            (bi, hi, slot), fn = moved
            # slot -> index among the exact keys (sinks, then window, then this step's tokens)
            in_window = torch.where(slot < s, slot, slot - s - nq + n_sink)
            index = torch.where(slot >= cut, slot - cut + n_sink + n_res, in_window)
            exact_keys = exact_keys.float().index_put((bi, hi, index), fn(exact_keys[bi, hi, index].float()))
        part = kernels.quantized_layer_decode(
            q, self._packed(n_body) if n_body else None, exact_keys, torch.cat(ex_v, dim=2), q_len,
            body_mask=None if allowed is None else allowed[..., s : s + n_body], exact_mask=mask,
            key_rotation=self.key_rotation, value_rotation=self.value_rotation, backend=self.kernels, dtype=self.dtype,
        )  # fmt: skip
        out = part.out.view(b, h, groups, q_len, d)
        return out.reshape(b, q_heads, q_len, d).transpose(1, 2).to(query.dtype)

    def _packed(self, n_tokens: int) -> kernels.PackedBody:
        """The body for the kernels, attending its first ``n_tokens`` tokens (token groups cached per body)."""
        gid = None
        if self.body.group_len is not None:
            memo = self._group_ids
            if memo.get("body") is not self.body:
                memo["gid"] = self.body.group_ids().to(torch.int32).contiguous()
                memo["body"] = self.body
            gid = memo["gid"]
        return packed_body(self.body, n_tokens, gid)

    def select(self, keep: torch.Tensor) -> KVStorage:
        """Keep the slots where ``keep`` is True, without re-quantizing anything.

        A few evicted tokens per head (:func:`kvpress.storage.base.defers_eviction`) are masked (``valid`` False)
        rather than dropped; the select that would pass that count drops every masked token at once.

        Per head the kept slots, in order, are sinks, body tokens, residual tokens. Heads keeping fewer tokens
        than the most-keeping head are padded (slots marked invalid, duplicating the head's last kept sink or
        body token, so they fall in the body or sink segment). The new segments have the same length in every
        head: ``s' = max`` kept sinks per head (a head with fewer fills them with its next tokens as full-precision
        copies: dequantized values for body tokens, so no loss), ``r' = min`` kept residual tokens per head; the
        body is the rest. Body slots come from kept body tokens (codes gathered by
        :meth:`QuantizedBody.take`) or from exact residual tokens of heads that kept more than ``r'``, which are
        quantized now, for the first time, as new key groups at the end of the body.
        """
        self.fresh = None
        if self.cfg is None:  # nothing appended yet
            return self
        if self.valid is not None:
            keep = keep & self.valid
        if (self.valid is None and bool(keep.all())) or (self.valid is not None and torch.equal(keep, self.valid)):
            return self
        dropped = int((~keep if self.valid is None else self.valid & ~keep).sum(-1).max())
        if defers_eviction(self.masked_slots, dropped, keep):
            out = copy.copy(self)  # mask now, drop with a later select
            out.valid, out.masked_slots = keep, self.masked_slots + dropped
            return out
        b, h, n = keep.shape
        device = keep.device
        counts = keep.sum(-1)
        k_new = int(counts.max())
        s_old, q_old = self.n_sink_slots, self.n_body_slots
        slot = torch.arange(n, device=device)
        slot_cls = (slot >= s_old).long() + (slot >= s_old + q_old).long()  # 0 sink, 1 body, 2 residual
        kept = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :, :k_new]
        # Padding goes right after each head's last kept sink/body token.
        n_front = (keep & (slot_cls < 2)).sum(-1, keepdim=True)
        pads = k_new - counts.unsqueeze(-1)
        j = torch.arange(k_new, device=device)
        src = torch.where(j < n_front, j, torch.where(j < n_front + pads, n_front - 1, j - pads)).clamp_min(0)
        idx = kept.gather(2, src) if k_new else kept
        is_pad = (j >= n_front) & (j < n_front + pads)
        cls = slot_cls[idx]
        s_new = int((cls == 0).sum(-1).max()) if k_new else 0
        r_new = int((cls == 2).sum(-1).min()) if k_new else 0
        q_new = k_new - s_new - r_new

        out = copy.copy(self)
        out.masked_slots = 0
        positions = self.positions.long() if self.positions is not None else slot.expand(b, h, n)
        out.positions = positions.gather(2, idx).to(POSITION_DTYPE)
        out.valid = None if not bool(is_pad.any()) else ~is_pad
        out.sink_k, out.sink_v = self._gather_exact(idx[:, :, :s_new])
        out.res_k, out.res_v = self._gather_exact(idx[:, :, k_new - r_new:])
        out.body = self._select_body(idx[:, :, s_new:k_new - r_new], cls[:, :, s_new:k_new - r_new]) if q_new else None
        return out

    def tensors(self) -> list[torch.Tensor]:
        held = [self.sink_k, self.sink_v, self.res_k, self.res_v, self.positions, self.valid]
        if self.rotation_owned:
            held += [self.key_rotation, self.value_rotation]
        if self.fresh is not None:
            held += list(self.fresh)
        out = [t for t in held if t is not None]
        if self.body is not None:
            out += self.body.tensors()
        return out

    def lengths(self) -> torch.Tensor:
        if self.cfg is None:
            return torch.zeros(0, 0, dtype=torch.long)
        if self.valid is not None:
            return self.valid.sum(-1)
        b, h = self._shape()
        return torch.full((b, h), self.n_slots, dtype=torch.long, device=self.sink_k.device)

    def index_batch(self, index: torch.Tensor) -> KVStorage:
        out = copy.copy(self)
        if self.cfg is None:
            return out
        index = index.to(self.sink_k.device)
        for name in ("sink_k", "sink_v", "res_k", "res_v", "positions", "valid"):
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.index_select(0, index))
        out.body = None if self.body is None else self.body.index_batch(index)
        out.fresh = None if self.fresh is None else tuple(t.index_select(0, index) for t in self.fresh)
        return out

    def state(self) -> StorageState:
        from kvpress.quant.state import quantized_state

        return quantized_state(self)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "QuantizedStorage":
        from kvpress.quant.state import quantized_from_state

        return quantized_from_state(cls, tensors, meta)

    # -- kvpress.quant extras --------------------------------------------------------------------------------
    def effective_bits(self) -> float:
        """Bits held per cached K or V element: ``8 * nbytes / (tokens * kv_heads * head_dim * 2)``.

        ``tokens * kv_heads`` is the number of real (valid) token slots over the batch and heads.
        """
        slots = int(self.lengths().sum())
        if slots == 0:
            return 0.0
        return 8.0 * self.nbytes() / (slots * self.cfg.head_dim * 2)

    def segment_lengths(self) -> dict[str, int]:
        """Slots per head in each segment (sinks, body, residual)."""
        return {"sink": self.n_sink_slots, "body": self.n_body_slots, "residual": self.n_residual_slots}

    # -- internals -------------------------------------------------------------------------------------------
    def _initialise(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        spec = self.spec
        d = keys.shape[-1]
        self.dtype = keys.dtype
        self.fp_dtype = spec.fp_dtype or keys.dtype
        self.cfg = spec.body_config(d)
        rotate_keys, rotate_values = spec.rotated
        if rotate_keys or rotate_values:
            self.key_rotation, self.value_rotation, self.rotation_owned = spec.rotations(
                d, keys.device, keys if spec.outlier_reorder else None, values if spec.outlier_reorder else None
            )
            if not rotate_keys:
                self.key_rotation = None
            if not rotate_values:
                self.value_rotation = None

    @staticmethod
    def _rotate(x: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        x = x.float()
        return x if r is None else x @ r

    @staticmethod
    def _unrotate(x: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        return x if r is None else x @ r.T

    def _flush(self) -> None:
        block = self.flush_block
        excess = self.n_residual_slots - self.spec.residual
        if excess < block:
            return
        m = excess // block * block
        keys = self._rotate(self.res_k[:, :, :m], self.key_rotation)
        values = self._rotate(self.res_v[:, :, :m], self.value_rotation)
        chunk = self._quantize_plain(keys, values) or QuantizedBody.quantize(self.cfg, keys, values, block=block)
        self.body = chunk if self.body is None else self.body.cat(chunk)
        self.res_k, self.res_v = self.res_k[:, :, m:].clone(), self.res_v[:, :, m:].clone()

    def _quantize_plain(self, keys: torch.Tensor, values: torch.Tensor) -> QuantizedBody | None:
        """Quantize a flush with the fused quantize-and-pack kernel the dispatch picks (Triton on CUDA, C++ on CPU;
        no GEAR terms); ``None``: use :meth:`QuantizedBody.quantize`. Bit-exact with it either way."""
        cfg = self.cfg
        if cfg.rank or cfg.outlier_fraction:
            return None
        picks = [
            pack_backend(keys, cfg.key_bits, cfg.group_size, "channel", cfg.scale_dtype, backend=self.kernels),
            pack_backend(values, cfg.value_bits, cfg.value_group, "token", cfg.scale_dtype, backend=self.kernels),
        ]
        if picks[0] != picks[1] or picks[0] == "torch":
            return None
        k_codes, k_scale, k_zero = quantize_pack(keys, cfg.key_bits, cfg.group_size, "channel", cfg.scale_dtype,
                                                 backend=picks[0])
        v_codes, v_scale, v_zero = quantize_pack(values, cfg.value_bits, cfg.value_group, "token", cfg.scale_dtype,
                                                 backend=picks[0])
        return QuantizedBody(cfg, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)

    def _rotated32(self, with_body: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """All slots' keys and values in float32, rotated basis (the body dequantized)."""
        ks = [self._rotate(self.sink_k, self.key_rotation)]
        vs = [self._rotate(self.sink_v, self.value_rotation)]
        if self.body is not None and with_body:
            bk, bv = self.body.dequantize()
            ks.append(bk)
            vs.append(bv)
        ks.append(self._rotate(self.res_k, self.key_rotation))
        vs.append(self._rotate(self.res_v, self.value_rotation))
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def _gather_exact(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision copies (``fp_dtype``, unrotated) of slots ``idx`` ``[B, H, m]``.

        Sink and residual slots are copied exactly; body slots are dequantized and un-rotated.
        """
        s, q = self.n_sink_slots, self.n_body_slots
        b, h, m = idx.shape
        d = self.cfg.head_dim
        body_slot = (idx >= s) & (idx < s + q)
        if m and bool(body_slot.any()):
            bk, bv = self.body.dequantize()
            dk = self._unrotate(bk, self.key_rotation).to(self.fp_dtype)
            dv = self._unrotate(bv, self.value_rotation).to(self.fp_dtype)
            src_k = torch.cat([self.sink_k, dk, self.res_k], dim=2)
            src_v = torch.cat([self.sink_v, dv, self.res_v], dim=2)
            index = idx
        else:
            src_k = torch.cat([self.sink_k, self.res_k], dim=2)
            src_v = torch.cat([self.sink_v, self.res_v], dim=2)
            index = torch.where(idx >= s + q, idx - q, idx)
        index = index.unsqueeze(-1).expand(b, h, m, d)
        return src_k.gather(2, index), src_v.gather(2, index)

    def _select_body(self, idx: torch.Tensor, cls: torch.Tensor) -> QuantizedBody:
        """The new body from slots ``idx`` ``[B, H, q]`` of class ``cls`` (1 body, 2 residual), per head body
        slots first."""
        s, q_old = self.n_sink_slots, self.n_body_slots
        b, h, q = idx.shape
        is_res = cls == 2
        n_body = (~is_res).sum(-1, keepdim=True)  # [B, H, 1]
        e = is_res.sum(-1)
        e_max = int(e.max())
        body = self.body
        index = idx - s  # body-token index for body slots
        if e_max:
            g = self.cfg.group_size
            e_pad = -(-e_max // g) * g
            t = torch.arange(e_pad, device=idx.device)
            # residual slot of the t-th new token of each head (clamped for padding, which is excluded)
            rank = (n_body + t).clamp(max=q - 1)
            res_idx = (idx.gather(2, rank) - s - q_old).clamp(min=0)
            pad = t >= e.unsqueeze(-1)
            gi = res_idx.unsqueeze(-1).expand(b, h, e_pad, self.cfg.head_dim)
            new_k = self._rotate(self.res_k.gather(2, gi), self.key_rotation).masked_fill(pad.unsqueeze(-1), 0.0)
            new_v = self._rotate(self.res_v.gather(2, gi), self.value_rotation).masked_fill(pad.unsqueeze(-1), 0.0)
            chunk = QuantizedBody.quantize(self.cfg, new_k, new_v, block=e_pad, exclude=pad)
            body = chunk if body is None else body.cat(chunk)
            j = torch.arange(q, device=idx.device)
            index = torch.where(j < n_body, index, q_old + (j - n_body))
        return body.take(index)
