"""Train a score predictor offline: teacher (KVzip) scores on local text, fitted from each layer's hidden states.

Data: prompts built like the evaluation's (needle haystacks in prose and noise, multi-key needles, variable
tracking, word lists; chat template of the model) with seeds disjoint from evaluation (``seed + 10_000``, the
evaluation uses seed 0), plus plain spans of local prose (the standard library's ``pydoc_data.topics``, or
``--text-file``). Only the context part of each prompt is used (as a query-agnostic prefill sees it).

Targets: the teacher's per-entry score in log space, ``log(score + eps)``, regressed with mean squared error.
Log space because eviction ranks entries of every layer and head together (KVzip's global budget): the predictor
must be calibrated across heads and layers, not only rank the tokens of one head, and KVzip's scores span orders of
magnitude (a ranking loss would give up that calibration).

Fitting: ``linear``: exact ridge regression per layer from streamed normal equations (deterministic, no data held);
``mlp``: Adam on a seeded subsample of tokens per layer, initialised from the ridge solution's direction. Every
model weight stays frozen (the teacher and the features run under ``torch.no_grad``).

Evaluation on held-out prompts: Spearman correlation with the teacher per layer, and the overlap of the kept sets
at ratio 0.5 (global budget) between predictor and teacher.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import kvpress
from kvpress.compat import cache_kwargs
from kvpress.context import LayerContext
from kvpress.policies.base import Policy
from kvpress.policies.kvzip import KVzip
from kvpress.scorer.predictor import ScorePredictor, model_signature

DATA_TASKS = ("niah_single_prose", "niah_single_noise", "niah_multikey_prose", "niah_multivalue_prose", "vt", "cwe")
SEED_OFFSET = 10_000  # evaluation samples use seed 0; training prompts never share a sample with them


@dataclass
class TrainConfig:
    """Everything that determines a trained predictor (stored in its metadata)."""

    kind: str = "mlp"
    sequences: int = 48  # training prompts
    held_out: int = 8  # evaluation prompts (disjoint seeds from training too)
    length: int = 1536  # tokens per prompt
    seed: int = 0
    eps: float = 1e-5  # target = log(teacher score + eps)
    ridge: float = 1.0  # ridge penalty of the linear fit (on standardised features)
    width: int = 64  # MLP hidden width
    steps: int = 1500  # MLP Adam steps per layer
    batch: int = 512
    lr: float = 3e-3
    tokens_per_sequence: int = 384  # MLP: tokens kept per prompt and layer (seeded subsample)
    teacher: dict[str, Any] = field(default_factory=lambda: {"n_sink": 4, "chunk_size": 2048})
    text_file: str | None = None

    def __post_init__(self) -> None:
        """Check every setting here, so that a bad one fails before a model loads (each error names it)."""
        from kvpress.scorer.predictor import KINDS

        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name, minimum in (("sequences", 1), ("held_out", 1), ("length", 64), ("width", 1), ("steps", 1),
                              ("batch", 1), ("tokens_per_sequence", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.held_out > self.sequences:
            raise ValueError(f"held_out ({self.held_out}) must not exceed sequences ({self.sequences}): the held-out "
                             "prompts evaluate a fit on the training ones")
        for name in ("eps", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not math.isfinite(self.ridge) \
                or self.ridge < 0:
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge!r}")
        if self.text_file is not None and not Path(self.text_file).is_file():
            raise FileNotFoundError(f"text_file {self.text_file!r} does not exist")


# ---------------------------------------------------------------------------------------------------- data
def training_prompts(tokenizer, count: int, length: int, seed: int, text_file: str | None = None) -> list[list[int]]:
    """``count`` context token sequences: harness task prefixes and plain prose spans, deterministic in ``seed``."""
    from kvpress.eval.text import load_text
    from kvpress.eval.tasks import get_task

    rng = random.Random(f"kvpress-scorer|{seed}")
    prose, _ = load_text(text_file)
    out: list[list[int]] = []
    for i in range(count):
        if i % 4 == 3:  # a quarter plain prose in a user turn, no task
            start = rng.randrange(0, max(1, len(prose) - length * 6))
            text = prose[start : start + length * 6]
            ids = tokenizer(text, add_special_tokens=False).input_ids[: max(32, length - 64)]
            body = tokenizer.decode(ids)
            if getattr(tokenizer, "chat_template", None):
                full = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                     add_generation_prompt=False)
                ids = tokenizer(full, add_special_tokens=False).input_ids
            out.append(ids[:length])
        else:
            task = get_task(DATA_TASKS[i % len(DATA_TASKS)], haystack_file=text_file)
            sample = task.make_sample(tokenizer, length, seed=seed + SEED_OFFSET, index=i)
            out.append(list(sample.prefix_ids))
    return out


class _TeacherRecorder(Policy):
    """At prefill: keeps each layer's attention input (``[seq, hidden]``) and, after the forward, the teacher's
    scores over positions (unless ``teacher`` is ``None``); evicts nothing."""

    wants_hidden_states = True

    def __init__(self, teacher: KVzip | None):
        self.teacher = teacher
        self.hidden: dict[int, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        if ctx.phase == "prefill":
            self.hidden[ctx.layer_idx] = ctx.hidden_states[0].float()
        return None

    def after_forward(self, fwd) -> None:
        if fwd.phase == "prefill" and self.teacher is not None:
            self.scores = self.teacher.prefill_scores(fwd)[0]


@torch.no_grad()
def teacher_features(model, tokenizer, ids: Sequence[int], teacher: KVzip,
                     cache_dir: str | Path | None = None) -> tuple[dict, dict]:
    """Per compressed layer: hidden states ``[seq, hidden]`` and teacher scores ``[kv_heads, seq]``.

    With ``cache_dir`` the teacher's scores (the expensive part: several forwards per prompt) are read from, or
    written to, a safetensors file keyed by the model, the teacher's parameters and the token ids; the hidden
    states always come from one plain forward."""
    from safetensors.torch import load_file, save_file

    teacher.tokenizer = teacher.tokenizer or tokenizer
    path = None
    if cache_dir is not None:
        key = json.dumps([model_signature(model.config), teacher_parameters(teacher), list(ids)])
        path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    cached = load_file(str(path)) if path is not None and path.exists() else None
    recorder = _TeacherRecorder(None if cached is not None else teacher)
    with kvpress.patch(model, recorder) as session:
        cache = session.new_cache()
        model(torch.tensor([list(ids)]), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    if cached is not None:
        return recorder.hidden, {int(name): value for name, value in cached.items()}
    scores = {i: s[0].float().contiguous() for i, s in recorder.scores.items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({str(i): s for i, s in scores.items()}, str(path))
    return recorder.hidden, scores


def teacher_parameters(teacher: KVzip) -> dict[str, Any]:
    """What determines the teacher's scores besides the model and the prompt."""
    return {"n_sink": teacher.n_sink, "chunk_size": teacher.chunk_size}


