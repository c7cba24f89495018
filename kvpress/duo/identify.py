"""DuoAttention head identification: optimise one gate per (layer, KV head) with the model frozen.

For the identification run only, every attention layer of the model runs a custom attention function (registered
with transformers' ``AttentionInterface`` and removed afterwards) whose output per head is

    alpha * full causal attention + (1 - alpha) * attention over the first ``n_sink`` tokens + the last ``window``

with ``alpha = sigmoid(logit[layer, kv_head])`` shared by the query heads of a KV head. The logits are the only
trainable parameters. Data: synthetic passkey prompts from the evaluation harness's generators (a needle at a random
depth in local prose, one or several keys; seeds disjoint from evaluation's), each followed by its answer. The loss is
the relative MSE between the final hidden states of the frozen full-attention model and of the mixed model on the
answer span, plus ``lam * mean(alpha)`` pushing gates toward streaming. Adam, one distinct prompt per step by default,
deterministic for a seed (one thread). On a model with sliding-window layers (Gemma 3) only the full-attention layers
are identified: a sliding layer's cache is bounded already, so its gates stay at 1 (no streaming mix, no penalty)
and the pattern's metadata lists the identified layers. Sequences are short (default 640 tokens, sinks/window 16/64, scaled from the
paper's long contexts), so one step is one forward + backward of the model: the default 160 steps take about 19
minutes on one CPU thread for SmolLM2-135M.

:func:`identify` returns a :class:`~kvpress.duo.pattern.DuoPattern`; ``method="needle"`` runs the training-free
identifier of :mod:`kvpress.duo.cheap` instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvpress.duo.cheap import needle_scores
from kvpress.duo.mixing import MixState, final_hidden, identification_attention
from kvpress.duo.pattern import DuoPattern, _model_shape, growing_layers
from kvpress.scorer.predictor import model_signature

SEED_OFFSET = 20_000  # evaluation samples use seed 0 (the learned scorer 10_000+): identification never shares one
DATA_TASKS = ("niah_single_prose", "niah_multikey_prose")
TRAINED_PROMPTS = 160  # default prompt counts per method (IdentifyConfig.prompts=None)
NEEDLE_PROMPTS = 16


@dataclass
class IdentifyConfig:
    """Identification settings (the CLI exposes each field)."""

    method: str = "trained"  # "trained" (gate optimisation) or "needle" (attention on a planted needle)
    steps: int = 160  # optimisation steps (one prompt each)
    # distinct prompts, cycled over the steps; None: 160 for "trained" (one per step: 16 prompts cycled over 48 steps
    # kept 24 of 32 needles at s=0.5, 160 distinct ones 30), 16 for "needle" (an average of attention mass)
    prompts: int | None = None
    length: int = 640  # tokens per prompt (prompt + answer budget of the generator)
    n_sink: int = 16  # sinks of the streaming side of the mix
    window: int = 64  # recent window of the streaming side
    lam: float = 0.05  # weight of mean(alpha)
    lr: float = 0.1  # Adam learning rate on the gate logits
    init_logit: float = 3.0  # sigmoid(3) = 0.95: every head starts close to full attention
    seed: int = 0
    loss: str = "hidden"  # "hidden": relative MSE of final hidden states; "kl": KL of the answer-token distributions

    def __post_init__(self) -> None:
        if self.prompts is None:
            self.prompts = TRAINED_PROMPTS if self.method == "trained" else NEEDLE_PROMPTS
        if self.loss not in ("hidden", "kl"):
            raise ValueError(f"loss must be 'hidden' or 'kl', got {self.loss!r}")
        if self.method not in ("trained", "needle"):
            raise ValueError(f"method must be 'trained' or 'needle', got {self.method!r}")
        for name in ("steps", "prompts", "length", "window"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.n_sink < 0 or self.lam < 0 or self.lr <= 0:
            raise ValueError("n_sink and lam must be >= 0 and lr > 0")


# ------------------------------------------------------------------------------------------------ attention
# ------------------------------------------------------------------------------------------------ data
@dataclass
class Example:
    ids: torch.Tensor  # [1, n] prompt + answer
    span: slice  # positions whose final hidden states predict the answer tokens
    needle: torch.Tensor  # token indices of the answer's value inside the context (for the cheap identifier)


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle), -1, -1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


def _needle_columns(tokenizer, sample) -> torch.Tensor:
    """Indices in ``prefix_ids`` of the tokens of the (first) answer value, found by character offsets."""
    value = sample.references[0]
    prefix_ids = list(sample.prefix_ids)
    try:
        enc = tokenizer(sample.prefix, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc.input_ids) == prefix_ids:
            start = sample.prefix.rfind(value)
            stop = start + len(value)
            cols = [i for i, (a, z) in enumerate(enc.offset_mapping) if a < stop and z > start >= 0]
            if cols:
                return torch.tensor(cols)
    except (NotImplementedError, TypeError, ValueError):
        pass
    for text in (" " + value, value):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        at = _find(prefix_ids, ids)
        if at >= 0:
            return torch.arange(at, at + len(ids))
    raise ValueError(f"could not locate the needle value {value!r} in the prompt's tokens")


def examples(tokenizer, count: int, length: int, seed: int, tasks: tuple[str, ...] = DATA_TASKS) -> list[Example]:
    """``count`` passkey prompts with their answers (harness generators, seeds ``seed + 20000``)."""
    from kvpress.eval.tasks import get_task

    out = []
    for i in range(count):
        sample = get_task(tasks[i % len(tasks)]).make_sample(tokenizer, length, seed=seed + SEED_OFFSET, index=i)
        answer = tokenizer(" " + sample.references[0], add_special_tokens=False).input_ids
        prompt = list(sample.prefix_ids) + list(sample.suffix_ids)
        ids = torch.tensor([prompt + answer])
        out.append(Example(ids, slice(len(prompt) - 1, len(prompt) - 1 + len(answer)),
                           _needle_columns(tokenizer, sample)))
    return out


# ------------------------------------------------------------------------------------------------ training
def _distillation(model: Any, student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance between the mixed model's and the full model's final hidden states on the answer span."""
    if kind == "hidden":
        return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)
    head = model.get_output_embeddings()
    log_p = head(teacher).float().log_softmax(-1)
    log_q = head(student).float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def train_gates(model: Any, data: list[Example], cfg: IdentifyConfig, progress: bool = True,
                log: list[dict[str, float]] | None = None) -> torch.Tensor:
    """Optimise the gate logits ``[layers, kv_heads]`` (see the module docstring); returns the gates (sigmoid)."""
    layers, kv_heads = _model_shape(model)
    torch.manual_seed(cfg.seed)
    logits = torch.full((layers, kv_heads), float(cfg.init_logit), requires_grad=True)
    # Sliding-window layers are bounded already: their gates stay at 1 (no streaming mix) and out of the penalty.
    growing = growing_layers(model)[:, None].expand(layers, kv_heads)

    def gates() -> torch.Tensor:
        return torch.where(growing, torch.sigmoid(logits), torch.ones(()))

    opt = torch.optim.Adam([logits], lr=cfg.lr)
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    state = MixState(cfg.n_sink, cfg.window, alpha=gates)
    bar = _progress(cfg.steps, progress)
    try:
        for step in range(cfg.steps):
            example = data[step % len(data)]
            with torch.no_grad():
                teacher = final_hidden(model, example.ids)[:, example.span]
            with identification_attention(model, state):
                student = final_hidden(model, example.ids)[:, example.span]
            distill = _distillation(model, student, teacher, cfg.loss)
            alpha = torch.sigmoid(logits)[growing]
            loss = distill + cfg.lam * alpha.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sparsity = float((alpha.detach() < 0.5).float().mean())
            record = {"step": step + 1, "loss": float(loss.detach()), "distill": float(distill.detach()),
                      "mean_alpha": float(alpha.detach().mean()), "sparsity": sparsity}
            if log is not None:
                log.append(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", distill=f"{record['distill']:.4f}",
                                sparsity=f"{sparsity:.2f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    return gates().detach()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers' dependencies
        return None
    return tqdm(total=total, desc="duo identify", unit="step")


# ------------------------------------------------------------------------------------------------ entry points
def identify(model: Any, tokenizer: Any, cfg: IdentifyConfig | None = None, *, model_name: str | None = None,
             progress: bool = True, log: list[dict[str, float]] | None = None) -> DuoPattern:
    """Identify retrieval / streaming heads of ``model``: a :class:`DuoPattern` with gates in [0, 1]."""
    cfg = cfg or IdentifyConfig()
    start = time.perf_counter()
    data = examples(tokenizer, cfg.prompts, cfg.length, cfg.seed)
    growing = growing_layers(model)  # the layers identified: sliding-window ones keep gate 1
    if cfg.method == "trained":
        gates = train_gates(model, data, cfg, progress=progress, log=log)
        steps = cfg.steps
        description = (f"{cfg.prompts} passkey prompts of {cfg.length} tokens ({', '.join(DATA_TASKS)}, seeds "
                       f"{cfg.seed + SEED_OFFSET}), answer span distillation ({cfg.loss}), lam={cfg.lam}, "
                       f"lr={cfg.lr}")
    else:
        scores = needle_scores(model, data, progress=progress)
        top = scores[growing].max().clamp_min(1e-12)  # scaled over the layers that grow
        gates = torch.where(growing[:, None], (scores / top).clamp(0, 1), 1.0)
        steps = 0
        description = (f"attention mass on the needle value from the answer span, {cfg.prompts} passkey prompts of "
                       f"{cfg.length} tokens ({', '.join(DATA_TASKS)}, seeds {cfg.seed + SEED_OFFSET})")
    seconds = time.perf_counter() - start
    text = model.config.get_text_config(decoder=True)
    meta = {
        "model": model_name or getattr(text, "_name_or_path", "") or getattr(model, "name_or_path", "?"),
        "model_signature": model_signature(model.config),
        "method": cfg.method,
        "n_sink": cfg.n_sink,
        "window": cfg.window,
        "steps": steps,
        "seed": cfg.seed,
        "data": description,
        "seconds": f"{seconds:.1f}",
        "threads": torch.get_num_threads(),
        "config": str(asdict(cfg)),
    }
    if not bool(growing.all()):  # a model with sliding-window layers: say which layers were identified
        meta["identified_layers"] = ",".join(str(i) for i in growing.nonzero().flatten().tolist())
    return DuoPattern(gates, meta)


def overlap(a: DuoPattern, b: DuoPattern, fraction: float = 0.5) -> float:
    """Fraction of ``a``'s top-``fraction`` retrieval heads that are also among ``b``'s."""
    top_a, top_b = a.retrieval_heads(fraction), b.retrieval_heads(fraction)
    return len(top_a & top_b) / max(1, len(top_a))
