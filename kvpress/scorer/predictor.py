"""A tiny per-layer model predicting an expensive scorer's per-entry scores from hidden states, and its file.

For layer ``l``, the input hidden states of the attention module ``h`` (``[batch, seq, hidden]``) map to one score
per KV head (``[batch, kv_heads, seq]``): ``linear``: ``h W_l + b_l``; ``mlp``: the same plus a small residual MLP,
``h W_l + b_l + gelu(h W1_l + b1_l) W2_l``.
Scores are in the teacher's log space (``log(score + eps)``), so they can be compared across layers and heads.

File format: safetensors with the stacked weights (``w``, ``b``; plus ``w1``, ``b1``, ``w2`` for the MLP; leading
axis = layer) and string metadata: ``kind``, ``num_layers``, ``hidden_size``, ``kv_heads``,
``model`` (name), ``model_signature`` (a hash of the shape-defining config fields), ``teacher`` and its
parameters, ``target``, ``data``, ``steps``, ``seed``, ``metrics`` (JSON). Loading checks the predictor against
the model and refuses a mismatch with a clear error. Predictors ship inside the package (``predictors/``) and are
never downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREDICTOR_DIR = Path(__file__).parent / "predictors"
KINDS = ("linear", "mlp")
_PARAMETERS = {"linear": ("w", "b"), "mlp": ("w", "b", "w1", "b1", "w2")}
# Weights beyond this magnitude are not a fit but a corrupted file (the shipped SmolLM2 predictors stay below 200).
MAX_WEIGHT = 1e6
# model signature fields: what makes hidden states and KV heads line up between a predictor and a model
_SIGNATURE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "vocab_size", "intermediate_size", "rope_theta")


def model_signature(config: Any) -> str:
    """A short hash of the config fields that a predictor depends on."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    values = {name: getattr(text, name, None) for name in _SIGNATURE_FIELDS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shipped_for(directory: Path, glob: str, signature: str) -> Path | None:
    """The first ``directory/glob`` safetensors file whose metadata names ``signature``, else ``None``."""
    from safetensors import safe_open

    for path in sorted(directory.glob(glob)):
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("model_signature") == signature:
                return path
    return None


class ScorePredictor(nn.Module):
    """Per-layer score predictors, stacked: ``forward(layer, hidden) -> [batch, kv_heads, seq]``."""

    def __init__(self, num_layers: int, hidden_size: int, kv_heads: int, kind: str = "linear", width: int = 64,
                 metadata: dict[str, str] | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.num_layers, self.hidden_size, self.kv_heads = kind, num_layers, hidden_size, kv_heads
        self.metadata = dict(metadata or {})
        self.w = nn.Parameter(torch.zeros(num_layers, hidden_size, kv_heads))
        self.b = nn.Parameter(torch.zeros(num_layers, kv_heads))
        if kind == "mlp":
            self.w1 = nn.Parameter(torch.zeros(num_layers, hidden_size, width))
            self.b1 = nn.Parameter(torch.zeros(num_layers, width))
            self.w2 = nn.Parameter(torch.zeros(num_layers, width, kv_heads))

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[batch, seq, hidden]`` -> scores ``[batch, kv_heads, seq]`` (float32)."""
        h = hidden.float()
        out = h @ self.w[layer] + self.b[layer]
        if self.kind == "mlp":
            out = out + nn.functional.gelu(h @ self.w1[layer] + self.b1[layer]) @ self.w2[layer]
        return out.transpose(1, 2)

    # -- files -----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in self.named_parameters()}
        meta = {**{k: str(v) for k, v in self.metadata.items()}, "kind": self.kind, "num_layers": str(self.num_layers),
                "hidden_size": str(self.hidden_size), "kv_heads": str(self.kv_heads)}
        save_file(tensors, str(path), metadata=meta)
        return path

    def check(self, model: Any) -> None:
        """Raise ``ValueError`` if this predictor was not trained for ``model``."""
        text = model.config.get_text_config(decoder=True)
        got = (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads)
        want = (self.num_layers, self.hidden_size, self.kv_heads)
        where = self.metadata.get("path", "the predictor")
        if got != want:
            raise ValueError(
                f"{where} was trained for {self.metadata.get('model', '?')} (layers, hidden size, KV heads = {want}); "
                f"this model has {got}"
            )
        signature = self.metadata.get("model_signature")
        if signature and signature != model_signature(model.config):
            raise ValueError(
                f"{where} was trained for {self.metadata.get('model', '?')} (signature {signature}); this model's "
                f"signature is {model_signature(model.config)}: train one for it with `kvpress scorer train`"
            )


def load_predictor(path: str | Path) -> ScorePredictor:
    """Read a predictor file (see the module docstring); clear errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictor file {str(path)!r} does not exist")
    from safetensors import SafetensorError, safe_open

    try:
        tensors = load_file(str(path))

        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        kind = meta["kind"]
        shape = (int(meta["num_layers"]), int(meta["hidden_size"]), int(meta["kv_heads"]))
    except (KeyError, ValueError, OSError, SafetensorError) as err:
        raise ValueError(f"{str(path)!r} is not a kvpress score predictor ({err})") from err
    if kind not in KINDS:
        raise ValueError(f"{str(path)!r}: metadata kind must be one of {KINDS}, got {kind!r}")
    if min(shape) < 1:
        raise ValueError(f"{str(path)!r}: metadata num_layers, hidden_size, kv_heads must be >= 1, got {shape}")
    names = set(_PARAMETERS[kind])
    if set(tensors) != names:
        raise ValueError(f"{str(path)!r}: its metadata says kind={kind!r}, which holds tensors {sorted(names)}; "
                         f"the file holds {sorted(tensors)}")
    width = tensors["w1"].shape[-1] if kind == "mlp" and tensors["w1"].dim() == 3 else 64
    predictor = ScorePredictor(*shape, kind=kind, width=width, metadata={**meta, "path": str(path)})
    expected = {name: tuple(p.shape) for name, p in predictor.named_parameters()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found:
        raise ValueError(f"{str(path)!r} has tensors {found}, expected {expected} for its metadata")
    for name, tensor in sorted(tensors.items()):
        if not tensor.is_floating_point():
            raise ValueError(f"{str(path)!r}: tensor {name!r} must be floating point, got {tensor.dtype}")
        values = tensor.float()
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise ValueError(f"{str(path)!r}: tensor {name!r} holds {bad} non-finite weights (NaN or Inf)")
        largest = float(values.abs().max()) if values.numel() else 0.0
        if largest > MAX_WEIGHT:
            raise ValueError(f"{str(path)!r}: tensor {name!r} holds a weight of magnitude {largest:.3g}, beyond the "
                             f"{MAX_WEIGHT:g} a trained predictor stays within: the file is corrupted")
    predictor.load_state_dict({k: v.float() for k, v in tensors.items()})
    return predictor.eval().requires_grad_(False)


def embedded_predictor(model: Any, kind: str = "mlp") -> Path:
    """Path of the predictor shipped for ``model`` (matched by signature); raises if none ships for it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    signature = model_signature(model.config)
    found = shipped_for(PREDICTOR_DIR, f"*-{kind}.safetensors", signature)
    if found is not None:
        return found
    shipped = sorted(p.name for p in PREDICTOR_DIR.glob("*.safetensors"))
    raise ValueError(
        f"no shipped {kind} predictor matches this model (signature {signature}; shipped: {shipped or 'none'}); "
        "train one with `kvpress scorer train --model ... --out scorer.safetensors` and pass predictor=<path>"
    )
