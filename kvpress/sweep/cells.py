"""Cells (one configuration of the grid: model x policy x task x length x depth x mode x seed, ``samples``
samples) and their keys, and the work units the backends run.

A cell's key is the SHA-256 (first 20 hex digits) of its resolved configuration as canonical JSON: the model's
identity (embedded: package, version, file and size; local directory: hashes of its config and tokenizer files
and the names and sizes of its weight files; hub id: the id), the policy with every explicit parameter and the
ratio, the task with its generator parameters and a hash of its source text, length, depth, mode, number of
samples, seed, the dtype, and the kvpress version. Times, threads, devices and backends are not part of it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import itertools
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpress.policies.expr import PolicyConfig
from kvpress.sweep.spec import SpecError
from kvpress.sweep.spec import SweepSpec
from kvpress.sweep.tasks import LM_EVAL, PPL, SYNTHETIC, build_task, resolved_params, task_identity, task_kind

KEY_HEX = 20


def kvpress_version() -> str:
    import kvpress

    return kvpress.__version__


@dataclass
class Cell:
    """One point of the grid. ``key`` identifies its result record; ``config`` is what the key hashes."""

    model: str
    policy: PolicyConfig
    task: str
    task_params: dict[str, Any]
    length: int | None
    depth: float | None
    mode: str | None
    samples: int
    seed: int | None
    dtype: str
    config: dict[str, Any] = field(repr=False, default_factory=dict)
    key: str = ""

    @property
    def kind(self) -> str:
        return task_kind(self.task)

    @property
    def context(self) -> tuple:
        """Cells with equal contexts see the same samples (and may share prefills)."""
        return (self.model, self.task, json.dumps(self.task_params, sort_keys=True), self.length, self.depth,
                self.mode, self.samples, self.seed, self.dtype)

    def describe(self) -> str:
        where = [self.task]
        if self.length is not None:
            where.append(f"L={self.length}")
        if self.depth is not None:
            where.append(f"depth={self.depth:g}")
        if self.mode and self.mode != "query-agnostic":
            where.append(self.mode)
        if self.seed:
            where.append(f"seed={self.seed}")
        return f"{self.policy.label} on {' '.join(where)} [{self.model}]"


def config_key(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_HEX]


# ------------------------------------------------------------------------------------------------ model identity


@functools.lru_cache(maxsize=32)
def model_identity(name: str) -> dict[str, Any]:
    """A content identity of a model, computed without loading it; raises :class:`SpecError` for an unknown one."""
    from kvpress.models import EMBEDDED_MODELS, embedded_gguf_path, is_embedded

    if is_embedded(name):
        gguf = embedded_gguf_path(name)
        package = gguf.parent.name
        try:
            version = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"kind": "embedded", "file": gguf.name, "bytes": gguf.stat().st_size, "package": package,
                "package_version": version}
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecError(f"models: {name!r} is a directory without a config.json (not a saved model)")
        digest = hashlib.sha256()
        for item in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (path / item).is_file():
                digest.update(item.encode() + (path / item).read_bytes())
        weights = sorted((p.name, p.stat().st_size) for p in path.iterdir()
                         if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
        return {"kind": "local", "files_sha256": digest.hexdigest(), "weights": weights}
    if _in_hub_cache(name) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        return {"kind": "hub", "id": name}
    raise SpecError(
        f"models: unknown model {name!r}: not an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}), not a "
        "local directory, and not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
    )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """Every cell of a spec, in order (models outermost, so that a local run loads each model once)."""

    spec: SweepSpec
    cells: list[Cell]
    notes: list[str]

    def __len__(self) -> int:
        return len(self.cells)


def plan(spec: SweepSpec) -> Plan:
    """Resolve a spec into cells (validating models; no model is loaded)."""
    version = kvpress_version()
    models = {m: model_identity(m) for m in spec.models}
    configs = spec.policy_configs()
    cells: list[Cell] = []
    seen: set[str] = set()
    for model, task in itertools.product(spec.models, spec.tasks):
        params = resolved_params(task, spec.task.get(task, {}))
        task_id = task_identity(task, spec.task.get(task, {}))
        kind = task_kind(task)
        if kind == SYNTHETIC:
            uses_depth = build_task(task, spec.task.get(task, {})).uses_depth
            axes = itertools.product(spec.lengths, (spec.depths or [None]) if uses_depth else [None], spec.modes,
                                     spec.seeds)
        elif kind == PPL:  # windows of a fixed text: no depth, mode or seed
            axes = ((length, None, None, None) for length in spec.lengths)
        else:  # lm-eval: the task fixes its own lengths
            axes = ((None, None, None, seed) for seed in spec.seeds)
        for (length, depth, mode, seed), policy in itertools.product(list(axes), configs):
            config = {
                "kvpress_version": version,
                "model": {"name": model, **models[model]},
                "dtype": spec.dtype,
                "policy": policy.to_json(),
                "task": task_id,
                "length": length,
                "depth": depth,
                "mode": mode,
                "samples": spec.samples,
                "seed": seed,
            }
            cell = Cell(model, policy, task, params, length, depth, mode, spec.samples, seed, spec.dtype, config,
                        config_key(config))
            if cell.key not in seen:
                seen.add(cell.key)
                cells.append(cell)
    return Plan(spec, cells, list(spec.notes))


# ------------------------------------------------------------------------------------------------------ work units


def work_units(cells: list[Cell], fanout: bool = True) -> list[list[Cell]]:
    """Cells grouped into units a worker runs together: the configurations of one prefill score policy that
    differ only in ratio (plus the baseline) share one prefill per sample (the eval harness's fan-out; results
    equal separate runs); every other cell is a unit of its own. Order follows ``cells``."""
    from kvpress.eval.generation import fanout_key

    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[cell.context].append(cell)
    units: list[list[Cell]] = []
    for members in groups.values():
        if not fanout or members[0].kind != SYNTHETIC:
            units.extend([c] for c in members)
            continue
        shared: dict[Any, list[Cell]] = {}
        singles: list[list[Cell]] = []
        baseline = [c for c in members if c.policy.is_baseline]
        for cell in members:
            if cell.policy.is_baseline:
                continue
            key = fanout_key(cell.policy.build(cell.length or 1024))
            if key is None:
                singles.append([cell])
            else:
                shared.setdefault(key, []).append(cell)
        grouped = list(shared.values())
        if baseline and grouped:
            grouped[0] = baseline + grouped[0]
        elif baseline:
            singles.insert(0, baseline)
        units.extend(grouped + singles)
    order = {id(c): i for i, c in enumerate(cells)}
    units.sort(key=lambda unit: min(order[id(c)] for c in unit))  # cells are ordered models outermost
    return units
