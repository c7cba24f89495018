"""Policies by name, for the CLI and configuration files."""

from __future__ import annotations

import typing
from typing import Any, Callable

from kvpress.policies.adakv import AdaKV
from kvpress.policies.base import SIZE_PARAMETERS, Policy, ScorePolicy
from kvpress.policies.decoding_budget import DecodingBudget
from kvpress.policies.duo_attention import DuoAttention
from kvpress.policies.h2o import H2O
from kvpress.policies.knorm import KeyNorm
from kvpress.policies.kvzip import KVzip
from kvpress.policies.learned import Learned
from kvpress.policies.pyramidkv import PyramidKV
from kvpress.policies.snapkv import SnapKV
from kvpress.policies.streaming_llm import StreamingLLM
from kvpress.policies.tova import TOVA


def _kvquant(**params: Any) -> Any:
    from kvpress.quant import KVQuant  # imported lazily: quantization is a storage spec, not an eviction policy

    return KVQuant(**params)


def _scorer(scorer: str | ScorePolicy, params: dict[str, Any] | None) -> ScorePolicy:
    policy = get_policy(scorer, **(params or {})) if isinstance(scorer, str) else scorer
    if not isinstance(policy, ScorePolicy):
        raise ValueError(f"scorer must name a scoring policy (e.g. snapkv, knorm, h2o), got {scorer!r}")
    return policy


def _adakv(scorer: str | ScorePolicy = "snapkv", scorer_params: dict[str, Any] | None = None,
           compression_ratio: float | None = None, budget: int | None = None, floor: float = 0.2) -> AdaKV:
    return AdaKV(_scorer(scorer, scorer_params), compression_ratio=compression_ratio, budget=budget, floor=floor)


def _pyramidkv(scorer: str | ScorePolicy = "snapkv", scorer_params: dict[str, Any] | None = None,
               compression_ratio: float | None = None, budget: int | None = None, beta: int = 20) -> PyramidKV:
    return PyramidKV(_scorer(scorer, scorer_params), compression_ratio=compression_ratio, budget=budget, beta=beta)


def _decoding_budget(budget: int | None = None, policy: str | ScorePolicy = "snapkv",
                     policy_params: dict[str, Any] | None = None, interval: int = 1, window: int = 16,
                     compression_ratio: float | None = None) -> DecodingBudget:
    params = dict(policy_params or {})
    if isinstance(policy, str) and not set(SIZE_PARAMETERS) & params.keys():
        # By name, the inner policy only scores: the budget sets the size (its own default ratio would also cut).
        params["compression_ratio"] = 0.0
    return DecodingBudget(_scorer(policy, params), budget=budget, interval=interval, window=window,
                          compression_ratio=compression_ratio)


def _duo_attention(pattern: Any = "auto", sparsity: float | None = None, n_sink: int = 16, window: int = 128,
                  threshold: float | None = None, retrieval_policy: str | Policy | None = None,
                  retrieval_params: dict[str, Any] | None = None,
                  compression_ratio: float | None = None) -> DuoAttention:
    inner = get_policy(retrieval_policy, **(retrieval_params or {})) if isinstance(retrieval_policy, str) \
        else retrieval_policy
    return DuoAttention(pattern=pattern, sparsity=sparsity, n_sink=n_sink, window=window, threshold=threshold,
                        retrieval_policy=inner, compression_ratio=compression_ratio)


_REGISTRY: dict[str, Callable[..., Any]] = {
    "none": lambda: None,
    "streaming_llm": StreamingLLM,
    "snapkv": SnapKV,
    "h2o": H2O,
    "tova": TOVA,
    "knorm": KeyNorm,
    "kvzip": KVzip,
    "learned": Learned,
    "adakv": _adakv,
    "pyramidkv": _pyramidkv,
    "decoding_budget": _decoding_budget,
    "kvquant": _kvquant,
    "duo_attention": _duo_attention,
}
_ALIASES = {"full": "none", "streamingllm": "streaming_llm", "sinks": "streaming_llm", "key_norm": "knorm",
            "keynorm": "knorm", "heavy_hitters": "h2o", "ada_kv": "adakv", "pyramid_kv": "pyramidkv",
            "duo": "duo_attention", "duoattention": "duo_attention"}


def register_policy(name: str, factory: Callable[..., Policy | None]) -> None:
    """Make ``factory`` available as ``get_policy(name, ...)``."""
    _REGISTRY[name] = factory


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def canonical_policy_name(name: str) -> str:
    """The registry key of ``name`` (case, ``-``/``_`` and aliases resolved); raises for an unknown name."""
    if not isinstance(name, str):
        raise ValueError(f"policy name must be a string (one of: {', '.join(available_policies())}), got {name!r}")
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available policies: {', '.join(available_policies())}")
    return key


def policy_factory(name: str) -> Callable[..., Any]:
    """The callable registered under ``name`` (for tools that inspect its parameters, e.g. sweep specs)."""
    return _REGISTRY[canonical_policy_name(name)]


def size_parameters(name: str) -> tuple[str, ...]:
    """The parameters that size the policy registered as ``name`` (``compression_ratio``, ``budget``, and its own:
    StreamingLLM's ``window``, DuoAttention's ``sparsity``/``threshold``): read from the class it builds."""
    factory = policy_factory(name)
    try:
        cls = factory if isinstance(factory, type) else typing.get_type_hints(factory).get("return")
    except Exception:  # noqa: BLE001 - a third-party factory whose annotations do not resolve: the defaults
        cls = None
    return tuple(getattr(cls, "size_parameters", SIZE_PARAMETERS))


def get_policy(name: str, **params: Any) -> Any:
    """Build a policy by name (``"none"`` gives ``None``: the uncompressed cache; ``"kvquant"`` a quantizer).

    Wrappers take their inner policy by name: ``get_policy("adakv", scorer="snapkv", compression_ratio=0.5)``,
    ``get_policy("decoding_budget", policy="h2o", budget=256)``. ``sliding_layers=True`` makes an eviction
    policy act on sliding-window layers too (:meth:`Policy.on_sliding_layers`).
    """
    factory = policy_factory(name)
    sliding = params.pop("sliding_layers", None)
    try:
        policy = factory(**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for policy {name!r}: {err}") from err
    if sliding is not None:
        if not isinstance(policy, Policy):
            raise ValueError(f"sliding_layers applies to eviction policies, not to {name!r}")
        policy.on_sliding_layers(sliding)
    return policy
