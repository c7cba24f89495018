"""Property-based tests (Hypothesis) of the invariants kvpress rests on, over random shapes, GQA ratios, paddings,
dtypes and policies (unit tier: tiny tensors and the tiny random models, bounded examples, no deadline).

* bytes held equal the theory, for every storage kind: dense, ragged, quantized, head-split;
* a keep mask never keeps padding and keeps exactly its budget;
* quantize -> dequantize error within the documented bound (``|x - x_hat| <= scale / 2`` per group) per bit width;
* pack / unpack and safetensors round trips are exact;
* cloning a cache and evicting from (or appending to) the clone leaves the original bit-identical.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

import kvpress
from kvpress.duo.pattern import DuoPattern, load_pattern
from kvpress.policies import H2O, TOVA, KeyNorm, SnapKV, StreamingLLM
from kvpress.quant import KVQuant
from kvpress.quant.packing import ALLOWED_BITS, pack, packed_words, unpack
from kvpress.quant.quantizer import _group_view, _reduce_dim, _ungroup, quantize
from kvpress.scorer.predictor import ScorePredictor, load_predictor
from kvpress.storage.dense import DenseStorage
from kvpress.storage.head_split import HeadSplitStorage
from kvpress.storage.ragged import RaggedStorage
from tiny_models import left_padded_batch, tiny_model

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _randn(shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -------------------------------------------------------------------------------------------- bytes held
@st.composite
def kv_shapes(draw):
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    seq = draw(st.integers(1, 40))
    dim = draw(st.sampled_from([4, 8, 16, 32]))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    return batch, heads, seq, dim, DTYPES[dtype]


@SETTINGS
@given(shape=kv_shapes(), seed=st.integers(0, 2**16), start=st.sampled_from([0, 0, 5]), data=st.data())
def test_dense_and_ragged_bytes_equal_theory(shape, seed, start, data):
    b, h, n, d, dtype = shape
    k, v = _randn((b, h, n, d), seed, dtype), _randn((b, h, n, d), seed + 1, dtype)
    dense = DenseStorage()
    dense.append(k, v, start)
    elem = k.element_size()
    positions = b * h * n * 4 if start else 0  # int32 positions only once they are not 0..n-1
    assert dense.nbytes() == 2 * b * h * n * d * elem + positions == dense.storage_nbytes()

    # any keep mask: equal counts stay dense (positions now held), unequal counts become ragged (no padding held)
    keep = torch.rand(b, h, n, generator=torch.Generator().manual_seed(seed + 2)) < data.draw(st.floats(0.1, 0.9))
    keep[..., -1] = True  # every head keeps at least its newest token
    if data.draw(st.booleans()):
        keep[:] = keep[0, 0].clone()  # the same tokens everywhere: dense
    kept = dense.select(keep)
    counts = keep.sum(-1)
    total = int(counts.sum())
    if bool(keep.all()):
        assert kept is dense
    elif bool((counts == counts.flatten()[0]).all()):
        assert isinstance(kept, DenseStorage)
        assert kept.nbytes() == 2 * total * d * elem + total * 4
    else:
        assert isinstance(kept, RaggedStorage)
        assert kept.nbytes() == 2 * total * d * elem + total * 4 + b * h * 8
    assert torch.equal(kept.lengths(), counts)
    # what is held is exactly the kept tokens, in order, at their positions
    view = kept.view()
    valid = view.valid if view.valid is not None else torch.ones(view.shape[:3], dtype=torch.bool)
    held_pos = view.positions if view.positions is not None else torch.arange(view.shape[2]).expand(view.shape[:3])
    for row in range(b):
        for head in range(h):
            want = keep[row, head].nonzero().flatten()
            got = held_pos[row, head][valid[row, head]]
            assert torch.equal(got.long(), want + start)
            assert torch.equal(view.keys[row, head][valid[row, head]], k[row, head, want])


def _quant_theory(n: int, d: int, spec: KVQuant, elem: int) -> tuple[dict[str, int], int]:
    """(segments, bytes per head) of a quantized head holding ``n`` appended tokens (no eviction, rank 0)."""
    sink = min(spec.n_sink, n)
    rest = n - sink
    body = max(0, (rest - spec.residual) // spec.group_size * spec.group_size)
    kb, vb = spec.key_bits or spec.bits, spec.value_bits or spec.bits
    vg = spec.value_group_size or min(spec.group_size, d)
    scale = torch.tensor([], dtype=spec.scale_dtype).element_size()
    per_head = (body * packed_words(d, kb) * 4 + (body // spec.group_size) * d * 2 * scale  # keys: codes, scale+zero
                + body * packed_words(d, vb) * 4 + body * (d // vg) * 2 * scale  # values
                + (sink + rest - body) * d * 2 * elem)  # sinks and residual, K and V, full precision
    return {"sink": sink, "body": body, "residual": rest - body}, per_head


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 120), d=st.sampled_from([16, 32]),
       bits=st.sampled_from(ALLOWED_BITS), value_bits=st.sampled_from([None, *ALLOWED_BITS]),
       group=st.sampled_from([8, 16]), residual=st.integers(0, 40), n_sink=st.integers(0, 6),
       scale_dtype=st.sampled_from(["float16", "float32"]), seed=st.integers(0, 2**16))
def test_quantized_bytes_equal_theory(b, h, n, d, bits, value_bits, group, residual, n_sink, scale_dtype, seed):
    spec = KVQuant(bits=bits, value_bits=value_bits, group_size=group, residual=residual, n_sink=n_sink,
                   rotate=False, scale_dtype=DTYPES[scale_dtype])
    storage = spec.create_storage(0)
    k, v = _randn((b, h, n, d), seed), _randn((b, h, n, d), seed + 1)
    cut = n // 2
    storage.append(k[..., :cut, :], v[..., :cut, :], 0)  # two appends: a prefill and an extend
    if n - cut:
        storage.append(k[..., cut:, :], v[..., cut:, :], cut)
    storage.view()
    segments, per_head = _quant_theory(n, d, spec, 4)
    assert storage.segment_lengths() == segments
    assert storage.nbytes() == b * h * per_head == _bytes(storage.tensors())
    assert storage.storage_nbytes() == storage.nbytes()  # no view pins a larger allocation


@SETTINGS
@given(b=st.integers(1, 2), heads=st.integers(2, 6), n=st.integers(1, 60), d=st.sampled_from([8, 16]),
       quantized=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_head_split_bytes_are_the_sum_of_its_groups(b, heads, n, d, quantized, seed, data):
    perm = torch.randperm(heads, generator=torch.Generator().manual_seed(seed))
    cut = data.draw(st.integers(1, heads - 1))
    groups = [perm[:cut].sort().values, perm[cut:].sort().values]
    spec = KVQuant(bits=data.draw(st.sampled_from(ALLOWED_BITS)), group_size=8, residual=8, n_sink=2, rotate=False)
    factory = (lambda: spec.create_storage(0)) if quantized else DenseStorage
    split = HeadSplitStorage(groups, [factory() for _ in groups])
    k, v = _randn((b, heads, n, d), seed), _randn((b, heads, n, d), seed + 1)
    split.append(k, v, 0)
    view = split.view()
    if quantized:
        per_group = [b * g.numel() * _quant_theory(n, d, spec, 4)[1] for g in groups]
    else:
        per_group = [2 * b * g.numel() * n * d * 4 for g in groups]
    assert split.nbytes() == sum(per_group) == sum(p.nbytes() for p in split.parts)
    assert torch.equal(split.lengths(), torch.full((b, heads), n))
    if not quantized:  # the merged view puts every head back in its place
        assert torch.equal(view.keys, k) and torch.equal(view.values, v)


# --------------------------------------------------------------------------------------------- keep masks
_MODEL = {}


def _model(arch: str = "llama"):
    if arch not in _MODEL:
        _MODEL[arch] = tiny_model(arch)
    return _MODEL[arch]


POLICIES = {
    "snapkv": lambda budget: SnapKV(budget=budget, window=2),
    "knorm": lambda budget: KeyNorm(budget=budget),
    "tova": lambda budget: TOVA(budget=budget),
    "h2o": lambda budget: H2O(budget=budget, window=1),
}


def _held(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [batch, heads, slots], valid) of what a compressed layer holds."""
    view = layer.storage.view()
    b, h, s = view.shape[:3]
    positions = view.positions if view.positions is not None else torch.arange(s).expand(b, h, s)
    valid = view.valid if view.valid is not None else torch.ones(b, h, s, dtype=torch.bool)
    return positions, valid


