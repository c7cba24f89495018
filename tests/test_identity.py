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


@pytest.mark.parametrize("reposition", [True, False])
def test_beam_search_under_streaming_llm_scores_match_teacher_forcing(reposition):
    """Every returned beam's score equals the log-probability of its tokens recomputed by teacher forcing through
    the same StreamingLLM cache (prefill, then one token per forward): the beams' caches are reordered with the
    beams, evictions included. The window is small enough that every row evicts during decoding."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch([14, 9], seed=4)
    beams, new = 3, 8
    policy = kvpress.StreamingLLM(n_sink=2, window=6, reposition=reposition)
    with torch.no_grad(), kvpress.patch(model, policy):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, num_beams=beams,
                             num_return_sequences=beams, do_sample=False, pad_token_id=0, length_penalty=0.0,
                             output_scores=True, return_dict_in_generate=True)
    seqs = out.sequences  # [batch * beams, prompt + new]
    assert seqs.shape == (2 * beams, ids.shape[1] + new)
    assert torch.equal(seqs[:, : ids.shape[1]], ids.repeat_interleave(beams, 0))
    m = mask.repeat_interleave(beams, 0)
    logprob = torch.zeros(seqs.shape[0], dtype=torch.float64)
    with torch.no_grad(), kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        logits = model(seqs[:, : ids.shape[1]], attention_mask=m, **cache_kwargs(model, cache)).logits[:, -1]
        for step in range(new):
            token = seqs[:, ids.shape[1] + step]
            logprob += torch.log_softmax(logits.double(), -1).gather(-1, token[:, None])[:, 0]
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            logits = model(token[:, None], attention_mask=m, **cache_kwargs(model, cache)).logits[:, -1]
        assert int(cache.layers[0].storage.lengths().max()) == 2 + 6  # the stream was cut to sinks + window
    torch.testing.assert_close(out.sequences_scores.double(), logprob, rtol=1e-4, atol=1e-4)
    # distinct beams per prompt, best first
    for row in range(2):
        group = seqs[row * beams:(row + 1) * beams]
        assert len({tuple(s.tolist()) for s in group}) == beams
        scores = out.sequences_scores[row * beams:(row + 1) * beams]
        assert bool((scores[:-1] >= scores[1:]).all())
