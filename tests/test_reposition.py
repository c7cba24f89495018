"""Re-positioning (StreamingLLM's positions within the cache) against transformers' own RoPE, in float64."""

import sys

import pytest
import torch
from tiny_models import tiny_model
from transformers.cache_utils import DynamicCache

import kvpress
from kvpress.compat import cache_kwargs, output_cache
from kvpress.policies import Policy, StreamingLLM
from kvpress.quant import KVQuant
from kvpress.reposition import reposition, rope_inv_freqs, rotate
from kvpress.storage import AttentionView

# transformers computes RoPE angles in float32 even for a float64 model; kvpress computes its shifts in float64.
# At the positions used here (< 64) that rounding moves float64 results by up to ~5e-7.
HF_ANGLE_ATOL = 2e-6


def _hf_rope(model):
    """(rotary module, apply_rotary_pos_emb) of the model's own modelling file."""
    module = sys.modules[type(model).__module__]
    return model.model.rotary_emb, module.apply_rotary_pos_emb


def _hf_rotate(model, x, positions, inverse=False):
    """Rotate ``x [batch, heads, seq, dim]`` to ``positions [batch, seq]`` with transformers' RoPE code."""
    rotary, apply = _hf_rope(model)
    cos, sin = rotary(x, positions)
    if inverse:
        sin = -sin
    return apply(x, x, cos, sin)[1]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
def test_rotate_matches_transformers_rope_and_composes(arch):
    model = tiny_model(arch).double()
    dim = model.config.head_dim if getattr(model.config, "head_dim", None) else 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dim, dtype=torch.float64, generator=gen)
    pos = torch.randint(0, 5000, (2, 5), generator=gen)
    inv_freq = rope_inv_freqs(model)[0]
    ours = rotate(x, pos[:, None, :], inv_freq)
    # float64 reference as complex multiplication of the (i, i + dim/2) pairs
    z = torch.complex(x[..., : dim // 2], x[..., dim // 2:]) * torch.polar(
        torch.ones((), dtype=torch.float64), pos[:, None, :, None].double() * inv_freq
    )
    torch.testing.assert_close(ours, torch.cat([z.real, z.imag], dim=-1), rtol=0, atol=1e-9)
    # transformers computes its angles in float32: equal within that rounding (|angle| < 5000 rad)
    torch.testing.assert_close(ours, _hf_rotate(model, x, pos), rtol=0, atol=5e-4)
    # R(a) R(b) = R(a + b), and R(-a) undoes R(a)
    other = torch.randint(-3000, 3000, (2, 5), generator=gen)
    torch.testing.assert_close(
        rotate(ours, other[:, None, :], inv_freq), rotate(x, (pos + other)[:, None, :], inv_freq), rtol=0, atol=1e-9
    )
    torch.testing.assert_close(rotate(ours, -pos[:, None, :], inv_freq), x, rtol=0, atol=1e-9)


def test_reposition_view_ragged_and_rotated_against_hf():
    """Invalid slots inside a head (quantized ragged layout), a Hadamard-held key basis, GQA queries."""
    model = tiny_model("llama").double()
    inv_freq = rope_inv_freqs(model)[0]
    gen = torch.Generator().manual_seed(1)
    batch, kv_heads, groups, seq, dim, q_len, seen = 2, 2, 2, 7, 16, 2, 40
    raw_k = torch.randn(batch, kv_heads, seq, dim, dtype=torch.float64, generator=gen)
    raw_q = torch.randn(batch, kv_heads * groups, q_len, dim, dtype=torch.float64, generator=gen)
    valid = torch.ones(batch, kv_heads, seq, dtype=torch.bool)
    valid[0, 1, 2] = valid[1, 0, 4] = False  # padding slots inside the sequence
    positions = torch.zeros(batch, kv_heads, seq, dtype=torch.long)
    for b in range(batch):
        for h in range(kv_heads):
            n = int(valid[b, h].sum())
            chosen = torch.sort(torch.randperm(seen - q_len, generator=gen)[: n - q_len]).values
            positions[b, h, valid[b, h]] = torch.cat([chosen, torch.arange(seen - q_len, seen)])
    held_keys = torch.stack(
        [torch.stack([_hf_rotate(model, raw_k[b:b + 1, h:h + 1], positions[b:b + 1, h])[0, 0] for h in range(kv_heads)])
         for b in range(batch)]
    )
    rotation = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen)).Q
    view = AttentionView(held_keys @ rotation, held_keys, positions, valid, key_rotation=rotation)
    query = _hf_rotate(model, raw_q, torch.arange(seen - q_len, seen).expand(batch, q_len))

    new_view = reposition(view, seen, inv_freq)

    assert torch.equal(new_view.positions, positions) and new_view.key_rotation is rotation
    assert torch.equal(view.keys, held_keys @ rotation)  # the stored tensor is not modified
    for b in range(batch):
        for h in range(kv_heads):
            n = int(valid[b, h].sum())
            expect_k = _hf_rotate(model, raw_k[b:b + 1, h:h + 1, valid[b, h]], torch.arange(n)[None])[0, 0]
            for g in range(groups):
                q_head = h * groups + g
                expect_q = _hf_rotate(model, raw_q[b:b + 1, q_head:q_head + 1], torch.arange(n - q_len, n)[None])
                logits = (query[b, q_head] @ rotation) @ new_view.keys[b, h][valid[b, h]].T
                torch.testing.assert_close(logits, expect_q[0, 0] @ expect_k.T, rtol=0, atol=HF_ANGLE_ATOL)
            # keys already at the newest tokens' offset are left exactly as held
            offset = torch.arange(n) - positions[b, h][valid[b, h]]
            same = offset == n - seen
            assert same[-q_len:].all()
            torch.testing.assert_close(new_view.keys[b, h][valid[b, h]][same], view.keys[b, h][valid[b, h]][same],
                                       rtol=0, atol=0)


