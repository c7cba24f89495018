"""Perplexity through the cache (tiny random Llama: seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import byte_tokenizer, tiny_llama

from kvpress.compat import cache_kwargs
from kvpress.eval.perplexity import (
    _piece_sizes,
    MODE_OVERRIDES,
    evaluate_perplexity,
    full_forward_perplexity,
    open_cache,
    score_through_cache,
    write_json,
)
from kvpress.eval.kv_bytes import cache_nbytes
from kvpress.eval.text import default_text, tokenize_text
from kvpress.policies.expr import PolicyConfig

N_TOKENS = 240


def _policy(name, params=None, mode="token"):
    return PolicyConfig.of(name, params).build(None, MODE_OVERRIDES[mode])


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids(model):
    return torch.randint(3, model.config.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(0))


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4


def position_bytes_per_token(model) -> int:
    """Upper bound on what a cache that evicted holds per token besides K/V: int64 positions per KV head."""
    return 8 * model.config.num_hidden_layers * model.config.num_key_value_heads


def masked_perplexity(model, ids, allowed: torch.Tensor) -> float:
    """One cache-less forward with an explicit ``[N, N]`` attention pattern (True = may attend)."""
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=allowed[None, None]).logits[0, :-1]
    return math.exp(float(F.cross_entropy(logits.float(), ids[0, 1:]).double()))


@pytest.mark.parametrize(
    "mode,kwargs",
    [("token", {}), ("token", {"prefill": 37}), ("chunked", {"chunk_size": 64})],
)
@pytest.mark.parametrize("cache", ["kvpress", "dynamic"])
def test_no_policy_equals_full_forward(model, ids, mode, kwargs, cache):
    result = evaluate_perplexity(model, ids, mode=mode, cache=cache, **kwargs)
    reference = full_forward_perplexity(model, ids)
    assert result.tokens_scored == N_TOKENS - 1
    assert result.perplexity == pytest.approx(reference, rel=1e-4)
    assert result.peak_kv_bytes == result.final_kv_bytes > 0  # a growing cache peaks at the end


def test_streaming_token_mode_equals_sink_window_attention(model, ids):
    """Token by token, token i attends to the sinks and the last `window` tokens before it (plus itself)."""
    n_sink, window = 4, 32
    policy = _policy("streaming_llm", {"n_sink": n_sink, "window": window})
    result = evaluate_perplexity(model, ids, policy=policy, mode="token")
    i = torch.arange(N_TOKENS)[:, None]
    j = torch.arange(N_TOKENS)[None, :]
    allowed = (j <= i) & ((j < n_sink) | (j >= i - window))
    assert result.perplexity == pytest.approx(masked_perplexity(model, ids, allowed), rel=1e-4)
    assert result.perplexity != pytest.approx(full_forward_perplexity(model, ids), rel=1e-4)


def test_streaming_chunked_mode_equals_its_attention_pattern(model, ids):
    """In chunks of C, a chunk attends to what the cache kept before it (sinks + last `window`) and to itself."""
    n_sink, window, chunk = 4, 32, 48
    policy = _policy("streaming_llm", {"n_sink": n_sink, "window": window}, mode="chunked")
    result = evaluate_perplexity(model, ids, policy=policy, mode="chunked", chunk_size=chunk)
    assert result.chunk_size == chunk
    i = torch.arange(N_TOKENS)[:, None]
    j = torch.arange(N_TOKENS)[None, :]
    chunk_start = (i // chunk) * chunk
    allowed = (j <= i) & ((j < n_sink) | (j >= chunk_start - window))
    assert result.perplexity == pytest.approx(masked_perplexity(model, ids, allowed), rel=1e-4)


def test_streaming_cache_is_bounded(model, ids):
    n_sink, window = 4, 16
    policy = _policy("streaming_llm", {"n_sink": n_sink, "window": window})
    sizes = []
    with open_cache(model, policy) as cache, torch.inference_mode():
        for t in range(100):
            model(input_ids=ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
            sizes.append(cache_nbytes(cache))
    per_token = kv_bytes_per_token(model)
    held = n_sink + window
    assert sizes[:held] == [(t + 1) * per_token for t in range(held)]  # grows one token per step until full
    bounded = sizes[held]  # after the first eviction: K/V of `held` tokens plus their positions (int64)
    assert held * per_token <= bounded <= held * (per_token + position_bytes_per_token(model))
    assert set(sizes[held:]) == {bounded}  # constant from then on
    short = evaluate_perplexity(model, ids[:, :80], policy=policy, kv_check_every=1)
    long = evaluate_perplexity(model, ids, policy=policy, kv_check_every=7)
    assert short.peak_kv_bytes == long.peak_kv_bytes == long.final_kv_bytes == bounded


def test_chunked_score_policy_compresses_every_chunk(model, ids):
    policy = _policy("snapkv", {"budget": 24, "window": 4}, mode="chunked")
    assert policy.every_chunk
    result = evaluate_perplexity(model, ids, policy=policy, mode="chunked", chunk_size=40)
    assert result.final_kv_bytes <= 24 * (kv_bytes_per_token(model) + position_bytes_per_token(model))
    # without every_chunk only the first chunk would be compressed: the cache would hold ~200 tokens
    assert result.peak_kv_bytes < 100 * kv_bytes_per_token(model)
    assert result.policy_params.get("every_chunk") is True
    # token mode keeps the prefill-only default: only the first forward is compressed
    assert not _policy("snapkv", {"budget": 24}).every_chunk


def test_piece_sizes():
    assert list(_piece_sizes(10, "token", 4, 0)) == [1] * 10
    assert list(_piece_sizes(10, "token", 4, 3)) == [3] + [1] * 7
    assert list(_piece_sizes(10, "chunked", 4, 3)) == [3, 4, 3]  # a prefill piece, then chunks
    assert list(_piece_sizes(10, "chunked", 4, 0)) == [4, 4, 2]
    assert list(_piece_sizes(3, "chunked", 8, 0)) == [3]


def test_segments_and_json(model, ids, tmp_path):
    result = evaluate_perplexity(model, ids, mode="chunked", chunk_size=50, segment_tokens=100)
    assert [s["tokens"] for s in result.segments] == [100, 100, 39]
    total = sum(math.log(s["perplexity"]) * s["tokens"] for s in result.segments) / result.tokens_scored
    assert math.exp(total) == pytest.approx(result.perplexity, rel=1e-9)
    path = write_json(tmp_path / "r.json", {"full": result}, config={"x": 1})
    data = json.loads(path.read_text())
    assert data["full"]["perplexity"] == result.perplexity and data["config"] == {"x": 1}


def test_score_through_cache_validates(model, ids):
    with open_cache(model, None, cache="dynamic") as cache:
        with pytest.raises(ValueError):
            score_through_cache(model, ids, cache, mode="sentence")
        with pytest.raises(ValueError):
            score_through_cache(model, ids[0], cache)
    with pytest.raises(ValueError):
        with open_cache(model, _policy("streaming_llm"), cache="dynamic"):
            pass


def test_text_and_tokenization():
    text = default_text()
    assert len(text) > 100_000
    tok = byte_tokenizer(chat=False)
    ids = tokenize_text(tok, text, max_tokens=500)
    assert ids.shape == (1, 500)
    assert tokenize_text(tok, "hello", None).shape == (1, 5)
    with pytest.raises(ValueError):
        tokenize_text(tok, "x", None)


def test_cli_end_to_end(model, tmp_path, capsys):
    """`kvpress perplexity` on a tiny model saved to disk, with --compare-full and a JSON file."""
    from kvpress.cli import main

    model.save_pretrained(tmp_path / "tiny")
    byte_tokenizer(chat=False).save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("The grass is green. The sky is blue. " * 20)
    out = tmp_path / "ppl.json"
    argv = ["perplexity", "--model", str(tmp_path / "tiny"), "--policy", "streaming_llm", "--window", "16",
            "--n-sink", "2", "--max-tokens", "300", "--text", str(text), "--compare-full", "--out", str(out),
            "--no-progress", "--full-chunk-size", "64"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"streaming_llm", "full", "config"}
    assert data["streaming_llm"]["tokens_scored"] == data["full"]["tokens_scored"] == 299
    assert data["streaming_llm"]["peak_kv_bytes"] < data["full"]["peak_kv_bytes"]
    assert data["full"]["cache"] == "DynamicCache" and data["streaming_llm"]["cache"] == "KVPressCache"
    assert "perplexity" in capsys.readouterr().out


def test_score_from_and_feed_last(model, ids):
    """Scoring only the tokens after a prefill equals the full run's per-token NLL over those tokens; feed_last
    leaves the cache holding every token."""
    with open_cache(model, None) as kv:
        full = score_through_cache(model, ids, kv, mode="chunked", chunk_size=16, prefill=40, segment_tokens=1)
    per_token = [s["perplexity"] for s in full["segments"]]  # one segment per token
    with open_cache(model, None) as kv:
        part = score_through_cache(model, ids, kv, mode="chunked", chunk_size=16, prefill=40, score_from=40,
                                   feed_last=True)
        assert kv.get_seq_length() == ids.shape[1]
    assert part["tokens_scored"] == ids.shape[1] - 40
    expected = sum(math.log(p) for p in per_token[39:])
    assert part["nll_sum"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="score_from"):
        score_through_cache(model, ids, None, score_from=0)
