"""The learned scorer: predictor files, training on tiny models, ratio and threshold modes, bad input."""

import math

import pytest
import torch
from eval_fixtures import byte_tokenizer
from tiny_models import left_padded_batch, tiny_model

import kvpress
from kvpress.compat import cache_kwargs, output_cache
from kvpress.context import LayerContext
from kvpress.policies import Learned, StreamingLLM, get_policy
from kvpress.quant import KVQuant
from kvpress.scorer import ScorePredictor, load_predictor, model_signature
from kvpress.scorer.train import TrainConfig, train, training_prompts


def _tiny(arch):
    return tiny_model(arch, vocab_size=len(byte_tokenizer()), max_position_embeddings=4096)


def _random_predictor(model, kind="linear", seed=0):
    text = model.config.get_text_config(decoder=True)
    p = ScorePredictor(text.num_hidden_layers, text.hidden_size, text.num_key_value_heads, kind=kind, width=8,
                       metadata={"model": "tiny", "model_signature": model_signature(model.config)})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in p.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return p.eval().requires_grad_(False)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_predictor_round_trip_is_exact(tmp_path, kind):
    model = _tiny("llama")
    p = _random_predictor(model, kind)
    path = p.save(tmp_path / "p.safetensors")
    q = load_predictor(path)
    assert q.kind == kind and q.metadata["model_signature"] == model_signature(model.config)
    for (name, a), (_, b) in zip(p.named_parameters(), q.named_parameters()):
        assert torch.equal(a, b), name
    hidden = torch.randn(2, 7, 64)
    assert torch.equal(p(1, hidden), q(1, hidden)) and p(1, hidden).shape == (2, 2, 7)


def test_training_prompts_mix_tasks_and_prose_deterministically():
    tok = byte_tokenizer()
    prompts = training_prompts(tok, 8, 1100, seed=0)
    assert prompts == training_prompts(tok, 8, 1100, seed=0) and prompts != training_prompts(tok, 8, 1100, seed=1)
    assert all(600 < len(p) <= 1100 for p in prompts)
    prose = tok.decode(prompts[3])
    assert "Repeat" not in prose and "magic number" not in prose and len(prose.split()) > 50


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_training_a_few_steps_runs_and_is_deterministic(arch):
    model, tok = _tiny(arch), byte_tokenizer()
    cfg = TrainConfig(kind="mlp", sequences=3, held_out=1, length=1100, steps=5, batch=64, tokens_per_sequence=64,
                      width=8)
    a = train(model, tok, cfg, model_name="tiny", progress=False, log=lambda _: None)
    b = train(model, tok, cfg, model_name="tiny", progress=False, log=lambda _: None)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name
    assert any(float(x.abs().sum()) > 0 for x in a.parameters())
    metrics = __import__("json").loads(a.metadata["metrics"])
    assert -1 <= metrics["spearman_mean"] <= 1 and 0 <= metrics["kept_overlap_at_0.5"] <= 1
    assert a.metadata["teacher"] == "kvzip" and "seeds 10000+" in a.metadata["data"]
    linear = train(model, tok, TrainConfig(kind="linear", sequences=3, held_out=1, length=1100), progress=False,
                   log=lambda _: None)
    assert linear.kind == "linear"


