"""Resumable policy sweeps: a grid of models x policies x parameters x tasks x lengths x seeds, one JSON record per
finished cell, run in this process or on Ray, reported as tables and plots.

    from kvpress.sweep import SweepSpec, load_spec, plan, run_sweep, write_report
    spec = SweepSpec.from_dict({"tasks": ["niah_single_noise"], "policies": ["snapkv"], "ratios": [0.25, 0.5]})
    print(len(plan(spec).cells))
    run_sweep(spec, "runs/my-sweep")               # again later: only the missing cells run
    write_report("runs/my-sweep", "runs/my-sweep/report")

Command line: ``kvpress sweep plan|run|report`` (see kvpress/sweep/README.md).
"""

from kvpress.sweep.backends import BackendError
from kvpress.sweep.cells import Cell, Plan, plan
from kvpress.policies.expr import PolicyConfig, expand
from kvpress.eval.report import pareto_front, plot_score_vs_bytes, plot_score_vs_ratio
from kvpress.sweep.report import aggregate, load_records, load_rows, plot_needle_heatmaps, write_report
from kvpress.sweep.runner import RunSummary, run_sweep
from kvpress.sweep.spec import SpecError, SweepSpec, load_spec
from kvpress.sweep.store import ResultStore, StoreError
from kvpress.sweep.tasks import available_sweep_tasks

__all__ = [
    "SweepSpec", "load_spec", "plan", "Plan", "Cell", "PolicyConfig", "expand", "run_sweep", "RunSummary",
    "ResultStore", "write_report", "load_rows", "load_records", "aggregate", "pareto_front", "plot_score_vs_ratio",
    "plot_score_vs_bytes", "plot_needle_heatmaps", "available_sweep_tasks", "SpecError", "StoreError", "BackendError",
]
