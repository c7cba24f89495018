"""DuoAttention: pattern files, the policy (exact sinks + window on streaming heads, everything on retrieval heads,
ragged storage, prefill / chunks / decode / padded batches), the identification attention and its training."""

import pytest
import torch
from tiny_models import left_padded_batch, tiny_model

import kvpress
from kvpress.compat import cache_kwargs, output_cache
from kvpress.duo import DuoPattern, load_pattern
from kvpress.duo.cheap import needle_scores
from kvpress.duo.identify import (
    Example,
    IdentifyConfig,
    MixState,
    identification_attention,
    overlap,
    train_gates,
)
from kvpress.policies import DuoAttention, SnapKV, StreamingLLM, get_policy
from kvpress.quant import KVQuant
from kvpress.scorer.predictor import model_signature

# tiny llama: 2 layers x 2 KV heads. Streaming at sparsity 0.5: (layer 0, head 0) and (layer 1, head 1).
GATES = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
SINK, WINDOW = 2, 4


def _pattern(model=None, gates=GATES):
    meta = {"model": "tiny"} if model is None else {"model": "tiny", "model_signature": model_signature(model.config)}
    return DuoPattern(gates.clone(), meta)


def _held(cache, layer, row, head):
    """Sorted absolute positions held by (row, head) of a layer."""
    view = cache.layers[layer].storage.view()
    n = view.keys.shape[2] if view.positions is None else view.positions.shape[2]
    positions = torch.arange(n) if view.positions is None else view.positions[row, head]
    if view.valid is not None:
        positions = positions[view.valid[row, head]]
    return sorted(int(p) for p in positions)


def _expect_streaming(first_real, seen):
    return sorted(set(range(first_real, first_real + SINK)) | set(range(seen - WINDOW, seen)))


def _check_heads(cache, seen, first_real=(0,)):
    for row, start in enumerate(first_real):
        assert _held(cache, 0, row, 0) == _expect_streaming(start, seen)
        assert _held(cache, 1, row, 1) == _expect_streaming(start, seen)
        assert _held(cache, 0, row, 1) == list(range(seen))  # retrieval heads: every token (padding included)
        assert _held(cache, 1, row, 0) == list(range(seen))


# ---------------------------------------------------------------------------------------------- pattern file
def test_pattern_round_trip_is_exact(tmp_path):
    gates = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    pattern = DuoPattern(gates, {"model": "m", "seed": 7, "n_sink": 16})
    loaded = load_pattern(pattern.save(tmp_path / "p.safetensors"))
    assert torch.equal(loaded.gates, gates) and loaded.gates.dtype == torch.float32
    assert loaded.metadata["seed"] == "7" and loaded.metadata["n_sink"] == "16" and loaded.metadata["model"] == "m"
    assert torch.equal(loaded.streaming(sparsity=0.4), pattern.streaming(sparsity=0.4))


