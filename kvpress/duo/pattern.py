"""DuoAttention head patterns: one gate per (layer, KV head), and their safetensors file.

A gate ``alpha`` in [0, 1] says how much a head needs the whole context: 1 = retrieval head (full cache), 0 =
streaming head (attention sinks + a recent window are enough). :meth:`DuoPattern.streaming` turns the gates into a
``[layers, kv_heads]`` bool map of streaming heads, for a target ``sparsity`` (fraction of heads made streaming,
lowest gates first, over the whole model) or a gate ``threshold``.

File format: safetensors with one tensor ``gates`` (float32 ``[num_layers, kv_heads]``) and string metadata:
``format`` (``kvpress-duo-pattern/1``), ``num_layers``, ``kv_heads``, ``model`` (name), ``model_signature`` (hash of
the shape-defining config fields, as for the learned scorer), ``method`` (``trained`` / ``needle`` / ...),
``n_sink`` and ``window`` it was identified with, ``steps``, ``seed``, ``data`` (dataset description), ``seconds``
(identification time) and free-form extras. Loading checks the file; :meth:`DuoPattern.check` checks it against a
model and raises a clear error on a mismatch. Patterns ship inside the package (``patterns/``) and are never
downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvpress.compat import cache_layer_specs
from kvpress.scorer.predictor import model_signature, shipped_for

PATTERN_DIR = Path(__file__).parent / "patterns"
FORMAT = "kvpress-duo-pattern/1"


def _model_shape(model_or_config: Any) -> tuple[int, int]:
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers), int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)


def layer_types(model_or_config: Any) -> list[str]:
    """The kind of every decoder layer (``"full_attention"``, ``"sliding_attention"``, ...), as the kvpress cache
    lays them out (:func:`kvpress.compat.cache_layer_specs`)."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return [kind for kind, _ in cache_layer_specs(text)]


def growing_layers(model_or_config: Any) -> torch.Tensor:
    """``[num_layers]`` bool: the full-attention layers, whose cache grows with the context (a sliding-window
    ring is bounded already): where streaming heads save memory and where identification looks for them."""
    return torch.tensor([kind == "full_attention" for kind in layer_types(model_or_config)])


