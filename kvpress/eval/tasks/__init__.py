"""The synthetic task registry: ``get_task(name)``, ``available_tasks()``, ``TASKS``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kvpress.eval.tasks.base import Rendered, Sample, Task, build_prompt
from kvpress.eval.tasks.common_words import CommonWords
from kvpress.eval.tasks.frequent_words import FrequentWords
from kvpress.eval.tasks.niah import NeedleTask
from kvpress.eval.tasks.variable_tracking import VariableTracking


def _niah(name: str, description: str, **kw) -> Callable[..., Task]:
    def factory(haystack_file: str | None = None) -> Task:
        return NeedleTask(name, description, haystack_file=haystack_file, **kw)

    return factory


# name -> factory(haystack_file=None). Prose tasks read ``haystack_file`` (default: Python's doc topics).
TASKS: dict[str, Callable[..., Task]] = {
    "niah_single_noise": _niah("niah_single_noise", "one needle in a repeated noise line", haystack="noise"),
    "niah_single_prose": _niah("niah_single_prose", "one needle in real prose", haystack="prose"),
    "niah_single_needles": _niah(
        "niah_single_needles", "one queried needle among distractor needles only", haystack="needles"
    ),
    "niah_multikey_prose": _niah(
        "niah_multikey_prose", "4 needles with different keys in prose, one queried", haystack="prose", num_keys=4
    ),
    "niah_multivalue_prose": _niah(
        "niah_multivalue_prose", "4 values of one key in prose, all required", haystack="prose", num_values=4
    ),
    "niah_multiquery_prose": _niah(
        "niah_multiquery_prose", "4 needles in prose, all 4 keys queried", haystack="prose", num_keys=4,
        num_queries=4,
    ),
    "vt": lambda haystack_file=None: VariableTracking("vt"),
    "cwe": lambda haystack_file=None: CommonWords("cwe"),
    "fwe": lambda haystack_file=None: FrequentWords("fwe"),
}


def available_tasks() -> list[str]:
    return list(TASKS)


def get_task(name: str, haystack_file: str | None = None) -> Task:
    """Build a task by name; ``haystack_file`` replaces the prose of prose-haystack tasks."""
    key = name.lower().replace("-", "_")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    if haystack_file is not None and not Path(haystack_file).is_file():
        raise FileNotFoundError(f"haystack_file {str(haystack_file)!r} does not exist")
    return TASKS[key](haystack_file=haystack_file)


__all__ = [
    "Task", "Sample", "Rendered", "build_prompt", "NeedleTask", "VariableTracking", "CommonWords", "FrequentWords",
    "TASKS", "available_tasks", "get_task",
]