def test_streaming_selection_by_sparsity_and_threshold():
    pattern = _pattern()
    assert pattern.streaming(sparsity=0.5).tolist() == [[True, False], [False, True]]
    assert pattern.streaming(sparsity=0.0).sum() == 0 and pattern.streaming(sparsity=1.0).all()
    assert pattern.streaming(sparsity=0.25).tolist() == [[True, False], [False, False]]
    assert pattern.streaming(threshold=0.85).tolist() == [[True, False], [True, True]]
    assert pattern.retrieval_heads(0.5) == {(0, 1), (1, 0)}
    assert overlap(pattern, _pattern(gates=GATES.flip(0))) == 0.0 and overlap(pattern, pattern) == 1.0


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: DuoPattern(torch.ones(4)), ValueError, r"\[layers, kv_heads\]"),
        (lambda: DuoPattern(torch.full((2, 2), 1.5)), ValueError, r"in \[0, 1\]"),
        (lambda: DuoAttention(GATES, sparsity=-0.1), ValueError, r"sparsity must be a number in \[0, 1\]"),
        (lambda: DuoAttention(GATES, sparsity=1.5), ValueError, r"sparsity must be a number in \[0, 1\]"),
        (lambda: DuoAttention(GATES, window=0), ValueError, "window must be an integer >= 1"),
        (lambda: DuoAttention(GATES, n_sink=-1), ValueError, "n_sink must be an integer >= 0"),
        (lambda: DuoAttention("/nonexistent/p.safetensors"), FileNotFoundError, "does not exist"),
        (lambda: DuoAttention(42), ValueError, "pattern must be"),
        (lambda: IdentifyConfig(loss="l1"), ValueError, "loss must be"),
        (lambda: IdentifyConfig(method="x"), ValueError, "method must be"),
        (lambda: DuoAttention(GATES, retrieval_policy=kvpress.policies.KVzip()), ValueError, "per layer"),
        (lambda: DuoAttention(GATES) | kvpress.policies.AdaKV(SnapKV()) | KVQuant(bits=4), ValueError, "ragged"),
    ],
)
def test_bad_input_is_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_not_a_pattern_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="is not a kvpress DuoAttention pattern"):
        load_pattern(tmp_path / "x.safetensors")


def test_pattern_for_another_model_is_refused(tmp_path):
    model = tiny_model("llama")
    wrong_shape = DuoPattern(torch.ones(3, 2), {"model": "other"})
    shape_error = r"identified on other \(layers, KV heads = \(3, 2\)\); this model has \(2, 2\)"
    with pytest.raises(ValueError, match=shape_error), kvpress.patch(model, DuoAttention(wrong_shape)):
        pass
    other = tiny_model("llama", hidden_size=32, intermediate_size=64)
    path = _pattern(other).save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="signature"), kvpress.patch(model, DuoAttention(path)):
        pass
    with pytest.raises(ValueError, match="no shipped DuoAttention pattern matches"), \
            kvpress.patch(model, DuoAttention("auto")):
        pass


def test_registry_builds_duo_attention():
    policy = get_policy("duo", pattern=GATES, sparsity=0.5, n_sink=SINK, window=WINDOW,
                        retrieval_policy="snapkv", retrieval_params={"compression_ratio": 0.5})
    assert isinstance(policy, DuoAttention) and isinstance(policy.retrieval_policy, SnapKV)
    assert policy.params()["sparsity"] == 0.5 and policy.params()["window"] == WINDOW


# ---------------------------------------------------------------------------------------------- the policy
def test_prefill_chunks_and_decode_hold_exact_sinks_window_and_everything():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 21), generator=torch.Generator().manual_seed(0))
    policy = DuoAttention(_pattern(model), sparsity=0.5, n_sink=SINK, window=WINDOW)
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()  # prefill, then two more chunks
        for start, stop in [(0, 9), (9, 15), (15, 21)]:
            out = model(ids[:, start:stop], **cache_kwargs(model, cache), use_cache=True)
            _check_heads(cache, stop)
        # streaming and retrieval heads each dense in their own part: no ragged layout to rebuild per step
        storage = cache.layers[0].storage
        assert type(storage).__name__ == "HeadSplitStorage"
        assert [type(p).__name__ for p in storage.parts] == ["SinkWindowStorage", "DenseStorage"]
        assert type(storage.parts[0].inner).__name__ == "DenseStorage"
        assert sorted(int(p.lengths().max()) for p in storage.parts) == [SINK + WINDOW, 21]
        for step in range(6):  # decoding: streaming heads stay at sinks + window
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
            _check_heads(cache, 22 + step)
        assert [r.tokens_max for r in cache.report()] == [27, 27]
        assert [r.tokens_min for r in cache.report()] == [SINK + WINDOW] * 2


def test_left_padded_batch_through_generate():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([14, 9], seed=3)
    with kvpress.patch(model, DuoAttention(_pattern(model), n_sink=SINK, window=WINDOW)):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    cache = output_cache(out)
    seen = cache.get_seq_length()
    assert seen == 14 + 7
    _check_heads(cache, seen, first_real=(0, 5))  # row 1's sinks are its first real tokens (positions 5, 6)


