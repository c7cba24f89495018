"""Sliding-window layers as kvpress storage (a bounded ring): transformers' semantics kept exactly, quantized rings
within the full layers' error bound, bytes counted, policies on full layers unless told otherwise."""

from __future__ import annotations

import pytest
import torch

import kvpress
from kvpress.cache import SlidingLayer
from kvpress.compat import cache_kwargs, output_cache
from kvpress.policies import KeyNorm, SnapKV, StreamingLLM
from kvpress.quant import KVQuant
from kvpress.storage import DenseStorage, SlidingWindowStorage
from kvpress.storage.sliding import SLIDE_EVERY
from tiny_models import left_padded_batch, tiny_model

WINDOW = 8  # tiny gemma3: layers 0 and 2 slide over 8 tokens, 1 and 3 are full


def _prefill_then_decode(model, ids, mask, steps, cache=None, seed=0):
    """Logits of a prefill then ``steps`` one-token forwards (tokens drawn from ``seed``), and the cache."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = {} if cache is None else cache_kwargs(model, cache)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True, **kwargs)
        logits, cache = [out.logits], output_cache(out)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            tok = torch.randint(3, 100, (ids.shape[0], 1), generator=gen)
            out = model(tok, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
            logits.append(out.logits)
            cache = output_cache(out)
    return logits, cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [[20], [12, 5, 9]])
def test_no_policy_identical_to_transformers_past_the_window(attn, lengths):
    model = tiny_model("gemma3", attn=attn)
    ids, mask = left_padded_batch(lengths)
    ref, ref_cache = _prefill_then_decode(model, ids, mask, steps=40)
    with kvpress.patch(model, None):
        got, cache = _prefill_then_decode(model, ids, mask, steps=40)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert [type(layer) for layer in cache.layers] == [SlidingLayer, kvpress.CompressedLayer] * 2
    for layer, theirs in zip(cache.layers, ref_cache.layers):
        assert torch.equal(layer.keys, theirs.keys) and torch.equal(layer.values, theirs.values)
        assert layer.get_seq_length() == theirs.get_seq_length()
    assert cache.nbytes() == sum(t.numel() * t.element_size() for layer in ref_cache.layers
                                 for t in (layer.keys, layer.values))
    report = cache.report()
    assert [r.layer_type for r in report] == ["sliding_attention", "full_attention"] * 2
    assert [r.tokens_max for r in report][::2] == [WINDOW - 1] * 2
    assert all(r.nbytes == r.full_nbytes for r in report)
    assert cache.bytes_ratios() == {"whole": 1.0, "sliding_attention": 1.0, "full_attention": 1.0}


def test_prefill_longer_than_the_window_then_generate():
    model = tiny_model("gemma3")
    ids, mask = left_padded_batch([30, 17], seed=3)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    with kvpress.patch(model, None):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ref, got)


def test_ring_read_through_kvpress_attention_matches_transformers():
    """A ring that is not transformers' own tensors (exact quantized ring: every token in the residual) is read
    through kvpress's attention with the sliding mask's columns: same logits at every real position."""
    model = tiny_model("gemma3")
    ids, mask = left_padded_batch([12, 5, 9])
    ref, _ = _prefill_then_decode(model, ids, mask, steps=40)
    with kvpress.patch(model, KVQuant(bits=8, residual=256, n_sink=0)):
        got, cache = _prefill_then_decode(model, ids, mask, steps=40)
    real = mask.bool()
    torch.testing.assert_close(got[0][real], ref[0][real], atol=1e-5, rtol=1e-5)
    for a, b in zip(ref[1:], got[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert type(cache.layers[0].storage.inner).__name__ == "QuantizedStorage"


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rings_within_the_full_layers_error_bound(bits):
    """KVQuant quantizes the sliding layers too; their logit error is no larger than that of the same model with
    every layer full (its full layers quantized the same way)."""
    spec = KVQuant(bits=bits, group_size=4, residual=4, n_sink=0)
    ids, mask = left_padded_batch([30, 22])
    errors = {}
    for name, kw in {"hybrid": {}, "all_full": {"layer_types": ["full_attention"] * 4}}.items():
        model = tiny_model("gemma3", **kw)
        ref, _ = _prefill_then_decode(model, ids, mask, steps=40)
        with kvpress.patch(model, spec):
            got, cache = _prefill_then_decode(model, ids, mask, steps=40)
        errors[name] = max((a - b).abs().max().item() for a, b in zip(ref[1:], got[1:]))
        if name == "hybrid":
            ring = cache.layers[0].storage
            assert isinstance(ring, SlidingWindowStorage) and ring.inner.n_body_slots > 0  # really quantized
            # stale tokens leave SLIDE_EVERY decode steps at a time (masked by position until then)
            assert WINDOW - 1 <= int(ring.lengths().max()) < WINDOW - 1 + SLIDE_EVERY
            assert cache.layer_nbytes()[0] == sum(t.numel() * t.element_size() for t in ring.inner.tensors())
    bound = 0.01 if bits == 8 else 0.1
    assert errors["hybrid"] < bound and errors["all_full"] < bound, errors
    assert errors["hybrid"] <= 2 * errors["all_full"] + 1e-3, errors


def test_ring_holds_window_minus_one_and_positions():
    ring = SlidingWindowStorage(DenseStorage(), 5)
    k = torch.arange(12, dtype=torch.float32).view(1, 1, 12, 1).expand(1, 2, 12, 3)
    ring.append(k[:, :, :9], k[:, :, :9], 0)
    step = ring.view()
    assert step.keys.shape[2] == 9 and step.positions[0, 0].tolist() == list(range(9))  # this forward's view
    assert ring.view().positions[0, 0].tolist() == [5, 6, 7, 8]  # held: the last window - 1
    ring.append(k[:, :, 9:10], k[:, :, 9:10], 9)
    assert ring.view().positions[0, 0].tolist() == [5, 6, 7, 8, 9]
    assert ring.view().positions[0, 0].tolist() == [6, 7, 8, 9]
    assert ring.inner.positions is None and ring.nbytes() == 2 * 2 * 4 * 3 * 4  # no positions held
    with pytest.raises(ValueError, match="sliding window must be an int >= 2"):
        SlidingWindowStorage(DenseStorage(), 1)


def test_policies_act_on_full_layers_unless_told():
    model = tiny_model("gemma3")
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    with kvpress.patch(model, SnapKV(compression_ratio=0.5, window=2)):
        cache = output_cache(model(ids, use_cache=True))
    held = [r.tokens_max for r in cache.report()]
    assert held == [WINDOW - 1, 20, WINDOW - 1, 20]
    ratios = cache.bytes_ratios()
    assert ratios["full_attention"] == pytest.approx(0.5, abs=0.02) and ratios["sliding_attention"] == 1.0
    assert 0.5 < ratios["whole"] < 0.6
    policy = KeyNorm(compression_ratio=0.5).on_sliding_layers()
    with kvpress.patch(model, policy):
        cache = output_cache(model(ids, use_cache=True))
    # prefill of 40: KeyNorm keeps 20 of the 40 tokens the sliding layers' attention read; the ring then holds
    # those of its last window - 1 positions that were kept (fewer than 7)
    report = cache.report()
    assert [r.tokens_max for r in report][1::2] == [20, 20]
    for r in report[::2]:
        layer = cache.layers[r.layer_idx]
        positions = layer.storage.view().positions
        assert r.tokens_max < WINDOW - 1 and bool((positions >= 40 - (WINDOW - 1)).all())
    with pytest.raises(ValueError, match="include must be a bool"):
        KeyNorm().on_sliding_layers("yes")


def test_streaming_llm_then_decode_on_hybrid_model_stays_bounded():
    model = tiny_model("gemma3")
    ids, mask = left_padded_batch([12, 7], seed=2)
    with kvpress.patch(model, StreamingLLM(n_sink=2, window=6)):
        _, cache = _prefill_then_decode(model, ids, mask, steps=30)
    assert [r.tokens_max for r in cache.report()] == [WINDOW - 1, 8, WINDOW - 1, 8]


def test_kvzip_style_snapshot_restores_a_slid_window():
    model = tiny_model("gemma3")
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(4))
    with kvpress.patch(model, None) as session:
        cache = session.new_cache()
        model(ids, use_cache=True, **cache_kwargs(model, cache))
        before = [(layer.keys.clone(), layer.seen_tokens) for layer in cache.layers]
        saved = cache.save_uncompressed_layers()
        model(ids[:, :5], use_cache=True, **cache_kwargs(model, cache))  # slides the rings
        cache.truncate(20, saved)
        for layer, (keys, seen) in zip(cache.layers, before):
            assert torch.equal(layer.keys, keys) and layer.seen_tokens == seen
        with pytest.raises(NotImplementedError, match="cannot be truncated"):
            model(ids[:, :5], use_cache=True, **cache_kwargs(model, cache))
            cache.truncate(20)


def test_eval_records_and_summaries_split_bytes_by_layer_type():
    from kvpress.eval.generation import bytes_by_layer_type
    from kvpress.eval.runner import summarize
    from kvpress.policies.expr import expand

    model = tiny_model("gemma3")
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    with kvpress.patch(model, SnapKV(compression_ratio=0.5, window=2)):
        cache = output_cache(model(ids, use_cache=True))
    by_type = bytes_by_layer_type(cache)
    assert sum(by_type.values()) == cache.nbytes() and set(by_type) == {"full_attention", "sliding_attention"}

    def record(policy, label, kv):
        return {"length": 40, "depth": None, "index": 0, "policy": policy, "label": label, "score": 1.0,
                "kv_bytes": sum(kv.values()), "kv_bytes_end": 0, "kv_bytes_by_layer_type": kv, "empty": False,
                "seconds": 0.0, "prefill_seconds": 0.0, "fanout": False, "prompt_tokens": 40}

    specs = [expand("none")[0], expand("snapkv", (0.5,))[0]]
    entries = summarize([record("none", "none", {"full_attention": 100, "sliding_attention": 300}),
                         record("snapkv", specs[1].label, {"full_attention": 50, "sliding_attention": 300})], specs)
    assert entries[1]["kv_fraction"] == 0.875
    assert entries[1]["kv_fraction_by_layer_type"] == {"full_attention": 0.5, "sliding_attention": 1.0}


def test_registry_sliding_layers_option():
    from kvpress.policies import get_policy

    assert get_policy("knorm", compression_ratio=0.5).sliding_layers is False
    policy = get_policy("knorm", compression_ratio=0.5, sliding_layers=True)
    assert policy.sliding_layers and policy.acts_on("sliding_attention") and policy.acts_on("full_attention")
    with pytest.raises(ValueError, match="sliding_layers applies to eviction policies"):
        get_policy("kvquant", bits=4, sliding_layers=True)
    pipe = (KeyNorm(compression_ratio=0.5) | KVQuant(bits=4)).on_sliding_layers()
    assert pipe.acts_on("sliding_attention") and pipe.policies[0].sliding_layers