def test_nothing_evicted_is_unchanged():
    model = tiny_model("llama")
    view = AttentionView(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), None, None)
    assert reposition(view, 4, rope_inv_freqs(model)[0]) is view


def _reference_after_streaming(model, ids, next_ids, n_sink, window):
    """Unpatched model: prefill ``ids``, keep sinks + window, move the kept keys to positions 0..n-1 with
    transformers' RoPE, then feed ``next_ids`` at positions n.. on a DynamicCache holding only those."""
    with torch.no_grad():
        full = output_cache(model(ids, use_cache=True))
    width = ids.shape[1]
    kept = torch.cat([torch.arange(n_sink), torch.arange(width - window, width)])
    batch = ids.shape[0]
    cache = DynamicCache(config=model.config)
    for idx, layer in enumerate(full.layers):
        keys = layer.keys[:, :, kept]
        raw = _hf_rotate(model, keys, kept.expand(batch, -1), inverse=True)
        moved = _hf_rotate(model, raw, torch.arange(len(kept)).expand(batch, -1))
        cache.update(moved, layer.values[:, :, kept], idx)
    n = len(kept)
    positions = torch.arange(n, n + next_ids.shape[1]).expand(batch, -1)
    with torch.no_grad():
        return model(next_ids, **cache_kwargs(model, cache), position_ids=positions, cache_position=positions[0]).logits


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gemma"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("next_len", [1, 3], ids=["decode", "chunk"])
def test_streaming_llm_attends_at_cache_positions(arch, attn, next_len):
    model = tiny_model(arch, attn=attn).double()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 100, (2, 30), generator=gen)
    next_ids = torch.randint(3, 100, (2, next_len), generator=gen)
    n_sink, window = 3, 8
    expected = _reference_after_streaming(model, ids, next_ids, n_sink, window)

    with torch.no_grad(), kvpress.patch(model, StreamingLLM(n_sink=n_sink, window=window)):
        out = model(ids, use_cache=True)
        got = model(next_ids, **cache_kwargs(model, output_cache(out)), use_cache=True).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=HF_ANGLE_ATOL)

    # with the original positions the logits differ: the test can tell the two apart
    with torch.no_grad(), kvpress.patch(model, StreamingLLM(n_sink=n_sink, window=window, reposition=False)):
        out = model(ids, use_cache=True)
        original = model(next_ids, **cache_kwargs(model, output_cache(out)), use_cache=True).logits
    assert (original - expected).abs().max() > 1e-4


