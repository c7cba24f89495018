"""Integration tier on the embedded Gemma-3-270M (slow, run in CI): sliding-window layers held as kvpress storage."""

import pytest
import torch

import kvpress
from kvpress.cache import SlidingLayer
from kvpress.compat import cache_kwargs, output_cache
from kvpress.eval import configurations, evaluate, get_task
from kvpress.quant import KVQuant

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gemma3")]

WINDOW = 512


def test_embedded_model_loads_offline(gemma3):
    model, tokenizer = gemma3
    config = model.config
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert config.sliding_window == WINDOW and config.num_key_value_heads == 1 and config.head_dim == 256
    assert config.layer_types.count("full_attention") == 3


@torch.no_grad()
def test_no_policy_logits_identical_prefill_and_200_steps_past_the_window(gemma3):
    model, tokenizer = gemma3
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 20_000, (1, WINDOW + 40), generator=gen)
    steps = torch.randint(10, 20_000, (200, 1, 1), generator=gen)

    def run():
        out = model(ids, use_cache=True)
        logits, cache = [out.logits], output_cache(out)
        for tok in steps:
            out = model(tok, use_cache=True, **cache_kwargs(model, cache))
            logits.append(out.logits)
            cache = output_cache(out)
        return logits, cache

    ref, ref_cache = run()
    with kvpress.patch(model, None):
        got, cache = run()
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert sum(isinstance(layer, SlidingLayer) for layer in cache.layers) == 15
    assert cache.get_seq_length() == WINDOW + 240
    # bytes held: exactly transformers' (sliding layers hold their last 511 tokens)
    theirs = sum(t.numel() * t.element_size() for layer in ref_cache.layers for t in (layer.keys, layer.values))
    assert cache.nbytes() == theirs
    assert [r.tokens_max for r in cache.report() if r.layer_type == "sliding_attention"] == [WINDOW - 1] * 15


@torch.no_grad()
def test_needle_retrieved_uncompressed_and_bytes_held(gemma3):
    model, tok = gemma3
    result = evaluate(model, tok, get_task("niah_single_noise"), configurations(["knorm"], [0.5]), [1500], 2,
                      progress=False, model_name="gemma3-270m")
    base = [r for r in result.records if r["policy"] == "none"]
    assert sum(r["score"] for r in base) >= 1  # the uncompressed model finds the needle
    knorm = [r for r in result.records if r["policy"] != "none"]
    # KeyNorm at 0.5 acts on the 3 full layers only: the 15 rings stay whole, ~82% of the bytes remain
    ratio = sum(r["kv_bytes"] for r in knorm) / sum(r["kv_bytes"] for r in base)
    assert 0.75 < ratio < 0.9, ratio


@torch.no_grad()
def test_kvquant_quantizes_every_layer(gemma3):
    model, tokenizer = gemma3
    ids = torch.randint(10, 20_000, (1, 1500), generator=torch.Generator().manual_seed(1))
    with kvpress.patch(model, None):
        full = output_cache(model(ids, use_cache=True))
    with kvpress.patch(model, KVQuant(bits=2)):
        cache = output_cache(model(ids, use_cache=True))
    kinds = {r.kind for r in cache.report()}
    assert kinds == {"QuantizedStorage", "SlidingWindow[QuantizedStorage]"}
    ratios = cache.bytes_ratios()
    assert ratios["sliding_attention"] < 0.5 and ratios["full_attention"] < 0.5
    assert cache.nbytes() / full.nbytes() == pytest.approx(ratios["whole"], rel=1e-6)


def test_shipped_predictor_and_duo_pattern_are_found_and_act_on_the_full_layers_only(gemma3):
    """`Learned(...)` and `DuoAttention(...)` with their defaults find the files shipped for Gemma-3-270M (by model
    signature); at ratio 0.5 on a 1,200-token prompt each full layer keeps what the policy says, and the sliding
    rings are left as they are."""
    from kvpress.policies import DuoAttention, Learned

    model, tokenizer = gemma3
    ids = torch.randint(10, 20_000, (1, 1200), generator=torch.Generator().manual_seed(2))
    types = list(model.config.get_text_config(decoder=True).layer_types)
    learned, duo = Learned(compression_ratio=0.5), DuoAttention(compression_ratio=0.25)
    for policy in (learned, duo):
        with torch.no_grad(), kvpress.patch(model, policy) as session:
            cache = session.new_cache()
            model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            full_held = 0
            for row, layer_type in zip(cache.report(), types):
                if layer_type == "sliding_attention":
                    assert row.tokens_max == WINDOW - 1  # the ring, untouched
                else:
                    full_held += row.tokens_mean
            if policy is learned:  # one budget over the full layers (KVzip's global scope): half of their tokens
                assert full_held == pytest.approx(0.5 * 1200 * (len(types) - types.count("sliding_attention")), abs=3)
            if policy is duo:  # one of the 3 full-layer heads streams: the lowest gate, layer 17
                streaming = duo.streaming_heads
                assert int(streaming.sum()) == 1 and bool(streaming[17, 0])
    assert learned.predictor.metadata["model"] == "gemma3-270m" and duo.pattern.metadata["model"] == "gemma3-270m"
