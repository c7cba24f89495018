"""Evaluation of KV-cache compression: RULER-style synthetic tasks, the needle grid, results and plots.

    from kvpress.eval import get_task, evaluate, configurations
    evaluate(model, tokenizer, get_task("vt"), configurations(["snapkv"], [0.5]), lengths=[1024], samples=5)

Policies are configured as policy expressions (:mod:`kvpress.policies.expr`), the same type the sweep uses.
"""

from kvpress.eval.runner import configurations, evaluate
from kvpress.eval.scoring import string_match_all, string_match_part
from kvpress.eval.tasks import available_tasks, get_task
from kvpress.policies.expr import PolicyConfig, parse_config

__all__ = [
    "PolicyConfig", "parse_config", "configurations", "evaluate", "string_match_all", "string_match_part",
    "available_tasks", "get_task",
]
