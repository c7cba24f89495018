"""Several questions about one context, answered from one compressed cache (``kvpress eval TASK --queries K``).

People ask many questions about the same document. A sample here is one context holding K needles and K
questions, question ``i`` asking for needle ``i``. The context is prefilled and compressed once per configuration,
then the K questions are answered one after another from that compressed cache, in two ways:

* ``clone``: each question from a fresh copy of the compressed context (what loading a saved cache gives);
* ``multi-turn``: one conversation, each question a new user turn after the previous answer, which stays in the
  cache (the policy keeps running on it, as in a chat).

The first forward follows the evaluation mode: ``query-agnostic`` compresses the context alone; ``query-aware``
compresses it with the first question in view (context + question 1 in the first forward), then forgets the
question's tokens, so every question is answered from a context that was compressed for question 1. That is where
a query-aware policy (SnapKV's observation window over question 1) should lose the later questions.

Scores are reported per question index (``q1`` .. ``qK``) so a drop after the first question shows.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

import kvpress
from kvpress.eval.generation import MODES, forward_last, greedy_decode, stop_token_ids
from kvpress.eval.scoring import score
from kvpress.eval.tasks.base import build_prompt, encode_prompt
from kvpress.eval.tasks.niah import NeedleTask

TURNS = ("clone", "multi-turn")
_ANSWER = "\u0000KVPRESS-ANSWER\u0000"


@dataclass
class Question:
    text: str
    answer_prefix: str
    references: list[str]
    suffix_ids: list[int]  # rest of the first user turn + assistant header + answer prefix (clone mode)
    turn_text: str  # the same question as a later turn of a conversation (after an answer)


@dataclass
class MultiSample:
    task: str
    index: int
    seed: int
    length: int
    prefix_ids: list[int]
    questions: list[Question]
    metric: str
    max_new_tokens: int
    haystack_units: int
    needle_depths: list[float] = field(default_factory=list)

    @property
    def context_tokens(self) -> int:
        return len(self.prefix_ids)


def needle_task(task: Any, k: int) -> NeedleTask:
    """A needle task with at least ``k`` keys, each asked once: ``task`` itself, or the same haystack with ``k``
    keys when it has fewer."""
    if not isinstance(task, NeedleTask):
        raise ValueError(f"--queries needs a needle task (niah_*), got {task.name!r}")
    if k < 1:
        raise ValueError(f"--queries must be >= 1, got {k}")
    if task.num_keys >= k and task.num_values == 1 and task.num_queries == 1:
        return task
    return NeedleTask(f"{task.name}_k{k}", f"{k} needles, one asked per question", haystack=task.haystack,
                      num_keys=k, haystack_file=task.haystack_file)  # fmt: skip


def follow_up_text(tokenizer, question: str, answer_prefix: str) -> str:
    """The text that closes an assistant answer and asks ``question`` as the next user turn (chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return f"\n\n{question}\n\n{answer_prefix}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": _ANSWER},
         {"role": "user", "content": question}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    if text.count(_ANSWER) != 1:
        raise ValueError("the chat template did not keep the assistant message intact")
    return text.split(_ANSWER)[1] + answer_prefix


def make_multi_sample(task: NeedleTask, tokenizer, length: int, k: int, seed: int = 0, index: int = 0,
                      depth: float | None = None) -> MultiSample:  # fmt: skip
    """Sample ``index``: the context of ``task.make_sample`` (sized for ``length``) and one question per needle key
    (the first ``k`` keys; key 1 is the one ``task`` would ask, at ``depth``)."""
    sample = task.make_sample(tokenizer, length, seed, index, depth)
    state = task.draw(random.Random(f"{task.name}|{seed}|{length}|{index}|{depth}"), depth)
    rendered = task.render(state, sample.haystack_units)
    questions = []
    for key in list(state.values)[:k]:
        text = f"What is the special magic number for {key} mentioned in the provided text?"
        prefix_text = f"The special magic number for {key} mentioned in the provided text is"
        prefix, suffix = build_prompt(tokenizer, task.instruction, rendered.context, text, prefix_text)
        if prefix != sample.prefix:
            raise AssertionError("the context of a question differs from the sample's")
        _, suffix_ids = encode_prompt(tokenizer, prefix, suffix)
        questions.append(Question(text, prefix_text, list(state.values[key]), suffix_ids,
                                  follow_up_text(tokenizer, text, prefix_text)))  # fmt: skip
    depths = [d for d, _ in state.needles[:k]]
    return MultiSample(task.name, index, seed, length, sample.prefix_ids, questions, sample.metric,
                       sample.max_new_tokens, sample.haystack_units, depths)  # fmt: skip


# ------------------------------------------------------------------------------------------------------- running
@dataclass
class Answer:
    question: int  # 0-based index
    text: str
    score: float
    seconds: float


