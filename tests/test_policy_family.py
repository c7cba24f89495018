"""H2O, TOVA, key-norm, KVzip, AdaKV, PyramidKV and DecodingBudget: what they keep, checked against direct
computations, on synthetic layer contexts and tiny random models."""

import math

import pytest
import torch
from tiny_models import left_padded_batch, tiny_model

import kvpress
from kvpress.compat import cache_kwargs, output_cache
from kvpress.context import LayerContext
from kvpress.policies import (
    H2O,
    TOVA,
    AdaKV,
    DecodingBudget,
    KeyNorm,
    KVzip,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    get_policy,
)
from kvpress.policies.pyramidkv import pyramid_budgets
from kvpress.quant import KVQuant


def _ctx(queries, keys, positions=None, valid=None, phase="prefill", state=None, seq_len=None):
    """A LayerContext over ``keys`` whose queries are the last ``q_len`` positions (causal), ``valid`` marking
    real keys ``[batch, seq]``."""
    b, h, s, d = keys.shape
    positions = torch.arange(s).expand(b, h, s) if positions is None else positions
    q_len = queries.shape[2]
    seq_len = s if seq_len is None else seq_len

    def rows(a, z):
        q_abs = torch.arange(seq_len - q_len + a, seq_len - q_len + z)
        allowed = positions.unsqueeze(2) <= q_abs.view(1, 1, -1, 1)
        if valid is not None:
            allowed = allowed & valid[:, None, None, :]
        return allowed

    return LayerContext(0, 2, phase, queries, keys, keys, positions, lambda n: rows(q_len - n, q_len),
                        d**-0.5, seq_len, {} if state is None else state, allowed_rows_fn=rows)