@SETTINGS
@given(lengths=st.lists(st.integers(3, 24), min_size=1, max_size=3), policy=st.sampled_from(sorted(POLICIES)),
       budget=st.integers(2, 16), arch=st.sampled_from(["llama", "qwen3"]), seed=st.integers(0, 1000))
def test_keep_masks_never_keep_padding_and_keep_exactly_the_budget(lengths, policy, budget, arch, seed):
    model = _model(arch)
    ids, mask = left_padded_batch(lengths, seed=seed)
    width = ids.shape[1]
    with torch.no_grad(), kvpress.patch(model, POLICIES[policy](budget)) as session:
        cache = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **kvpress.cache_kwargs(model, cache))
    for idx in cache.compressed_layers:
        layer = cache.layers[idx]
        positions, valid = _held(layer)
        lengths_held = layer.storage.lengths()
        if max(lengths) <= budget and bool((lengths_held == width).all()):
            continue  # nothing to evict in any row: no mask, the layer holds the input as given (as transformers)
        for row, n in enumerate(lengths):
            first_real = width - n
            held = positions[row][valid[row]]
            assert bool((held >= first_real).all()), f"row {row} keeps padding: {held.tolist()} < {first_real}"
            assert bool((lengths_held[row] == min(budget, n)).all()), (row, lengths_held[row].tolist(), budget, n)
            for head in range(positions.shape[1]):  # each head: distinct positions, in increasing order
                p = positions[row, head][valid[row, head]]
                assert bool((p[1:] > p[:-1]).all())