@torch.no_grad()
def compress_context(model, tokenizer, policy: Any, sample: MultiSample, mode: str):
    """The compressed context cache of ``sample`` under ``policy`` (see the module docstring for ``mode``), and the
    prefill seconds."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    first = list(sample.prefix_ids)
    if mode == "query-aware":
        first += sample.questions[0].suffix_ids
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        if mode == "query-aware" and len(cache.compressed_layers) != len(cache.layers):
            raise NotImplementedError("query-aware multi-question evaluation needs a model without sliding layers")
        t0 = time.perf_counter()
        forward_last(model, first, cache)
        seconds = time.perf_counter() - t0
    if mode == "query-aware":
        cache.truncate(len(sample.prefix_ids))  # forget question 1: the context, compressed with it in view
    return cache, seconds


@torch.no_grad()
def answer_questions(model, tokenizer, policy: Any, cache, sample: MultiSample, turns: str,
                     stop_ids: set[int] | None = None) -> list[Answer]:  # fmt: skip
    """The K answers from a compressed context ``cache`` (``turns``: ``clone`` or ``multi-turn``); the cache is
    left as it was in ``clone`` mode and holds the conversation in ``multi-turn`` mode."""
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")
    stop_ids = stop_ids if stop_ids is not None else stop_token_ids(model, tokenizer)
    out: list[Answer] = []
    pending: list[int] = []  # tokens of the previous answer not yet fed (the last one, when cut at the budget)
    with kvpress.patch(model, policy):
        for i, q in enumerate(sample.questions):
            t0 = time.perf_counter()
            if turns == "clone":
                work, ids = cache.clone(), q.suffix_ids
            else:
                work = cache
                turn = tokenizer(q.turn_text, add_special_tokens=False)["input_ids"]
                ids = q.suffix_ids if i == 0 else pending + turn
            logits = forward_last(model, ids, work)
            tokens = greedy_decode(model, work, logits, sample.max_new_tokens, stop_ids)
            pending = tokens[-1:] if len(tokens) == sample.max_new_tokens else []
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            out.append(Answer(i, text, score(text, q.references, sample.metric), time.perf_counter() - t0))
    return out


def run_multi(model, tokenizer, configs: Sequence[Any], samples: Iterable[MultiSample], mode: str,
              turns: Sequence[str] = TURNS, progress: Any = None) -> list[dict[str, Any]]:  # fmt: skip
    """Records (one per configuration x sample x turns x question) of every configuration on every sample.
    ``configs``: objects with ``label`` and ``build(n_tokens)`` (a policy expression's
    ``PolicyConfig``)."""
    from kvpress.eval.runner import _with_tokenizer

    stop_ids = stop_token_ids(model, tokenizer)
    records = []
    for sample in samples:
        n_first = sample.context_tokens + (len(sample.questions[0].suffix_ids) if mode == "query-aware" else 0)
        for config in configs:
            policy = _with_tokenizer(config.build(n_first), tokenizer)
            cache, prefill_s = compress_context(model, tokenizer, policy, sample, mode)
            kv_bytes = cache.nbytes()
            for i, how in enumerate(turns):
                base = cache if i == len(turns) - 1 else cache.clone()
                for answer in answer_questions(model, tokenizer, policy, base, sample, how, stop_ids):
                    records.append({
                        "task": sample.task, "index": sample.index, "length": sample.length,
                        "context_tokens": sample.context_tokens, "config": config.label, "mode": mode,
                        "turns": how, "question": answer.question + 1, "prediction": answer.text,
                        "references": sample.questions[answer.question].references, "score": answer.score,
                        "needle_depth": sample.needle_depths[answer.question], "kv_bytes": kv_bytes,
                        "prefill_seconds": prefill_s, "answer_seconds": answer.seconds,
                    })  # fmt: skip
            if progress is not None:
                progress(sample, config)
    return records


def per_question_table(records: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Mean score (x100) per configuration x turns x question index, with the sample count."""
    groups: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for r in records:
        groups.setdefault((r["config"], r["mode"], r["turns"]), {}).setdefault(r["question"], []).append(r["score"])
    rows = []
    for (config, mode, turns), by_q in groups.items():
        means = [100.0 * sum(by_q.get(q, [])) / max(1, len(by_q.get(q, []))) for q in range(1, k + 1)]
        rows.append({"config": config, "mode": mode, "turns": turns, "n": len(by_q.get(1, [])),
                     **{f"q{q}": m for q, m in zip(range(1, k + 1), means)}, "mean": sum(means) / k})  # fmt: skip
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], k: int) -> str:
    questions = " | ".join(f"q{q}" for q in range(1, k + 1))
    head = f"| configuration | first forward | answers | n | {questions} | mean |"
    lines = [head, "|---|---|---|---:|" + "---:|" * (k + 1)]
    for r in rows:
        cells = " | ".join(f"{r[f'q{q}']:.1f}" for q in range(1, k + 1))
        label = r["config"].replace("|", "\\|")  # a pipeline's `|` inside a markdown table cell
        lines.append(f"| `{label}` | {r['mode']} | {r['turns']} | {r['n']} | {cells} | {r['mean']:.1f} |")
    return "\n".join(lines)


__all__ = ["MultiSample", "Question", "Answer", "TURNS", "needle_task", "make_multi_sample", "compress_context",
           "answer_questions", "run_multi", "per_question_table", "markdown_table"]