def test_reposition_with_rotated_quantized_storage():
    """KVQuant holds keys Hadamard-rotated; re-positioning must undo that basis first. At 8 bits the rotated and
    unrotated storages give the same logits up to quantization noise, and both match the dense cache closely."""
    # a larger init than the default makes attention (and so positions) matter: with original positions the
    # logits move by ~0.24, 8-bit storage by ~0.01
    model = tiny_model("llama", initializer_range=0.1).double()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 100, (1, 40), generator=gen)
    step = torch.randint(3, 100, (1, 1), generator=gen)
    results = {}
    for name, spec in {
        "dense": None,
        "rot": KVQuant(bits=8, group_size=16, residual=0, n_sink=0, rotate=True),
        "plain": KVQuant(bits=8, group_size=16, residual=0, n_sink=0, rotate=False),
    }.items():
        policy = StreamingLLM(n_sink=2, window=16) if spec is None else StreamingLLM(n_sink=2, window=16) | spec
        with torch.no_grad(), kvpress.patch(model, policy):
            out = model(ids, use_cache=True)
            results[name] = model(step, **cache_kwargs(model, output_cache(out)), use_cache=True).logits
    reference = _reference_after_streaming(model, ids, step, 2, 16)
    torch.testing.assert_close(results["dense"], reference, rtol=0, atol=HF_ANGLE_ATOL)
    assert (results["rot"] - reference).abs().max() < 0.03
    assert (results["plain"] - reference).abs().max() < 0.03


class DropMiddle(Policy):
    """Ragged test policy: at prefill, head h of row b evicts a different number of middle tokens."""

    reposition = True

    def select(self, ctx):
        if ctx.phase != "prefill":
            return None
        keep = torch.ones(ctx.keys.shape[:3], dtype=torch.bool)
        for b in range(keep.shape[0]):
            for h in range(keep.shape[1]):
                keep[b, h, 2:2 + 3 * (b + h + 1)] = False
        return keep


def test_ragged_eviction_repositions_each_head_by_its_own_count():
    """Per-head eviction counts differ: each head's reference is the model on a cache holding what that head
    kept. Checked through kv_heads=1 models, where one head is the whole layer."""
    model = tiny_model("llama", num_key_value_heads=1, num_attention_heads=2).double()
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(3, 100, (2, 24), generator=gen)
    step = torch.randint(3, 100, (2, 1), generator=gen)
    with torch.no_grad(), kvpress.patch(model, DropMiddle()):
        out = model(ids, use_cache=True)
        got = model(step, **cache_kwargs(model, output_cache(out)), use_cache=True).logits
    with torch.no_grad():
        full = output_cache(model(ids, use_cache=True))
    for b in range(2):
        n_drop = 3 * (b + 1)
        kept = torch.cat([torch.arange(2), torch.arange(2 + n_drop, 24)])
        cache = DynamicCache(config=model.config)
        for idx, layer in enumerate(full.layers):
            keys = layer.keys[b:b + 1, :, kept]
            raw = _hf_rotate(model, keys, kept[None], inverse=True)
            cache.update(_hf_rotate(model, raw, torch.arange(len(kept))[None]), layer.values[b:b + 1, :, kept], idx)
        n = len(kept)
        with torch.no_grad():
            expected = model(step[b:b + 1], **cache_kwargs(model, cache), position_ids=torch.tensor([[n]]),
                             cache_position=torch.tensor([n])).logits
        torch.testing.assert_close(got[b:b + 1], expected, rtol=0, atol=HF_ANGLE_ATOL)


def test_bad_reposition_arguments():
    with pytest.raises(ValueError, match="reposition must be True or False"):
        StreamingLLM(reposition="yes")
    model = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="reposition=False"):
        with kvpress.patch(model, StreamingLLM(window=8)):
            pass
    with kvpress.patch(model, StreamingLLM(window=8, reposition=False)):
        pass


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_left_padded_batch_equals_rows_run_alone(arch):
    """Padding shifts a row's slots but not its rotary positions; re-positioning must not mix the two up."""
    from tiny_models import left_padded_batch

    model = tiny_model(arch, initializer_range=0.1).double()
    ids, mask = left_padded_batch([20, 13], seed=6)
    policy = StreamingLLM(n_sink=2, window=6)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0)
    with torch.no_grad(), kvpress.patch(model, policy):
        batched = torch.stack(model.generate(ids, attention_mask=mask, **kwargs).logits, dim=1)
        for row in range(2):
            alone = ids[row:row + 1, mask[row].bool()]
            single = torch.stack(model.generate(alone, **kwargs).logits, dim=1)
            torch.testing.assert_close(batched[row:row + 1], single, rtol=0, atol=1e-8)
