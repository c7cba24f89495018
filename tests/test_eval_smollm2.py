"""Synthetic tasks on the embedded SmolLM2-135M (slow tier: real model, a few samples each)."""

import json

import pytest

from kvpress.cli import main as kvpress_main
from kvpress.eval import available_tasks, configurations, evaluate, get_task

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]


def test_tasks_size_prompts_in_smollm2_tokens(smollm2):
    _, tok = smollm2
    for name in available_tasks():
        for length in (1024, 2048):
            sample = get_task(name).make_sample(tok, length, seed=1)
            assert length - 260 < sample.prompt_tokens + sample.max_new_tokens <= length, (name, length)
            assert sample.prefix.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in sample.suffix
            # split tokenisation equals the joint one: both modes see exactly the tokens of the whole prompt
            joint = tok(sample.prefix + sample.suffix, add_special_tokens=False)["input_ids"]
            assert joint == sample.prefix_ids + sample.suffix_ids, (name, length)


def test_single_needle_uncompressed_and_snapkv_fanout(smollm2):
    model, tok = smollm2
    result = evaluate(model, tok, get_task("niah_single_noise"), configurations(["snapkv"], [0.5]), [1024], 2,
                      progress=False, model_name="smollm2-135m")
    base, snap = result.metrics["entries"]
    assert base["score"] == 100.0 and base["empty_answers"] == 0
    assert 0.5 <= snap["kv_fraction"] < 0.56 and snap["score"] is not None
    assert all(r["fanout"] for r in result.records)  # one prefill per sample served both configurations
    for r in result.records:
        if r["policy"] == "none":
            assert r["prediction"].startswith(r["gold"][0])


def test_every_task_runs_uncompressed(smollm2):
    model, tok = smollm2
    for name in available_tasks():
        task = get_task(name)
        task.max_new_tokens = min(task.max_new_tokens, 24)
        result = evaluate(model, tok, task, configurations([], None), [512], 1, progress=False)
        (record,) = result.records
        assert record["prompt_tokens"] + task.max_new_tokens <= 512 and record["kv_bytes"] > 0
        assert 0.0 <= record["score"] <= 1.0
        if name in ("niah_single_noise", "niah_single_prose"):
            assert record["score"] == 1.0, record


def test_cli_needle_grid(smollm2, tmp_path):
    out = tmp_path / "grid"
    code = kvpress_main(["eval", "niah-grid", "--haystack", "prose", "--lengths", "512", "--depths", "0", "1",
                         "--compression-ratio", "0.5", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "niah_single_prose" and metrics["model"] == "smollm2-135m"
    grid = metrics["entries"][0]["grid"]
    assert set(grid) == {"0", "1"} and grid["0"] == {"512": 100.0}  # (depth 1 of this sample: "898123.", a miss)
    assert grid["1"]["512"] in (0.0, 100.0)
    assert (out / "heatmap_none.png").stat().st_size > 5000
    assert (out / "heatmap_snapkv_compression_ratio_0.5.png").is_file() and (out / "score_vs_ratio.png").is_file()
