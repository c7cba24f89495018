"""Running sweeps on a tiny random model saved as a local directory: the store, resume after a kill or Ctrl-C
(exactly the missing cells run, same report), failing cells, bad input that must not touch stored records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpress.cli import main as kvpress_main
from kvpress.policies import Policy, register_policy
from kvpress.policies.registry import _REGISTRY
from kvpress.sweep import ResultStore, StoreError, load_spec, plan, run_sweep, write_report

from sweep_fixtures import report_without_times, snapshot, stable_records, write_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def uninterrupted(spec_path, tmp_path_factory):
    """The 6-cell sweep run once, start to end, and its report."""
    out = tmp_path_factory.mktemp("full") / "store"
    summary = run_sweep(spec_path, out, progress=False)
    assert (summary.done, summary.failed, summary.skipped) == (6, 0, 0)
    write_report(out, out / "report")
    return out


def test_plan_has_six_cells(spec_path, capsys):
    assert len(plan(load_spec(spec_path)).cells) == 6
    assert kvpress_main(["sweep", "plan", str(spec_path), "--count"]) == 0
    assert capsys.readouterr().out.strip().endswith("6 cells")


def test_store_layout_and_record(uninterrupted, spec_path):
    store = ResultStore.open(uninterrupted)
    assert store.kvpress_version == __import__("kvpress").__version__
    records = list(store.records())
    assert len(records) == 6 and not store.errors()
    by_policy = {r["policy"]: r for r in records}
    assert set(by_policy) == {"none", "snapkv(compression_ratio=0.25)", "snapkv(compression_ratio=0.5)",
                              "streaming_llm(window=64)", "kvquant(bits=2)",
                              "snapkv(compression_ratio=0.5, window=8) | kvquant(bits=4)"}
    full = by_policy["none"]
    assert full["kv_fraction"] == pytest.approx(1.0) and full["kv_bytes"] == full["full_kv_bytes"]
    for r in records:
        assert r["n_samples"] == 2 and len(r["samples"]) == 2 and 0 <= r["score"] <= 100
        assert r["prefill_seconds"] > 0 and r["decode_seconds"] >= 0
        assert r["environment"]["kvpress"] and r["config"]["model"]["kind"] == "local"
        assert {"prediction", "gold", "kv_bytes", "full_kv_bytes"} <= set(r["samples"][0])
    assert 0.72 < by_policy["snapkv(compression_ratio=0.25)"]["kv_fraction"] < 0.78
    assert 0.47 < by_policy["snapkv(compression_ratio=0.5)"]["kv_fraction"] < 0.53
    assert by_policy["kvquant(bits=2)"]["kv_fraction"] < 0.6
    run = [json.loads(line) for line in (uninterrupted / "runs.jsonl").read_text().splitlines()]
    assert run[-1]["done"] == 6
    report = (uninterrupted / "report" / "report.md").read_text()
    assert "snapkv(compression_ratio=0.5, window=8) \\| kvquant(bits=4)" in report
    for name in ("scores.csv", "times.csv", "score_vs_ratio.png", "score_vs_bytes.png", "heatmap_niah_single_noise.png"):
        assert (uninterrupted / "report" / name).stat().st_size > 0


def test_second_run_skips_everything(uninterrupted, spec_path):
    before = snapshot(uninterrupted / "cells")
    summary = run_sweep(spec_path, uninterrupted, progress=False)
    assert (summary.done, summary.skipped, summary.ran) == (0, 6, [])
    assert snapshot(uninterrupted / "cells") == before


def test_ctrl_c_after_two_cells_then_resume_runs_exactly_the_other_four(spec_path, uninterrupted, tmp_path):
    out = tmp_path / "store"
    seen = []

    def interrupt_after_two(outcome):
        seen.append(outcome["key"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec_path, out, progress=False, on_outcome=interrupt_after_two)
    stored = ResultStore.open(out).finished_keys()
    assert stored == set(seen)
    before = snapshot(out / "cells")
    summary = run_sweep(spec_path, out, progress=False)
    all_keys = {c.key for c in plan(load_spec(spec_path)).cells}
    assert set(summary.ran) == all_keys - stored and len(summary.ran) == 4 and summary.skipped == 2
    assert {k: v for k, v in snapshot(out / "cells").items() if k in before} == before  # first two untouched
    assert stable_records(out) == stable_records(uninterrupted)


def test_killed_process_resumes_and_reports_like_an_uninterrupted_run(spec_path, uninterrupted, tmp_path):
    """SIGKILL the `kvpress sweep run` process once 2 cells are stored; resume; exactly the missing cells run and
    the report (times aside) equals the uninterrupted run's."""
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kvpress.cli", "sweep", "run", str(spec_path), "--out", str(out),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "cells").glob("*.json"))) >= 2 if (out / "cells").is_dir() else False:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    stored = ResultStore.open(out).finished_keys()
    assert 2 <= len(stored) < 6
    for path in (out / "cells").glob("*.json"):  # a record's name appears only with its whole content
        assert json.loads(path.read_text())["key"] == path.stem
    before = snapshot(out / "cells")
    summary = run_sweep(spec_path, out, progress=False)
    all_keys = {c.key for c in plan(load_spec(spec_path)).cells}
    assert set(summary.ran) == all_keys - stored and summary.skipped == len(stored)
    assert {k: v for k, v in snapshot(out / "cells").items() if k in before} == before
    assert not list((out / "cells").glob(".*.tmp"))  # the resume removed the killed run's temporary files
    write_report(out, out / "report")
    assert report_without_times(out / "report" / "report.md") == report_without_times(
        uninterrupted / "report" / "report.md")
    assert (out / "report" / "scores.csv").read_text() == (uninterrupted / "report" / "scores.csv").read_text()


