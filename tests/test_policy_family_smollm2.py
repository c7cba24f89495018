"""The policy family on the embedded SmolLM2: bounded caches over long generations, KVzip on a real needle."""

import pytest
import torch

import kvpress
from kvpress.compat import cache_kwargs
from kvpress.eval.generation import forward_last, greedy_decode, stop_token_ids
from kvpress.eval.tasks import get_task
from kvpress.policies import H2O, AdaKV, DecodingBudget, KVzip, SnapKV

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]


def _generate_bytes(model, ids, policy, n_tokens):
    """Greedy-generate ``n_tokens`` one forward at a time (EOS ignored); bytes held after each step."""
    sizes = []
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        logits = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
        for _ in range(n_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
            sizes.append(cache.nbytes())
    return sizes, cache


@torch.no_grad()
@pytest.mark.parametrize("which", ["h2o", "decoding_budget"])
def test_2000_tokens_with_the_cache_at_its_budget_throughout(smollm2, which):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and her cat."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    budget = 192
    policy = H2O(budget=budget) if which == "h2o" else DecodingBudget(SnapKV(compression_ratio=0.0), budget=budget)
    sizes, cache = _generate_bytes(model, ids, policy, 2000)
    full_at = budget - ids.shape[1]  # the step at which the cache reaches the budget
    assert len(set(sizes[full_at:])) == 1, sorted(set(sizes[full_at:]))[:5]  # flat: not a byte more, ever
    assert sizes[full_at - 1] < sizes[full_at]
    assert cache.get_seq_length() == ids.shape[1] + 2000
    assert {r.tokens_max for r in cache.report()} == {budget}


@torch.no_grad()
def test_kvzip_keeps_the_needle_query_agnostic_and_loads_the_tokenizer_itself(smollm2):
    model, tokenizer = smollm2
    task = get_task("niah_single_prose")
    sample = task.make_sample(tokenizer, 1536, index=3)
    stop = stop_token_ids(model, tokenizer)
    policy = KVzip(compression_ratio=0.75)  # no tokenizer given: read from the model's own files
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        forward_last(model, sample.prefix_ids, cache)  # the context alone: the question is not seen
        held = sum(int(cache.layers[i].storage.lengths().sum()) for i in cache.compressed_layers)
        logits = forward_last(model, sample.suffix_ids, cache)
        answer = tokenizer.decode(greedy_decode(model, cache, logits, 12, stop))
    n_ctx = len(sample.prefix_ids)
    assert held == pytest.approx(0.25 * n_ctx * 30 * 3, rel=0.01)
    assert sample.references[0] in answer, (answer, sample.references)


@torch.no_grad()
def test_adakv_holds_ragged_bytes_on_smollm2(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([get_task("niah_single_prose").make_sample(tokenizer, 1024, index=0).prefix_ids])
    with kvpress.patch(model, AdaKV(SnapKV(), compression_ratio=0.5)) as session:
        cache = session.new_cache()
        model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    held = sum(int(cache.layers[i].storage.lengths().sum()) for i in range(30))
    kv_bytes = held * 2 * 64 * 4  # K and V, head_dim 64, fp32
    assert held == 30 * 3 * (ids.shape[1] // 2)
    assert kv_bytes < cache.nbytes() < 1.02 * kv_bytes