def test_all_streaming_equals_streaming_llm_and_no_streaming_equals_no_policy():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([16, 11], seed=4)

    def run(policy):
        with kvpress.patch(model, policy):
            return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                  output_logits=True, return_dict_in_generate=True)

    duo_all = run(DuoAttention(_pattern(model), sparsity=1.0, n_sink=SINK, window=WINDOW))
    streaming = run(StreamingLLM(n_sink=SINK, window=WINDOW, reposition=False))
    for a, b in zip(duo_all.logits, streaming.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    plain = run(None)
    ones = run(DuoAttention(_pattern(model, torch.ones(2, 2)), threshold=0.5, n_sink=SINK, window=WINDOW))
    zero = run(DuoAttention(_pattern(model), sparsity=0.0, n_sink=SINK, window=WINDOW))
    for a, b, c in zip(plain.logits, ones.logits, zero.logits):
        assert torch.equal(a, b) and torch.equal(a, c)  # alpha = 1 everywhere: identical to no policy
    assert not all(torch.equal(a, b) for a, b in zip(plain.logits, duo_all.logits))


def test_retrieval_policy_applies_to_retrieval_heads_only():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(1))
    policy = DuoAttention(_pattern(model), n_sink=SINK, window=WINDOW, retrieval_policy=SnapKV(compression_ratio=0.5))
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        model(ids, **cache_kwargs(model, cache), use_cache=True)
    assert len(_held(cache, 0, 0, 1)) == 10 and len(_held(cache, 1, 0, 0)) == 10
    assert _held(cache, 0, 0, 0) == _expect_streaming(0, 20) and _held(cache, 1, 0, 1) == _expect_streaming(0, 20)


@pytest.mark.parametrize("bits", [8, 4])
def test_composes_with_kvquant_each_head_group_in_its_own_quantized_storage(bits):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(6))

    def run(policy, steps=6):
        with kvpress.patch(model, policy) as session:
            cache = session.new_cache()
            out = model(ids, **cache_kwargs(model, cache), use_cache=True)
            logits = [out.logits[:, -1]]
            for _ in range(steps):
                out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
                logits.append(out.logits[:, -1])
        return cache, torch.cat(logits)

    duo = DuoAttention(_pattern(model), n_sink=SINK, window=WINDOW)
    quant = KVQuant(bits=bits, n_sink=2, residual=8, group_size=8)
    cache_q, logits_q = run(duo | quant)
    cache_d, logits_d = run(DuoAttention(_pattern(model), n_sink=SINK, window=WINDOW))
    cache_k, _ = run(KVQuant(bits=bits, n_sink=2, residual=8, group_size=8))
    for layer in (0, 1):
        storage = cache_q.layers[layer].storage
        assert type(storage).__name__ == "HeadSplitStorage"
        assert [type(p).__name__ for p in storage.parts] == ["SinkWindowStorage", "QuantizedStorage"]
        assert type(storage.parts[0].inner).__name__ == "QuantizedStorage"
    seen = 46
    assert cache_q.layers[0].storage.lengths().tolist() == [[SINK + WINDOW, seen]]
    assert cache_q.layers[1].storage.lengths().tolist() == [[seen, SINK + WINDOW]]
    _check_heads(cache_q, seen)
    assert cache_q.nbytes() < cache_d.nbytes() and cache_q.nbytes() < cache_k.nbytes()
    if bits == 8:  # 8-bit codes: the same next tokens' logits as DuoAttention on full-precision storage
        torch.testing.assert_close(logits_q, logits_d, atol=2e-2, rtol=2e-2)
    (duo | quant).__or__(None)  # re-composing a split pipeline does not split twice
    assert type((duo | quant | None).storage).__name__ == "HeadSplitSpec"


