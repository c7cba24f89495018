"""The shipped SmolLM2 predictor, end to end (slow tier): ratio mode out of the box, threshold mode over a long
generation with decode-time pruning."""

from __future__ import annotations

import pytest
import torch

import kvpress
from kvpress.demo import build_prompt
from kvpress.policies import Learned, get_policy

pytestmark = pytest.mark.slow


def _full_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = torch.finfo(model.dtype).bits // 8
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * itemsize


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_shipped_predictor_works_out_of_the_box_at_ratio_half(smollm2, kind):
    model, tokenizer = smollm2
    ids, answer = build_prompt(tokenizer, 1500, 0.4, seed=3)
    with kvpress.patch(model, get_policy("learned", kind=kind, compression_ratio=0.5)):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    held = kvpress.output_cache(out).nbytes()
    full = _full_bytes_per_token(model) * (out.sequences.shape[1] - 1)
    assert answer in text
    assert held <= 0.52 * full, (held, full)


@torch.inference_mode()
def test_threshold_mode_stays_below_the_full_cache_over_a_2000_token_sequence(smollm2):
    model, tokenizer = smollm2
    ids, answer = build_prompt(tokenizer, 1500, 0.4, seed=3)
    per_token = _full_bytes_per_token(model)
    policy = Learned(threshold=-5.0, window=16)
    generated, ratios = [], []
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        out = model(input_ids=ids, **kvpress.cache_kwargs(model, cache), use_cache=True)
        length = ids.shape[1]
        while length < 2000:
            token = out.logits[0, -1].argmax().view(1, 1)
            generated.append(int(token))
            out = model(input_ids=token, **kvpress.cache_kwargs(model, cache), use_cache=True)
            length += 1
            assert cache.nbytes() < per_token * length, f"step {length}: {cache.nbytes()} >= full"
            if length % 100 == 0:
                ratios.append(float(torch.stack([r.mean() for r in Learned.achieved(cache).values()]).mean()))
    assert answer in tokenizer.decode(generated[:12], skip_special_tokens=True)
    # Content-adaptive, and bounded: most entries are pruned, and new tokens are pruned as they leave the window.
    assert min(ratios) > 0.5, ratios
    print(f"threshold -5: achieved ratio {ratios[0]:.3f} .. {ratios[-1]:.3f}, final {cache.nbytes() / (per_token * length):.3f} of full")