def _dense_probs(q, k, q_abs, valid=None):
    """float64 softmax(q k^T) with causality by absolute position: ``[batch, heads_q, n, seq]``."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    logits = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    allowed = torch.arange(k.shape[2]).view(1, 1, 1, -1) <= q_abs.view(1, 1, -1, 1)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)


# ---------------------------------------------------------------------------------------------------- H2O
@pytest.mark.parametrize("groups", [1, 3])
def test_h2o_accumulates_dense_column_sums_over_prefill_and_decode(groups):
    torch.manual_seed(0)
    b, hkv, s, d = 2, 2, 37, 8
    valid = torch.ones(b, s + 2, dtype=torch.bool)
    valid[1, :5] = False  # left padding of row 1
    keys = torch.randn(b, hkv, s + 2, d)
    queries = torch.randn(b, hkv * groups, s + 2, d)
    policy = H2O(budget=1000, chunk_size=8)  # a budget above the length: accumulate only
    state: dict = {}
    assert policy.select(_ctx(queries[:, :, :s], keys[:, :, :s], valid=valid[:, :s], state=state)) is None
    for t in (s, s + 1):  # two decoding steps
        ctx = _ctx(queries[:, :, t : t + 1], keys[:, :, : t + 1], valid=valid[:, : t + 1], phase="decode", state=state)
        assert policy.select(ctx) is None
    got = policy.score(_ctx(queries[:, :, -1:], keys, valid=valid, phase="decode", state=state))
    probs = _dense_probs(queries, keys, torch.arange(s + 2), valid)  # every query, prefill and decode
    expected = probs.sum(dim=2).view(b, hkv, groups, s + 2).sum(2)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_h2o_holds_its_budget_with_the_recent_window_during_decoding():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 40))
    with kvpress.patch(model, H2O(budget=12, window=4)) as session:
        cache = session.new_cache()
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        sizes = [cache.report()[0].tokens_max]
        for _ in range(10):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
            sizes.append(cache.report()[0].tokens_max)
        positions = cache.layers[0].storage.view().positions[0, 0]
    assert sizes == [12] * 11
    assert positions[-4:].tolist() == [46, 47, 48, 49]  # the window: the 4 newest tokens


# ---------------------------------------------------------------------------------------------------- TOVA
def test_tova_drops_the_argmin_of_the_newest_querys_head_averaged_attention():
    torch.manual_seed(1)
    b, hkv, groups, s, d = 2, 2, 2, 21, 8
    keys, queries = torch.randn(b, hkv, s, d), torch.randn(b, hkv * groups, s, d)
    state = {"tova.budget": torch.full((b, hkv), s - 1)}  # as after a prefill of s - 1 tokens
    keep = TOVA(compression_ratio=0.5).select(_ctx(queries[:, :, -1:], keys, phase="decode", state=state))
    probs = _dense_probs(queries[:, :, -1:], keys, torch.tensor([s - 1]))[:, :, 0]  # [b, hq, s]
    argmin = probs.mean(1).argmin(-1)  # averaged over every query head of the layer
    assert keep.sum(-1).eq(s - 1).all()
    for row in range(b):
        assert not keep[row, :, argmin[row]].any() and keep[row].sum() == hkv * (s - 1)


def test_tova_budget_fixed_at_prefill_held_while_decoding():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 100, (1, 30))
    with kvpress.patch(model, TOVA(compression_ratio=0.5)):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert [r.tokens_max for r in output_cache(out).report()] == [15, 15]


# ---------------------------------------------------------------------------------------------------- key-norm
def test_knorm_keeps_the_smallest_norm_keys():
    torch.manual_seed(2)
    keys = torch.randn(1, 2, 10, 4)
    keep = KeyNorm(budget=3).select(_ctx(torch.randn(1, 2, 10, 4), keys))
    expected = keys.norm(dim=-1).topk(3, largest=False).indices.sort().values
    assert keep.nonzero()[:, -1].view(2, 3).tolist() == expected[0].tolist()


# ---------------------------------------------------------------------------------------------------- AdaKV
def test_adakv_shares_the_layer_budget_by_score_with_a_floor():
    torch.manual_seed(3)
    scores = torch.rand(2, 4, 50)
    scores[:, 0] *= 10  # head 0 dominates: it takes most of the budget beyond the floors
    valid = torch.ones(2, 4, 50, dtype=torch.bool)
    valid[1, :, :10] = False
    policy = AdaKV(KeyNorm(), compression_ratio=0.6, floor=0.25)
    keep = policy.keep_from_scores(scores, valid, 0, 1)
    counts = keep.sum(-1)
    assert counts.sum(-1).tolist() == [4 * 20, 4 * 16]  # the uniform layer budget: 40% of 50 / of 40 real
    assert (counts >= torch.tensor([[5], [4]])).all()  # floor: ceil(0.25 * 20), ceil(0.25 * 16)
    assert counts[:, 0].gt(counts[:, 1:].max(-1).values).all()
    assert not keep[1, :, :10].any()
    for row, floor in enumerate([5, 4]):  # beyond each head's floor, the best remaining entries of any head win
        masked = scores[row].masked_fill(~valid[row], -1)
        floor_sets = torch.zeros_like(keep[row])
        for h in range(4):
            floor_sets[h, masked[h].topk(floor).indices] = True
        assert (keep[row] | ~floor_sets).all()
        rest_kept, rest_dropped = masked[keep[row] & ~floor_sets], masked[~keep[row] & valid[row]]
        assert rest_kept.min() >= rest_dropped.max()


def test_adakv_holds_ragged_bytes_equal_to_the_tokens_it_keeps():
    model = tiny_model("llama", num_key_value_heads=4, num_attention_heads=4, head_dim=64)  # SmolLM2's head_dim
    ids = torch.randint(3, 100, (1, 64))
    with kvpress.patch(model, AdaKV(SnapKV(window=4), compression_ratio=0.5)):
        cache = output_cache(model(ids, use_cache=True))
    for layer in cache.layers:
        lengths = layer.storage.lengths()
        assert type(layer.storage).__name__ == "RaggedStorage" and lengths.unique().numel() > 1
        assert int(lengths.sum()) == 4 * 32
        kv_bytes = int(lengths.sum()) * 2 * 64 * 4  # K and V, fp32: the rest is int32 positions and lengths
        assert 0 < layer.nbytes() - kv_bytes < 0.02 * kv_bytes


def test_adakv_refuses_storage_that_cannot_be_ragged():
    with pytest.raises(ValueError, match="AdaKV gives heads different lengths.*KVQuant.*pads"):
        AdaKV(SnapKV(), compression_ratio=0.5) | KVQuant(bits=4)


# ---------------------------------------------------------------------------------------------------- PyramidKV
def test_pyramid_budgets_decrease_with_depth_and_keep_the_uniform_total():
    mean_keep, n = torch.tensor([[100]]), torch.tensor([[1000]])
    budgets = pyramid_budgets(mean_keep, n, 10, beta=20)[:, 0, 0]
    assert (budgets[1:] <= budgets[:-1]).all() and budgets[0] > 100 > budgets[-1]
    assert abs(int(budgets.sum()) - 1000) <= 10  # floor rounding only
    capped = pyramid_budgets(torch.tensor([[80]]), torch.tensor([[100]]), 8, beta=20)[:, 0, 0]
    assert capped.max() == 100 and abs(int(capped.sum()) - 640) <= 8  # the excess moved to deeper layers


def test_pyramidkv_on_a_model_keeps_more_in_lower_layers():
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 100, (1, 60))
    with kvpress.patch(model, PyramidKV(SnapKV(window=4), compression_ratio=0.5, beta=4)):
        kept = [r.tokens_max for r in output_cache(model(ids, use_cache=True)).report()]
    assert kept == sorted(kept, reverse=True) and kept[0] > 30 > kept[-1]
    assert abs(sum(kept) - 4 * 30) <= 4


# ---------------------------------------------------------------------------------------------------- DecodingBudget
@pytest.mark.parametrize("interval", [1, 5])
def test_decoding_budget_never_exceeds_budget_plus_interval(interval):
    model = tiny_model("mistral")
    ids, mask = left_padded_batch([30, 22])
    policy = DecodingBudget(KeyNorm(compression_ratio=0.25), budget=16, interval=interval, window=4)
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        out = model(ids, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
        sizes = [cache.report()[0].tokens_max]
        for _ in range(12):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
            sizes.append(cache.report()[0].tokens_max)
    assert sizes[0] == 16 and max(sizes) <= 16 + interval - (1 if interval > 1 else 0)
    assert sizes[-1] <= 16 + interval


def test_decoding_budget_carries_h2o_scores_between_cuts():
    torch.manual_seed(4)
    keys, queries = torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    h2o = H2O(budget=1000)
    policy, state = DecodingBudget(h2o, budget=6, interval=3, window=1), {}
    policy.select(_ctx(queries[:, :, :10], keys[:, :, :10], state=state))
    policy.select(_ctx(queries[:, :, 10:11], keys[:, :, :11], phase="decode", state=state))
    keep = policy.select(_ctx(queries[:, :, 11:], keys, phase="decode", state=state))  # 12 >= 6 + 3: cut
    mass = _dense_probs(queries, keys, torch.arange(12)).sum(2)[0, 0]
    expected = set(mass[:11].topk(5).indices.tolist()) | {11}  # window 1, then the heaviest by total mass
    assert set(keep[0, 0].nonzero()[:, 0].tolist()) == expected


# ---------------------------------------------------------------------------------------------------- KVzip
class _Tokenizer:
    """A stand-in tokenizer: a few fixed ids per prompt (the tiny models have no tokenizer)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [3 + (ord(c) % 90) for c in text.strip()[:5]] or [3]})()


