"""The evaluation loop on a tiny random Llama: every task end to end, fan-out == direct runs, both modes,
result files, plots and the ``kvpress eval`` command line."""

import json
import struct

import pytest

from eval_fixtures import byte_tokenizer, tiny_llama
from kvpress.cli import main as kvpress_main
from kvpress.eval import PolicyConfig, available_tasks, configurations, evaluate, get_task
from kvpress.eval.generation import ScoreRecorder, run_direct, run_fanout, supports_fanout
from kvpress.eval.runner import _plan, run_sample
from kvpress.policies import SnapKV, StreamingLLM

LENGTH = 1100
# 2 layers x 2 KV heads x head_dim 16 x (K + V) x 4 bytes
BYTES_PER_TOKEN = 2 * 2 * 16 * 2 * 4


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _task(name, max_new_tokens=3):
    task = get_task(name)
    task.max_new_tokens = max_new_tokens  # random models never stop: keep decoding short
    return task


@pytest.mark.parametrize("name", available_tasks())
def test_every_task_end_to_end(model, tok, name):
    specs = configurations(["snapkv", "streaming_llm"], [0.5])
    result = evaluate(model, tok, _task(name), specs, [LENGTH], 1, progress=False, model_name="tiny")
    assert [r["label"] for r in result.records] == [
        "none", "snapkv(compression_ratio=0.5)", "streaming_llm(compression_ratio=0.5)"]
    none, snap, stream = result.records
    assert none["kv_bytes"] == none["context_tokens"] * BYTES_PER_TOKEN  # query-agnostic: context only
    for r in (snap, stream):
        assert 0.45 < r["kv_bytes"] / none["kv_bytes"] < 0.56, r
        assert 0.0 <= r["score"] <= 1.0 and r["gold"] == none["gold"] and r["task"] == name
    assert stream["parameters"]["window"] == round(none["context_tokens"] * 0.5) - 4  # sized at the first forward
    entries = {e["label"]: e for e in result.metrics["entries"]}
    assert entries["snapkv(compression_ratio=0.5)"]["kv_fraction"] == pytest.approx(
        snap["kv_bytes"] / none["kv_bytes"], abs=1e-4)
    assert entries["none"]["per_length"] == {str(LENGTH): 100.0 * none["score"]}


@pytest.mark.parametrize("mode", ["query-agnostic", "query-aware"])
@pytest.mark.parametrize("policy, params", [
    ("snapkv", {"window": 16}),
    ("adakv", {"scorer": "snapkv", "scorer_params": {"window": 16}}),
    ("pyramidkv", {"scorer": "knorm", "beta": 4}),
    ("kvzip", {}),
], ids=["snapkv", "adakv", "pyramidkv", "kvzip"])
def test_fanout_equals_direct_runs(model, tok, mode, policy, params):
    sample = _task("niah_multikey_prose", 6).make_sample(tok, LENGTH, index=1)
    specs = configurations([policy], [0.25, 0.5, 0.9], params)
    fanned = run_sample(model, tok, sample, specs, mode, fanout=True)
    direct = run_sample(model, tok, sample, specs, mode, fanout=False)
    for (spec, _, f), (_, _, d) in zip(fanned, direct):
        assert f.tokens == d.tokens, spec.label
        assert (f.kv_bytes, f.kv_bytes_end) == (d.kv_bytes, d.kv_bytes_end), spec.label
        assert f.fanout and not d.fanout
    assert len({g.prefill_seconds for _, _, g in fanned}) == 1  # one shared prefill
    held = [g.kv_bytes for _, _, g in fanned]
    assert held == sorted(held, reverse=True) and held[-1] < 0.15 * held[0]


def test_fanout_logits_match_the_direct_compressed_cache(model, tok):
    """The cache left by the recorder + top-k is the cache SnapKV builds itself (same continuation logits)."""
    sample = _task("niah_single_noise").make_sample(tok, 600)
    policy = SnapKV(compression_ratio=0.6, window=8)
    direct = run_direct(model, tok, policy, sample.prefix_ids, sample.suffix_ids, "query-agnostic", 12)
    fanned = run_fanout(model, tok, [None, policy], sample.prefix_ids, sample.suffix_ids, "query-agnostic", 12)
    assert fanned[1].tokens == direct.tokens and fanned[1].kv_bytes == direct.kv_bytes
    assert fanned[0].kv_bytes == len(sample.prefix_ids) * BYTES_PER_TOKEN


