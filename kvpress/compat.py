"""The names transformers gives the KV cache, read from signatures and output classes, never from versions.

transformers 5.24 renamed the model forward argument ``past_key_values`` to ``cache`` (the old name is still
accepted through a deprecation shim that warns, and outputs expose ``.cache`` with ``.past_key_values`` as a
warning alias). Code that hands a cache to a model or reads one back goes through these helpers, so that it
uses whichever name the installed transformers declares and never trips a deprecation warning.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import transformers

# Newest first: a forward that declares the new name is read with it even if an alias survives somewhere.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")
TRANSFORMERS_VERSION: str = transformers.__version__


@lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> tuple[str, ...]:
    # inspect.signature follows functools.wraps' __wrapped__ through transformers' decorators to the real forward.
    return tuple(inspect.signature(cls.forward).parameters)


def cache_argument(model: Any) -> str:
    """The name of the cache argument of ``model.forward``: ``"cache"`` (transformers >= 5.24) or
    ``"past_key_values"`` (older releases).

    Raises:
        ValueError: the forward declares neither name (not a transformers decoder with a KV cache).
    """
    params = _forward_parameters(type(model))
    for name in CACHE_ARGUMENT_NAMES:
        if name in params:
            return name
    raise ValueError(
        f"{type(model).__name__}.forward takes no KV cache argument (looked for {', '.join(CACHE_ARGUMENT_NAMES)}; "
        f"transformers {TRANSFORMERS_VERSION})"
    )


def cache_position_index(model: Any) -> int | None:
    """Index of the cache argument among ``model.forward``'s positional arguments (``self`` excluded)."""
    params = _forward_parameters(type(model))[1:]
    name = cache_argument(model)
    return params.index(name) if name in params else None


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the name ``model.forward`` (and ``generate``) takes: ``model(ids, **cache_kwargs(model,
    cache))``."""
    return {cache_argument(model): cache}


def cache_layer_specs(text_config: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(layer type, kwargs of its transformers cache layer)`` for every decoder layer.

    ``get_layer_types_and_kwargs`` returns one kwargs dict per layer in recent releases and one dict shared by all
    layers in older ones (e.g. 5.14); both shapes are accepted.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    if isinstance(layer_kwargs, dict):
        layer_kwargs = [dict(layer_kwargs) for _ in layer_types]
    return list(zip(layer_types, layer_kwargs, strict=True))


def output_cache(output: Any) -> Any:
    """The cache a model output carries (``output.cache`` on transformers >= 5.24, ``output.past_key_values``
    before), read without a deprecation warning; ``None`` if the output holds none."""
    fields = getattr(output, "__dataclass_fields__", None)
    if fields is not None:
        for name in CACHE_ARGUMENT_NAMES:
            if name in fields:
                return getattr(output, name)
        return None
    if isinstance(output, (tuple, list)):  # return_dict=False
        from transformers.cache_utils import Cache

        return next((item for item in output if isinstance(item, Cache)), None)
    return None
