"""The sweep specification: a TOML file (or the same keys as flags, or a dict) naming every axis of the grid.

    name     = "smoke"
    models   = ["smollm2-135m"]                       # embedded names, local directories or hub ids
    tasks    = ["niah_single_noise", "perplexity", "lm_eval:kvpress_niah_choice"]
    policies = ["*", "snapkv(window=[16, 32])", "kvquant(bits=[2, 4])", "snapkv | kvquant(bits=2)"]
    ratios   = [0.25, 0.5, 0.75]                      # for every policy a ratio reaches (see kvpress.policies.expr)
    baseline = true                                   # the uncompressed run ("none"), once
    lengths  = [1024]                                 # tokens: prompt + answer budget; perplexity: tokens scored
    depths   = [0.0, 0.5, 1.0]                        # needle tasks only (default: drawn per sample)
    samples  = 5                                      # per cell (perplexity: disjoint windows of the text)
    seeds    = [0]
    modes    = ["query-agnostic"]                     # and/or "query-aware" (synthetic tasks)

    [task.perplexity]                                 # parameters of one task (see kvpress.sweep.tasks)
    mode = "chunked"
    chunk_size = 256

``"*"`` stands for every policy of the registry (``available_policies()``) that no other single-stage entry
names; a ``*`` policy that cannot be built from its defaults (it needs an argument) is left out with a note.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpress.policies.expr import BASELINE, ExpressionError, PolicyConfig, check_builds, expand, parse

# Every bad specification (a policy expression included) raises this, naming the offending key.
SpecError = ExpressionError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODES = ("query-agnostic", "query-aware")
ALL_POLICIES = "*"
DEFAULTS: dict[str, Any] = {
    "name": "sweep",
    "models": ["smollm2-135m"],
    "ratios": [],
    "baseline": True,
    "lengths": [1024],
    "depths": [],
    "samples": 5,
    "seeds": [0],
    "modes": ["query-agnostic"],
    "fanout": True,
    "device": "cpu",
    "dtype": "float32",
    "task": {},
}
REQUIRED = ("tasks", "policies")
KEYS = (*REQUIRED, *DEFAULTS)


@dataclass
class SweepSpec:
    """A validated specification. Build it with :func:`load_spec` / :meth:`from_dict`; :func:`kvpress.sweep.plan`
    turns it into cells."""

    tasks: list[str]
    policies: list[str]
    name: str = "sweep"
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    ratios: list[float] = field(default_factory=list)
    baseline: bool = True
    lengths: list[int] = field(default_factory=lambda: [1024])
    depths: list[float] = field(default_factory=list)
    samples: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    modes: list[str] = field(default_factory=lambda: ["query-agnostic"])
    fanout: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    task: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what "*" left out, and why
    source: str | None = None  # the file it came from

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "SweepSpec":
        if not isinstance(data, dict):
            raise SpecError(f"a sweep spec is a table of keys, got {type(data).__name__}")
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise SpecError(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(KEYS)}")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise SpecError(f"missing key {missing[0]!r} (required: {', '.join(REQUIRED)})")
        values = {**DEFAULTS, **data}
        spec = cls(
            name=_string("name", values["name"]),
            models=_list("models", values["models"], _nonempty_string),
            tasks=_list("tasks", values["tasks"], _nonempty_string),
            policies=_list("policies", values["policies"], _nonempty_string),
            ratios=_list("ratios", values["ratios"], _ratio, allow_empty=True),
            baseline=_bool("baseline", values["baseline"]),
            lengths=_list("lengths", values["lengths"], _positive_int),
            depths=_list("depths", values["depths"], _depth, allow_empty=True),
            samples=_positive_int("samples", values["samples"]),
            seeds=_list("seeds", values["seeds"], _int),
            modes=_list("modes", values["modes"], _mode),
            fanout=_bool("fanout", values["fanout"]),
            device=_string("device", values["device"]),
            dtype=_string("dtype", values["dtype"]),
            task=_task_tables(values["task"]),
            source=source,
        )
        spec._check_policies()
        spec._check_tasks()
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in KEYS}

    # -- validation beyond types: policies against the registry, tasks against the task registries ---------
    def _check_policies(self) -> None:
        n_check = max(self.lengths)
        for i, text in enumerate(self.policies):
            if text.strip() == ALL_POLICIES:
                continue
            for config in expand(text, self.ratios, f"policies[{i}]"):
                check_builds(config, n_check, f"policies[{i}]")

    def _named_policies(self) -> set[str]:
        """Registry names that a single-stage entry names explicitly (``*`` leaves them to that entry)."""
        named = set()
        for i, text in enumerate(self.policies):
            if text.strip() != ALL_POLICIES:
                stages = parse(text, f"policies[{i}]")
                if len(stages) == 1:
                    named.add(stages[0].name)
        return named

    def policy_configs(self) -> list[PolicyConfig]:
        """Every policy configuration, in spec order, without duplicates (the baseline first when asked)."""
        from kvpress.policies import available_policies

        out: list[PolicyConfig] = [PolicyConfig()] if self.baseline else []
        self.notes = []
        named = self._named_policies()
        n_check = max(self.lengths)
        for i, text in enumerate(self.policies):
            texts = [text]
            if text.strip() == ALL_POLICIES:
                texts = [n for n in available_policies() if n != BASELINE and n not in named]
            for item in texts:
                try:
                    configs = expand(item, self.ratios, f"policies[{i}]")
                    for config in configs:
                        if text.strip() == ALL_POLICIES:
                            check_builds(config, n_check, f"policies[{i}] ({item})")
                except SpecError as err:
                    if text.strip() != ALL_POLICIES:
                        raise
                    self.notes.append(f"'*' left out {item}: {str(err).split(': ', 2)[-1]}")
                    continue
                out.extend(c for c in configs if c not in out)
        return out

    def _check_tasks(self) -> None:
        from kvpress.sweep.tasks import check_task

        for i, name in enumerate(self.tasks):
            check_task(name, self.task.get(name, {}), f"tasks[{i}]")
        for name in self.task:
            if name not in self.tasks:
                raise SpecError(f"task.{name}: parameters for a task that is not in 'tasks' ({', '.join(self.tasks)})")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a TOML spec; every error names the offending key."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"spec file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise SpecError(f"spec file {str(path)!r} cannot be read: {err}") from None
    return SweepSpec.from_dict(data, source=str(path))


# -------------------------------------------------------------------------------------------------- checkers


def _list(key: str, value: Any, check, allow_empty: bool = False) -> list:
    if not isinstance(value, list):
        value = [value]
    if not value and not allow_empty:
        raise SpecError(f"{key}: the axis is empty (give at least one value)")
    out = [check(f"{key}[{i}]", v) for i, v in enumerate(value)]
    seen = set()
    for i, v in enumerate(out):
        if v in seen:
            raise SpecError(f"{key}[{i}]: duplicate value {v!r}")
        seen.add(v)
    return out


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{key}: expected a string, got {value!r}")
    return value


def _nonempty_string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{key}: expected a non-empty string, got {value!r}")
    return value.strip()


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{key}: expected true or false, got {value!r}")
    return value


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{key}: expected an integer, got {value!r}")
    return value


def _positive_int(key: str, value: Any) -> int:
    if _int(key, value) < 1:
        raise SpecError(f"{key}: expected an integer >= 1, got {value!r}")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _ratio(key: str, value: Any) -> float:
    if not 0.0 <= _number(key, value) < 1.0:
        raise SpecError(f"{key}: a compression ratio is in [0, 1) (the fraction of tokens removed), got {value!r}")
    return float(value)


def _depth(key: str, value: Any) -> float:
    if not 0.0 <= _number(key, value) <= 1.0:
        raise SpecError(f"{key}: a needle depth is in [0, 1], got {value!r}")
    return float(value)


def _mode(key: str, value: Any) -> str:
    if value not in MODES:
        raise SpecError(f"{key}: mode must be one of {', '.join(MODES)}, got {value!r}")
    return value


def _task_tables(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise SpecError("task: expected tables [task.NAME] of task parameters")
    return {str(k): dict(v) for k, v in value.items()}
