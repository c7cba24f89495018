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


def _generate(model, ids, spec):
    with torch.no_grad(), kvpress.patch(model, spec):
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
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
