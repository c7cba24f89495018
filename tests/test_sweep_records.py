"""Provenance: a store's records exported as JSON lines rebuild its report byte for byte without a model; the export
holds no absolute path of the machine; failed cells travel along."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sweep_fixtures import save_tiny_model, write_spec

from kvpress.cli import main as kvpress_main
from kvpress.sweep import ResultStore, run_sweep, write_report
from kvpress.sweep.records import RecordsFile, export_records
from kvpress.sweep.store import StoreError

SPEC = """
name = "records"
models = ["{model}"]
tasks = ["niah_single_noise", "perplexity"]
policies = ["snapkv", "streaming_llm", "kvquant(bits=2)"]
ratios = [0.5]
lengths = [700]
samples = 2
[task.niah_single_noise]
max_new_tokens = 2
[task.perplexity]
chunk_size = 128
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small sweep (needle and perplexity, eviction and quantization) run in a working directory of its own, the
    model named by its path there; one failed cell added by hand."""
    root = tmp_path_factory.mktemp("records")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        save_tiny_model(root / "tiny")
        spec = write_spec(root / "spec.toml", Path("tiny"), SPEC)
        summary = run_sweep(spec, root / "store", progress=False)
        assert (summary.done, summary.failed) == (8, 0)
        ResultStore.open(root / "store").write_error({
            "key": "f" * 20, "status": "error", "cell": "snapkv on nothing [tiny]", "error": "ValueError: made up",
            "traceback": f'File "{root}/x.py"', "config": {"model": {"name": f"{root}/tiny"}}})
    return root


def test_records_rebuild_the_report_byte_for_byte(store, monkeypatch):
    monkeypatch.chdir(store)
    export_records(store / "store", store / "records.jsonl")
    kw = dict(title="t", intro="intro text")
    from_store = write_report(store / "store", store / "a", markdown=store / "a" / "LEADERBOARD.md", **kw)
    from_records = write_report(store / "records.jsonl", store / "b", markdown=store / "b" / "LEADERBOARD.md", **kw)
    assert [p.name for p in from_store] == [p.name for p in from_records]
    for name in ("LEADERBOARD.md", "scores.csv", "times.csv"):
        assert (store / "a" / name).read_bytes() == (store / "b" / name).read_bytes(), name
    report = (store / "b" / "LEADERBOARD.md").read_text()
    assert "Failed cells: 1" in report and "streaming_llm(compression_ratio=0.5)" in report


def test_the_export_is_compact_sorted_and_portable(store, monkeypatch):
    monkeypatch.chdir(store)
    path = export_records(store / "store", store / "records.jsonl")
    lines = path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 9 and [e["key"] for e in entries] == sorted(e["key"] for e in entries)
    assert lines == [json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False) for e in entries]
    raw = "".join(p.read_text() for p in (store / "store" / "errors").glob("*.json"))
    assert str(store) in raw and str(store) not in path.read_text()  # no absolute path of this machine
    assert entries[-1]["config"]["model"]["name"] == "tiny"
    assert "traceback" not in entries[-1] and entries[-1]["status"] == "error"
    records = RecordsFile(path)
    assert len(list(records.records())) == 8 and [e["key"] for e in records.errors()] == ["f" * 20]
    assert {r["model"] for r in records.records()} == {"tiny"}


def test_cli_export_then_report(store, monkeypatch, capsys):
    monkeypatch.chdir(store)
    assert kvpress_main(["sweep", "export", "store", "--out", "cli.jsonl"]) == 0
    assert kvpress_main(["sweep", "report", "cli.jsonl", "--out", "cli_report"]) == 0
    assert (store / "cli_report" / "report.md").is_file()
    (store / "bad.jsonl").write_text('{"no": "key"}\n')
    with pytest.raises(StoreError, match="not a cell record"):
        RecordsFile(store / "bad.jsonl")
    assert kvpress_main(["sweep", "report", "bad.jsonl"]) == 2
    assert "not a cell record" in capsys.readouterr().err


def test_no_committed_file_names_a_path_of_the_machine():
    """Result files, reports and records hold repository-relative paths only."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    pattern = re.compile(r"(?<![\w.])/(home|root|work|tmp|Users)/[\w.-]+")
    found = []
    for name in files.split():
        path = root / name
        if path.suffix in (".json", ".jsonl", ".md", ".csv", ".toml", ".py", ".txt") and path.is_file():
            for match in pattern.finditer(path.read_text(encoding="utf-8", errors="replace")):
                found.append(f"{name}: {match.group(0)}")
    assert not found, found[:10]