def test_teacher_cache_gives_the_same_predictor_without_running_the_teacher_again(tmp_path, monkeypatch):
    from kvpress.policies.kvzip import KVzip

    model, tok = _tiny("llama"), byte_tokenizer()
    cfg = TrainConfig(kind="linear", sequences=2, held_out=1, length=1100)
    a = train(model, tok, cfg, progress=False, log=lambda _: None, teacher_cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3

    def no_teacher(self, fwd):
        raise AssertionError("the teacher ran although its scores were cached")

    monkeypatch.setattr(KVzip, "prefill_scores", no_teacher)
    b = train(model, tok, cfg, progress=False, log=lambda _: None, teacher_cache=tmp_path)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


def _ctx(hidden, positions, valid, seq_len, state=None):
    b, h, s = positions.shape
    keys = torch.zeros(b, h, s, 4)

    def rows(a, z):
        return valid.unsqueeze(2).expand(b, h, z - a, s)

    return LayerContext(0, 2, "decode" if hidden.shape[1] == 1 else "prefill", torch.zeros(b, h, hidden.shape[1], 4),
                        keys, keys, positions, lambda n: rows(0, n), 0.5, seq_len, {} if state is None else state,
                        allowed_rows_fn=rows, hidden_states=hidden)


def test_threshold_keeps_exactly_the_entries_above_it_plus_window_and_sinks():
    model = _tiny("llama")
    predictor = _random_predictor(model)
    torch.manual_seed(3)
    b, h, s = 2, 2, 30
    hidden = torch.randn(b, s, 64)
    valid = torch.ones(b, h, s, dtype=torch.bool)
    valid[1, :, :5] = False  # left padding of row 1
    positions = torch.arange(s).expand(b, h, s)
    scores = predictor(0, hidden)
    threshold = float(scores.median())
    policy = Learned(predictor=predictor, threshold=threshold, window=3, n_sink=2)
    keep = policy.select(_ctx(hidden, positions, valid, s))
    rank = valid.long().cumsum(-1)
    expected = valid & ((scores > threshold) | (rank <= 2) | (rank > valid.sum(-1, keepdim=True) - 3))
    assert torch.equal(keep, expected)
    assert not keep[1, :, :5].any()


def test_threshold_mode_prunes_while_decoding_and_reports_the_ratio():
    model = _tiny("llama")
    predictor = _random_predictor(model, seed=1)
    ids = torch.randint(3, 200, (1, 40))
    policy = Learned(predictor=predictor, threshold=0.0, window=4, n_sink=1)
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        for _ in range(30):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
        achieved = Learned.achieved(cache)
    for layer in (0, 1):
        held = cache.layers[layer].storage.lengths()
        assert (held < 70).all() and (held >= 5).all()  # pruned by content, window and sink kept
        torch.testing.assert_close(achieved[layer], 1 - held.double() / 70)


def test_ratio_mode_scores_have_the_right_shape_under_gqa_and_padding_and_compose():
    model = _tiny("qwen3")
    predictor = _random_predictor(model)
    ids, mask = left_padded_batch([44, 30])
    for policy in (Learned(predictor=predictor, compression_ratio=0.5),
                   Learned(predictor=predictor, compression_ratio=0.5) | StreamingLLM(n_sink=2, window=16),
                   Learned(predictor=predictor, compression_ratio=0.5, scope="head") | KVQuant(bits=4, group_size=8)):
        with kvpress.patch(model, policy):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
        cache = output_cache(out)
        held = torch.stack([cache.layers[i].storage.lengths() for i in (0, 1)])
        assert held.sum(dim=(0, 2)).tolist()[1] <= 2 * 2 * 15 + 2 * 2 * 2  # half of row 1's 30 real (+ new)
        for i in (0, 1):
            view = cache.layers[i].storage.view()
            real = view.valid if view.valid is not None else torch.ones_like(view.positions, dtype=torch.bool)
            assert (view.positions[1][real[1]] >= 14).all()  # padding never kept


def test_shipped_predictor_is_found_for_the_model_or_a_clear_error():
    model = _tiny("llama")
    with pytest.raises(ValueError, match="no shipped mlp predictor matches this model"):
        with kvpress.patch(model, get_policy("learned", compression_ratio=0.5)):
            pass
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda p: Learned(predictor=p, threshold=float("nan")), "threshold must be a finite number"),
        (lambda p: Learned(predictor=p, threshold=math.inf), "threshold must be a finite number"),
        (lambda p: Learned(predictor=p, threshold=1.0, compression_ratio=0.5), "threshold cannot be combined"),
        (lambda p: Learned(predictor="/nonexistent/scorer.safetensors"), "does not exist"),
        (lambda p: Learned(predictor=p, window=-1), "window must be an integer >= 0"),
    ],
)
def test_bad_input(factory, match):
    predictor = _random_predictor(_tiny("llama"))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        factory(predictor)


def test_predictor_for_another_model_or_of_the_wrong_shape_is_refused(tmp_path):
    llama, qwen = _tiny("llama"), _tiny("qwen3")
    with pytest.raises(ValueError, match="trained for tiny .*signature"):
        with kvpress.patch(qwen, Learned(predictor=_random_predictor(llama), compression_ratio=0.5)):
            pass
    other = ScorePredictor(5, 64, 2, metadata={"model": "five-layers"})
    with pytest.raises(ValueError, match=r"trained for five-layers \(layers, hidden size, KV heads = \(5, 64, 2\)\)"):
        with kvpress.patch(llama, Learned(predictor=other, compression_ratio=0.5)):
            pass
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 64, 2)}, str(bad), metadata={"kind": "linear", "num_layers": "2",
                                                              "hidden_size": "64", "kv_heads": "2"})
    with pytest.raises(ValueError, match=r"kind='linear', which holds tensors \['b', 'w'\]; the file holds \['w'\]"):
        load_predictor(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a kvpress score predictor"):
        load_predictor(tmp_path / "junk.safetensors")
