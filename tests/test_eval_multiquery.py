"""Multi-question evaluation (kvpress/eval/multiquery.py) on a tiny model with a byte tokenizer."""

import pytest
import torch
from eval_fixtures import byte_tokenizer, tiny_llama

from kvpress.eval.generation import run_direct
from kvpress.eval.multiquery import (
    answer_questions,
    compress_context,
    make_multi_sample,
    markdown_table,
    needle_task,
    per_question_table,
    run_multi,
)
from kvpress.eval.tasks import get_task
from kvpress.policies import SnapKV
from kvpress.policies.expr import expand


@pytest.fixture(scope="module")
def setup():
    tok = byte_tokenizer()
    model = tiny_llama()
    task = needle_task(get_task("niah_multikey_prose"), 3)
    return model, tok, task, make_multi_sample(task, tok, 700, 3, seed=1)


def test_k_questions_share_one_context_and_ask_each_needle(setup):
    _, tok, task, sample = setup
    assert task.num_keys == 4 and len(sample.questions) == 3
    context = tok.decode(sample.prefix_ids)
    refs = [q.references[0] for q in sample.questions]
    assert len(set(refs)) == 3 and all(r in context for r in refs)
    for q in sample.questions:
        assert q.references[0] not in tok.decode(q.suffix_ids)
        assert q.text in tok.decode(q.suffix_ids) and q.text in q.turn_text
    assert needle_task(get_task("niah_multikey_prose"), 6).num_keys == 6
    with pytest.raises(ValueError, match="needs a needle task"):
        needle_task(get_task("vt"), 2)


@torch.no_grad()
def test_clone_answers_equal_single_question_runs_and_leave_the_cache_alone(setup):
    model, tok, _, sample = setup
    policy = SnapKV(compression_ratio=0.5)
    cache, _ = compress_context(model, tok, policy, sample, "query-agnostic")
    before = (cache.get_seq_length(), cache.nbytes())
    answers = answer_questions(model, tok, policy, cache, sample, "clone")
    assert (cache.get_seq_length(), cache.nbytes()) == before
    for q, answer in zip(sample.questions, answers):
        single = run_direct(model, tok, SnapKV(compression_ratio=0.5), sample.prefix_ids, q.suffix_ids,
                            "query-agnostic", sample.max_new_tokens)  # fmt: skip
        assert answer.text == single.text


@torch.no_grad()
def test_multi_turn_keeps_the_conversation_and_query_aware_forgets_question_one(setup):
    model, tok, _, sample = setup
    cache, _ = compress_context(model, tok, None, sample, "query-agnostic")
    answer_questions(model, tok, None, cache, sample, "multi-turn")
    assert cache.get_seq_length() > sample.context_tokens + sum(len(q.suffix_ids) for q in sample.questions[:1])
    policy = SnapKV(compression_ratio=0.5)
    aware, _ = compress_context(model, tok, policy, sample, "query-aware")
    assert aware.get_seq_length() == sample.context_tokens
    held = aware.layers[0].storage.lengths()
    assert int(held.max()) < sample.context_tokens  # compressed with question 1 in view, question 1 forgotten
    with pytest.raises(ValueError, match="turns must be one of"):
        answer_questions(model, tok, None, aware, sample, "all-at-once")


def test_records_and_per_question_table(setup):
    model, tok, _, sample = setup
    configs = expand("none") + expand("snapkv", [0.5])
    records = run_multi(model, tok, configs, [sample], "query-agnostic")
    assert len(records) == 2 * 2 * 3  # configurations x turns x questions
    rows = per_question_table(records, 3)
    assert {(r["config"], r["turns"]) for r in rows} == {(c.label, t) for c in configs for t in ("clone", "multi-turn")}
    assert all(r["n"] == 1 and set(r) >= {"q1", "q2", "q3", "mean"} for r in rows)
    table = markdown_table(rows, 3)
    assert "| q1 | q2 | q3 | mean |" in table and "snapkv" in table


def test_eval_cli_queries_writes_a_per_question_table(setup, tmp_path, capsys):
    import json

    from kvpress.cli import main

    model, tok, _, _ = setup
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    assert main(["eval", "niah_multikey_prose", "--queries", "2", "--model", str(model_dir), "--lengths", "1200",
                 "--samples", "1", "--policy", "snapkv | kvquant(bits=4, group_size=8)", "--compression-ratio", "0.5",
                 "--turns", "clone", "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads((out / "metrics.json").read_text())
    assert [(r["config"], r["turns"]) for r in rows] == [
        ("none", "clone"), ("snapkv(compression_ratio=0.5) | kvquant(bits=4, group_size=8)", "clone")]
    assert "| q1 | q2 | mean |" in (out / "summary.md").read_text()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * 2
    capsys.readouterr()
    assert main(["eval", "vt", "--queries", "2", "--model", str(model_dir), "--out", str(tmp_path / "x")]) == 2
    assert "needs a needle task" in capsys.readouterr().err  # one error line, exit 2 (kvpress.cli)