class _Explodes(Policy):
    name = "explodes_test"

    def select(self, ctx):
        raise RuntimeError("boom at layer %d" % ctx.layer_idx)


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(model_dir, tmp_path):
    register_policy("explodes_test", _Explodes)
    try:
        spec = write_spec(tmp_path / "s.toml", model_dir, """
models = ["{model}"]
tasks = ["niah_single_noise"]
policies = ["snapkv", "explodes_test"]
ratios = [0.5]
lengths = [600]
samples = 1
[task.niah_single_noise]
max_new_tokens = 2
""")
        out = tmp_path / "store"
        summary = run_sweep(spec, out, progress=False)
        assert (summary.done, summary.failed) == (2, 1)
        store = ResultStore.open(out)
        (error,) = store.errors()
        assert "RuntimeError: boom at layer" in error["error"] and "explodes_test" in error["cell"]
        assert "Traceback" in error["traceback"]
        before = snapshot(out / "cells")
        again = run_sweep(spec, out, progress=False)  # failed cells are retried, finished ones are not
        assert (again.done, again.failed, again.skipped) == (0, 1, 2)
        assert snapshot(out / "cells") == before and len(list((out / "errors").glob("*.json"))) == 2
        assert kvpress_main(["sweep", "run", str(spec), "--out", str(out), "--no-progress"]) == 1
        files = write_report(out, out / "report")
        assert "## Failed cells" in files[-1].read_text()
    finally:
        _REGISTRY.pop("explodes_test")