SECOND_MODEL_SPEC = """
name = "records-second-model"
models = ["{model}"]
tasks = ["niah_single_noise"]
policies = ["knorm"]
ratios = [0.5]
lengths = [700]
samples = 1
[task.niah_single_noise]
max_new_tokens = 2
"""


def test_two_specs_two_models_one_store_one_report(store, monkeypatch, capsys):
    """A second spec on another model runs into the same store (as the leaderboard's Gemma grid does); the export
    takes the cells of the specs it is given, and the report has a summary and plots per model."""
    monkeypatch.chdir(store)
    save_tiny_model(store / "other")
    spec_a = store / "spec.toml"
    spec_b = write_spec(store / "second.toml", Path("other"), SECOND_MODEL_SPEC)
    summary = run_sweep(spec_b, store / "store", progress=False)
    assert summary.done == 2  # knorm(0.5) and the uncompressed run
    assert kvpress_main(["sweep", "export", "store", "--spec", str(spec_b), "--out", "b_only.jsonl"]) == 0
    assert {r["model"] for r in RecordsFile(store / "b_only.jsonl").records()} == {"other"}
    assert kvpress_main(["sweep", "export", "store", "--spec", str(spec_a), str(spec_b), "--out", "both.jsonl"]) == 0
    records = list(RecordsFile(store / "both.jsonl").records())
    assert {r["model"] for r in records} == {"tiny", "other"} and len(records) == 10
    capsys.readouterr()
    write_report(store / "both.jsonl", store / "two", title="two models")
    report = (store / "two" / "report.md").read_text()
    summary_text = report.split("## Summary", 1)[1].split("## Per task", 1)[0]
    # the model with more cells first, each with its own headline table
    assert summary_text.index("### tiny") < summary_text.index("### other")
    assert "`knorm`" in summary_text.split("### other", 1)[1] and "`knorm`" not in summary_text.split("### other")[0]
    for name in ("score_vs_ratio_tiny.png", "score_vs_ratio_other.png", "heatmap_niah_single_noise_other.png"):
        assert (store / "two" / name).is_file(), name
    assert "| model | task | policy |" in report


def test_the_committed_leaderboard_is_rebuilt_byte_for_byte_from_its_committed_records(tmp_path):
    """`make leaderboard-report` from benchmarks/leaderboard/records.jsonl alone (no model run) gives the committed
    LEADERBOARD.md, scores and times byte for byte, and the README's block is the one committed."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    records = root / "benchmarks" / "leaderboard" / "records.jsonl"
    assert records.is_file(), "the leaderboard's cell records are committed next to its report"
    work = tmp_path / "benchmarks"
    work.mkdir()
    readme = tmp_path / "README.md"
    shutil.copy(root / "README.md", readme)
    make = (root / "Makefile").read_text(encoding="utf-8")
    title = re.search(r'--title "([^"]+)"', make.split("leaderboard-report:", 1)[1]).group(1)
    write_report(records, work / "leaderboard", markdown=work / "LEADERBOARD.md", title=title,
                 intro=(root / "benchmarks" / "leaderboard_intro.md").read_text(encoding="utf-8"), readme=readme)
    assert (work / "LEADERBOARD.md").read_bytes() == (root / "benchmarks" / "LEADERBOARD.md").read_bytes()
    for name in ("scores.csv", "times.csv"):
        assert (work / "leaderboard" / name).read_bytes() == (root / "benchmarks" / "leaderboard" / name).read_bytes()
    assert readme.read_bytes() == (root / "README.md").read_bytes()
    tracked = subprocess.run(["git", "ls-files", "benchmarks/leaderboard"], cwd=root, capture_output=True, text=True)
    if tracked.returncode == 0:  # every committed figure is one the report writes
        figures = {Path(f).name for f in tracked.stdout.split() if f.endswith(".png")}
        assert figures == {p.name for p in (work / "leaderboard").glob("*.png")}