@dataclass
class DuoPattern:
    """Gates ``[num_layers, kv_heads]`` (float32 in [0, 1]) and the metadata of how they were found."""

    gates: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        gates = torch.as_tensor(self.gates)
        if gates.dim() != 2 or gates.numel() == 0:
            raise ValueError(f"a DuoAttention pattern is a [layers, kv_heads] tensor of gates, got shape "
                             f"{tuple(gates.shape)}")
        gates = gates.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(gates).all()) or bool((gates < 0).any()) or bool((gates > 1).any()):
            raise ValueError("DuoAttention gates must be finite numbers in [0, 1]")
        self.gates = gates
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}

    @property
    def num_layers(self) -> int:
        return self.gates.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.gates.shape[1]

    @property
    def where(self) -> str:
        return self.metadata.get("path", "the DuoAttention pattern")

    def streaming(self, sparsity: float | None = None, threshold: float | None = None,
                  eligible: torch.Tensor | None = None) -> torch.Tensor:
        """``[num_layers, kv_heads]`` bool, True for streaming heads.

        ``sparsity``: that fraction of the eligible heads (rounded to the nearest count) with the lowest gates is
        streaming (ties broken by layer then head, deterministic). ``threshold``: eligible heads with a gate below
        it are streaming. ``eligible``: ``[num_layers]`` bool, the layers the policy acts on (default all): on a
        model with sliding-window layers only the full-attention ones, whose caches grow with the context, are
        candidates; a sliding layer is never made streaming and never counts in the fraction.
        """
        if (sparsity is None) == (threshold is None):
            raise ValueError("give exactly one of sparsity or threshold")
        layers = torch.ones(self.num_layers, dtype=torch.bool) if eligible is None else torch.as_tensor(
            eligible, dtype=torch.bool).cpu()
        if layers.shape != (self.num_layers,):
            raise ValueError(f"eligible must be [{self.num_layers}] (one flag per layer), got {tuple(layers.shape)}")
        candidate = layers[:, None].expand_as(self.gates)
        if threshold is not None:
            return (self.gates < float(threshold)) & candidate
        flat = torch.where(candidate, self.gates, torch.inf).flatten()  # ineligible heads sort last
        n_stream = math.floor(float(sparsity) * int(candidate.sum()) + 0.5)
        order = torch.sort(flat, stable=True).indices
        out = torch.zeros(flat.numel(), dtype=torch.bool)
        out[order[:n_stream]] = True
        return out.view_as(self.gates)

    @property
    def identified_layers(self) -> torch.Tensor:
        """``[num_layers]`` bool: the layers identification looked at (all, unless the metadata's
        ``identified_layers`` lists the full-attention layers of a model with sliding-window ones)."""
        listed = self.metadata.get("identified_layers")
        out = torch.zeros(self.num_layers, dtype=torch.bool) if listed else torch.ones(self.num_layers, dtype=torch.bool)
        if listed:
            out[[int(i) for i in listed.split(",")]] = True
        return out

    def retrieval_heads(self, fraction: float = 0.5) -> set[tuple[int, int]]:
        """The ``fraction`` of heads with the highest gates, as ``{(layer, head)}`` (to compare patterns)."""
        streaming = self.streaming(sparsity=1.0 - fraction)
        return {(int(layer), int(head)) for layer, head in (~streaming).nonzero().tolist()}

    # -- checks and files --------------------------------------------------------------------------------------
    def check(self, model: Any) -> None:
        """Raise ``ValueError`` if this pattern was not identified on ``model`` (layer / head counts, signature)."""
        got = _model_shape(model)
        want = (self.num_layers, self.kv_heads)
        trained_for = self.metadata.get("model", "?")
        if got != want:
            raise ValueError(f"{self.where} was identified on {trained_for} (layers, KV heads = {want}); this model "
                             f"has {got}: run `kvpress duo identify` on it")
        signature = self.metadata.get("model_signature")
        config = getattr(model, "config", model)
        if signature and signature != model_signature(config):
            raise ValueError(f"{self.where} was identified on {trained_for} (signature {signature}); this model's "
                             f"signature is {model_signature(config)}: run `kvpress duo identify` on it")

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in self.metadata.items() if k != "path"}
        meta.update(format=FORMAT, num_layers=str(self.num_layers), kv_heads=str(self.kv_heads))
        save_file({"gates": self.gates}, str(path), metadata=meta)
        return path


def load_pattern(path: str | Path) -> DuoPattern:
    """Read a pattern file (see the module docstring); clear errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DuoAttention pattern file {str(path)!r} does not exist")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            names = set(handle.keys())
            gates = handle.get_tensor("gates") if "gates" in names else None
        if meta.get("format") != FORMAT or gates is None:
            raise ValueError(f"format {meta.get('format')!r}, tensors {sorted(names)}")
        shape = (int(meta["num_layers"]), int(meta["kv_heads"]))
    except (KeyError, ValueError, OSError, SafetensorError) as err:
        raise ValueError(f"{str(path)!r} is not a kvpress DuoAttention pattern ({err})") from err
    if tuple(gates.shape) != shape:
        raise ValueError(f"{str(path)!r} holds gates of shape {tuple(gates.shape)}, its metadata says {shape}")
    return DuoPattern(gates.float(), {**meta, "path": str(path)})


def embedded_pattern(model: Any) -> Path:
    """Path of the pattern shipped for ``model`` (matched by model signature); raises if none ships for it."""
    signature = model_signature(getattr(model, "config", model))
    found = shipped_for(PATTERN_DIR, "*.safetensors", signature)
    if found is not None:
        return found
    shipped = sorted(p.name for p in PATTERN_DIR.glob("*.safetensors"))
    raise ValueError(
        f"no shipped DuoAttention pattern matches this model (signature {signature}; shipped: {shipped or 'none'}); "
        "identify one with `kvpress duo identify --model ... --out pattern.safetensors` and pass pattern=<path>"
    )


def as_pattern(pattern: Any) -> DuoPattern:
    """A :class:`DuoPattern` from a pattern, a path, or a ``[layers, kv_heads]`` tensor of gates."""
    if isinstance(pattern, DuoPattern):
        return pattern
    if isinstance(pattern, (str, Path)):
        return load_pattern(pattern)
    if isinstance(pattern, torch.Tensor):
        return DuoPattern(pattern, {"method": "tensor"})
    raise ValueError(f"pattern must be 'auto', a path, a DuoPattern or a [layers, kv_heads] tensor, got {pattern!r}")
