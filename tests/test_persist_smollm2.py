"""Saved caches on the embedded SmolLM2-135M (slow tier): greedy continuation from a loaded file equals the
in-memory cache's for several policies (quantized and ragged among them), and the `kvpress cache` CLI."""

import pytest
import torch

import kvpress
from kvpress.cache_cli import build_policy
from kvpress.cli import main
from kvpress.compat import cache_kwargs
from kvpress.demo import build_prompt

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]

POLICIES = {
    "none": None,
    "snapkv(compression_ratio=0.5)": "DenseStorage",
    "adakv(compression_ratio=0.5)": "RaggedStorage",
    "h2o(compression_ratio=0.5)": "DenseStorage",
    "kvquant(bits=2)": "QuantizedStorage",
    "learned(compression_ratio=0.5) | kvquant(bits=4)": "QuantizedStorage",
}


@torch.no_grad()
def _greedy(model, policy, cache, ids, steps=8):
    out_tokens = []
    with kvpress.patch(model, policy):
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out_tokens.append(int(token))
            out = model(token, **cache_kwargs(model, cache), use_cache=True)
    return out_tokens, out.logits[:, -1]


@pytest.mark.parametrize("expression", list(POLICIES))
def test_greedy_continuation_from_a_saved_cache_equals_the_in_memory_one(smollm2, expression, tmp_path):
    model, tokenizer = smollm2
    ids, _ = build_prompt(tokenizer, 640, 0.5, seed=3)
    context, question = ids[:, :-16], ids[:, -16:]
    policy = build_policy(expression, context.shape[1])
    with kvpress.patch(model, policy) as session, torch.no_grad():
        cache = session.new_cache()
        model(context, **cache_kwargs(model, cache), use_cache=True)
    if POLICIES[expression]:
        assert {type(cache.layers[i].storage).__name__ for i in cache.compressed_layers} == {POLICIES[expression]}
    path = tmp_path / "c.kvc"
    n = cache.save(path, policy=expression)
    assert n <= cache.nbytes() * 1.02 + 200_000  # the file is the held bytes plus a small header
    loaded = kvpress.load_cache(path, model)
    expected, expected_logits = _greedy(model, policy, cache, question)
    got, logits = _greedy(model, policy, loaded, question)
    assert got == expected
    assert torch.equal(logits, expected_logits)


def test_cache_cli_build_ask_info(smollm2, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("The secret code of the vault is 7412. " + "The sky was grey and the sea was calm. " * 40)
    out = tmp_path / "doc.kvc"
    assert main(["cache", "build", "--policy", "snapkv(compression_ratio=0.25)", "--text", str(text),
                 "--out", str(out)]) == 0  # fmt: skip
    assert main(["cache", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "snapkv(compression_ratio=0.25)" in info and "30 layers" in info and "DenseStorage" in info
    assert main(["cache", "ask", str(out), "What is the secret code of the vault?", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # an answer was printed
    assert "first token" in captured.err
    with pytest.raises(SystemExit, match="is a directory"):
        main(["cache", "build", "--text", str(text), "--out", str(tmp_path)])
