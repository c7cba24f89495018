"""Without compression, a patched model must give exactly what transformers gives."""

import pytest
import torch
from tiny_models import ARCHITECTURES, left_padded_batch, tiny_model

import kvpress
from kvpress.compat import cache_kwargs, output_cache
from kvpress.policies import SnapKV

ARCHS = list(ARCHITECTURES)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", [None, "ratio0"], ids=["no-policy", "snapkv-ratio-0"])
def test_forward_logits_identical(arch, attn, policy):
    model = tiny_model(arch, attn=attn)
    ids, mask = left_padded_batch([24, 17, 9])
    ref = model(ids, attention_mask=mask, use_cache=True)
    policy = SnapKV(compression_ratio=0.0, window=4) if policy == "ratio0" else None
    with kvpress.patch(model, policy):
        out = model(ids, attention_mask=mask, use_cache=True)
        assert isinstance(output_cache(out), kvpress.KVPressCache)
        # a decoding step through the cache
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        step = model(nxt, attention_mask=mask2, **cache_kwargs(model, output_cache(out)), use_cache=True)
    ref_step = model(nxt, attention_mask=mask2, **cache_kwargs(model, output_cache(ref)), use_cache=True)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(step.logits, ref_step.logits)
    assert output_cache(out).nbytes() == sum(
        layer.keys.numel() * layer.keys.element_size() * 2 for layer in output_cache(ref).layers
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [[20], [20, 13, 6]], ids=["batch1", "batch3-left-padded"])
def test_greedy_generate_identical(arch, batch):
    model = tiny_model(arch)
    ids, mask = left_padded_batch(batch, seed=1)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs, output_logits=True, return_dict_in_generate=True)
    with kvpress.patch(model, None):
        out = model.generate(ids, **kwargs, output_logits=True, return_dict_in_generate=True)
    assert isinstance(output_cache(out), kvpress.KVPressCache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", [None, "streaming"])
def test_beam_search_runs_and_matches_without_policy(policy):
    model = tiny_model("llama")
    ids, mask = left_padded_batch([14, 9], seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    pol = kvpress.StreamingLLM(n_sink=2, window=6) if policy else None
    with kvpress.patch(model, pol):
        out = model.generate(ids, **kwargs)
    if policy is None:
        assert torch.equal(out, ref)
    else:
        assert out.shape == ref.shape