@SETTINGS
@given(lengths=st.lists(st.integers(3, 20), min_size=1, max_size=3), window=st.integers(1, 8), n_sink=st.integers(0, 3),
       steps=st.integers(0, 6), seed=st.integers(0, 1000))
def test_streaming_llm_holds_sinks_and_window_of_real_tokens(lengths, window, n_sink, steps, seed):
    model = _model()
    ids, mask = left_padded_batch(lengths, seed=seed)
    width = ids.shape[1]
    with torch.no_grad(), kvpress.patch(model, StreamingLLM(n_sink=n_sink, window=window)) as session:
        cache = session.new_cache()
        out = model(input_ids=ids, attention_mask=mask, **kvpress.cache_kwargs(model, cache))
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=mask.dtype)], dim=1)
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, attention_mask=mask, **kvpress.cache_kwargs(model, cache))
    total = width + steps
    for idx in cache.compressed_layers:
        positions, valid = _held(cache.layers[idx])
        for row, n in enumerate(lengths):
            first_real = width - n
            real = list(range(first_real, total))
            want = sorted(set(real[:n_sink]) | set(real[-window:]))
            for head in range(positions.shape[1]):
                assert positions[row, head][valid[row, head]].tolist() == want


# ------------------------------------------------------------------------------------- quantization error
@SETTINGS
@given(bits=st.sampled_from(ALLOWED_BITS), axis=st.sampled_from(["channel", "token"]),
       tokens=st.integers(1, 70), group=st.sampled_from([4, 8, 16, 32]), dtype=st.sampled_from(sorted(DTYPES)),
       scale_dtype=st.sampled_from(["float16", "float32"]), magnitude=st.sampled_from([1e-3, 1.0, 30.0]),
       offset=st.sampled_from([0.0, 5.0]), seed=st.integers(0, 2**16))
def test_quantize_dequantize_error_within_half_a_step(bits, axis, tokens, group, dtype, scale_dtype, magnitude,
                                                      offset, seed):
    d = 32
    x = (_randn((2, tokens, d), seed, scale=magnitude) + offset).to(DTYPES[dtype])
    q = quantize(x, bits, group, axis, scale_dtype=DTYPES[scale_dtype])
    y = q.dequantize(torch.float64)
    assert y.shape == x.shape
    codes = q.unpacked_codes()
    assert int(codes.max()) <= 2**bits - 1
    # the documented bound, per element from its own group's stored scale: |x - x_hat| <= scale / 2
    grouped = _group_view(torch.zeros_like(x, dtype=torch.float64), group, axis)
    half_step = _ungroup((q.scale.double() / 2).unsqueeze(_reduce_dim(axis)).expand_as(grouped), tokens, axis)
    err = (x.double() - y).abs()
    slack = 1e-6 * (x.double().abs() + half_step) + 1e-12  # float32 arithmetic of the reconstruction
    assert bool((err <= half_step + slack).all()), float((err - half_step).max())
    # and the step itself is what min/max over the group allows (up to the rounding of the stored scale)
    levels = 2**bits - 1
    spread = _group_view(x.double(), group, axis)
    rng = spread.amax(_reduce_dim(axis)) - spread.amin(_reduce_dim(axis))
    lowest = spread.amin(_reduce_dim(axis)).abs()
    eps, tiny = torch.finfo(DTYPES[scale_dtype]).eps, torch.finfo(DTYPES[scale_dtype]).tiny
    # the stored zero is min(g) rounded down (at most 2 eps |min| below it), the scale then rounded up
    assert bool((q.scale.double() <= (rng + 2 * eps * lowest) / levels * (1 + 2 * eps) + tiny).all())


