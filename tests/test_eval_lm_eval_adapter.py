"""The lm-eval adapter scores through the compressed cache (tiny random Llama, character tokenizer: seconds)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("lm_eval")

from eval_fixtures import byte_tokenizer, tiny_llama  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kvpress.compat import cache_kwargs
from kvpress.eval.lm_eval_adapter import KVPressLM, kvpress_task_manager  # noqa: E402

CONTEXT = (
    "The grass is green. The sky is blue. One of the special magic numbers for tulip is: 4812. "
    "The sun is yellow. Here we go. There and back again. The grass is green. The sky is blue. "
    "What is the special magic number for tulip?"
)
REQUESTS = [(CONTEXT, " 4812"), (CONTEXT, " 9377"), (CONTEXT, " tulip is blue"), ("", "The sky is blue.")]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_llama(), byte_tokenizer(chat=False)


def adapter(model_and_tokenizer, policy="none", **params) -> KVPressLM:
    model, tok = model_and_tokenizer
    return KVPressLM(pretrained=model, tokenizer=tok, policy=policy, device="cpu", **params)


def loglikelihoods(lm, requests=REQUESTS) -> torch.Tensor:
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=args, idx=i) for i, args in enumerate(requests)
    ]
    return torch.tensor([ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)], dtype=torch.float64)


def test_registered_under_kvpress():
    assert get_model("kvpress") is KVPressLM


def test_no_policy_matches_unpatched_forward_exactly(model_and_tokenizer):
    """Policy none through KVPressCache == the unpatched model fed the same way through a DynamicCache."""
    model, _ = model_and_tokenizer
    lm = adapter(model_and_tokenizer)
    encoded = []
    score_tokens = lm._loglikelihood_tokens
    lm._loglikelihood_tokens = lambda reqs, **kw: (encoded.extend(reqs), score_tokens(reqs, **kw))[1]
    got = loglikelihoods(lm)
    expected = []
    with torch.inference_mode():
        for _, ctx, cont in encoded:
            cache = DynamicCache(config=model.config)
            last = model(input_ids=torch.tensor([ctx]), **cache_kwargs(model, cache)).logits[0, -1:]
            rest = model(input_ids=torch.tensor([cont[:-1]]), **cache_kwargs(model, cache)).logits[0]
            logp = torch.log_softmax(torch.cat([last, rest]).float(), -1)
            expected.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).squeeze(-1).double().sum()))
    assert len(encoded) == len(REQUESTS)
    assert torch.equal(got, torch.tensor(expected, dtype=torch.float64))


def test_no_policy_matches_stock_hflm(model_and_tokenizer):
    """... and agrees with lm-eval's own cache-less HFLM scoring (one forward over context+continuation)."""
    model, tok = model_and_tokenizer
    got = loglikelihoods(adapter(model_and_tokenizer))
    stock = loglikelihoods(HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu"))
    torch.testing.assert_close(got, stock, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "policy,params",
    [("streaming_llm", {"n_sink": 2, "window": 8}), ("snapkv", {"compression_ratio": 0.9, "window": 4})],
)
def test_compression_changes_loglikelihoods(model_and_tokenizer, policy, params):
    full = loglikelihoods(adapter(model_and_tokenizer))
    compressed = loglikelihoods(adapter(model_and_tokenizer, policy, **params))
    assert torch.isfinite(compressed).all()
    # the empty-context request (prefix token + 16 chars) is too short for snapkv's 0.9 to bite identically;
    # every request with the long context must move
    assert (compressed[:3] - full[:3]).abs().min() > 1e-4


def test_model_call_is_disabled(model_and_tokenizer):
    with pytest.raises(RuntimeError, match="cache"):
        adapter(model_and_tokenizer)._model_call(torch.tensor([[1, 2, 3]]))


def test_rolling_through_cache(model_and_tokenizer):
    model, tok = model_and_tokenizer
    text = CONTEXT
    request = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu").loglikelihood_rolling(request, True)
    for mode in ("chunked", "token"):
        full = adapter(model_and_tokenizer, rolling_mode=mode, rolling_chunk_size=64).loglikelihood_rolling(request, True)
        assert math.isclose(full[0], stock[0], rel_tol=1e-5), mode
    streaming = adapter(model_and_tokenizer, "streaming_llm", n_sink=2, window=16, rolling_chunk_size=24)
    compressed = streaming.loglikelihood_rolling(request, True)
    assert abs(compressed[0] - stock[0]) > 1e-3


def test_generate_runs_under_the_patch(model_and_tokenizer, monkeypatch):
    import kvpress

    seen = []
    original = kvpress.patch

    def spy(model, policy=None, **kwargs):
        seen.append(policy)
        return original(model, policy, **kwargs)

    monkeypatch.setattr(kvpress, "patch", spy)
    lm = adapter(model_and_tokenizer, "streaming_llm", n_sink=2, window=8)
    request = [Instance(request_type="generate_until", doc={}, arguments=(CONTEXT, {"until": ["\n"], "max_gen_toks": 8}), idx=0)]
    out = lm.generate_until(request, disable_tqdm=True)
    assert isinstance(out[0], str)
    assert len(seen) == 1 and seen[0] is lm.policy


def test_policy_params_reach_the_policy(model_and_tokenizer):
    lm = adapter(model_and_tokenizer, "snapkv", compression_ratio=0.25, window=4, rolling_mode="chunked")
    assert lm.policy.params()["compression_ratio"] == 0.25
    assert lm.rolling_policy.params().get("every_chunk") is True
    info = lm.get_model_info()
    assert info["kvpress_policy"] == "snapkv" and info["kvpress_policy_params"]["window"] == 4
    with pytest.raises(ValueError):
        adapter(model_and_tokenizer, "streaming_llm", not_a_param=3)


OFFLINE_TASKS = ["kvpress_niah_choice", "kvpress_pydoc_ppl", "kvpress_niah_1k"]
METRICS = {"kvpress_niah_choice": "acc,none", "kvpress_pydoc_ppl": "word_perplexity,none",
           "kvpress_niah_1k": "score,none"}


def _simple_evaluate(lm, tok, limit=2) -> dict:
    import lm_eval

    results = lm_eval.simple_evaluate(model=lm, tasks=OFFLINE_TASKS, limit=limit,
                                      task_manager=kvpress_task_manager(metadata={"tokenizer": tok}))
    return {task: results["results"][task][metric] for task, metric in METRICS.items()} | {
        "config": results["config"]}


def test_simple_evaluate_through_kvpress_reproduces_stock_lm_eval(model_and_tokenizer):
    """Without a policy, the harness's numbers through the kvpress adapter are lm-eval's own (its cache-less HFLM):
    the same accuracy and generation score, the same word perplexity up to float rounding; with
    StreamingLLM the perplexity moves and the accuracy and score stay on their scales."""
    model, tok = model_and_tokenizer
    # max_length above the pydoc documents' length (4.5k and 6k byte tokens), so that HFLM scores each in one
    # window, as the adapter's cache does (HFLM's default 4096 would restart the context mid-document)
    stock = _simple_evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu", max_length=8192), tok)
    ours = _simple_evaluate(adapter(model_and_tokenizer), tok)
    assert ours["kvpress_niah_choice"] == stock["kvpress_niah_choice"]
    assert ours["kvpress_niah_1k"] == stock["kvpress_niah_1k"]
    assert math.isclose(ours["kvpress_pydoc_ppl"], stock["kvpress_pydoc_ppl"], rel_tol=1e-5)
    assert ours["config"]["kvpress_policy"] == "none"
    streaming = _simple_evaluate(adapter(model_and_tokenizer, "streaming_llm", n_sink=2, window=64), tok)
    assert streaming["config"]["kvpress_policy"] == "streaming_llm"
    assert streaming["kvpress_niah_choice"] in (0.0, 0.5, 1.0)  # 2 documents
    assert 0.0 <= streaming["kvpress_niah_1k"] <= 100.0
    assert abs(math.log(streaming["kvpress_pydoc_ppl"]) - math.log(stock["kvpress_pydoc_ppl"])) > 1e-3


@pytest.mark.slow
def test_lm_eval_command_line(model_and_tokenizer, tmp_path):
    """The plain `lm_eval` command finds the `kvpress` model when given one of our task files.

    Slow tier: lm-eval's command line indexes all its built-in tasks first (~1-2 min on 2 cores)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from kvpress.eval.lm_eval_adapter import task_include_path

    model, tok = model_and_tokenizer
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    lm_eval_cli = [sys.executable, "-c", "from lm_eval.__main__ import cli_evaluate; cli_evaluate()"]
    task = str(Path(task_include_path()) / "kvpress_pydoc_ppl.yaml")
    args = ["run", "--model", "kvpress", "--model_args",
            f"pretrained={tmp_path / 'tiny'},policy=streaming_llm,window=32,n_sink=2,rolling_chunk_size=128",
            "--tasks", task, "--limit", "1", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(lm_eval_cli + args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kvpress_pydoc_ppl" in done.stdout and "word_perplexity" in done.stdout


def test_kvpress_lm_eval_command_forwards_to_lm_eval(monkeypatch):
    """`kvpress lm-eval ARGS` hands ARGS to lm-eval's own command line, our task directory included."""
    import sys

    import lm_eval.__main__

    from kvpress.cli import build_parser
    from kvpress.eval.lm_eval_adapter import task_include_path

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    args = build_parser().parse_args(["lm-eval", "--model", "kvpress", "--tasks", "kvpress_niah_1k", "--limit", "2"])
    assert args.func(args) == 0
    assert seen == [["lm_eval", "--model", "kvpress", "--tasks", "kvpress_niah_1k", "--limit", "2",
                     "--include_path", task_include_path()]]
