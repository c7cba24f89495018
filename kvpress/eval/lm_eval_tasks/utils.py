"""Dataset and scoring functions referenced by the kvpress task YAMLs (``!function utils.<name>``).

Samples come from the synthetic tasks of :mod:`kvpress.eval.tasks` (the same generator, seeds and prompts as
``kvpress eval``), generated at run time, or from the standard library's ``pydoc_data``: nothing is
downloaded. lm-eval calls a task's ``custom_dataset`` with the run's metadata (the model args and
``--metadata``) plus the YAML's ``dataset_kwargs``. Prompts are sized in tokens of the model under test: the
tokenizer named by the ``tokenizer`` or ``pretrained`` model arg (default: the embedded SmolLM2), or a
tokenizer object passed as ``tokenizer`` in the metadata (Python API).

Importing this module also registers the ``kvpress`` lm-eval model, so ``lm_eval run --model kvpress --tasks
<path of a YAML here>`` works with lm-eval's own command line (it loads task files before building the model).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterator
from typing import Any

import datasets

import kvpress.eval.lm_eval_adapter  # noqa: F401  (registers the "kvpress" model with lm-eval)
from kvpress.eval.scoring import score
from kvpress.eval.tasks import Sample, get_task

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_NEEDLE_VALUE = re.compile(r"special magic numbers? for (\S+) is: (\d+)\.")


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str):
    from pathlib import Path

    from transformers import AutoTokenizer

    from kvpress.models import is_embedded, resolve_model_path

    path = resolve_model_path(name)
    return AutoTokenizer.from_pretrained(path, local_files_only=is_embedded(name) or Path(path).is_dir())


def _tokenizer(meta: dict[str, Any]):
    tok = meta.get("tokenizer") or meta.get("pretrained")
    if tok is None or isinstance(tok, str):
        from kvpress.models import DEFAULT_MODEL

        return _load_tokenizer(tok or DEFAULT_MODEL)
    return tok


def _samples(
    task: str = "niah_single_noise",
    length: int = 1024,
    samples: int = 10,
    depths: list[float] | None = None,
    sample_seed: int = 0,
    haystack_file: str | None = None,
    **meta: Any,
) -> Iterator[Sample]:
    """``samples`` prompts of a :mod:`kvpress.eval.tasks` task at ``length`` tokens (prompt + answer budget);
    needle tasks cycle through ``depths``. ``meta``: the run's metadata (names the tokenizer)."""
    generator = get_task(task, haystack_file=haystack_file)
    depths = list(depths) if depths is not None else list(DEFAULT_DEPTHS)
    tokenizer = _tokenizer(meta)
    for index in range(samples):
        depth = depths[index % len(depths)] if generator.uses_depth else None
        yield generator.make_sample(tokenizer, length, seed=sample_seed, index=index, depth=depth)


def synthetic_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """Generative samples of a synthetic task (arguments: see :func:`_samples`)."""
    rows = [
        {
            "input": s.prefix + s.suffix,
            "outputs": s.references,
            "metric": s.metric,
            "length": s.length,
            "depth": s.depth,
            "prompt_tokens": s.prompt_tokens,
        }
        for s in _samples(**kwargs)
    ]
    return {"test": datasets.Dataset.from_list(rows)}


def needle_choice_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """Needle retrieval as multiple choice: the queried key's value among the values of every needle in the
    context (the distractor keys' values). Scored by log-likelihood, i.e. through the adapter's loglikelihood
    path: the prompt is prefilled (and compressed), each choice is scored through the compressed cache.
    Arguments: see :func:`_samples` (default task: ``niah_multikey_prose``)."""
    kwargs.setdefault("task", "niah_multikey_prose")
    rows = []
    for s in _samples(**kwargs):
        answer = s.references[0]
        choices = sorted({value for _, value in _NEEDLE_VALUE.findall(s.prefix)} | {answer})
        if len(choices) < 2:
            raise ValueError(f"{s.task}: a multiple-choice needle task needs distractor needles (several keys)")
        random.Random(f"choices|{s.index}|{s.length}").shuffle(choices)
        rows.append(
            {
                "input": s.prefix + s.suffix,
                "choices": [" " + c for c in choices],
                "label": choices.index(answer),
                "length": s.length,
                "depth": s.depth,
            }
        )
    return {"test": datasets.Dataset.from_list(rows)}


def pydoc_dataset(docs: int = 8, min_chars: int = 2000, max_chars: int = 6000, **meta: Any) -> dict[str, datasets.Dataset]:
    """The first ``docs`` standard-library help topics of at least ``min_chars`` characters, cut to
    ``max_chars``: offline text for ``loglikelihood_rolling`` (perplexity through the cache)."""
    from pydoc_data.topics import topics

    texts = [text[:max_chars] for text in topics.values() if len(text) >= min_chars][:docs]
    return {"test": datasets.Dataset.from_list([{"text": t} for t in texts])}


def process_synthetic_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The task's own metric (RULER's substring match: "all" or "part"), x100."""
    return {"score": 100.0 * score(results[0], doc["outputs"], doc["metric"])}
