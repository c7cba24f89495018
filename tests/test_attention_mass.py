"""Attention with per-key mass (H2O's prefill path) against float64 dense references."""

import math

import pytest
import torch
from tiny_models import left_padded_batch, tiny_model

import kvpress
from kvpress.attention import allowed_slots
from kvpress.attention_mass import attention_with_mass
from kvpress.policies import H2O
from kvpress.storage import AttentionView


def _reference(q, k, v, allowed, reduce="sum"):
    """float64 attention ``[b, q, hq, d]`` and mass ``[b, hkv, s]``; ``allowed`` ``[b, hkv, q, s]``."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    logits = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    mask = allowed.repeat_interleave(g, 1)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    grouped = probs.view(b, hkv, g, n, -1)
    return (probs @ vv).transpose(1, 2), grouped.sum((2, 3)) if reduce == "sum" else grouped.amax((2, 3))


@pytest.mark.parametrize("groups", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_past, q_len", [(0, 37), (0, 1), (20, 13), (64, 1)])
def test_matches_float64_reference(groups, dtype, n_past, q_len):
    torch.manual_seed(groups + q_len)
    b, hkv, d = 2, 2, 16
    s = n_past + q_len
    q = torch.randn(b, hkv * groups, q_len, d).to(dtype)
    k, v = torch.randn(b, hkv, s, d).to(dtype), torch.randn(b, hkv, s, d).to(dtype)
    view = AttentionView(k, v, None, None)
    causal = torch.arange(s).view(1, 1, 1, s) <= (n_past + torch.arange(q_len)).view(1, 1, q_len, 1)
    allowed = causal.expand(b, hkv, q_len, s)
    want_out, want_mass = _reference(q.float(), k.float(), v.float(), allowed)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    want_max = _reference(q.float(), k.float(), v.float(), allowed, reduce="max")[1]
    for causal_from in (n_past, None):  # the diagonal-block fast path and the general mask path
        out, mass = attention_with_mass(q, view, lambda a, z: allowed[:, :, a:z], d**-0.5, causal_from, chunk=8)
        assert out.dtype == dtype and out.shape == (b, q_len, hkv * groups, d)
        torch.testing.assert_close(out.double(), want_out, **tol)
        torch.testing.assert_close(mass.double(), want_mass, **tol)
        _, peak = attention_with_mass(q, view, lambda a, z: allowed[:, :, a:z], d**-0.5, causal_from, chunk=8,
                                      reduce="max")
        torch.testing.assert_close(peak.double(), want_max, **tol)


def test_padding_queries_attend_nowhere_and_evicted_views():
    torch.manual_seed(7)
    b, hkv, g, s, d = 2, 2, 2, 30, 8
    q, k, v = torch.randn(b, hkv * g, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    positions = torch.sort(torch.randperm(60)[:s]).values.expand(b, hkv, s).contiguous()  # a thinned cache
    valid = torch.ones(b, hkv, s, dtype=torch.bool)
    valid[1, :, :6] = False  # row 1's first slots are not tokens (ragged filler / padding)
    view = AttentionView(k, v, positions, valid)
    q_abs = torch.arange(60 - s, 60)  # these queries sit at the last positions
    query_real = torch.ones(b, s, dtype=torch.bool)
    query_real[1, :4] = False  # row 1's first queries are padding: they attend to nothing
    allowed = (positions.unsqueeze(2) <= q_abs.view(1, 1, s, 1)) & valid.unsqueeze(2) & query_real.view(b, 1, s, 1)
    out, mass = attention_with_mass(q, view, lambda a, z: allowed[:, :, a:z], d**-0.5, None, chunk=7)
    want_out, want_mass = _reference(q, k, v, allowed)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mass.double(), want_mass, atol=1e-5, rtol=1e-4)
    assert out[1, :4].abs().max() == 0  # padding queries: no attention, no mass


class _Recorder(H2O):
    def __init__(self):
        super().__init__(budget=10_000)
        self.seen = []

    def select(self, ctx):
        self.seen.append((ctx.layer_idx, ctx.queries.clone(), ctx.keys.clone(), ctx.key_valid.clone(),
                          ctx.allowed_fn(ctx.q_len), ctx.attention_mass.clone()))
        return super().select(ctx)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_h2o_in_a_model_gets_the_dense_column_sums_and_the_same_logits(attn):
    model = tiny_model("qwen3", attn=attn)
    ids, mask = left_padded_batch([26, 15])
    ref = model(ids, attention_mask=mask).logits
    recorder = _Recorder()
    with kvpress.patch(model, recorder):
        out = model(ids, attention_mask=mask, use_cache=True).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=1e-4)  # its own attention, same numbers
    assert len(recorder.seen) == 2
    for _, q, k, _, allowed, mass in recorder.seen:
        _, want = _reference(q, k, k, allowed)
        torch.testing.assert_close(mass.double(), want, atol=1e-5, rtol=1e-4)