def test_store_of_another_kvpress_version_is_refused_untouched(spec_path, uninterrupted, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(uninterrupted, old)
    manifest = json.loads((old / "store.json").read_text())
    (old / "store.json").write_text(json.dumps({**manifest, "kvpress_version": "0.0.1"}))
    before = snapshot(old)
    with pytest.raises(StoreError, match=r"results of kvpress 0.0.1, this is kvpress .*new --out"):
        run_sweep(spec_path, old, progress=False)
    assert kvpress_main(["sweep", "run", str(spec_path), "--out", str(old), "--no-progress"]) == 2
    assert "kvpress sweep: error:" in capsys.readouterr().err
    assert snapshot(old) == before
    write_report(old, tmp_path / "report")  # reading an older store is fine


def test_bad_input_leaves_the_store_untouched(spec_path, uninterrupted, tmp_path, capsys):
    before = snapshot(uninterrupted)
    for argv, message in [
        (["--policies", "snapkv(windw=3)"], "has no parameter 'windw'"),
        (["--tasks", "needle"], "unknown task 'needle'"),
        (["--models", str(tmp_path / "missing-model")], "unknown model"),
        (["--backend", "ray", "--ray-address", "127.0.0.1:9"], "cannot reach the Ray cluster at '127.0.0.1:9'"),
    ]:
        code = kvpress_main(["sweep", "run", str(spec_path), "--out", str(uninterrupted), "--no-progress", *argv])
        assert code == 2 and message in capsys.readouterr().err, argv
    assert snapshot(uninterrupted) == before
    (tmp_path / "not-a-store").mkdir()
    (tmp_path / "not-a-store" / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="not a kvpress sweep store"):
        run_sweep(spec_path, tmp_path / "not-a-store", progress=False)
    assert os.listdir(tmp_path / "not-a-store") == ["precious.txt"]


def test_cli_flags_alone_make_a_spec(model_dir, tmp_path, capsys):
    out = tmp_path / "store"
    axes = ["--models", str(model_dir), "--tasks", "vt", "--policies", "streaming_llm", "--ratios", "0.5",
            "--lengths", "900", "--samples", "1", "--task-param", "vt.max_new_tokens=2"]
    code = kvpress_main(["sweep", "run", *axes, "--out", str(out), "--no-progress", "--report"])
    assert code == 0
    assert "2 cells done" in capsys.readouterr().out
    assert (out / "report" / "report.md").is_file()
    assert kvpress_main(["sweep", "plan", *axes, "--out", str(out)]) == 0
    assert "2 cells (2 stored, 0 to run)" in capsys.readouterr().out
    assert kvpress_main(["sweep", "plan", *axes, "--samples", "2", "--out", str(out)]) == 0  # another cell each
    assert "2 cells (0 stored, 2 to run)" in capsys.readouterr().out


def test_lm_eval_and_perplexity_cells(model_dir, tmp_path):
    """The other task kinds: an offline lm-eval task through the kvpress adapter and perplexity through the cache."""
    pytest.importorskip("lm_eval")
    spec = write_spec(tmp_path / "s.toml", model_dir, """
models = ["{model}"]
tasks = ["lm_eval:kvpress_niah_choice", "perplexity"]
policies = ["snapkv"]
ratios = [0.5]
lengths = [256]
samples = 2
[task.perplexity]
chunk_size = 64
""")
    out = tmp_path / "store"
    summary = run_sweep(spec, out, progress=False)
    assert (summary.done, summary.failed) == (4, 0)
    records = {(r["task"], r["policy"]): r for r in ResultStore.open(out).records()}
    choice = records[("lm_eval:kvpress_niah_choice", "snapkv(compression_ratio=0.5)")]
    assert choice["metric"] == "acc" and choice["n_samples"] == 2 and 0 <= choice["score"] <= 100
    full, snap = records[("perplexity", "none")], records[("perplexity", "snapkv(compression_ratio=0.5)")]
    assert full["metric"] == "perplexity" and not full["higher_is_better"]
    assert full["kv_fraction"] == pytest.approx(1.0) and snap["kv_fraction"] < 0.6  # compressed after every chunk
    assert snap["samples"][0]["parameters"]["every_chunk"] is True
    assert snap["score"] > 1 and [s["tokens_scored"] for s in full["samples"]] == [255, 255]
    rows = {(r["task"], r["policy"]): r for r in __import__("kvpress").sweep.load_rows(out)}
    assert rows[("perplexity", "none")]["pct_of_full"] == pytest.approx(100.0)
