"""Evaluation of KV-cache compression: RULER-style synthetic tasks, the needle grid, results and plots.

    from kvpress.eval import get_task, evaluate, sweep
"""

from kvpress.eval.runner import PolicySpec, evaluate, sweep
from kvpress.eval.scoring import string_match_all, string_match_part
from kvpress.eval.tasks import available_tasks, get_task

__all__ = [
    "PolicySpec", "evaluate", "sweep", "string_match_all", "string_match_part", "available_tasks", "get_task",
]
