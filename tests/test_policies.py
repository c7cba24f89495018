"""Policy parameters, selection rules and bounded caches on tiny models."""

import math
import re

import pytest
import torch
from tiny_models import left_padded_batch, tiny_model

import kvpress
from kvpress.compat import cache_kwargs, output_cache
from kvpress.context import LayerContext
from kvpress.policies import Pipeline, SnapKV, StreamingLLM, available_policies, get_policy, keep_topk


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5", float("nan"), True])
def test_bad_compression_ratio(ratio):
    with pytest.raises(ValueError, match=r"compression_ratio must be .*\[0, 1\)"):
        SnapKV(compression_ratio=ratio)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: StreamingLLM(window=0), "window must be an integer >= 1, got 0"),
        (lambda: StreamingLLM(n_sink=-1), "n_sink must be an integer >= 0"),
        (lambda: SnapKV(window=0), "window must be an integer >= 1"),
        (lambda: SnapKV(kernel_size=4), "kernel_size must be an odd integer"),
        (lambda: SnapKV(budget=0), "budget must be an integer >= 1"),
        (lambda: SnapKV(compression_ratio=0.5, budget=10), "either compression_ratio or budget"),
        (lambda: get_policy("h3o"), "unknown policy .h3o.; available policies: " + re.escape(", ".join(available_policies()))),
        (lambda: get_policy("snapkv", ratio=0.5), "bad parameters for policy 'snapkv'"),
    ],
)
def test_bad_parameters(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_registry():
    assert {"none", "snapkv", "streaming_llm"} <= set(available_policies())
    assert get_policy("none") is None
    p = get_policy("SnapKV", compression_ratio=0.25, window=8)
    assert isinstance(p, SnapKV) and p.compression_ratio == 0.25 and p.window == 8
    assert isinstance(get_policy("streaming-llm", window=16), StreamingLLM)


def test_keep_topk():
    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.7]]])
    assert keep_topk(scores, 2).tolist() == [[[False, True, False, True]]]


def _ctx(queries, keys, phase="prefill", mask=None):
    b, h, s, d = keys.shape
    positions = torch.arange(s).expand(b, h, s)
    q_len = queries.shape[2]

    def allowed(n):
        q_abs = torch.arange(s - n, s)
        causal = positions.unsqueeze(2) <= q_abs.view(1, 1, n, 1)
        return causal if mask is None else causal & mask[:, None, None, :]

    return LayerContext(0, 1, phase, queries, keys, keys, positions, allowed, d**-0.5, s)


