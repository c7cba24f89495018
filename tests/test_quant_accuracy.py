"""The quantization benchmark's probes on a tiny model: perplexity through the cache after a prefill
(kvpress.eval.perplexity, ``score_from`` / ``feed_last`` / ``measure_bits``) and its effective bits (end and mean)."""

import pytest
import torch
from tiny_models import tiny_model

import kvpress
from kvpress.compat import cache_kwargs
from kvpress.eval.perplexity import evaluate_perplexity
from kvpress.quant import KVQuant
from benchmark_scripts import load_benchmark


def cache_perplexity(model, ids, prefill, chunk, policy=None):
    return evaluate_perplexity(model, ids, policy=policy, mode="chunked", chunk_size=chunk, prefill=prefill,
                               score_from=prefill, feed_last=True, measure_bits=True)


@pytest.fixture(scope="module")
def model_and_ids():
    model = tiny_model("llama")  # float32, 2 layers, 2 KV heads, head_dim 16
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    return model, ids


def _bits_after_each_chunk(model, ids, prefill, chunk, spec):
    """Effective bits of the cache after each forward past the prefill, replayed by hand."""
    out = []
    with torch.no_grad(), kvpress.patch(model, spec) as session:
        cache = session.new_cache()
        model(ids[:, :prefill], **cache_kwargs(model, cache), use_cache=True)
        for start in range(prefill, ids.shape[1], chunk):
            model(ids[:, start : start + chunk], **cache_kwargs(model, cache), use_cache=True)
            n = start + min(chunk, ids.shape[1] - start)
            out.append(8 * cache.nbytes() / (2 * 2 * n * 16 * 2))  # layers * kv_heads * tokens * head_dim * K,V
    return out


def test_dense_cache_is_32_bits(model_and_ids):
    model, ids = model_and_ids
    res = cache_perplexity(model, ids, 20, 8)
    assert res.effective_bits == pytest.approx(32.0) and res.mean_effective_bits == pytest.approx(32.0)
    assert res.tokens_scored == 40 and res.perplexity > 1


def test_scores_what_follows_the_prefill_like_a_hand_loop(model_and_ids):
    """The tokens after the prefill, each from the logits of the forward that fed the token before it."""
    model, ids = model_and_ids
    nll = 0.0
    with torch.no_grad(), kvpress.patch(model, None) as session:
        cache = session.new_cache()
        last = model(ids[:, :20], **cache_kwargs(model, cache), use_cache=True).logits[:, -1:]
        for start in range(20, 60, 8):
            out = model(ids[:, start : start + 8], **cache_kwargs(model, cache), use_cache=True).logits
            pred = torch.cat([last, out[:, :-1]], dim=1)[0].double()
            nll += float(torch.nn.functional.cross_entropy(pred, ids[0, start : start + 8], reduction="sum"))
            last = out[:, -1:]
    res = cache_perplexity(model, ids, 20, 8)
    assert res.mean_nll == pytest.approx(nll / 40, rel=1e-6) and res.final_kv_bytes == cache.nbytes()


def test_mean_effective_bits_average_the_scored_steps(model_and_ids):
    model, ids = model_and_ids
    # residual window 8..15 tokens (fp16), 4-token chunks: the window fills and empties along the run
    spec = KVQuant(bits=2, group_size=8, residual=8, n_sink=2, fp_dtype=torch.float16)
    res = cache_perplexity(model, ids, 20, 4, policy=spec)
    steps = _bits_after_each_chunk(model, ids, 20, 4, spec)
    assert len(steps) == 10 and max(steps) > min(steps)
    assert res.effective_bits == pytest.approx(steps[-1])
    assert res.mean_effective_bits == pytest.approx(sum(steps) / len(steps))
    dense = cache_perplexity(model, ids, 20, 4)
    assert res.final_kv_bytes < dense.final_kv_bytes / 2


def _benchmark_module():
    return load_benchmark("quant_accuracy")


def test_matched_bits_configs_table_and_plot(tmp_path):
    bench = _benchmark_module()
    configs = bench.matched_bits()
    names = [c.name for c in configs]
    assert len(names) == len(set(names)) and names[0] == "fp32 cache"
    kv = [c for c in configs if c.policy is not None]
    assert kv and all(c.policy.fp_dtype == torch.float16 for c in kv)
    assert {c.nbits for c in configs if c.backend == "quanto"} == {2, 4}
    records = [
        {"name": "fp32 cache", "bits": "32", "effective_bits": 32.0, "mean_effective_bits": 32.0, "kv_bytes": 100,
         "perplexity": 10.0, "needle_score": 1.0, "needle_logprob": -0.1},
        {"name": "HF quanto 2-bit G64 R16", "bits": "2", "effective_bits": 3.0, "mean_effective_bits": 3.0,
         "kv_bytes": 10, "perplexity": 100.0, "needle_score": None, "needle_logprob": None},
        {"name": "kvpress 2-bit +rot G64 R0", "bits": "2", "effective_bits": 3.06, "mean_effective_bits": 2.98,
         "kv_bytes": 11, "perplexity": 11.0, "needle_score": 0.5, "needle_logprob": -0.3},
        {"name": "HF quanto 4-bit G128 R16", "bits": "4", "error": "ValueError: no"},
    ]  # fmt: skip
    setup = {"tokens": 64, "prefill": 32, "chunk": 16, "needle_trials": 0, "needle_tokens": 0}
    lines = bench.matched_table(records, setup).splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| config")]
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "kvpress 2-bit +rot G64 R0", "HF quanto 2-bit G64 R16", "fp32 cache", "HF quanto 4-bit G128 R16"
    ]  # sorted by mean effective bits, failures last
    assert "+10.0%" in rows[0] and "+900.0%" in rows[1]
    pytest.importorskip("matplotlib")
    out = bench.plot_matched(records, str(tmp_path / "plot.png"))
    assert out is not None and (tmp_path / "plot.png").stat().st_size > 0
