"""``run_sweep``: plan, skip what the store has, run the rest on a backend, store every outcome as it arrives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvpress.sweep.backends import make_backend
from kvpress.sweep.cells import Plan, plan, work_units
from kvpress.sweep.spec import SweepSpec, load_spec
from kvpress.sweep.store import ResultStore


@dataclass
class RunSummary:
    out: Path
    planned: int
    skipped: int  # already in the store
    done: int = 0  # finished in this run
    failed: int = 0
    duplicates: int = 0  # finished here but another run had stored them first (kept theirs)
    seconds: float = 0.0
    interrupted: bool = False
    ran: list[str] = field(default_factory=list)  # keys of the cells that ran here (records and errors)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        state = "interrupted" if self.interrupted else "finished"
        return (f"{state}: {self.done} cells done, {self.failed} failed, {self.skipped} skipped (already stored) of "
                f"{self.planned} in {self.seconds:.0f} s; results in {self.out}")


def _progress(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(
        TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
        TextColumn("done {task.fields[done]} · failed {task.fields[failed]} · skipped {task.fields[skipped]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[last]}", markup=False),
        disable=not enabled, transient=False,
    )


def run_sweep(
    spec: SweepSpec | str | Path,
    out: str | Path,
    *,
    backend: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    progress: bool = True,
    on_outcome: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Run every cell of ``spec`` that ``out`` does not hold yet.

    Everything that can be checked without a model is checked before the store is touched: the spec (policies,
    parameters, tasks, models), the backend (Ray installed, cluster reachable) and the store's kvpress version.
    A failing cell is stored as an error entry and the sweep goes on; Ctrl-C stops it with every finished cell
    stored (re-running resumes). ``on_outcome`` is called after each outcome is stored.
    """
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    the_plan: Plan = plan(spec)
    runner = make_backend(backend, device=spec.device, ray_address=ray_address, workers=workers,
                          cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    runner.check()
    store = ResultStore.open(out, create=True, for_writing=True)
    finished = store.finished_keys()
    todo = [c for c in the_plan.cells if c.key not in finished]
    summary = RunSummary(Path(out), len(the_plan.cells), len(the_plan.cells) - len(todo), notes=the_plan.notes)
    started = time.perf_counter()
    by_key = {c.key: c for c in todo}
    try:
        with _progress(progress) as bar:
            task = bar.add_task("sweep", total=len(todo), done=0, failed=0, skipped=summary.skipped, last="")

            def handle(outcome: dict[str, Any]) -> None:
                cell = by_key.get(outcome["key"])
                if outcome["status"] == "ok":
                    if store.write(outcome):
                        summary.done += 1
                    else:
                        summary.duplicates += 1
                else:
                    store.write_error(outcome)
                    summary.failed += 1
                summary.ran.append(outcome["key"])
                label = cell.describe() if cell else outcome["key"]
                bar.update(task, advance=1, done=summary.done, failed=summary.failed,
                           last=("FAILED " if outcome["status"] != "ok" else "") + label[:60])
                if on_outcome is not None:
                    on_outcome(outcome)

            runner.run(work_units(todo, spec.fanout), handle, spec.fanout)
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        summary.seconds = time.perf_counter() - started
        store.log_run({"spec": spec.to_dict(), "source": spec.source, "backend": backend, "planned": summary.planned,
                       "skipped": summary.skipped, "done": summary.done, "failed": summary.failed,
                       "interrupted": summary.interrupted, "seconds": round(summary.seconds, 2)})
    return summary
