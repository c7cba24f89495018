"""Offline lm-eval task definitions for kvpress (YAML configs plus the dataset functions in ``utils``).

Every sample is generated locally at run time by the synthetic tasks of :mod:`kvpress.eval.tasks` (or read
from the standard library's ``pydoc_data``): nothing is downloaded. Point lm-eval at this directory with
``--include_path`` or use :func:`kvpress.eval.lm_eval_adapter.kvpress_task_manager`.
"""
