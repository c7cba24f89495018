"""Saved compressed caches (kvpress.persist): exact round trips of every storage kind, continuation from a loaded
cache token for token, and clear errors for files that must not load."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import left_padded_batch, tiny_model

import kvpress
from kvpress.compat import cache_kwargs
from kvpress.duo import DuoPattern
from kvpress.persist import CacheFileError, cache_info, storage_from_bytes, storage_to_bytes
from kvpress.policies import H2O, AdaKV, DuoAttention, Learned, SnapKV, StreamingLLM
from kvpress.quant import KVQuant
from kvpress.scorer import ScorePredictor
from kvpress.scorer.predictor import model_signature
from kvpress.storage import DenseStorage

QUANT = dict(group_size=8, residual=8, n_sink=2)


def _predictor(model, seed=0):
    text = model.config.get_text_config(decoder=True)
    p = ScorePredictor(text.num_hidden_layers, text.hidden_size, text.num_key_value_heads, kind="linear", width=8,
                       metadata={"model": "tiny", "model_signature": model_signature(model.config)})  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in p.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return p


def _duo(model):
    gates = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    return DuoAttention(DuoPattern(gates, {"model": "tiny", "model_signature": model_signature(model.config)}),
                        n_sink=2, window=4)  # fmt: skip


# name -> (policy builder taking the model, storage kind expected in the compressed layers)
POLICIES = {
    "dense": (lambda m: None, "DenseStorage"),
    "dense-evicted": (lambda m: SnapKV(compression_ratio=0.5), "DenseStorage"),
    "ragged": (lambda m: AdaKV(SnapKV(), compression_ratio=0.5), "RaggedStorage"),
    "h2o-mass": (lambda m: H2O(compression_ratio=0.5), "DenseStorage"),
    "streaming-reposition": (lambda m: StreamingLLM(n_sink=2, window=16), "DenseStorage"),
    "quant-2bit-rotated": (lambda m: KVQuant(bits=2, **QUANT), "QuantizedStorage"),
    "quant-calibrated-rotation": (lambda m: KVQuant(bits=2, outlier_reorder=True, rotation_block=8, **QUANT),
                                  "QuantizedStorage"),
    "quant-gear-evicted": (lambda m: SnapKV(compression_ratio=0.5) | KVQuant(
        bits=4, rank=2, outlier_fraction=0.05, lowrank_block=16, **QUANT), "QuantizedStorage"),
    "learned-threshold": (lambda m: Learned(predictor=_predictor(m), threshold=0.0, window=4, n_sink=1),
                          None),
    "learned-quant": (lambda m: Learned(predictor=_predictor(m), compression_ratio=0.5) | KVQuant(bits=4, **QUANT),
                      "QuantizedStorage"),
    "head-split": (lambda m: _duo(m) | KVQuant(bits=4, **QUANT), "HeadSplitStorage"),
}


def _prefill(model, policy, ids, mask=None):
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        model(ids, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
    return cache


@torch.no_grad()
def _continue(model, policy, cache, question, steps=6, mask=None):
    """Greedy tokens after ``question`` and every step's logits."""
    tokens, logits = [], []
    with kvpress.patch(model, policy):
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(question)], dim=1)
        out = model(question, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
    return torch.cat(tokens, 1), torch.stack(logits)


def _ids(n, seed, batch=1):
    return torch.randint(3, 100, (batch, n), generator=torch.Generator().manual_seed(seed))


def _check_same_continuation(model, policy, cache, path, question, mask=None):
    cache.save(path)
    loaded = kvpress.load_cache(path, model)
    assert loaded.nbytes() == cache.nbytes()
    expected_tokens, expected_logits = _continue(model, policy, cache, question, mask=mask)
    tokens, logits = _continue(model, policy, loaded, question, mask=mask)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(logits, expected_logits)  # bit for bit, not just the argmax
    return loaded


@pytest.mark.parametrize("name", list(POLICIES))
def test_continuation_from_a_loaded_cache_is_exact_for_every_storage_kind(name, tmp_path):
    model = tiny_model("llama")
    build, kind = POLICIES[name]
    policy = build(model)
    cache = _prefill(model, policy, _ids(60, 1))
    if kind is not None:
        assert {type(cache.layers[i].storage).__name__ for i in cache.compressed_layers} == {kind}
    loaded = _check_same_continuation(model, policy, cache, tmp_path / "c.kvc", _ids(5, 2))
    assert [r.tokens_max for r in loaded.report()] == [r.tokens_max for r in cache.report()]


@pytest.mark.parametrize("arch", ["qwen3", "gemma", "gemma3", "mistral"])
@pytest.mark.parametrize("name", ["dense-evicted", "ragged", "quant-gear-evicted"])
def test_continuation_is_exact_on_other_architectures_incl_sliding_layers(arch, name, tmp_path):
    model = tiny_model(arch)
    policy = POLICIES[name][0](model)
    cache = _prefill(model, policy, _ids(60, 3))
    loaded = _check_same_continuation(model, policy, cache, tmp_path / "c.kvc", _ids(4, 4))
    kinds = [type(layer).__name__ for layer in loaded.layers]
    assert kinds == [type(layer).__name__ for layer in cache.layers]
    if arch == "gemma3":
        assert "SlidingLayer" in kinds  # kvpress ring storage, saved and restored like every layer


@pytest.mark.parametrize("name", ["ragged", "quant-gear-evicted", "h2o-mass"])
def test_left_padded_batch_round_trip(name, tmp_path):
    model = tiny_model("llama")
    policy = POLICIES[name][0](model)
    ids, mask = left_padded_batch([50, 37, 44], seed=5)
    cache = _prefill(model, policy, ids, mask)
    _check_same_continuation(model, policy, cache, tmp_path / "c.kvc", _ids(3, 6, batch=3), mask=mask)


def test_policy_memory_and_metadata_are_saved(tmp_path):
    model = tiny_model("llama")
    policy = H2O(compression_ratio=0.5)
    cache = _prefill(model, policy, _ids(40, 7))
    path = tmp_path / "h2o.kvc"
    n = cache.save(path, policy="h2o(compression_ratio=0.5)", prompt_tokens=40, extra={"note": "x"})
    loaded = kvpress.load_cache(path, model)
    for i in cache.compressed_layers:
        before, after = cache.layers[i].policy_state, loaded.layers[i].policy_state
        assert before.keys() == after.keys() and before  # H2O's accumulated attention mass
        assert _same(before, after)
        assert loaded.layers[i].seen_tokens == cache.layers[i].seen_tokens == 40
    assert loaded.policy_expression == "h2o(compression_ratio=0.5)" and loaded.prompt_tokens == 40
    assert loaded.extra == {"note": "x"}
    info = cache_info(path)
    assert info["file_bytes"] == n == path.stat().st_size
    assert info["policy"] == "h2o(compression_ratio=0.5)" and info["tokens_seen"] == 40
    assert info["layer_kinds"] == ["DenseStorage", "DenseStorage"]
    assert sum(info["layer_bytes"]) >= cache.nbytes() - 1  # every held tensor is in the file


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------------------------ property test
def _views_equal(a, b):
    va, vb = a.view(), b.view()
    assert va.shape == vb.shape
    for name in ("keys", "values", "positions", "valid", "key_rotation", "value_rotation"):
        x, y = getattr(va, name), getattr(vb, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert torch.equal(a.lengths(), b.lengths())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    kv_heads=st.sampled_from([1, 2, 4]),
    groups=st.sampled_from([1, 2, 3]),
    seq=st.integers(1, 40),
    keep_p=st.floats(0.2, 1.0),
    kind=st.sampled_from(["dense", "quant2", "quant4-gear"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_storage_round_trip_property(batch, kv_heads, groups, seq, keep_p, kind, dtype, seed):
    """Random shapes, GQA ratios, per-head keep masks (ragged and padded storage): a storage read back from its
    bytes has the same view, lengths and decode output, and continues identically after one more append."""
    gen = torch.Generator().manual_seed(seed)
    dim = 16

    def kv(n):
        return (torch.randn(batch, kv_heads, n, dim, generator=gen).to(dtype),
                torch.randn(batch, kv_heads, n, dim, generator=gen).to(dtype))  # fmt: skip

    if kind == "dense":
        storage = DenseStorage()
    else:
        spec = KVQuant(bits=2 if kind == "quant2" else 4, rank=2 if "gear" in kind else 0,
                       lowrank_block=16, **QUANT)  # fmt: skip
        storage = spec.create_storage(0)
    storage.append(*kv(seq), 0)
    storage.view()
    keep = torch.rand(batch, kv_heads, seq, generator=gen) < keep_p
    keep[..., -1] = True  # every head keeps at least one token
    storage = storage.select(keep)
    loaded = storage_from_bytes(storage_to_bytes(storage))
    assert type(loaded) is type(storage)
    _views_equal(storage, loaded)
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=gen).to(dtype)
    assert torch.equal(storage.view().decode(query, None, 0.25) if hasattr(storage.view(), "decode") else query,
                       loaded.view().decode(query, None, 0.25) if hasattr(loaded.view(), "decode") else query)
    new = kv(3)
    storage.append(*new, seq)
    loaded.append(*new, seq)
    _views_equal(storage, loaded)


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("llama")
    path = tmp_path_factory.mktemp("persist") / "c.kvc"
    _prefill(model, SnapKV(compression_ratio=0.5), _ids(30, 8)).save(path)
    return model, path


def test_another_model_is_refused(saved):
    model, path = saved
    with pytest.raises(CacheFileError, match="another model.*weights differ"):
        kvpress.load_cache(path, tiny_model("llama", seed=1))  # same architecture, other weights
    with pytest.raises(CacheFileError, match="another model.*num_hidden_layers 2 .this model: 3"):
        kvpress.load_cache(path, tiny_model("llama", num_hidden_layers=3))
    with pytest.raises(CacheFileError, match="another model.*model_type 'llama'"):
        kvpress.load_cache(path, tiny_model("qwen2"))
    with pytest.raises(CacheFileError, match="another model.*dtype 'float32'"):
        kvpress.load_cache(path, tiny_model("llama").to(torch.bfloat16))


def test_truncated_file_is_refused(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in (len(data) - 10, 100, 4):
        bad = tmp_path / f"cut{cut}.kvc"
        bad.write_bytes(data[:cut])
        with pytest.raises(CacheFileError, match="truncated"):
            kvpress.load_cache(bad, saved[0])


def test_corrupted_file_is_refused(saved, tmp_path):
    model, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one byte of tensor data
    bad = tmp_path / "flip.kvc"
    bad.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="corrupted.*checksum"):
        kvpress.load_cache(bad, model)
    data = bytearray(path.read_bytes())
    data[9] = 0xFF  # inside the JSON header
    bad.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="corrupted header"):
        kvpress.load_cache(bad, model)


def _rewrite_metadata(path, out, change):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["kvpress"])
    change(meta)
    header["__metadata__"]["kvpress"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_future_format_version_and_foreign_files_are_refused(saved, tmp_path):
    model, path = saved
    future = tmp_path / "future.kvc"
    _rewrite_metadata(path, future, lambda m: m.update(format_version=99))
    with pytest.raises(CacheFileError, match="format version 99.*reads version 1 only"):
        kvpress.load_cache(future, model)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CacheFileError, match="without kvpress metadata"):
        kvpress.load_cache(plain, model)


def test_directory_and_missing_paths_are_refused(saved, tmp_path):
    model, _ = saved
    with pytest.raises(IsADirectoryError, match="is a directory"):
        kvpress.load_cache(tmp_path, model)
    with pytest.raises(FileNotFoundError, match="no such saved cache"):
        kvpress.load_cache(tmp_path / "nope.kvc", model)
    cache = _prefill(model, None, _ids(5, 9))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        cache.save(tmp_path)


def test_unsavable_policy_memory_names_the_entry(tmp_path):
    model = tiny_model("llama")
    cache = _prefill(model, None, _ids(5, 9))
    cache.model_state["odd"] = object()
    with pytest.raises(TypeError, match="model_state.odd"):
        cache.save(tmp_path / "x.kvc")
    assert not (tmp_path / "x.kvc").exists()


def test_generate_continues_from_a_loaded_cache(tmp_path):
    """``model.generate(context + question, cache=loaded)`` feeds only the question, as for the in-memory cache."""
    model = tiny_model("llama")
    policy = SnapKV(compression_ratio=0.5)
    context, question = _ids(50, 10), _ids(6, 11)
    cache = _prefill(model, policy, context)
    cache.save(tmp_path / "g.kvc")
    loaded = kvpress.load_cache(tmp_path / "g.kvc", model)
    full = torch.cat([context, question], 1)
    with kvpress.patch(model, policy):
        expected = model.generate(full, **cache_kwargs(model, cache), max_new_tokens=8, do_sample=False)
        got = model.generate(full, **cache_kwargs(model, loaded), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