def test_kvzip_scores_are_the_max_reconstruction_attention_of_the_model():
    model = tiny_model("llama", attn="eager")
    torch.manual_seed(5)
    ids = torch.randint(3, 100, (1, 24))
    policy = KVzip(compression_ratio=0.5, tokenizer=_Tokenizer(), n_sink=0)
    first, _, postfix = policy._prompt_ids(None)
    scored = {}
    real_after_forward = KVzip.after_forward

    def record(self, fwd):
        scored["scores"], scored["valid"] = self.reconstruction_scores(fwd)
        scored["seq"] = fwd.cache.get_seq_length()

    KVzip.after_forward = record
    try:
        with kvpress.patch(model, policy):
            model(ids, use_cache=True)
    finally:
        KVzip.after_forward = real_after_forward
    assert scored["seq"] == 24  # the reconstruction left no trace
    full = torch.cat([ids, torch.tensor([first + postfix]), ids], dim=1)
    with torch.no_grad():
        attn = model(full, output_attentions=True).attentions  # eager: [1, heads, q, k] per layer
    n_rep = full.shape[1] - 24
    for layer, probs in enumerate(attn):
        ref = probs[:, :, 24:, :24].double().view(1, 2, 2, n_rep, 24).amax(dim=(2, 3))  # group heads, queries
        torch.testing.assert_close(scored["scores"][layer].double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scope", ["global", "layer", "head"])
def test_kvzip_budget_scopes(scope):
    model = tiny_model("qwen2", num_hidden_layers=3)
    ids, mask = left_padded_batch([40, 26])
    with kvpress.patch(model, KVzip(compression_ratio=0.5, scope=scope, tokenizer=_Tokenizer())):
        cache = output_cache(model(ids, attention_mask=mask, use_cache=True))
    per_layer = torch.stack([cache.layers[i].storage.lengths() for i in range(3)])  # [layers, batch, heads]
    assert cache.get_seq_length() == 40
    assert per_layer.sum(dim=(0, 2)).tolist() == [3 * 2 * 20, 3 * 2 * 13]  # half of each row's real tokens
    if scope == "head":
        assert (per_layer == torch.tensor([20, 13]).view(1, 2, 1)).all()
    if scope == "layer":
        assert per_layer.sum(-1).tolist() == [[40, 26]] * 3
    for i in range(3):  # padding is never kept
        view = cache.layers[i].storage.view()
        held = view.valid if view.valid is not None else torch.ones_like(view.positions, dtype=torch.bool)
        assert (view.positions[1][held[1]] >= 14).all()


def test_kvzip_with_ratio_zero_leaves_the_cache_as_a_plain_prefill_and_restores_sliding_layers():
    model = tiny_model("gemma3")
    ids = torch.randint(3, 100, (1, 30))
    nxt = torch.randint(3, 100, (1, 1))
    ref = model(ids, use_cache=True)
    ref_step = model(nxt, **cache_kwargs(model, output_cache(ref)), use_cache=True).logits
    with kvpress.patch(model, KVzip(compression_ratio=0.0, tokenizer=_Tokenizer())):
        out = model(ids, use_cache=True)
        step = model(nxt, **cache_kwargs(model, output_cache(out)), use_cache=True).logits
    torch.testing.assert_close(step, ref_step, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- composition
FAMILY = {
    "h2o": lambda: H2O(compression_ratio=0.5),
    "tova": lambda: TOVA(compression_ratio=0.5),
    "knorm": lambda: KeyNorm(compression_ratio=0.5),
    "kvzip": lambda: KVzip(compression_ratio=0.5, tokenizer=_Tokenizer()),
    "adakv": lambda: AdaKV(SnapKV(window=4), compression_ratio=0.5),
    "pyramidkv": lambda: PyramidKV(SnapKV(window=4), compression_ratio=0.5, beta=4),
    "decoding_budget": lambda: DecodingBudget(KeyNorm(), budget=20, interval=2, window=2),
}


@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("with_", ["alone", "streaming", "quant"])
def test_every_policy_composes_and_never_keeps_padding(name, with_):
    if name == "adakv" and with_ == "quant":
        pytest.skip("AdaKV refuses padded (quantized) storage: tested above")
    model = tiny_model("llama")
    ids, mask = left_padded_batch([44, 30, 12])
    policy = FAMILY[name]()
    if with_ == "streaming":
        policy = policy | StreamingLLM(n_sink=2, window=16)
    elif with_ == "quant":
        policy = policy | KVQuant(bits=4, group_size=8, residual=8)
    with kvpress.patch(model, policy):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    cache = output_cache(out)
    assert out.sequences.shape == (3, 49) and cache.get_seq_length() == 48
    pad = (1 - mask).sum(-1)  # padding positions of each row: 0 .. pad-1
    for layer in cache.layers:
        view = layer.storage.view()
        held = view.valid if view.valid is not None else torch.ones_like(view.positions, dtype=torch.bool)
        for row in range(3):
            assert (view.positions[row][held[row]] >= pad[row]).all(), (name, with_, row)
        real = mask.sum(-1)  # nothing holds more than its row's real tokens
        assert (layer.storage.lengths().max(-1).values <= real + 4).all()
    if with_ == "streaming":
        assert max(r.tokens_max for r in cache.report()) <= 18


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: H2O(budget=0), "budget must be an integer >= 1, got 0"),
        (lambda: H2O(compression_ratio=1.0), r"compression_ratio must be in \[0, 1\)"),
        (lambda: TOVA(compression_ratio=-0.1), r"compression_ratio must be in \[0, 1\)"),
        (lambda: DecodingBudget(KeyNorm(), budget=0), "budget must be an integer >= 1, got 0"),
        (lambda: DecodingBudget(KeyNorm(), budget=8, interval=0), "interval must be an integer >= 1, got 0"),
        (lambda: DecodingBudget(KeyNorm(), budget=8, window=8), "window must be smaller than budget"),
        (lambda: DecodingBudget(StreamingLLM(), budget=8), "policy must be a kvpress ScorePolicy"),
        (lambda: AdaKV(SnapKV(), floor=1.5), r"floor must be a number in \[0, 1\], got 1.5"),
        (lambda: AdaKV("snapkv"), "scorer must be a kvpress ScorePolicy"),
        (lambda: PyramidKV(SnapKV(), beta=0), "beta must be an integer >= 1, got 0"),
        (lambda: KVzip(scope="row"), r"scope must be one of \('global', 'layer', 'head'\)"),
        (lambda: KVzip(compression_ratio=0.5, budget=3), "either compression_ratio or budget"),
        (lambda: get_policy("adakv", scorer="streaming_llm"), "scorer must name a scoring policy"),
        (lambda: get_policy("decoding_budget", policy="h2o"), "give exactly one of budget or compression_ratio"),
    ],
)
def test_bad_input_names_the_parameter(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_registry_builds_every_family_member_by_name():
    assert isinstance(get_policy("h2o", budget=64), H2O)
    assert isinstance(get_policy("key-norm", compression_ratio=0.3), KeyNorm)
    ada = get_policy("adakv", scorer="snapkv", scorer_params={"window": 8}, compression_ratio=0.5)
    assert isinstance(ada, AdaKV) and ada.scorer.window == 8 and ada.compression_ratio == 0.5
    db = get_policy("decoding_budget", policy="h2o", budget=64, interval=8)
    assert isinstance(db, DecodingBudget) and isinstance(db.policy, H2O)
    assert db.policy.compression_ratio == 0.0  # by name the inner policy only scores: the budget sets the size
    own = get_policy("decoding_budget", policy="snapkv", policy_params={"compression_ratio": 0.25}, budget=64)
    assert own.policy.compression_ratio == 0.25
    assert isinstance(get_policy("pyramidkv", compression_ratio=0.25), PyramidKV)
    assert isinstance(get_policy("kvzip", compression_ratio=0.5, scope="layer"), KVzip)


def test_policies_that_never_read_keys_leave_a_quantized_decode_step_undecoded(monkeypatch):
    """StreamingLLM reads positions only: a decode step over quantized storage must not dequantize the layer."""
    from kvpress.storage.base import LazyAttentionView

    built = []
    original = LazyAttentionView._built
    monkeypatch.setattr(LazyAttentionView, "_built", lambda self: built.append(1) or original(self))
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 80))
    with kvpress.patch(model, StreamingLLM(n_sink=4, window=48) | KVQuant(bits=4, group_size=8, residual=8)) as s:
        cache = s.new_cache()
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        built.clear()
        for _ in range(3):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
    assert built == []
    with kvpress.patch(model, KeyNorm(compression_ratio=0.0) | KVQuant(bits=4, group_size=8, residual=8)) as s:
        cache = s.new_cache()
        model(ids, **cache_kwargs(model, cache), use_cache=True)
        built.clear()
        model(ids[:, :1], **cache_kwargs(model, cache), use_cache=True)
    assert built == []  # KeyNorm acts at prefill only: its decode steps read nothing either