def test_fanout_eligibility_and_plan():
    assert supports_fanout(SnapKV(compression_ratio=0.5))
    assert not supports_fanout(SnapKV(compression_ratio=0.5, every_chunk=True))
    assert not supports_fanout(StreamingLLM(window=8))
    with pytest.raises(ValueError):
        ScoreRecorder(StreamingLLM(window=8))
    policies = [None, SnapKV(compression_ratio=0.3), StreamingLLM(window=8), SnapKV(compression_ratio=0.6),
                SnapKV(compression_ratio=0.5, window=4)]
    assert _plan(policies, fanout=True) == [[0, 1, 3], [2], [4]]
    assert _plan(policies, fanout=False) == [[0], [1], [2], [3], [4]]
    assert _plan([None, StreamingLLM(window=8)], fanout=True) == [[0], [1]]


def test_query_aware_compresses_the_question_too(model, tok):
    task = _task("niah_single_noise")
    specs = configurations(["snapkv"], [0.5])
    agnostic = evaluate(model, tok, task, specs, [800], 1, progress=False).records
    aware = evaluate(model, tok, task, specs, [800], 1, mode="query-aware", progress=False).records
    sample = task.make_sample(tok, 800)
    assert aware[0]["mode"] == "query-aware" and agnostic[0]["mode"] == "query-agnostic"
    assert aware[0]["kv_bytes"] - agnostic[0]["kv_bytes"] == len(sample.suffix_ids) * BYTES_PER_TOKEN
    # SnapKV keeps half of the tokens of the first forward, in each mode (plus the positions of kept slots)
    for records in (aware, agnostic):
        assert 0.5 <= records[1]["kv_bytes"] / records[0]["kv_bytes"] < 0.56
    # end of the answer: query-agnostic appended the question uncompressed after the compressed context
    assert agnostic[1]["kv_bytes_end"] > agnostic[1]["kv_bytes"] + len(sample.suffix_ids) * BYTES_PER_TOKEN - 1


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_grid_run_writes_results_and_plots(model, tok, tmp_path):
    specs = configurations(["snapkv"], [0.5])
    result = evaluate(model, tok, _task("niah_single_noise"), specs, [650, 800], 1, depths=[0.0, 0.5, 1.0],
                      progress=False, model_name="tiny", out_dir=tmp_path, config={"note": "test"})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([
        "samples.jsonl", "metrics.json", "summary.csv", "summary.md", "config.json", "score_vs_ratio.png",
        "score_vs_bytes.png",
        "heatmap_none.png", "heatmap_snapkv_compression_ratio_0.5.png",
    ])
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2 * 2 == len(result.records)
    rec = json.loads(lines[0])
    for field in ("task", "length", "depth", "policy", "parameters", "seed", "prompt_tokens", "prediction", "gold",
                  "score", "kv_bytes", "seconds", "mode"):
        assert field in rec
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["schema_version"] == 1 and metrics["task"] == "niah_single_noise" and metrics["model"] == "tiny"
    assert metrics["policies"] == ["none", "snapkv"] and metrics["depths"] == [0.0, 0.5, 1.0]
    entry = metrics["entries"][1]
    assert set(entry["per_length"]) == {"650", "800"} and set(entry["grid"]) == {"0", "0.5", "1"}
    assert entry["n_samples"] == 6 and entry["parameters"] == {"compression_ratio": 0.5}
    scores = [r["score"] for r in result.records if r["label"] == entry["label"] and r["length"] == 650]
    assert entry["per_length"]["650"] == pytest.approx(100 * sum(scores) / len(scores), abs=0.01)
    assert json.loads((tmp_path / "config.json").read_text())["note"] == "test"
    csv_rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * 3  # header + (2 lengths + all) per configuration
    assert "| snapkv(compression_ratio=0.5) |" in (tmp_path / "summary.md").read_text()
    assert "## Needle grid: none" in (tmp_path / "summary.md").read_text()
    width, height = _png_size(tmp_path / "heatmap_none.png")
    assert width > 200 and height > 150


