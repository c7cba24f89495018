"""QuantizedStorage and KVQuant: segments, exactness, rotation, eviction without re-quantization, bytes."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

import kvpress
from kvpress.attention import attend
from kvpress.compat import cache_kwargs, output_cache
from kvpress.quant import KVQuant, QuantizedStorage, quantize
from kvpress.quant.packing import packed_words
from kvpress.storage import AttentionView, DenseStorage


def _kv(b=2, h=3, n=70, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, n, d, generator=g)
    k[..., 1] *= 6  # an outlier channel
    v = torch.randn(b, h, n, d, generator=g)
    return k.to(dtype), v.to(dtype)


def _fill(spec, k, v, prefill):
    st = spec.create_storage(0)
    st.append(k[:, :, :prefill], v[:, :, :prefill], 0)
    st.view()
    for t in range(prefill, k.shape[2]):
        st.append(k[:, :, t : t + 1], v[:, :, t : t + 1], t)
        st.view()
    return st


def _unrotated(view: AttentionView):
    keys, values = view.keys.float(), view.values.float()
    if view.key_rotation is not None:
        keys = keys @ view.key_rotation.T
        values = values @ view.value_rotation.T
    return keys, values


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_segments_and_body_match_reference_quantizer(rotate, bits):
    spec = KVQuant(bits=bits, group_size=8, residual=6, n_sink=3, rotate=rotate)
    k, v = _kv()
    st = _fill(spec, k, v, prefill=37)
    seg = st.segment_lengths()
    assert seg["sink"] == 3
    assert seg["body"] % 8 == 0 and 6 <= seg["residual"] < 6 + 8
    assert sum(seg.values()) == 70
    keys, values = _unrotated(st.view())
    s, q = seg["sink"], seg["body"]
    # sinks and residual are exact (up to the float32 rotation round trip)
    assert torch.allclose(keys[:, :, :s], k[:, :, :s], atol=1e-5)
    assert torch.allclose(values[:, :, s + q :], v[:, :, s + q :], atol=1e-5)
    # the body equals the reference quantizer applied to the rotated tokens in groups aligned after the sinks
    r = st.key_rotation if rotate else torch.eye(16)
    rv = st.value_rotation if rotate else torch.eye(16)
    ref_k = quantize(k[:, :, s : s + q] @ r, bits, 8, "channel").dequantize() @ r.T
    ref_v = quantize(v[:, :, s : s + q] @ rv, bits, 8, "token").dequantize() @ rv.T
    assert torch.allclose(keys[:, :, s : s + q], ref_k, atol=1e-5)
    assert torch.allclose(values[:, :, s : s + q], ref_v, atol=1e-5)
    assert not torch.allclose(keys[:, :, s : s + q], k[:, :, s : s + q], atol=1e-3)  # really quantized
    assert st.view().positions is None and st.view().valid is None
    assert torch.equal(st.lengths(), torch.full((2, 3), 70))


@pytest.mark.parametrize("rotate", ["keys", "values"])
def test_rotate_only_keys_or_values(rotate):
    spec = KVQuant(bits=2, group_size=8, residual=4, rotate=rotate)
    k, v = _kv(b=1, h=2, n=40)
    st = _fill(spec, k, v, prefill=36)
    view = st.view()
    assert (view.key_rotation is None) == (rotate == "values")
    assert (view.value_rotation is None) == (rotate == "keys")
    q = torch.randn(1, 2, 2, 16, generator=torch.Generator().manual_seed(2))
    keys, values = _unrotated(
        AttentionView(
            view.keys, view.values, None, None,
            view.key_rotation if view.key_rotation is not None else torch.eye(16),
            view.value_rotation if view.value_rotation is not None else torch.eye(16),
        )
    )  # fmt: skip
    ref = F.scaled_dot_product_attention(q, keys, values, scale=0.25).transpose(1, 2)
    assert torch.allclose(attend(q, view, None, 0.25), ref, atol=1e-5)
    with pytest.raises(ValueError, match="rotate"):
        KVQuant(rotate="both")


@pytest.mark.parametrize(
    ("bits", "key_bits", "expected"), [(2, None, True), (3, None, False), (4, None, False), (4, 2, True)]
)
def test_rotate_auto_default(bits, key_bits, expected):
    spec = KVQuant(bits=bits, key_bits=key_bits, group_size=8, residual=4)
    assert spec.rotate == "auto" and spec.rotated == (expected, expected)
    st = spec.create_storage(0)
    st.append(*_kv(n=20), 0)
    first = st.view()  # the prefill's exact tokens, read unrotated
    assert first.key_rotation is None and first.value_rotation is None
    view = st.view()  # the stored form
    assert (view.key_rotation is not None) == expected and (view.value_rotation is not None) == expected


@pytest.mark.parametrize(("arch", "normalised"), [("llama", False), ("gemma3", True), ("qwen3", True)])
def test_rotate_auto_leaves_normalised_keys_unrotated_at_two_bits(arch, normalised):
    """Under the patch, 2-bit rotate="auto" rotates the values, and the keys only where the model does not
    normalise them per head (QK-norm); explicit settings are left alone; params do not change."""
    model = tiny_model(arch)
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    for spec, want in ((KVQuant(bits=2, group_size=8, residual=4), (not normalised, True)),
                       (KVQuant(bits=2, group_size=8, residual=4, rotate=True), (True, True)),
                       (KVQuant(bits=4, group_size=8, residual=4), (False, False))):
        params = spec.params()
        with torch.no_grad(), kvpress.patch(model, spec) as session:
            cache = session.new_cache()
            model(ids, **cache_kwargs(model, cache), use_cache=True)
            assert spec.rotated == want
            storages = [getattr(layer.storage, "inner", layer.storage) for layer in cache.layers]
            assert all(isinstance(st, QuantizedStorage) for st in storages)  # sliding rings hold one too
            for st in storages:
                assert (st.key_rotation is not None, st.value_rotation is not None) == want
        assert spec.params() == params
    assert KVQuant(bits=4, rotate=True).rotated == (True, True)
    assert KVQuant(bits=2, rotate=False).rotated == (False, False)
    assert KVQuant(bits=2, rotate="keys").rotated == (True, False)
    assert KVQuant(bits=4, rotate="values").rotated == (False, True)
    for bad in ("both", "AUTO", 1, None):
        with pytest.raises(ValueError, match="rotate"):
            KVQuant(rotate=bad)


@pytest.mark.parametrize("rotate", [False, True])
def test_fp16_full_precision_parts(rotate):
    b, h, n, d = 1, 2, 300, 64
    k, v = _kv(b, h, n, d)
    base = {"bits": 2, "group_size": 32, "residual": 32, "n_sink": 4, "rotate": rotate}
    full, half = KVQuant(**base).create_storage(0), KVQuant(**base, fp_dtype=torch.float16).create_storage(0)
    for st in (full, half):
        st.append(k, v, 0)
        first = st.view()
        assert first.keys.dtype == torch.float32  # views are in the model's dtype
        keys, values = _unrotated(first)  # the tokens of the forward itself: exact, whatever fp_dtype is
        assert torch.allclose(keys, k, atol=1e-5) and torch.allclose(values, v, atol=1e-5)
    assert half.sink_k.dtype == half.res_v.dtype == torch.float16 and full.res_k.dtype == torch.float32
    assert half.segment_lengths() == full.segment_lengths() == {"sink": 4, "body": 256, "residual": 40}
    # bytes from the real tensors: the sinks and residual window cost half, the rest is unchanged
    fp_elements = b * h * (4 + 40) * d * 2
    assert full.nbytes() - half.nbytes() == fp_elements * 2
    assert half.nbytes() == sum(t.numel() * t.element_size() for t in half.tensors())
    assert half.storage_nbytes() == half.nbytes()
    assert half.effective_bits() == pytest.approx(8 * half.nbytes() / (b * h * n * d * 2))
    # the stored view: full-precision tokens within float16 rounding of the input, cast back to float32
    view = half.view()
    assert view.keys.dtype == view.values.dtype == torch.float32
    keys, values = _unrotated(view)
    fp = torch.cat([torch.arange(4), torch.arange(260, 300)])
    for got, ref in ((keys, k), (values, v)):
        err = (got[:, :, fp] - ref[:, :, fp]).abs()
        assert bool((err <= ref[:, :, fp].abs() * 2**-11 + 1e-5).all())
        assert torch.allclose(got[:, :, fp], ref[:, :, fp].half().float(), atol=1e-5)
    # the body is quantized from the held float16 values (the reference quantizer on the rounded tokens)
    r = half.key_rotation if rotate else torch.eye(d)
    rv = half.value_rotation if rotate else torch.eye(d)
    body = slice(4, 260)
    ref_k = quantize(k[:, :, body].half().float() @ r, 2, 32, "channel").dequantize() @ r.T
    ref_v = quantize(v[:, :, body].half().float() @ rv, 2, 32, "token").dequantize() @ rv.T
    assert torch.allclose(keys[:, :, body], ref_k, atol=1e-4) and torch.allclose(values[:, :, body], ref_v, atol=1e-4)
    # appending and evicting keep the float16 parts
    half.append(k[:, :, :40], v[:, :, :40], n)
    half.view()
    assert half.res_k.dtype == torch.float16 and half.nbytes() == half.storage_nbytes()
    kept = half.select(torch.rand(b, h, n + 40, generator=torch.Generator().manual_seed(0)) < 0.7)
    assert kept.sink_k.dtype == kept.res_k.dtype == torch.float16
    assert kept.view().keys.dtype == torch.float32
    assert kept.nbytes() == sum(t.numel() * t.element_size() for t in kept.tensors())


def test_fp16_parts_on_a_bf16_model_and_validation():
    k, v = _kv(n=40, dtype=torch.bfloat16)
    st = KVQuant(bits=4, group_size=8, residual=8, fp_dtype=torch.float16).create_storage(0)
    st.append(k, v, 0)
    assert st.view().keys.dtype == torch.bfloat16 and st.res_k.dtype == torch.float16
    assert KVQuant(fp_dtype=torch.float16).params()["fp_dtype"] == "float16"
    assert KVQuant().params()["fp_dtype"] is None
    for bad in (torch.int8, "float16", torch.bool, 16):
        with pytest.raises(ValueError, match="fp_dtype"):
            KVQuant(fp_dtype=bad)


def test_first_view_after_append_is_exact_then_stored():
    spec = KVQuant(bits=2, group_size=8, residual=4, n_sink=0, rotate=True)
    k, v = _kv(n=40)
    st = spec.create_storage(0)
    st.append(k, v, 0)
    first, _ = _unrotated(st.view())
    second, _ = _unrotated(st.view())
    assert torch.allclose(first, k, atol=1e-5)
    assert not torch.allclose(second, k, atol=1e-2)
    assert st.fresh is None  # the exact copy is gone once attention read it
    off = KVQuant(bits=2, group_size=8, residual=4, n_sink=0, exact_new_tokens=False).create_storage(0)
    off.append(k, v, 0)
    assert torch.allclose(_unrotated(off.view())[0], second, atol=1e-6)


def test_rotated_view_attention_equals_unrotated_attention():
    spec = KVQuant(bits=3, group_size=8, residual=4, rotate=True)
    k, v = _kv(b=1, h=2, n=50)
    st = _fill(spec, k, v, prefill=45)
    view = st.view()
    r, rv = view.key_rotation, view.value_rotation
    assert torch.allclose(r @ r.T, torch.eye(16), atol=1e-6)
    assert torch.allclose(rv @ rv.T, torch.eye(16), atol=1e-6)
    q = torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(9))  # GQA: 2 query heads per KV head
    out = attend(q, view, None, 0.25)  # rotates q, un-rotates the output
    keys, values = _unrotated(view)
    ref = F.scaled_dot_product_attention(
        q, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), scale=0.25
    ).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)


def test_bytes_and_effective_bits_arithmetic():
    # 2-bit, G=32, fp16 scale+zero, head_dim 64: 2 + 32/32 = 3 bits per body element for keys and for values
    spec = KVQuant(bits=2, group_size=32, residual=32, n_sink=4, rotate=False)
    b, h, n, d = 1, 2, 300, 64
    k, v = _kv(b, h, n, d)
    st = spec.create_storage(0)
    st.append(k, v, 0)
    st.view()
    seg = st.segment_lengths()
    assert seg == {"sink": 4, "body": 256, "residual": 40}
    per_head_body = seg["body"] * (2 * d * 2 // 8) + seg["body"] // 32 * d * 2 * 2 + seg["body"] * 2 * 2 * 2
    per_head_fp = (seg["sink"] + seg["residual"]) * d * 2 * 4  # float32 model dtype
    expected = b * h * (per_head_body + per_head_fp)
    assert st.nbytes() == expected
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors())
    assert st.storage_nbytes() == st.nbytes()  # no slice pins the appended prefill tensors
    assert st.effective_bits() == pytest.approx(8 * expected / (b * h * n * d * 2))
    assert st.body.k_codes.shape == (1, 2, 256, packed_words(64, 2))
    assert st.body.k_codes.dtype == torch.int32


def test_nbytes_counts_lowrank_outliers_and_owned_rotation():
    base = dict(bits=2, group_size=16, residual=0, n_sink=0, lowrank_block=32)
    k, v = _kv(1, 2, 64, 32)
    plain = KVQuant(**base, rotate=False).create_storage(0)
    full = KVQuant(**base, rank=2, outlier_fraction=0.05, outlier_reorder=True).create_storage(0)
    for st in (plain, full):
        st.append(k, v, 0)
        st.view()
    extra_lowrank = 2 * 1 * 2 * (64 * 2 + 2 * 32 * 2) * 2  # K and V: left rows + right per 32-token block, fp16
    extra_outliers = 2 * 1 * 2 * 64 * 2 * (2 + 1)  # K and V: 2 per row (ceil(0.05*32)), fp16 value + uint8 index
    extra_rotation = 2 * 32 * 32 * 4  # calibrated per layer: held and counted
    extra_group_block = 4 * 4  # int32 low-rank block of each of the 4 key groups
    extra = extra_lowrank + extra_outliers + extra_rotation + extra_group_block
    assert full.nbytes() == plain.nbytes() + extra
    shared = KVQuant(**base).create_storage(0)
    shared.append(k, v, 0)
    assert not any(t is shared.key_rotation for t in shared.tensors())  # shared constant, not per layer


def test_lowrank_and_outliers_reduce_body_error():
    k, v = _kv(1, 2, 128, 32, seed=3)
    errs = {}
    for name, extra in {"plain": {}, "rank": {"rank": 4}, "outliers": {"outlier_fraction": 0.05}}.items():
        st = KVQuant(bits=2, group_size=16, residual=0, n_sink=0, lowrank_block=64, **extra).create_storage(0)
        st.append(k, v, 0)
        st.view()
        keys, values = _unrotated(st.view())
        errs[name] = float((keys - k).norm() + (values - v).norm())
    assert errs["rank"] < 0.97 * errs["plain"]
    assert errs["outliers"] < 0.95 * errs["plain"]


@pytest.mark.parametrize("extra", [{}, {"rank": 2, "lowrank_block": 16}, {"outlier_fraction": 0.1}])
@pytest.mark.parametrize("equal_counts", [True, False])
def test_select_keeps_codes_without_requantizing(extra, equal_counts):
    spec = KVQuant(bits=2, group_size=8, residual=6, n_sink=2, **extra)
    k, v = _kv(n=60)
    st = _fill(spec, k, v, prefill=50)
    before = st.view()
    seg = st.segment_lengths()
    g = torch.Generator().manual_seed(1)
    if equal_counts:
        keep = torch.zeros(2, 3, 60, dtype=torch.bool)
        for b in range(2):
            for h in range(3):
                keep[b, h, torch.randperm(60, generator=g)[:35]] = True
    else:
        keep = torch.rand(2, 3, 60, generator=g) < 0.6
    new = st.select(keep)
    view = new.view()
    assert torch.equal(new.lengths(), keep.sum(-1))
    valid = view.valid if view.valid is not None else torch.ones(view.keys.shape[:3], dtype=torch.bool)
    first_residual = seg["sink"] + seg["body"]
    for b in range(2):
        for h in range(3):
            slots = keep[b, h].nonzero().flatten()
            assert torch.equal(view.positions[b, h][valid[b, h]], slots)
            got_k = view.keys[b, h][valid[b, h]]
            got_v = view.values[b, h][valid[b, h]]
            # sinks and body tokens keep their values: codes are gathered, never redone (a body token moved into
            # the full-precision sink segment only goes through a float32 rotation round trip)
            old = slots < first_residual
            assert (got_k[old] - before.keys[b, h, slots[old]]).abs().max() < 1e-5
            assert (got_v[old] - before.values[b, h, slots[old]]).abs().max() < 1e-5
            # residual tokens: the last r' kept ones stay in the residual, bit for bit; the others were quantized now,
            # for the first time, into new groups of this head's kept tokens: each element within half a step of
            # its group, and a group's range is within the range of this head's kept tokens (per key channel, per
            # value token), in the held (rotated) basis.
            r_new = new.segment_lengths()["residual"]
            fresh = slots >= first_residual
            exact = torch.zeros_like(fresh)
            exact[len(slots) - r_new:] = True
            assert bool(fresh[exact].all())
            assert torch.equal(got_k[exact], before.keys[b, h, slots[exact]])
            assert torch.equal(got_v[exact], before.values[b, h, slots[exact]])
            requantized = fresh & ~exact
            if bool(requantized.any()):
                kept_k, kept_v = before.keys[b, h, slots].double(), before.values[b, h, slots].double()
                levels = 2**spec.bits - 1
                k_half = (kept_k.amax(0) - kept_k.amin(0)) / levels / 2  # [head_dim]: per key channel
                v_half = (kept_v.amax(1) - kept_v.amin(1)) / levels / 2  # [tokens]: per value token
                slack = 4e-3  # the fp16 scale rounded up and zero rounded down (a few fp16 ulps of the range)
                err_k = (got_k[requantized].double() - kept_k[requantized]).abs()
                err_v = (got_v[requantized].double() - kept_v[requantized]).abs()
                if not extra:  # GEAR terms (low rank, outliers) change the reconstruction; plain codes are bounded
                    assert bool((err_k <= k_half * (1 + slack) + 1e-4).all()), float((err_k - k_half).max())
                    assert bool((err_v <= v_half[requantized, None] * (1 + slack) + 1e-4).all())
                assert float(err_v.max()) > 0  # quantized, not copied (a value group spans a token's channels)
    # appending after eviction continues positions and keeps everything consistent
    new.append(k[:, :, :5], v[:, :, :5], 60)
    view = new.view()
    assert view.positions[0, 0, -5:].tolist() == list(range(60, 65))
    assert torch.equal(new.lengths(), keep.sum(-1) + 5)
    assert new.nbytes() == sum(t.numel() * t.element_size() for t in new.tensors())
    assert new.storage_nbytes() == new.nbytes()


def test_select_everything_returns_same_storage_and_repeated_eviction():
    spec = KVQuant(bits=4, group_size=4, residual=4, n_sink=2)
    k, v = _kv(n=30)
    st = _fill(spec, k, v, prefill=20)
    assert st.select(torch.ones(2, 3, 30, dtype=torch.bool)) is st
    # a sliding window (StreamingLLM-like): evict the oldest non-sink token at every step
    for t in range(30, 60):
        view = st.view()
        keep = torch.ones(view.keys.shape[:3], dtype=torch.bool)
        keep[:, :, 2] = False
        st = st.select(keep)
        st.append(k[:, :, t % 30 : t % 30 + 1], v[:, :, t % 30 : t % 30 + 1], t)
    view = st.view()
    assert view.keys.shape[2] == 30
    assert view.positions[0, 0, :2].tolist() == [0, 1]
    assert view.positions[0, 0, 2:].tolist() == list(range(32, 60))
    # the body's key groups shrank by eviction: held group lengths are tracked, emptied groups dropped
    body = st.body
    assert body is not None and body.n_groups <= body.n_tokens // 4 + 2



def test_small_evictions_are_masked_then_dropped_together():
    """StreamingLLM-like eviction of one token per step: the first few selects only mask (same bytes, same
    tensors), attention sees exactly the kept tokens, and the select past the limit drops every masked token."""
    from storage_helpers import select_at_once

    from kvpress.storage.base import DEFER_FRACTION, DEFER_SLOTS

    spec = KVQuant(bits=2, group_size=8, residual=16, n_sink=2)
    n0 = 300
    k, v = _kv(n=n0 + 40, seed=5)
    st = _fill(spec, k[:, :, :n0], v[:, :, :n0], prefill=n0 - 20)
    limit = min(DEFER_SLOTS, n0 // DEFER_FRACTION)
    assert 1 < limit < 40
    reference = st  # the same evictions, each dropped at once
    for step in range(limit + 1):
        t = n0 + step
        view = st.view()
        pos = view.positions if view.positions is not None else torch.arange(view.shape[2]).expand(view.shape[:3])
        valid = view.valid if view.valid is not None else torch.ones(view.shape[:3], dtype=torch.bool)
        oldest = torch.where(valid & (pos >= 2), pos, torch.full_like(pos, 1 << 30)).amin(-1, keepdim=True)
        keep = valid & (pos != oldest)  # evict the oldest non-sink token
        before, st = st, st.select(keep)
        ref_view = reference.view()
        ref_pos = ref_view.positions if ref_view.positions is not None else torch.arange(ref_view.shape[2]).expand(
            ref_view.shape[:3])
        ref_valid = ref_view.valid if ref_view.valid is not None else torch.ones(ref_view.shape[:3], dtype=torch.bool)
        reference = select_at_once(reference, ref_valid & (ref_pos != oldest))
        if step < limit:  # masked: every held tensor as it was, one more slot marked invalid
            assert st.masked_slots == step + 1 and st.n_slots == n0 + step
            assert all(getattr(st, name) is getattr(before, name) for name in ("body", "sink_k", "res_k", "res_v"))
            assert int((~st.valid).sum()) == 2 * 3 * (step + 1)
        else:  # every masked token dropped
            assert st.masked_slots == 0 and st.n_slots == n0 + step - (limit + 1) and st.valid is None
        got, want = st.view(), reference.view()
        g_valid = got.valid if got.valid is not None else torch.ones(got.shape[:3], dtype=torch.bool)
        w_valid = want.valid if want.valid is not None else torch.ones(want.shape[:3], dtype=torch.bool)
        assert torch.equal(st.lengths(), reference.lengths())
        g_pos, w_pos = (x.positions if x.positions is not None else torch.arange(x.shape[2]).expand(x.shape[:3])
                        for x in (got, want))
        for b in range(2):
            for h in range(3):
                assert torch.equal(g_pos[b, h][g_valid[b, h]], w_pos[b, h][w_valid[b, h]])
                assert torch.equal(got.keys[b, h][g_valid[b, h]], want.keys[b, h][w_valid[b, h]])
                assert torch.equal(got.values[b, h][g_valid[b, h]], want.values[b, h][w_valid[b, h]])
        st.append(k[:, :, t : t + 1], v[:, :, t : t + 1], t)
        reference.append(k[:, :, t : t + 1], v[:, :, t : t + 1], t)
        st.view(), reference.view()


def test_index_batch_reorders_exactly():
    spec = KVQuant(bits=3, group_size=8, residual=4, rank=2, lowrank_block=16, outlier_fraction=0.05)
    k, v = _kv(b=3, n=50)
    st = _fill(spec, k, v, prefill=48)
    view = st.view()
    idx = torch.tensor([2, 0, 0])
    other = st.index_batch(idx).view()
    assert torch.equal(other.keys, view.keys[idx])
    assert torch.equal(other.values, view.values[idx])
    clone = st.clone()
    assert torch.equal(clone.view().keys, view.keys)


def test_key_and_value_bits_and_bf16():
    spec = KVQuant(bits=4, key_bits=4, value_bits=2, group_size=8, residual=0, n_sink=0, rotate=False)
    k, v = _kv(n=32, dtype=torch.bfloat16)
    st = spec.create_storage(0)
    st.append(k, v, 0)
    view = st.view()
    assert view.keys.dtype == torch.bfloat16
    assert st.body.k_codes.shape[-1] == packed_words(16, 4) and st.body.v_codes.shape[-1] == packed_words(16, 2)
    keys, values = _unrotated(st.view())
    assert (keys - k.float()).abs().max() < (values - v.float()).abs().max()


def test_config_validation():
    for bad in (1, 5, 16):
        with pytest.raises(ValueError, match="bits"):
            KVQuant(bits=bad)
    with pytest.raises(ValueError, match="key_bits"):
        KVQuant(key_bits=6)
    with pytest.raises(ValueError, match="group_size"):
        KVQuant(group_size=0)
    with pytest.raises(ValueError, match="residual"):
        KVQuant(residual=-1)
    with pytest.raises(ValueError, match="rank"):
        KVQuant(rank=-1)
    with pytest.raises(ValueError, match="rank=40"):
        KVQuant(rank=40, group_size=32)
    with pytest.raises(ValueError, match="outlier_fraction"):
        KVQuant(outlier_fraction=1.0)
    with pytest.raises(ValueError, match="lowrank_block"):
        KVQuant(lowrank_block=48, group_size=32, rank=2)
    st = KVQuant(group_size=12).create_storage(0)
    with pytest.raises(ValueError, match="group_size=12 must divide head_dim=16"):
        st.append(*_kv(n=4), 0)
    st = KVQuant(group_size=8, value_group_size=4).create_storage(0)
    st.append(*_kv(n=4), 0)  # explicit value groups of 4 channels divide 16
    assert st.cfg.value_group == 4
    odd = [t[..., :15] for t in _kv(n=4)]
    with pytest.raises(ValueError, match="head_dim=15"):  # the Hadamard rotation needs an even head_dim
        KVQuant(group_size=5, rotate=True).create_storage(0).append(*odd, 0)
    KVQuant(group_size=5, rotate=False).create_storage(0).append(*odd, 0)  # unrotated: any head_dim


def test_patched_tiny_model_close_to_full_precision_and_smaller():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        with kvpress.patch(model, KVQuant(bits=8, group_size=8, residual=8)) as session:
            cache = session.new_cache()
            outs = [model(ids[:, :50], **cache_kwargs(model, cache)).logits]
            for t in range(50, 70):
                outs.append(model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits)
        got = torch.cat(outs, dim=1)
        assert (got - ref).abs().max() < 0.02
        assert all(isinstance(layer.storage, QuantizedStorage) for layer in cache.layers)
        with kvpress.patch(model, None) as session:
            dense = session.new_cache()
            model(ids, **cache_kwargs(model, dense))
        assert isinstance(dense.layers[0].storage, DenseStorage)
        with kvpress.patch(model, KVQuant(bits=2, group_size=8, residual=8)) as session:
            small = session.new_cache()
            model(ids, **cache_kwargs(model, small))
        assert small.nbytes() < 0.4 * dense.nbytes()


@pytest.mark.parametrize("order", ["evict|quant", "quant|evict"])
def test_pipeline_with_eviction_policies(order):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    quant = KVQuant(bits=4, group_size=8, residual=8)
    snap = kvpress.policies.SnapKV(compression_ratio=0.5, window=8)
    policy = snap | quant if order == "evict|quant" else quant | snap
    with torch.no_grad(), kvpress.patch(model, policy):
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        cache = output_cache(model(ids, use_cache=True))
    assert out.shape == (1, 70)
    assert cache.report()[0].tokens_max == 32
    assert isinstance(cache.layers[0].storage, QuantizedStorage)
    with torch.no_grad(), kvpress.patch(model, kvpress.policies.StreamingLLM(n_sink=2, window=16) | quant):
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert out.shape == (1, 84)


def test_empty_storage():
    st = KVQuant(bits=4).create_storage(3)
    assert st.layer_idx == 3
    assert st.lengths().shape == (0, 0) and st.nbytes() == 0 and st.effective_bits() == 0.0
    assert st.select(torch.zeros(0, 0, 0, dtype=torch.bool)) is st
    assert st.index_batch(torch.tensor([0])).nbytes() == 0
