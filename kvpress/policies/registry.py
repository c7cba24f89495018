"""Policies by name, for the CLI and configuration files."""

from __future__ import annotations

from typing import Any, Callable

from kvpress.policies.base import Policy
from kvpress.policies.snapkv import SnapKV
from kvpress.policies.streaming_llm import StreamingLLM

def _kvquant(**params: Any) -> Any:
    from kvpress.quant import KVQuant  # imported lazily: quantization is a storage spec, not an eviction policy

    return KVQuant(**params)


_REGISTRY: dict[str, Callable[..., Any]] = {
    "none": lambda: None,
    "streaming_llm": StreamingLLM,
    "snapkv": SnapKV,
    "kvquant": _kvquant,
}
_ALIASES = {"full": "none", "streamingllm": "streaming_llm", "sinks": "streaming_llm"}


def register_policy(name: str, factory: Callable[..., Policy | None]) -> None:
    """Make ``factory`` available as ``get_policy(name, ...)``."""
    _REGISTRY[name] = factory


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def canonical_policy_name(name: str) -> str:
    """The registry key of ``name`` (case, ``-``/``_`` and aliases resolved); raises for an unknown name."""
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available policies: {', '.join(available_policies())}")
    return key


def policy_factory(name: str) -> Callable[..., Any]:
    """The callable registered under ``name`` (for tools that inspect its parameters, e.g. sweep specs)."""
    return _REGISTRY[canonical_policy_name(name)]


def get_policy(name: str, **params: Any) -> Any:
    """Build a policy by name (``"none"`` gives ``None``: the uncompressed cache; ``"kvquant"`` a quantizer)."""
    key = canonical_policy_name(name)
    try:
        return _REGISTRY[key](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for policy {name!r}: {err}") from err
