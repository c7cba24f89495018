"""``kvpress sweep``: plan, run (resumable; local or Ray) and report policy sweeps.

    kvpress sweep plan SPEC.toml                       # the cells and their count; bad specs fail here
    kvpress sweep run SPEC.toml --out runs/my-sweep    # again after a crash or Ctrl-C: only missing cells run
    kvpress sweep run SPEC.toml --out DIR --backend ray [--ray-address HOST:PORT] [--workers N]
    kvpress sweep report runs/my-sweep                 # tables (Markdown, CSV) and plots into DIR/report/
    kvpress sweep export runs/my-sweep --out records.jsonl   # the records as JSON lines (commit them with a report)
    kvpress sweep report records.jsonl --out DIR       # the same report, rebuilt from the records (no model)
    kvpress sweep plan --tasks niah_single_noise --policies snapkv "kvquant(bits=[2,4])" --ratios 0.25 0.5

Every axis of the spec file is also a flag (a flag replaces the file's value); see kvpress/sweep/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

AXIS_FLAGS = {
    # flag: (spec key, type, nargs)
    "models": ("models", str, "+"), "tasks": ("tasks", str, "+"), "policies": ("policies", str, "+"),
    "ratios": ("ratios", float, "*"), "lengths": ("lengths", int, "+"), "depths": ("depths", float, "*"),
    "seeds": ("seeds", int, "+"), "modes": ("modes", str, "+"),
}


def _task_param(text: str) -> tuple[str, str, Any]:
    key, sep, raw = text.partition("=")
    task, dot, name = key.rpartition(".")
    if not sep or not dot or not task or not name:
        raise argparse.ArgumentTypeError(f"expected TASK.KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return task, name, value


def _add_axes(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="TOML spec file (optional when --tasks and --policies are given)")
    g = p.add_argument_group("axes (replace the spec file's values)")
    for flag, (_, kind, nargs) in AXIS_FLAGS.items():
        g.add_argument(f"--{flag}", type=kind, nargs=nargs, default=None)
    g.add_argument("--samples", type=int, default=None, help="samples per cell")
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="include the uncompressed run")
    g.add_argument("--task-param", type=_task_param, action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="a task parameter, e.g. perplexity.chunk_size=128 (repeatable)")
    g.add_argument("--name", default=None)


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="resumable policy sweeps (local or Ray), result store, reports",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="sweep_command", metavar="{plan,run,report,export}")
    plan_p = sub.add_parser("plan", help="print the cells of a spec and their count (checks the spec)")
    _add_axes(plan_p)
    plan_p.add_argument("--out", default=None, help="a results directory: mark the cells it already holds")
    plan_p.add_argument("--count", action="store_true", help="print the count only")
    plan_p.set_defaults(func=cmd_plan)

    run_p = sub.add_parser("run", help="run the cells a results directory does not hold yet")
    _add_axes(run_p)
    run_p.add_argument("--out", required=True, help="results directory (created; resumed if it exists)")
    run_p.add_argument("--backend", choices=("local", "ray"), default="local")
    run_p.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (HOST:PORT, ray://HOST:PORT or auto); default: start a local Ray")
    run_p.add_argument("--workers", type=int, default=None, help="Ray actors (default: CPUs / --cpus-per-worker)")
    run_p.add_argument("--cpus-per-worker", type=float, default=1)
    run_p.add_argument("--gpus-per-worker", type=float, default=0)
    run_p.add_argument("--no-progress", action="store_true")
    run_p.add_argument("--report", action="store_true", help="write the report into OUT/report afterwards")
    run_p.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="Markdown/CSV tables and plots of a results directory or records file")
    rep.add_argument("dir", help="results directory, or a records file written by `kvpress sweep export` (no model "
                                 "runs: the report is rebuilt from the records)")
    rep.add_argument("--out", default=None, help="where tables and plots go (default DIR/report)")
    rep.add_argument("--markdown", default=None, help="write the Markdown here instead (image links relative)")
    rep.add_argument("--spec", nargs="+", default=None, metavar="SPEC",
                     help="report only the cells of these specs (others in DIR are ignored)")
    rep.add_argument("--title", default=None)
    rep.add_argument("--intro", default=None, help="a file whose text goes under the title")
    rep.add_argument("--readme", default=None, help="update the leaderboard block of this README with the summary")
    rep.set_defaults(func=cmd_report)

    exp = sub.add_parser("export", help="the records of a results directory as compact JSON lines (provenance)")
    exp.add_argument("dir", help="results directory")
    exp.add_argument("--out", required=True, help="records file to write (JSON lines)")
    exp.add_argument("--spec", nargs="+", default=None, metavar="SPEC",
                     help="export only the cells of these specs (one store can hold several, e.g. one per model)")
    exp.set_defaults(func=cmd_export)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def spec_from_args(args: argparse.Namespace):
    from kvpress.sweep.spec import SweepSpec, load_spec, tomllib
    from kvpress.sweep.spec import SpecError

    data: dict[str, Any] = {}
    source = None
    if args.spec:
        load_spec(args.spec)  # validates the file alone first, so its errors name its keys
        from pathlib import Path

        data = tomllib.loads(Path(args.spec).read_text(encoding="utf-8"))
        source = args.spec
    for flag, (key, _, _) in AXIS_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    for key in ("samples", "baseline", "name"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    for task, name, value in args.task_param:
        data.setdefault("task", {}).setdefault(task, {})[name] = value
    if not args.spec and not ("tasks" in data and "policies" in data):
        raise SpecError("give a spec file, or at least --tasks and --policies")
    return SweepSpec.from_dict(data, source=source)


def _errors():
    from kvpress.sweep.backends import BackendError
    from kvpress.sweep.spec import SpecError
    from kvpress.sweep.store import StoreError

    return (SpecError, StoreError, BackendError)


def _fail(err: Exception) -> int:
    from kvpress.cli import fail

    return fail("sweep", err)


def cmd_plan(args: argparse.Namespace) -> int:
    from kvpress.sweep.cells import plan

    try:
        spec = spec_from_args(args)
        the_plan = plan(spec)
        done: set[str] = set()
        if args.out:
            from kvpress.sweep.store import ResultStore

            done = ResultStore.open(args.out).finished_keys()
    except _errors() as err:
        return _fail(err)
    if not args.count:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"sweep {spec.name!r}: {len(the_plan.cells)} cells")
        for col in ("key", "model", "task", "L", "depth", "mode", "seed", "policy") + (("stored",) if args.out else ()):
            table.add_column(col, overflow="fold")
        for c in the_plan.cells:
            row = [c.key[:10], c.model, c.task, str(c.length or "-"), "-" if c.depth is None else f"{c.depth:g}",
                   c.mode or "-", "-" if c.seed is None else str(c.seed), c.policy.label]
            table.add_row(*row, *(("yes" if c.key in done else "no",) if args.out else ()))
        Console(width=200).print(table)
        for note in the_plan.notes:
            print(f"note: {note}")
    missing = sum(c.key not in done for c in the_plan.cells)
    print(f"{len(the_plan.cells)} cells" + (f" ({len(the_plan.cells) - missing} stored, {missing} to run)" if args.out else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from kvpress.sweep.runner import run_sweep

    try:
        spec = spec_from_args(args)
        summary = run_sweep(spec, args.out, backend=args.backend, ray_address=args.ray_address, workers=args.workers,
                            cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                            progress=not args.no_progress)
    except _errors() as err:
        return _fail(err)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished cell is stored in {args.out}; run the same command to resume",
              file=sys.stderr)
        return 130
    for note in summary.notes:
        print(f"note: {note}")
    print(summary.line())
    if args.report:
        from kvpress.sweep.report import write_report

        try:
            print(f"report: {write_report(args.out, f'{args.out}/report')[-1]}")
        except ValueError as err:
            print(f"no report: {err}")
    return 1 if summary.failed else 0


def _spec_keys(specs: list[str] | None) -> list[str] | None:
    """The cell keys of every spec in ``specs`` (None: no filter)."""
    if not specs:
        return None
    from kvpress.sweep.cells import plan
    from kvpress.sweep.spec import load_spec

    return [c.key for spec in specs for c in plan(load_spec(spec)).cells]


def cmd_export(args: argparse.Namespace) -> int:
    from kvpress.sweep.records import export_records

    try:
        path = export_records(args.dir, args.out, keys=_spec_keys(args.spec))
    except _errors() as err:
        return _fail(err)
    print(f"wrote {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvpress.sweep.report import write_report

    try:
        keys = _spec_keys(args.spec)
        intro = Path(args.intro).read_text(encoding="utf-8") if args.intro else ""
        files = write_report(args.dir, args.out or f"{args.dir}/report", markdown=args.markdown, keys=keys,
                             title=args.title, intro=intro, readme=args.readme)
    except (*_errors(), ValueError) as err:
        return _fail(err)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
