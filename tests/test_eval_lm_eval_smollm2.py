"""Slow tier: lm-eval through the kvpress cache on SmolLM2-135M, model registered by name."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow


def test_simple_evaluate_by_name_through_the_cache():
    import lm_eval

    from kvpress.eval.lm_eval_adapter import kvpress_task_manager

    scores = {}
    for args in ("pretrained=smollm2-135m", "pretrained=smollm2-135m,policy=streaming_llm,window=16,n_sink=4"):
        results = lm_eval.simple_evaluate(
            model="kvpress", model_args=args, tasks=["kvpress_niah_choice"],
            task_manager=kvpress_task_manager(), limit=1, log_samples=True,
        )
        assert results["config"]["model"] == "kvpress"
        samples = results["samples"]["kvpress_niah_choice"]
        scores[args] = [ll for s in samples for (ll, _) in s["filtered_resps"]]
        assert results["results"]["kvpress_niah_choice"]["acc,none"] >= 0.0
    full, streamed = scores.values()
    assert len(full) == len(streamed) >= 2  # one prompt, one log-likelihood per choice
    # a 16-token window drops the needles: the choice log-likelihoods must move
    assert max(abs(a - b) for a, b in zip(full, streamed)) > 1e-3
