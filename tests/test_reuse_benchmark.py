"""benchmarks/reuse.py's bookkeeping (no model): K-question records from another run are added for new contexts
only, the per-question table is redone, and a run of another task or length is refused."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def reuse_module():
    return load_benchmark("reuse")


def _result(indices, score, length=4096):
    records = [{"config": "none", "mode": "query-agnostic", "turns": "clone", "index": i, "question": q,
                "score": score} for i in indices for q in (1, 2)]  # fmt: skip
    return {"model": "m", "task": "t", "length": length, "queries": 2, "context_tokens": 100, "threads": 1,
            "reps": 1, "text_bytes": 10, "ttft": [], "accuracy": records}  # fmt: skip


def test_append_adds_new_contexts_only_and_redoes_the_table(reuse_module, tmp_path, capsys):
    out, extra = tmp_path / "reuse.json", tmp_path / "more.json"
    out.write_text(json.dumps(_result([0, 1], 1.0)))
    extra.write_text(json.dumps(_result([1, 2, 3], 0.0)))  # context 1 is held already: its records are skipped
    assert reuse_module.main(["--append", str(extra), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sorted({r["index"] for r in result["accuracy"]}) == [0, 1, 2, 3] and len(result["accuracy"]) == 8
    (row,) = result["per_question"]
    assert row["n"] == 4 and row["q1"] == pytest.approx(50.0) and row["mean"] == pytest.approx(50.0)
    assert result["appended"] == [{"from": str(extra), "records": 4}]
    assert "added 4 records (2 already held)" in capsys.readouterr().out


def test_append_refuses_another_length(reuse_module, tmp_path, capsys):
    out, extra = tmp_path / "reuse.json", tmp_path / "more.json"
    out.write_text(json.dumps(_result([0], 1.0)))
    extra.write_text(json.dumps(_result([1], 1.0, length=600)))
    assert reuse_module.main(["--append", str(extra), "--out", str(out)]) == 2
    assert "length differs" in capsys.readouterr().err


def test_bad_counts_are_refused(reuse_module, capsys):
    for argv, word in ((["--samples", "0"], "--samples"), (["--first-sample", "-1"], "--first-sample")):
        with pytest.raises(SystemExit) as info:
            reuse_module.main(argv)
        assert info.value.code == 2 and word in capsys.readouterr().err
