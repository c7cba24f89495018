"""Float64 references for the kernel tests (tests/test_kernels_*.py): built from kvpress.quant's own unpacker
and the documented layout, independently of the kernels' code."""

from __future__ import annotations

import math

import torch

from kvpress.kernels import PackedBody
from kvpress.quant.body import BodyConfig, QuantizedBody
from kvpress.quant.packing import unpack


def triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton is not importable ({exc}): pip install 'kvpress[triton]' (in the dev extra)"
    return None


def make_body(
    key_bits: int, value_bits: int, group_size: int, head_dim: int, batch: int, heads: int, n: int, *,
    rank: int = 0, outlier_fraction: float = 0.0, value_group: int | None = None, seed: int = 0,
) -> QuantizedBody:  # fmt: skip
    """A random body of ``n`` tokens (``n`` a multiple of the group, or of 2 groups with low rank)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, n, head_dim, generator=g)
    keys[..., 3] *= 5  # an outlier channel, as real keys have
    values = torch.randn(batch, heads, n, head_dim, generator=g)
    cfg = BodyConfig(
        head_dim=head_dim, key_bits=key_bits, value_bits=value_bits, group_size=group_size,
        value_group=value_group or min(group_size, head_dim), rank=rank, outlier_fraction=outlier_fraction,
    )  # fmt: skip
    return QuantizedBody.quantize(cfg, keys, values, block=2 * group_size if rank else group_size)


def ragged_take(body: QuantizedBody, counts: torch.Tensor, seed: int = 0) -> tuple[QuantizedBody, torch.Tensor]:
    """Keep ``counts[b, h]`` random tokens per head (as eviction does: padded by repeating the last kept token).

    Returns the thinned body and ``valid`` ``[B, H, max(counts)]`` (False at padding).
    """
    b, h, n = body.k_codes.shape[:3]
    g = torch.Generator().manual_seed(seed)
    width = int(counts.max())
    index = torch.zeros(b, h, width, dtype=torch.long)
    valid = torch.zeros(b, h, width, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            c = int(counts[i, j])
            kept = torch.sort(torch.randperm(n, generator=g)[:c]).values
            index[i, j, :c] = kept
            index[i, j, c:] = kept[-1]
            valid[i, j, :c] = True
    return body.take(index), valid


def dequantize64(body: PackedBody) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[B, H, n_tokens, D]`` in float64 from the packed layout."""
    n, d = body.n_tokens, body.head_dim
    b, h = body.batch, body.kv_heads
    gid = body.token_groups(0, n)
    kc = unpack(body.k_codes[:, :, :n].contiguous(), body.key_bits, d).double()
    vc = unpack(body.v_codes[:, :, :n].contiguous(), body.value_bits, d).double()
    index = gid.unsqueeze(-1).expand(b, h, n, d)
    keys = body.k_zero.double().gather(2, index) + kc * body.k_scale.double().gather(2, index)
    gv = body.value_group
    v_zero = body.v_zero[:, :, :n].double().repeat_interleave(gv, -1)
    values = v_zero + vc * body.v_scale[:, :, :n].double().repeat_interleave(gv, -1)
    if body.k_left is not None:
        blk = body.group_block.long()[gid]
        for name, left, right in (("k", body.k_left, body.k_right), ("v", body.v_left, body.v_right)):
            rows = right.double().gather(2, blk.view(b, h, n, 1, 1).expand(b, h, n, d, right.shape[-1]))
            term = torch.einsum("bhnr,bhndr->bhnd", left[:, :, :n].double(), rows)
            if name == "k":
                keys = keys + term
            else:
                values = values + term
    if body.k_out_val is not None:
        keys = keys.scatter(-1, body.k_out_idx[:, :, :n].long(), body.k_out_val[:, :, :n].double())
        values = values.scatter(-1, body.v_out_idx[:, :, :n].long(), body.v_out_val[:, :, :n].double())
    return keys, values


def attention64(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``query`` ``[B, H, M, D]`` (scaled) over ``[B, H, S, D]`` with ``mask`` ``[B, H, L, S]``; float64
    ``(out, lse)``, out 0 and lse -inf for rows with nothing allowed."""
    q = query.double()
    logits = q @ keys.double().transpose(-1, -2)
    if mask is not None:
        b, h, q_len, s = mask.shape
        m = q.shape[2]
        rows = mask.unsqueeze(2).expand(b, h, m // q_len, q_len, s).reshape(b, h, m, s)
        logits = logits.masked_fill(~rows, -math.inf)
    lse = torch.logsumexp(logits, -1)
    probs = torch.nan_to_num(torch.exp(logits - lse.unsqueeze(-1)), nan=0.0)
    return probs @ values.double(), lse


def ragged64(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Per-segment float64 attention over the flat layout (``mask`` ``[T, L]``); ``[B, H, M, D]``."""
    b, h, m, d = query.shape
    out = torch.zeros(b, h, m, d, dtype=torch.float64)
    start = 0
    for i in range(b):
        for j in range(h):
            n = int(lengths[i, j])
            if n == 0:  # an empty head attends to nothing: its partial output is 0
                continue
            seg_mask = None if mask is None else mask[start : start + n].T.reshape(1, 1, -1, n)
            o, _ = attention64(query[i : i + 1, j : j + 1], keys[start : start + n][None, None],
                               values[start : start + n][None, None], seg_mask)  # fmt: skip
            out[i, j] = o[0, 0]
            start += n
    return out


def storage_reference64(st, fresh, query: torch.Tensor, allowed: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """What a QuantizedStorage's decode must return, in float64: every slot unrotated (body dequantized from its
    codes), the last slots replaced by ``fresh``; ``[B, L, q_heads, D]``."""
    from kvpress.quant.storage import packed_body

    parts_k, parts_v = [st.sink_k.double()], [st.sink_v.double()]
    if st.body is not None:
        bk, bv = dequantize64(packed_body(st.body))
        if st.key_rotation is not None:
            bk = bk @ st.key_rotation.double().T
        if st.value_rotation is not None:
            bv = bv @ st.value_rotation.double().T
        parts_k.append(bk)
        parts_v.append(bv)
    keys = torch.cat([*parts_k, st.res_k.double()], dim=2)
    values = torch.cat([*parts_v, st.res_v.double()], dim=2)
    if fresh is not None and fresh[0].shape[2]:
        n = fresh[0].shape[2]
        keys[:, :, -n:] = fresh[0].double()
        values[:, :, -n:] = fresh[1].double()
    b, q_heads, q_len, d = query.shape
    h = keys.shape[1]
    if allowed is not None:
        allowed = allowed | ~allowed.any(-1, keepdim=True)
    q = query.double().reshape(b, h, q_heads // h * q_len, d) * scaling
    out, _ = attention64(q, keys, values, allowed)
    return out.reshape(b, q_heads, q_len, d).transpose(1, 2)