def test_snapkv_scores_match_naive_reference():
    torch.manual_seed(0)
    b, hkv, groups, s, d, w, k = 2, 2, 3, 40, 8, 6, 5
    q = torch.randn(b, hkv * groups, s, d)
    keys = torch.randn(b, hkv, s, d)
    policy = SnapKV(compression_ratio=0.5, window=w, kernel_size=k)
    got = policy.score(_ctx(q, keys))
    # naive float64 reference, one head at a time
    for bi in range(b):
        for h in range(hkv):
            per_group = []
            for g in range(groups):
                qh = q[bi, h * groups + g, -w:].double()
                logits = qh @ keys[bi, h].double().T / math.sqrt(d)
                for i in range(w):  # causal inside the window
                    logits[i, s - w + i + 1 :] = float("-inf")
                attn = torch.softmax(logits, -1).mean(0)
                pooled = torch.stack([attn[max(0, j - k // 2) : j + k // 2 + 1].mean() for j in range(s)])
                per_group.append(pooled)
            ref = torch.stack(per_group).mean(0)
            torch.testing.assert_close(got[bi, h, : s - w].double(), ref[: s - w], atol=1e-6, rtol=1e-5)
            assert torch.isinf(got[bi, h, s - w :]).all()


def test_snapkv_selection_counts_and_padding():
    torch.manual_seed(1)
    q, keys = torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :10] = False  # left padding of row 1
    keep = SnapKV(compression_ratio=0.5, window=4).select(_ctx(q, keys, mask=valid))
    # the ratio applies to each row's real tokens: 30 -> 15, and 20 (10 padding) -> 10
    assert keep.sum(-1).tolist() == [[15, 15], [10, 10]]
    assert not keep[1, :, :10].any()  # padding is never kept
    assert keep[..., -4:].all()  # the observation window always stays
    assert SnapKV(budget=7, window=2).select(_ctx(q, keys)).sum(-1).eq(7).all()
    assert SnapKV(compression_ratio=0.0).select(_ctx(q, keys)) is None
    assert SnapKV(compression_ratio=0.5).select(_ctx(q[:, :, -1:], keys, phase="decode")) is None


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_streaming_llm_bounded_during_generation(arch):
    model = tiny_model(arch)
    ids, mask = left_padded_batch([12, 7], seed=2)
    policy = StreamingLLM(n_sink=2, window=6)
    with kvpress.patch(model, policy):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    cache = output_cache(out)
    assert cache.get_seq_length() == ids.shape[1] + 39
    for report in cache.report():
        if report.kind == "DenseStorage" or report.kind == "RaggedStorage":
            assert report.tokens_max == 8
    layer = cache.layers[cache.layer_types().index("full_attention")]  # sliding layers: not acted on
    positions = layer.storage.view().positions
    # row 1 is left padded by 5: its sinks are its first real tokens (positions 5, 6)
    assert positions[1, 0, :2].tolist() == [5, 6]
    assert positions[0, 0, :2].tolist() == [0, 1]
    assert positions[0, 0, 2:].tolist() == list(range(cache.get_seq_length() - 6, cache.get_seq_length()))


def test_streaming_llm_nbytes_constant_once_window_fills():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 4))
    sizes = []
    with kvpress.patch(model, StreamingLLM(n_sink=2, window=10)) as session:
        cache = session.new_cache()
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        for _ in range(30):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
            sizes.append(cache.nbytes())
    assert len(set(sizes[10:])) == 1 and sizes[5] < sizes[10]


def test_snapkv_halves_bytes_on_tiny_model():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 64))
    with kvpress.patch(model, None):
        full = output_cache(model(ids, use_cache=True)).nbytes()
    with kvpress.patch(model, SnapKV(compression_ratio=0.5, window=8)):
        cache = output_cache(model(ids, use_cache=True))
    # K+V halved; int32 positions add 4 bytes per kept token per head
    assert cache.nbytes() == full // 2 + 2 * 2 * 32 * 4
    assert cache.storage_nbytes() == cache.nbytes()


def test_pipeline_intersects_policies():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 40))
    pipe = SnapKV(compression_ratio=0.5, window=4) | StreamingLLM(n_sink=2, window=30)
    assert isinstance(pipe, Pipeline) and len(pipe.policies) == 2
    with kvpress.patch(model, pipe):
        cache = output_cache(model(ids, use_cache=True))
    positions = cache.layers[0].storage.view().positions
    assert positions.shape[-1] <= 20
    assert ((positions < 2) | (positions >= 10)).all()
    with pytest.raises(ValueError, match="pipeline stages must be"):
        Pipeline(SnapKV(), "quantize")


def test_prompt_only_policies_are_not_called_while_decoding():
    """SnapKV (a plain scorer) is skipped at decode steps; H2O (observes every forward) and a pipeline holding
    it are still called."""
    from kvpress.policies import H2O, SnapKV

    class CountingSnapKV(SnapKV):
        def score(self, ctx):
            phases.append(ctx.phase)
            return super().score(ctx)

    assert not SnapKV(compression_ratio=0.5).acts_at("decode") and SnapKV().acts_at("prefill")
    assert H2O(compression_ratio=0.5).acts_at("decode")
    assert (SnapKV(compression_ratio=0.5) | H2O(compression_ratio=0.5)).acts_at("decode")
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    phases: list[str] = []
    with torch.no_grad(), kvpress.patch(model, CountingSnapKV(compression_ratio=0.5)):
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert phases == ["prefill"] * model.config.num_hidden_layers


@pytest.mark.parametrize("seed", range(6))
def test_keep_topk_dropping_one_token_equals_the_stable_sort(seed):
    """The O(seq) path (one scored token over budget per head, as when decoding under a budget) keeps exactly what
    the stable descending sort keeps, ties and -inf (unscored) slots included."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (2, 3, 17), generator=gen).float()  # many ties
    scores[torch.rand(2, 3, 17, generator=gen) < 0.3] = float("-inf")
    n_keep = (scores > float("-inf")).sum(-1) - 1
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank_ok = torch.arange(17) < n_keep.clamp(min=0).unsqueeze(-1)
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank_ok)
    assert torch.equal(keep_topk(scores, n_keep), expected)
