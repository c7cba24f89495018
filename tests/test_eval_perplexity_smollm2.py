"""Slow tier: perplexity through the StreamingLLM cache on SmolLM2-135M (the 20k-token run lives in
benchmarks/perplexity_streaming.py; this is its short version)."""

from __future__ import annotations

import pytest

from kvpress.eval.perplexity import evaluate_perplexity
from kvpress.eval.text import load_text, tokenize_text
from kvpress.policies.expr import PolicyConfig

pytestmark = pytest.mark.slow

N_TOKENS, N_SINK, WINDOW = 200, 4, 64


@pytest.fixture(scope="module")
def smollm2():
    from kvpress.models import load_model

    return load_model("smollm2-135m")


def test_streaming_llm_perplexity_bounded_beside_full_cache(smollm2):
    model, tokenizer = smollm2
    ids = tokenize_text(tokenizer, load_text()[0], N_TOKENS)
    policy = PolicyConfig.of("streaming_llm", {"n_sink": N_SINK, "window": WINDOW}).build()
    streaming = evaluate_perplexity(model, ids, policy=policy, mode="token", kv_check_every=1,
                                    model_name="smollm2-135m")
    full = evaluate_perplexity(model, ids, mode="chunked", chunk_size=100, cache="dynamic",
                               model_name="smollm2-135m")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    positions_per_token = 8 * cfg.num_hidden_layers * cfg.num_key_value_heads
    held = N_SINK + WINDOW
    print(
        f"\nSmolLM2 {N_TOKENS} tokens: streaming_llm(n_sink={N_SINK}, window={WINDOW}) token mode "
        f"ppl={streaming.perplexity:.3f} {streaming.tokens_per_second:.1f} tok/s peak={streaming.peak_kv_bytes:,} B | "
        f"full cache ppl={full.perplexity:.3f} peak={full.peak_kv_bytes:,} B"
    )
    assert streaming.tokens_scored == full.tokens_scored == N_TOKENS - 1
    # bounded: never more than the sinks + window (plus their positions), read after every token
    assert held * kv_per_token <= streaming.peak_kv_bytes <= held * (kv_per_token + positions_per_token)
    assert streaming.final_kv_bytes == streaming.peak_kv_bytes
    assert full.peak_kv_bytes == (N_TOKENS - 1) * kv_per_token
    # a 64-token window on prose stays close to the full cache (both are real language-model perplexities)
    assert 1.0 < full.perplexity < 100.0
    assert 0.7 < streaming.perplexity / full.perplexity < 1.5
    assert streaming.tokens_per_second > 0
