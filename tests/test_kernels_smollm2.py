"""End to end on SmolLM2-135M: greedy generation through the Triton kernels (interpreter without a GPU) equals the
torch decode path token for token, and both equal the materialised path (dequantize the layer, then SDPA)."""

import pytest
import torch
from kernels_reference import triton_missing

import kvpress
import kvpress.attention
from kvpress import kernels
from kvpress.quant import KVQuant

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]

PROMPT = (
    "The lighthouse keeper wrote in his log every evening. On the first night of the storm he noted the wind, "
    "the height of the waves and the ships that passed. The secret word of the keeper is amber. What is the "
    "secret word of the keeper? Answer:"
)
NEW_TOKENS = 8
FAST_PATH_TOKENS = 70  # past one fold of the ragged tail (TAIL_TOKENS = 64)


def _generate(model, ids, spec, new_tokens=NEW_TOKENS):
    with torch.no_grad(), kvpress.patch(model, spec):
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)  # fmt: skip
    return out.sequences[0, ids.shape[1] :], torch.stack(out.scores)


@pytest.mark.skipif(triton_missing() is not None, reason=str(triton_missing()))
def test_generation_through_triton_equals_torch_and_materialised(smollm2, monkeypatch):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    # 2 bits, rotated; a window of 16 so most of the prompt is read from packed codes at every step
    spec = KVQuant(bits=2, group_size=32, residual=16, n_sink=4)
    with kernels.force_backend("triton"):
        triton_tokens, triton_scores = _generate(model, ids, spec)
    with kernels.force_backend("torch"):
        torch_tokens, torch_scores = _generate(model, ids, spec)
    monkeypatch.setattr(kvpress.attention, "DECODE_MAX_QUERIES", 0)
    materialised_tokens, materialised_scores = _generate(model, ids, spec)
    assert torch.equal(triton_tokens, torch_tokens)
    assert torch.equal(torch_tokens, materialised_tokens)
    torch.testing.assert_close(triton_scores, torch_scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch_scores, materialised_scores, rtol=1e-4, atol=1e-4)


# Every configuration of benchmarks/decode_speed.py: the fast CPU paths (C++ kernels, ragged tail, DuoAttention's
# dense head groups read in place) against the torch kernels and against the materialised path (build the view,
# then SDPA with masks).
FAST_PATH_CONFIGS = [
    "kvquant(bits=2, residual=16)",
    "kvquant(bits=4, residual=16)",
    "snapkv(compression_ratio=0.5) | kvquant(bits=2, residual=16)",
    "adakv(snapkv(), compression_ratio=0.5)",
    "duo_attention(sparsity=0.5, n_sink=4, window=32)",
    "h2o(budget=200)",
]


@pytest.mark.parametrize("expression", FAST_PATH_CONFIGS)
def test_generation_through_cpu_fast_paths_equals_torch_and_materialised(smollm2, monkeypatch, expression):
    from kvpress.eval.text import default_text
    from kvpress.kernels import cpu_decode
    from kvpress.policies.expr import expand

    if cpu_decode.load_error() is not None:
        pytest.skip(cpu_decode.load_error())
    model, tokenizer = smollm2
    ids = tokenizer(default_text()[:3000] + "\n\n" + PROMPT, return_tensors="pt").input_ids[:, -600:]
    config = expand(expression)[0]
    runs = {}
    with kernels.force_backend("cpp"):
        runs["cpp"] = _generate(model, ids, config.build(ids.shape[1]), FAST_PATH_TOKENS)
    with kernels.force_backend("torch"):
        runs["torch"] = _generate(model, ids, config.build(ids.shape[1]), FAST_PATH_TOKENS)
    monkeypatch.setattr(kvpress.attention, "DECODE_MAX_QUERIES", 0)
    runs["materialised"] = _generate(model, ids, config.build(ids.shape[1]), FAST_PATH_TOKENS)
    assert torch.equal(runs["cpp"][0], runs["torch"][0]), expression
    assert torch.equal(runs["torch"][0], runs["materialised"][0]), expression
    # Logits agree closely until tokens quantized during decoding enter the body: from then on a last-ulp
    # difference between two float paths can round a value to the neighbouring code (one quantization step), so
    # later logits differ by more than float noise while the greedy tokens above stay identical.
    torch.testing.assert_close(runs["cpp"][1][:NEW_TOKENS], runs["torch"][1][:NEW_TOKENS], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runs["cpp"][1][:NEW_TOKENS], runs["materialised"][1][:NEW_TOKENS], rtol=1e-4,
                               atol=1e-4)