# ---------------------------------------------------------------------------------------------- identification
def _examples(n=2, length=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (1, length), generator=gen)
        out.append(Example(ids, slice(length - 4, length), torch.tensor([5, 6])))
    return out


def test_mix_at_alpha_one_is_the_model_and_a_wide_window_is_full_attention():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 30), generator=torch.Generator().manual_seed(2))
    plain = model(ids).logits
    with torch.no_grad(), identification_attention(model, MixState(2, 4, alpha=lambda: torch.ones(2, 2))):
        ones = model(ids).logits
    assert torch.equal(plain, ones)
    with torch.no_grad(), identification_attention(model, MixState(2, 64, alpha=lambda: torch.zeros(2, 2))):
        wide = model(ids).logits
    torch.testing.assert_close(wide, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), identification_attention(model, MixState(2, 4, alpha=lambda: torch.zeros(2, 2))):
        narrow = model(ids).logits
    assert not torch.allclose(narrow, plain, atol=1e-3)
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("loss", ["hidden", "kl"])
def test_gate_training_is_deterministic_and_moves_the_gates(loss):
    model = tiny_model("llama")
    cfg = IdentifyConfig(steps=3, n_sink=2, window=4, lr=0.2, init_logit=2.0, seed=5, loss=loss)
    first = train_gates(model, _examples(), cfg, progress=False)
    log = []
    second = train_gates(model, _examples(), cfg, progress=False, log=log)
    assert torch.equal(first, second) and first.shape == (2, 2)
    assert not torch.allclose(first, torch.sigmoid(torch.tensor(2.0)).expand(2, 2))
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["distill"] > 0 for r in log)
    assert all(p.requires_grad for p in model.parameters())  # trainable flags restored


def _plant_retrieval_head(model, kv_head: int, needle_token: int, span_token: int, big: float = 6.0) -> None:
    """Make KV head ``kv_head`` of layer 0 a retrieval head: queries of ``span_token`` put (almost) all their
    attention on keys of ``needle_token``. Both tokens get orthogonal embedding directions that every other
    embedding is cleared of; the query and key of that head live in the lowest-frequency rotary pair (dims 7 and
    15 of 16), which rotates by under 0.01 rad over the prompt, so the match does not depend on distance."""
    emb = model.get_input_embeddings().weight
    attn = model.model.layers[0].self_attn
    d, groups = 16, 2  # head_dim, query heads per KV head in the tiny llama
    with torch.no_grad():
        e, f = torch.zeros(emb.shape[1]), torch.zeros(emb.shape[1])
        e[0], f[1] = 1.0, 1.0
        emb[:, :2] = 0.0  # no other token has a component along e or f
        emb[needle_token], emb[span_token] = 8 * e, 8 * f
        rows = slice(kv_head * d, (kv_head + 1) * d)
        attn.k_proj.weight[rows] = 0.0
        attn.k_proj.weight[kv_head * d + 7] = big * e
        for q_head in range(kv_head * groups, (kv_head + 1) * groups):
            attn.q_proj.weight[q_head * d:(q_head + 1) * d] = 0.0
            attn.q_proj.weight[q_head * d + 7] = big * f


def _reference_needle_mass(model, examples) -> torch.Tensor:
    """``[layers, kv_heads]``: attention probability from the answer rows to the needle columns, from the model's
    own eager attention weights (mean over a KV head's query heads and over rows, summed over needle columns)."""
    total = 0
    for ex in examples:
        out = model(ex.ids, output_attentions=True)
        per_layer = []
        for probs in out.attentions:  # [1, heads, q, k]
            mass = probs[0][:, ex.span][..., ex.needle].sum(-1).mean(-1)  # [heads]
            per_layer.append(mass.view(-1, 2).mean(-1))
        total = total + torch.stack(per_layer)
    total = total / len(examples)
    return total / total.max()


