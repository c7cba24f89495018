"""benchmarks/soak.py on a tiny random model: the loop, the series it records and the verdicts it draws."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_scripts import load_benchmark

from kvpress.policies import StreamingLLM
from kvpress.quant import KVQuant
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def soak_module():
    return load_benchmark("soak")


def test_soak_records_flat_bytes_and_finite_values(soak_module):
    model = tiny_model("llama")
    prompt = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    policy = StreamingLLM(n_sink=2, window=24) | KVQuant(bits=2, group_size=4, residual=4, n_sink=2)
    lines: list[str] = []
    result = soak_module.soak(model, prompt, "streaming_kvquant2", policy, tokens=120, every=30, seed=0,
                              temperature=1.0, top_k=20, log=lines.append)
    intervals = result["intervals"]
    assert [r["tokens"] for r in intervals] == [30, 60, 90, 120] and len(lines) == 4
    assert all(r["cache_finite"] and r["rss"] > 0 and r["tokens_per_s"] > 0 for r in intervals)
    verdict = result["verdict"]
    assert verdict["no_nan"] and verdict["bytes_flat"] and abs(verdict["bytes_drift"]) <= 0.01
    assert verdict["speed_ratio"] > 0 and verdict["rss_growth"] is not None
    # the same seed samples the same stream
    again = soak_module.soak(model, prompt, "streaming_kvquant2", policy, tokens=120, every=30, seed=0,
                             temperature=1.0, top_k=20, log=lambda _: None)
    assert [r["nbytes"] for r in again["intervals"]] == [r["nbytes"] for r in intervals]


def test_verdict_flags_growth_nan_and_slowdown(soak_module):
    rows = [{"tokens": 1000 * (i + 1), "max_nbytes": 100 + 10 * i, "nbytes": 100 + 10 * i, "rss": 1000 + 100 * i,
             "tokens_per_s": 10.0 - 2 * i, "cache_finite": i < 2, "nonfinite_logits": 0} for i in range(3)]
    verdict = soak_module.verdict("streaming", rows)
    assert verdict["bytes_flat"] is False and verdict["rss_ok"] is False and verdict["speed_ok"] is False
    assert verdict["no_nan"] is False
    grows = soak_module.verdict("duo", rows)
    assert grows["bytes_flat"] is None and grows["bytes_per_token"] == pytest.approx(0.01)
    assert grows["speed_ok"] is None and grows["speed_ratio"] == pytest.approx(6 / 8)
    # RSS grew by 200 bytes, the cache by 20: 180 beyond it, 18% of the first RSS
    assert grows["rss_growth_beyond_cache"] == pytest.approx(0.18) and grows["rss_ok"] is False
    cache_grows = [dict(r, nbytes=100 + 200 * i, rss=1000 + 200 * i) for i, r in enumerate(rows)]  # RSS = cache
    assert soak_module.verdict("duo", cache_grows)["rss_ok"] is True
    assert soak_module.verdict("streaming", cache_grows)["rss_ok"] is False
    assert soak_module.verdict("streaming", rows[:2])["bytes_flat"] is None  # too short to judge


def test_rejudge_recomputes_verdicts_of_saved_runs(soak_module, tmp_path, capsys):
    rows = [{"tokens": 1000 * (i + 1), "max_nbytes": 100, "nbytes": 100, "rss": 1000, "tokens_per_s": 10.0,
             "cache_finite": True, "nonfinite_logits": 0} for i in range(3)]
    path = tmp_path / "soak_streaming_3000.json"
    path.write_text(json.dumps({"config": "streaming", "tokens": 3000, "intervals": rows, "verdict": {"stale": True}}))
    assert soak_module.main(["--rejudge", "--out", str(tmp_path)]) == 0
    assert "| `streaming` | 3,000 | ? | 0.00 -> 0.00 (+0.00%) |" in capsys.readouterr().out
    verdict = json.loads(path.read_text())["verdict"]
    assert "stale" not in verdict and verdict["bytes_flat"] and verdict["speed_ok"] and verdict["rss_ok"]
    assert (tmp_path / "soak.png").stat().st_size > 0
    assert soak_module.main(["--rejudge", "--out", str(tmp_path / "empty")]) == 2
    assert "no soak_" in capsys.readouterr().err


def test_bad_arguments_are_refused(soak_module, capsys):
    for argv, word in ((["--tokens", "0"], "--tokens"), (["--temperature", "nan"], "--temperature"),
                       (["--configs", "nope"], "--configs")):
        with pytest.raises(SystemExit) as info:
            soak_module.parse_args(argv)
        assert info.value.code == 2 and word in capsys.readouterr().err