def test_bad_configurations(model, tok):
    with pytest.raises(ValueError, match="depths do not apply"):
        evaluate(model, tok, _task("vt"), configurations([], None), [800], 1, depths=[0.5], progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        evaluate(model, tok, _task("vt"), [PolicyConfig(), PolicyConfig()], [800], 1, progress=False)
    with pytest.raises(ValueError, match="unknown policy"):
        PolicyConfig.of("nonsense", None, 0.5)


def test_policy_specs():
    specs = configurations(["snapkv", "none", "streaming_llm"], [0.25, 0.5], {"window": 16})
    # a fixed window sizes StreamingLLM: the ratios do not reach it, it runs once
    assert [s.label for s in specs] == [
        "none", "snapkv(compression_ratio=0.25, window=16)", "snapkv(compression_ratio=0.5, window=16)",
        "streaming_llm(window=16)",
    ]
    assert specs[1].build(100).compression_ratio == 0.25 and specs[0].build(100) is None
    stream = PolicyConfig.of("streaming_llm", {"n_sink": 2}, 0.75).build(400)
    assert (stream.n_sink, stream.window) == (2, 98)
    assert configurations(["streaming_llm(n_sink=2) | kvquant(bits=4)"], [0.5])[1].label == \
        "streaming_llm(compression_ratio=0.5, n_sink=2) | kvquant(bits=4)"
    with pytest.raises(ValueError, match=r"compression_ratio\[0\] must be in \[0, 1\)"):
        configurations(["snapkv"], [1.5])
    assert [s.label for s in configurations(["none"], [0.5], baseline=False)] == ["none"]


def test_cli_list(capsys):
    assert kvpress_main(["eval", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == [*available_tasks(), "niah-grid"]
    assert all(len(line.split()) > 2 for line in lines)


def test_cli_grid_end_to_end(model, tok, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    code = kvpress_main([
        "eval", "niah-grid", "--model", str(model_dir), "--lengths", "650", "750", "--depths", "0", "1",
        "--compression-ratio", "0.5", "--param", "window=8", "--out", str(out), "--no-progress",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "snapkv(compression_ratio=0.5, window=8)" in printed and str(out) in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "niah_single_noise" and metrics["samples"] == 1
    assert [e["label"] for e in metrics["entries"]] == ["none", "snapkv(compression_ratio=0.5, window=8)"]
    assert set(metrics["entries"][0]["grid"]) == {"0", "1"}
    config = json.loads((out / "config.json").read_text())
    assert config["grid"] and config["params"] == {"window": 8} and config["depths"] == [0.0, 1.0]
    assert (out / "heatmap_snapkv_compression_ratio_0.5_window_8.png").is_file()
    capsys.readouterr()
    assert kvpress_main(["eval"]) == 2
    assert capsys.readouterr().err.strip() == "kvpress eval: error: give a task (see kvpress eval --list)"
    assert kvpress_main(["eval", "nope", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvpress eval: error: unknown task 'nope'") and err.count("\n") == 1
    with pytest.raises(ValueError, match="unknown task"):  # --debug: the exception itself, with its traceback
        kvpress_main(["eval", "nope", "--model", str(model_dir), "--debug"])


def test_cli_runs_a_policy_without_ratio_once(monkeypatch, capsys):
    from kvpress.eval.cli import checked_configurations
    from kvpress.policies import registry

    monkeypatch.setitem(registry._REGISTRY, "sinks_only", lambda n_sink=4: StreamingLLM(n_sink=n_sink, window=1))
    cfg = {"policies": ["snapkv", "sinks_only", "kvquant(bits=4)"], "compression_ratios": [0.25, 0.5], "params": {},
           "baseline": True, "lengths": [1000]}
    labels = [s.label for s in checked_configurations(cfg)]
    assert labels == ["none", "snapkv(compression_ratio=0.25)", "snapkv(compression_ratio=0.5)", "sinks_only",
                      "kvquant(bits=4)"]
    assert capsys.readouterr().out.count("takes no compression ratio") == 2  # sinks_only, kvquant(bits=4)
    with pytest.raises(ValueError, match="unknown policy"):
        checked_configurations({**cfg, "policies": ["nonsense"]})


@pytest.mark.parametrize("value", ["1.5", "nan", "-0.1", "1", "half"])
def test_cli_rejects_a_ratio_outside_0_1(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        kvpress_main(["eval", "vt", "--compression-ratio", "0.5", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--compression-ratio" in err and "compression_ratio must be" in err and "[0, 1)" in err