@pytest.mark.parametrize("planted", [0, 1])
def test_needle_scores_rank_a_planted_retrieval_head_first(planted):
    """needle_scores measures what it says: the attention mass the answer puts on the needle. A head planted to
    retrieve the needle scores 1 and every other head far below; all scores match the model's own attention."""
    model = tiny_model("llama", attn="eager")
    _plant_retrieval_head(model, planted, needle_token=120, span_token=121)
    examples = []
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        ids = torch.randint(3, 100, (1, 24), generator=gen)
        needle = torch.tensor([4 + 3 * i, 5 + 3 * i])  # a different depth in each prompt
        ids[0, needle] = 120
        ids[0, 20:] = 121
        examples.append(Example(ids, slice(20, 24), needle))
    gates = needle_scores(model, examples)
    assert gates.shape == (2, 2)
    assert float(gates[0, planted]) == 1.0
    others = torch.ones(2, 2, dtype=torch.bool)
    others[0, planted] = False
    assert float(gates[others].max()) < 0.5, gates
    with torch.no_grad():
        reference = _reference_needle_mass(model, examples)
    torch.testing.assert_close(gates, reference, rtol=1e-4, atol=1e-5)
    pattern = DuoPattern(gates)
    assert pattern.retrieval_heads(fraction=0.25) == {(0, planted)}


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_shipped_smollm2_pattern_holds_at_most_055_of_the_bytes_at_sparsity_half(smollm2):
    from kvpress.duo.pattern import embedded_pattern
    from kvpress.eval.text import load_text, tokenize_text

    model, tokenizer = smollm2
    pattern = load_pattern(embedded_pattern(model))
    pattern.check(model)
    assert pattern.metadata["method"] == "trained" and (pattern.num_layers, pattern.kv_heads) == (30, 3)
    ids = tokenize_text(tokenizer, load_text(None)[0], max_tokens=2000)
    n = ids.shape[1]
    policy = DuoAttention("auto", sparsity=0.5, n_sink=16, window=128)
    with torch.no_grad(), kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        model(ids, **cache_kwargs(model, cache), use_cache=True)
    full = 30 * 3 * n * 64 * 2 * 4  # float32 keys + values of every token, every layer and KV head
    assert int(policy.streaming_heads.sum()) == 45
    lengths = torch.stack([cache.layers[i].storage.lengths()[0] for i in range(30)])
    assert torch.equal(lengths, torch.where(policy.streaming_heads, 16 + 128, n))
    assert cache.nbytes() <= 0.55 * full


def test_identify_defaults_take_one_distinct_prompt_per_step_for_trained_gates_and_16_for_the_needle_identifier():
    trained, needle = IdentifyConfig(), IdentifyConfig(method="needle")
    assert (trained.steps, trained.prompts) == (160, 160)
    assert needle.prompts == 16
    assert IdentifyConfig(prompts=7).prompts == 7