# ---------------------------------------------------------------------------------------------------- fitting
class _NormalEquations:
    """Streamed sums for ridge regression of ``y`` ``[n, heads]`` on ``x`` ``[n, hidden]`` (float64)."""

    def __init__(self, hidden: int, heads: int):
        self.xtx = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)
        self.xty = torch.zeros(hidden + 1, heads, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        xb = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        self.xtx += xb.T @ xb
        self.xty += xb.T @ y.double()

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.xtx[-1, -1]
        scale = (self.xtx.diagonal()[:-1] / n).clamp(min=1e-12)  # penalise in units of each feature's scale
        penalty = torch.diag(torch.cat([ridge * scale, torch.zeros(1, dtype=torch.float64)]))
        solution = torch.linalg.solve(self.xtx + penalty, self.xty)
        return solution[:-1].float(), solution[-1].float()


def _fit_mlp(layer: int, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
             linear: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Adam on ``(x, y)`` for one layer: the linear map (started at the ridge solution) plus a residual MLP
    (started at zero). Returns the layer's weights and its final training MSE."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + layer)
    hidden, width = x.shape[1], cfg.width
    w = linear[0].clone().requires_grad_(True)
    b = linear[1].clone().requires_grad_(True)
    w1 = (torch.randn(hidden, width, generator=gen) / math.sqrt(hidden)).requires_grad_(True)
    b1 = torch.zeros(width, requires_grad=True)
    w2 = torch.zeros(width, y.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b, w1, b1, w2], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.steps):
        idx = torch.randint(0, x.shape[0], (min(cfg.batch, x.shape[0]),), generator=gen)
        xb = x[idx].float()
        pred = xb @ w + b + torch.nn.functional.gelu(xb @ w1 + b1) @ w2
        loss = torch.nn.functional.mse_loss(pred, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return {"w": w.detach(), "b": b.detach(), "w1": w1.detach(), "b1": b1.detach(), "w2": w2.detach()}, float(loss.detach())


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_predictor(predictor: ScorePredictor, held_out: list[tuple[dict, dict]], eps: float,
                       ratios: Sequence[float] = (0.5, 0.75, 0.9)) -> dict[str, Any]:
    """Spearman correlation per layer, and the overlap of the kept sets (global budget) with the teacher's at each
    of ``ratios`` (the fraction of the teacher's kept entries that the predictor keeps too)."""
    from scipy.stats import spearmanr

    rho: dict[int, list[float]] = {}
    overlaps: dict[float, list[float]] = {r: [] for r in ratios}
    for hidden, scores in held_out:
        pred = {i: predictor(i, hidden[i].unsqueeze(0))[0] for i in hidden}
        for i in hidden:
            r = spearmanr(pred[i].flatten().numpy(), torch.log(scores[i] + eps).flatten().numpy()).statistic
            rho.setdefault(i, []).append(float(r))
        valid = {i: torch.ones_like(scores[i], dtype=torch.bool).unsqueeze(0) for i in scores}
        for ratio in ratios:
            policy = KVzip(compression_ratio=ratio)
            keep_t = policy.keep_masks({i: s.unsqueeze(0) for i, s in scores.items()}, valid)
            keep_p = policy.keep_masks({i: p.unsqueeze(0) for i, p in pred.items()}, valid)
            both = sum(int((keep_t[i] & keep_p[i]).sum()) for i in keep_t)
            overlaps[ratio].append(both / max(1, sum(int(keep_t[i].sum()) for i in keep_t)))
    per_layer = {i: sum(v) / len(v) for i, v in sorted(rho.items())}
    return {
        "spearman_per_layer": per_layer,
        "spearman_mean": sum(per_layer.values()) / max(1, len(per_layer)),
        **{f"kept_overlap_at_{r:g}": sum(v) / max(1, len(v)) for r, v in overlaps.items()},
    }


# ---------------------------------------------------------------------------------------------------- training
def train(model, tokenizer, cfg: TrainConfig, model_name: str = "", progress: bool = True,
          log: Callable[[str], None] = print, teacher_cache: str | Path | None = None) -> ScorePredictor:
    """Build the data, fit a predictor of ``cfg.kind`` and evaluate it on held-out prompts (see the module).

    ``teacher_cache``: a folder where the teacher's scores are kept between runs (see :func:`teacher_features`),
    so that fitting settings can be compared without re-running the teacher."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    text = model.config.get_text_config(decoder=True)
    layers = [i for i, kind in enumerate(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
              if kind == "full_attention"]
    hidden_size, heads = text.hidden_size, text.num_key_value_heads
    teacher = KVzip(compression_ratio=0.5, tokenizer=tokenizer, **cfg.teacher)
    prompts = training_prompts(tokenizer, cfg.sequences + cfg.held_out, cfg.length, cfg.seed, cfg.text_file)
    train_ids, held_ids = prompts[: cfg.sequences], prompts[cfg.sequences :]
    normal = {i: _NormalEquations(hidden_size, heads) for i in layers}
    kept_x: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    kept_y: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = _bar(len(prompts), "teacher scores", progress)
    n_tokens = 0
    for ids in train_ids:
        hidden, scores = teacher_features(model, tokenizer, ids, teacher, teacher_cache)
        n_tokens += len(ids)
        pick = torch.randperm(len(ids), generator=gen)[: cfg.tokens_per_sequence]
        for i in layers:
            y = torch.log(scores[i].T + cfg.eps)  # [seq, heads]
            normal[i].add(hidden[i], y)
            if cfg.kind == "mlp":
                kept_x[i].append(hidden[i][pick].half())
                kept_y[i].append(y[pick].float())
        bar.update(1)
    held_out = []
    for ids in held_ids:
        held_out.append(teacher_features(model, tokenizer, ids, teacher, teacher_cache))
        bar.update(1)
    bar.close()
    data_s = time.perf_counter() - started

    predictor = ScorePredictor(text.num_hidden_layers, hidden_size, heads, kind=cfg.kind, width=cfg.width)
    linear = {i: normal[i].solve(cfg.ridge) for i in layers}
    fit_bar = _bar(len(layers), f"fit {cfg.kind}", progress)
    losses = {}
    for i in layers:
        weights = {"w": linear[i][0], "b": linear[i][1]}
        if cfg.kind == "mlp":
            weights, losses[i] = _fit_mlp(i, torch.cat(kept_x[i]), torch.cat(kept_y[i]), cfg, linear[i])
            fit_bar.set_postfix_str(f"layer {i} mse {losses[i]:.3f}")
        with torch.no_grad():
            for name, value in weights.items():
                getattr(predictor, name)[i].copy_(value)
        fit_bar.update(1)
    fit_bar.close()
    predictor.eval().requires_grad_(False)
    metrics = evaluate_predictor(predictor, held_out, cfg.eps)
    metrics.update({"train_tokens": n_tokens, "data_seconds": round(data_s, 1),
                    "total_seconds": round(time.perf_counter() - started, 1)})
    if losses:
        metrics["train_mse_mean"] = sum(losses.values()) / len(losses)
    predictor.metadata = {
        "model": model_name or str(getattr(model, "name_or_path", "")),
        "model_signature": model_signature(model.config),
        "teacher": "kvzip",
        "teacher_params": json.dumps({**cfg.teacher, "scope": "global"}),
        "target": f"log(kvzip max-attention score + {cfg.eps})",
        "data": f"{cfg.sequences} prompts of {cfg.length} tokens: harness tasks {', '.join(DATA_TASKS)} with seeds "
                f"{cfg.seed + SEED_OFFSET}+ and prose spans of {cfg.text_file or 'pydoc_data.topics'}",
        "steps": str(cfg.steps if cfg.kind == "mlp" else 0),
        "seed": str(cfg.seed),
        "config": json.dumps(asdict(cfg)),
        "metrics": json.dumps(metrics),
    }
    log(f"spearman {metrics['spearman_mean']:.3f}, kept-set overlap at 0.5/0.75/0.9 {metrics['kept_overlap_at_0.5']:.3f}/"
        f"{metrics['kept_overlap_at_0.75']:.3f}/{metrics['kept_overlap_at_0.9']:.3f}, "
        f"{metrics['total_seconds']:.0f} s")
    return predictor


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def train_to_file(model_name: str, out: str | Path, cfg: TrainConfig, progress: bool = True,
                  teacher_cache: str | Path | None = None) -> ScorePredictor:
    model, tokenizer = kvpress.load_model(model_name)
    predictor = train(model, tokenizer, cfg, model_name=model_name, progress=progress, teacher_cache=teacher_cache)
    predictor.save(out)
    return predictor
