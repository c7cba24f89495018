"""benchmarks/answer_likelihood.py: the answer's log-likelihood through a cache filled by a separate context forward
equals the one read off a single uncached forward of context + question + answer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from benchmark_scripts import load_benchmark
from tiny_models import tiny_model


class _Tokenizer:
    """Maps `` 1 2 3`` to ids [1, 2, 3] (the answer's text is its ids)."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        return SimpleNamespace(input_ids=[int(t) for t in text.split()])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_answer_loglik_uncompressed_equals_one_uncached_forward(arch):
    module = load_benchmark("answer_likelihood")
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(1)
    prefix, suffix = torch.randint(3, 90, (40,), generator=g).tolist(), torch.randint(3, 90, (6,), generator=g).tolist()
    answer = [7, 11, 13]
    sample = SimpleNamespace(prefix_ids=prefix, suffix_ids=suffix, references=[" ".join(map(str, answer))])
    loglik, held = module.answer_loglik(model, _Tokenizer(), None, sample)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix + suffix + answer])).logits[0].float()
    start = len(prefix) + len(suffix) - 1
    expected = logits.log_softmax(-1)[start:start + 3].gather(1, torch.tensor(answer)[:, None]).sum()
    assert loglik == pytest.approx(float(expected), abs=1e-4)
    assert loglik < 0 and held > 0
