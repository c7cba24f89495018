"""The tasks a sweep can run, their parameters (``[task.NAME]`` tables) and their identities (for cell keys).

Three kinds, all offline:

* **synthetic** (every ``kvpress eval`` task: ``kvpress.eval.tasks.available_tasks()``): run by
  :func:`kvpress.eval.evaluate`. Parameters: ``haystack_file`` (prose tasks), ``max_new_tokens`` (answer budget).
  ``lengths`` are prompt + answer budgets in tokens; ``depths`` place the needle (needle tasks only); ``modes``.
* **perplexity**: teacher forcing through the cache (:func:`kvpress.eval.perplexity.evaluate_perplexity`) on
  ``samples`` disjoint windows of ``lengths`` tokens of a text. Parameters: ``mode`` (``"chunked"`` or
  ``"token"``), ``chunk_size``, ``prefill`` (a first piece, either mode), ``text`` (a UTF-8 file; default the standard
  library's pydoc topics). In chunked mode, stages that take ``every_chunk`` get ``every_chunk=True``.
  Score: perplexity (lower is better).
* **lm-eval** (``lm_eval:<task>``, the offline task YAMLs in ``kvpress/eval/lm_eval_tasks``): run through
  :class:`kvpress.eval.lm_eval_adapter.KVPressLM` with ``limit = samples``. Parameters: ``nominal_tokens``
  (the ``n`` a ratio is mapped through for policies sized by window or budget; default 1024). Lengths do not
  apply (each task fixes its own).
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any

from kvpress.policies.expr import ExpressionError as SpecError  # the sweep's error (kvpress.sweep.SpecError)

PERPLEXITY = "perplexity"
LM_EVAL_PREFIX = "lm_eval:"
SYNTHETIC, PPL, LM_EVAL = "synthetic", "perplexity", "lm_eval"

PARAMETERS: dict[str, dict[str, Any]] = {
    SYNTHETIC: {"haystack_file": None, "max_new_tokens": None},
    PPL: {"mode": "chunked", "chunk_size": 256, "prefill": 0, "text": None},
    LM_EVAL: {"nominal_tokens": 1024},
}


def task_kind(name: str) -> str:
    if name == PERPLEXITY:
        return PPL
    if name.startswith(LM_EVAL_PREFIX):
        return LM_EVAL
    return SYNTHETIC


@functools.lru_cache(maxsize=1)
def lm_eval_task_names() -> tuple[str, ...]:
    """Names of the offline lm-eval tasks shipped with kvpress (read from the YAMLs; lm-eval not imported)."""
    root = Path(__file__).resolve().parent.parent / "eval" / "lm_eval_tasks"
    names = []
    for path in sorted(root.glob("*.yaml")):
        match = re.search(r"^task:\s*(\S+)", path.read_text(encoding="utf-8"), re.MULTILINE)
        if match:
            names.append(match.group(1))
    return tuple(names)


def available_sweep_tasks() -> list[str]:
    from kvpress.eval.tasks import available_tasks

    return [*available_tasks(), PERPLEXITY, *(LM_EVAL_PREFIX + n for n in lm_eval_task_names())]


def check_task(name: str, params: dict[str, Any], where: str) -> None:
    """Validate a task name and its parameters (no model needed); raises :class:`SpecError`."""
    kind = task_kind(name)
    if kind == SYNTHETIC:
        from kvpress.eval.tasks import available_tasks

        if name not in available_tasks():
            raise SpecError(f"{where}: unknown task {name!r}; available tasks: {', '.join(available_sweep_tasks())}")
    elif kind == LM_EVAL and name[len(LM_EVAL_PREFIX):] not in lm_eval_task_names():
        raise SpecError(f"{where}: unknown lm-eval task {name!r}; offline lm-eval tasks: "
                        f"{', '.join(LM_EVAL_PREFIX + n for n in lm_eval_task_names())}")
    allowed = PARAMETERS[kind]
    for key, value in params.items():
        here = f"task.{name}.{key}"
        if key not in allowed:
            raise SpecError(f"{here}: unknown parameter; parameters of {kind} tasks: {', '.join(allowed) or 'none'}")
        if key in ("haystack_file", "text"):
            if not isinstance(value, str) or not Path(value).is_file():
                raise SpecError(f"{here}: expected the path of an existing text file, got {value!r}")
        elif key == "mode":
            if value not in ("chunked", "token"):
                raise SpecError(f"{here}: expected 'chunked' or 'token', got {value!r}")
        elif key in ("max_new_tokens", "chunk_size", "nominal_tokens"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{here}: expected an integer >= 1, got {value!r}")
        elif key == "prefill":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{here}: expected an integer >= 0, got {value!r}")


def resolved_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The task's parameters with defaults filled in."""
    return {**PARAMETERS[task_kind(name)], **params}


def _sha256_file(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def default_text_sha256() -> str:
    from kvpress.eval.text import default_text

    return hashlib.sha256(default_text().encode("utf-8")).hexdigest()


def task_identity(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """What determines the task's samples: its generator configuration and the content of its source text."""
    kind = task_kind(name)
    params = resolved_params(name, params)
    if kind == SYNTHETIC:
        from kvpress.eval.tasks import get_task

        task = get_task(name, haystack_file=params["haystack_file"])
        if params["max_new_tokens"] is not None:
            task.max_new_tokens = params["max_new_tokens"]
        config = {k: v for k, v in task.config().items() if k != "haystack_file"}
        text = params["haystack_file"]
        config["haystack_sha256"] = _sha256_file(text) if text else default_text_sha256()
        return {"kind": kind, **config}
    if kind == PPL:
        text = params["text"]
        return {"kind": kind, "name": name, "mode": params["mode"], "chunk_size": params["chunk_size"],
                "prefill": params["prefill"], "text_sha256": _sha256_file(text) if text else default_text_sha256()}
    task = name[len(LM_EVAL_PREFIX):]
    root = Path(__file__).resolve().parent.parent / "eval" / "lm_eval_tasks"
    yaml_sha = hashlib.sha256()
    for path in sorted(root.glob("*.yaml")) + [root / "utils.py"]:
        yaml_sha.update(path.read_bytes())
    return {"kind": kind, "name": task, "nominal_tokens": params["nominal_tokens"],
            "definitions_sha256": yaml_sha.hexdigest()}


def build_task(name: str, params: dict[str, Any]):
    """The :class:`kvpress.eval.tasks.Task` of a synthetic task, with its parameters applied."""
    from kvpress.eval.tasks import get_task

    params = resolved_params(name, params)
    task = get_task(name, haystack_file=params["haystack_file"])
    if params["max_new_tokens"] is not None:
        task.max_new_tokens = params["max_new_tokens"]
    return task