def test_cli_parses_identify_and_prints_pattern_info(tmp_path, capsys):
    from kvpress.cli import build_parser, main

    args = build_parser().parse_args(["duo", "identify", "--out", "p.safetensors", "--method", "needle", "--seed", "3",
                                      "--steps", "5", "--window", "32"])
    assert (args.method, args.seed, args.steps, args.window, args.model) == ("needle", 3, 5, 32, "smollm2-135m")
    assert args.prompts is None  # resolved per method by IdentifyConfig
    path = _pattern(gates=GATES).save(tmp_path / "p.safetensors")
    assert main(["duo", "info", str(path), "--sparsity", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "format: kvpress-duo-pattern/1" in printed and "0.100*" in printed and "0.900 " in printed


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_head_split_decode_reads_each_dense_part_in_place_like_the_merged_view(monkeypatch, arch):
    """Decode over DuoAttention's two dense head groups (each attended in place) gives the logits of SDPA over the
    merged, masked view, batch > 1 included."""
    import kvpress.attention

    model = tiny_model(arch)
    ids = torch.randint(3, 100, (2, 17), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name, limit in (("in place", kvpress.attention.DECODE_MAX_QUERIES), ("merged", 0)):
        monkeypatch.setattr(kvpress.attention, "DECODE_MAX_QUERIES", limit)
        with torch.no_grad(), kvpress.patch(model, DuoAttention(_pattern(model), n_sink=SINK, window=WINDOW)):
            out = model(ids, use_cache=True)
            cache = output_cache(out)
            steps, token = [], out.logits[:, -1:].argmax(-1)
            for _ in range(5):
                out = model(token, **cache_kwargs(model, cache), use_cache=True)
                steps.append(out.logits)
                token = out.logits[:, -1:].argmax(-1)
            assert type(cache.layers[0].storage).__name__ == "HeadSplitStorage"
        logits[name] = torch.cat(steps, 1)
    torch.testing.assert_close(logits["in place"], logits["merged"], rtol=1e-5, atol=1e-5)


def test_on_a_model_with_sliding_layers_only_the_full_layers_heads_are_ranked():
    """Tiny Gemma 3 (layers 0 and 2 slide over 8 tokens, 1 and 3 are full): the sparsity is a share of the full
    layers' heads; the sliding layers, though their gates are the lowest, are never made streaming, unless the
    policy is told ``sliding_layers=True``."""
    model = tiny_model("gemma3")
    n_layers, kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    types = list(model.config.layer_types)
    full = torch.tensor([t == "full_attention" for t in types])
    gates = torch.where(full[:, None], 0.5, 0.01).expand(n_layers, kv).clone()
    gates[full.nonzero()[0, 0], 0] = 0.2  # the lowest gate among the full layers' heads
    pattern = _pattern(model, gates)
    assert pattern.streaming(sparsity=1.0).all()  # no eligibility given: every layer
    with pytest.raises(ValueError, match="eligible must be"):
        pattern.streaming(sparsity=0.5, eligible=torch.ones(n_layers + 1, dtype=torch.bool))
    n_full_heads = int(full.sum()) * kv
    for sliding_layers, candidates in ((False, full), (True, torch.ones_like(full))):
        policy = DuoAttention(pattern, sparsity=0.5, n_sink=SINK, window=WINDOW)
        if sliding_layers:
            policy.on_sliding_layers()
        ids = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), kvpress.patch(model, policy) as session:
            cache = session.new_cache()
            model(ids, **cache_kwargs(model, cache), use_cache=True)
            streaming = policy.streaming_heads
            n_candidates = int(candidates.sum()) * kv
            assert int(streaming.sum()) == round(0.5 * n_candidates)
            assert not streaming[~candidates].any()
            if not sliding_layers:
                # the lowest full-layer gate streams first; the sliding layers' (lower) gates are passed over
                assert bool(streaming[full.nonzero()[0, 0], 0]) and int(streaming.sum()) == round(0.5 * n_full_heads)
                for i, row in enumerate(cache.report()):
                    if types[i] == "full_attention":
                        want_min = SINK + WINDOW if streaming[i].any() else 30
                        want_max = SINK + WINDOW if streaming[i].all() else 30
                        assert (row.tokens_min, row.tokens_max) == (want_min, want_max)


@pytest.mark.parametrize("method", ["trained", "needle"])
def test_identification_on_a_model_with_sliding_layers_leaves_them_at_one(method, monkeypatch):
    """Only the layers whose cache grows are identified: sliding layers' gates stay 1, the full ones move."""
    from kvpress.duo import identify as identify_module

    monkeypatch.setattr(identify_module, "examples", lambda *a, **k: _examples(length=30))
    model = tiny_model("gemma3")
    types = list(model.config.layer_types)
    sliding = torch.tensor([t == "sliding_attention" for t in types])
    assert sliding.any() and (~sliding).any()
    cfg = IdentifyConfig(method=method, steps=3, prompts=2, n_sink=2, window=4, lr=0.5, init_logit=2.0, seed=0)
    pattern = identify_module.identify(model, None, cfg, model_name="tiny-gemma3", progress=False)
    assert torch.equal(pattern.gates[sliding], torch.ones_like(pattern.gates[sliding]))
    assert (pattern.gates[~sliding] < 1).any()
    assert pattern.metadata["identified_layers"] == ",".join(str(i) for i, t in enumerate(types) if t != "sliding_attention")
    assert torch.equal(pattern.identified_layers, ~sliding)
    # ranked among the identified layers, half of them stream (never a sliding layer)
    streaming = pattern.streaming(sparsity=1.0, eligible=pattern.identified_layers)
    assert torch.equal(streaming.any(-1), ~sliding)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("how", ["generate", "new_cache"])
def test_compression_ratio_sizes_at_the_first_forward_without_size_for(arch, how):
    """`DuoAttention(compression_ratio=r)` straight under kvpress.patch (no size_for, as NVIDIA kvpress users write
    it): the first forward sizes it before any layer stores, each layer's heads are split in two dense parts, and
    the result equals the policy sized up front with size_for."""
    model = tiny_model(arch)
    n_layers, kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    gates = torch.rand(n_layers, kv, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(4))
    results = []
    for sized in (False, True):
        policy = DuoAttention(gates, compression_ratio=0.5, n_sink=SINK, window=WINDOW)
        if sized:
            policy.size_for(ids.shape[1])
        with torch.no_grad(), kvpress.patch(model, policy) as session:
            if how == "generate":
                out = model.generate(ids, max_new_tokens=4, do_sample=False)
                results.append((out.tolist(), policy.streaming_heads.clone()))
                continue
            cache = session.new_cache()
            logits = model(ids, **cache_kwargs(model, cache), use_cache=True).logits
            kinds = {type(layer.storage).__name__ for layer, t in zip(cache.layers, cache.layer_types())
                     if t == "full_attention"}
            assert kinds <= {"HeadSplitStorage", "DenseStorage", "SinkWindowStorage"}  # a layer of one head group: its part
            assert not any(layer.storage_pending for layer in cache.layers)
            results.append((logits, policy.streaming_heads.clone(), cache.nbytes()))
    assert policy.streaming_heads.any()
    if how == "generate":
        assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    else:
        torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
        assert torch.equal(results[0][1], results[1][1]) and results[0][2] == results[1][2]


class _DuoPolicyEveryStep(DuoAttention):
    """DuoAttention as it ran before its streaming heads' storage kept the rule: the policy at every decode step."""

    def acts_at(self, phase: str) -> bool:
        return True


@pytest.mark.parametrize("quantized", [False, True])
def test_decode_without_the_policy_equals_the_policy_at_every_step(quantized):
    """Streaming heads trimmed by their storage (no policy call per decode step) attend to, and hold, exactly what
    the policy called at every step gives: same logits, same tokens and bytes held after every step."""
    assert not DuoAttention(_pattern(tiny_model("llama"))).acts_at("decode")
    model = tiny_model("llama")
    ids, mask = left_padded_batch([30, 21], seed=8)

    def run(cls):
        policy = cls(_pattern(model), n_sink=SINK, window=WINDOW)
        if quantized:
            policy = policy | KVQuant(bits=4, n_sink=2, residual=8, group_size=8)
        held = []
        with torch.no_grad(), kvpress.patch(model, policy) as session:
            cache = session.new_cache()
            step_mask = mask
            out = model(ids, attention_mask=step_mask, **cache_kwargs(model, cache), use_cache=True)
            logits = [out.logits[:, -1]]
            for _ in range(10):
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=step_mask.dtype)], dim=1)
                out = model(out.logits[:, -1:].argmax(-1), attention_mask=step_mask, **cache_kwargs(model, cache),
                            use_cache=True)
                logits.append(out.logits[:, -1])
                held.append(([layer.storage.lengths().tolist() for layer in cache.layers], cache.nbytes()))
        return torch.stack(logits), held

    logits, held = run(DuoAttention)
    logits_every, held_every = run(_DuoPolicyEveryStep)
    torch.testing.assert_close(logits, logits_every, rtol=0, atol=0)
    assert held == held_every