# ------------------------------------------------------------------------------------------ round trips
@SETTINGS
@given(bits=st.sampled_from(ALLOWED_BITS), shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
       length=st.integers(0, 100), seed=st.integers(0, 2**16))
def test_pack_unpack_and_safetensors_round_trips_are_exact(bits, shape, length, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*shape, length), generator=gen, dtype=torch.uint8)
    words = pack(codes, bits)
    assert words.dtype == torch.int32 and words.shape[-1] == packed_words(length, bits)
    assert torch.equal(unpack(words, bits, length), codes)
    loaded = load(save({"words": words.contiguous()}))["words"]  # safetensors bytes in memory
    assert loaded.dtype == torch.int32 and torch.equal(loaded, words)
    assert torch.equal(unpack(loaded, bits, length), codes)


@SETTINGS
@given(bits=st.sampled_from(ALLOWED_BITS), axis=st.sampled_from(["channel", "token"]), tokens=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_quantized_tensor_survives_safetensors_bit_for_bit(bits, axis, tokens, seed):
    q = quantize(_randn((2, 3, tokens, 16), seed), bits, 8, axis)
    loaded = load(save({"codes": q.codes.contiguous(), "scale": q.scale.contiguous(), "zero": q.zero.contiguous()}))
    again = type(q)(loaded["codes"], loaded["scale"], loaded["zero"], q.bits, q.group_size, q.axis, q.shape, q.dtype)
    assert torch.equal(again.dequantize(), q.dequantize())


@SETTINGS
@given(layers=st.integers(1, 3), hidden=st.sampled_from([8, 16]), heads=st.integers(1, 3),
       kind=st.sampled_from(["linear", "mlp"]), seed=st.integers(0, 2**16))
def test_predictor_and_pattern_files_round_trip_exactly(tmp_path_factory, layers, hidden, heads, kind, seed):
    root = tmp_path_factory.mktemp("files")
    predictor = ScorePredictor(layers, hidden, heads, kind=kind, width=4, metadata={"model": "m", "seed": seed})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in predictor.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    back = load_predictor(predictor.save(root / "p.safetensors"))
    assert back.kind == kind and back.metadata["seed"] == str(seed)
    for (name, a), (_, b) in zip(predictor.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), name
    gates = torch.rand(layers, heads, generator=gen)
    pattern = load_pattern(DuoPattern(gates, {"model": "m"}).save(root / "g.safetensors"))
    assert torch.equal(pattern.gates, gates) and pattern.metadata["model"] == "m"


# ------------------------------------------------------------------------------------------------ clones
def _snapshot(cache) -> list[torch.Tensor]:
    return [t.detach().clone() for idx in cache.compressed_layers for t in cache.layers[idx].storage.tensors()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


CLONE_POLICIES = {
    "full": lambda: None,
    "snapkv": lambda: SnapKV(compression_ratio=0.5, window=2),
    "kvquant": lambda: KVQuant(bits=2, group_size=8, residual=4, n_sink=2),
    "snapkv|kvquant": lambda: SnapKV(compression_ratio=0.25, window=2) | KVQuant(bits=4, group_size=8, residual=4),
}


@SETTINGS
@given(lengths=st.lists(st.integers(4, 30), min_size=1, max_size=2), policy=st.sampled_from(sorted(CLONE_POLICIES)),
       seed=st.integers(0, 1000), data=st.data())
def test_evicting_from_a_clone_leaves_the_original_bit_identical(lengths, policy, seed, data):
    model = _model()
    ids, mask = left_padded_batch(lengths, seed=seed)
    grad = data.draw(st.booleans())  # a cache filled with gradients on holds graph tensors: clone copies them too
    with torch.set_grad_enabled(grad), kvpress.patch(model, CLONE_POLICIES[policy]()) as session:
        cache = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **kvpress.cache_kwargs(model, cache))
        before = _snapshot(cache)
        nbytes = cache.nbytes()
        clone = cache.clone()
        assert _same(_snapshot(clone), before)
        held = [t for idx in clone.compressed_layers for t in clone.layers[idx].storage.tensors()]
        assert not any(t.requires_grad for t in held)  # detached copies, whatever the original holds
        for idx in clone.compressed_layers:  # evict a random subset from the clone
            layer = clone.layers[idx]
            slots = layer.storage.view().shape
            keep = torch.rand(slots[:3], generator=torch.Generator().manual_seed(seed + idx)) < 0.5
            keep[..., -1] = True
            layer.keep(keep)
        if data.draw(st.booleans()):  # and decode one more token on it
            model(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                  **kvpress.cache_kwargs(model, clone))
    assert _same(_snapshot(cache), before)
    assert cache.nbytes() == nbytes
