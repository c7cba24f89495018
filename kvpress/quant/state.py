"""The saved form of a :class:`~kvpress.quant.storage.QuantizedStorage` (used by :mod:`kvpress.persist`).

Everything a quantized layer holds is written: the exact segments (sinks, residual window), the packed body
(codes, scales and zeros, GEAR low-rank factors and outliers, group lengths and blocks), positions, validity, the
exact copy of the last append if one is pending, and per-layer calibrated rotations. Shared rotations (constants
of the :class:`~kvpress.quant.KVQuant` spec, like weights) are not written; they are rebuilt from the spec, which
is written as its parameters. Nothing is pickled: metadata is plain JSON.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any

import torch

from kvpress.quant.body import BodyConfig, QuantizedBody
from kvpress.storage.base import StorageState, optional_tensors, prefixed, under

if TYPE_CHECKING:
    from kvpress.quant.config import KVQuant

_EXACT = ("sink_k", "sink_v", "res_k", "res_v", "positions", "valid")
_DTYPE_FIELDS = ("scale_dtype", "fp_dtype", "factor_dtype")


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.float16`` -> ``"float16"`` (``None`` stays ``None``)."""
    return None if dtype is None else str(dtype).replace("torch.", "")


def dtype_from_name(name: str | None, what: str) -> torch.dtype | None:
    """Inverse of :func:`dtype_name`; a clear error for anything that is not a torch dtype's name."""
    if name is None:
        return None
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{what}: {name!r} is not a torch dtype")
    return value


def spec_to_json(spec: "KVQuant") -> dict[str, Any]:
    """The spec's constructor arguments as JSON (dtypes by name)."""
    return spec.params()


def spec_from_json(params: dict[str, Any]) -> "KVQuant":
    from kvpress.quant.config import KVQuant

    args = dict(params)
    for name in ("scale_dtype", "fp_dtype"):
        if name in args:
            args[name] = dtype_from_name(args[name], f"kvquant {name}")
    return KVQuant(**args)


def _config_to_json(cfg: BodyConfig) -> dict[str, Any]:
    out = asdict(cfg)
    for name in _DTYPE_FIELDS:
        if name in out:
            out[name] = dtype_name(out[name])
    return out


def _config_from_json(params: dict[str, Any]) -> BodyConfig:
    args = dict(params)
    for name in _DTYPE_FIELDS:
        if name in args:
            args[name] = dtype_from_name(args[name], f"body config {name}")
    return BodyConfig(**args)


def body_state(body: QuantizedBody) -> dict[str, torch.Tensor]:
    """The body's tensors by field name (``None`` fields left out)."""
    return optional_tensors(**{f.name: getattr(body, f.name) for f in fields(body) if f.name != "cfg"})


def body_from_state(cfg: BodyConfig, tensors: dict[str, torch.Tensor]) -> QuantizedBody:
    names = {f.name for f in fields(QuantizedBody)} - {"cfg"}
    unknown = sorted(set(tensors) - names)
    if unknown:
        raise ValueError(f"quantized body state has unknown tensors {unknown}")
    return QuantizedBody(cfg, **tensors)


def quantized_state(storage: Any) -> StorageState:
    """``(tensors, meta)`` of a quantized layer (see the module docstring)."""
    meta: dict[str, Any] = {
        "spec": spec_to_json(storage.spec),
        "layer_idx": storage.layer_idx,
        "kernels": storage.kernels,
        "initialised": storage.cfg is not None,
    }
    if storage.cfg is None:
        return {}, meta
    meta.update(
        cfg=_config_to_json(storage.cfg),
        dtype=dtype_name(storage.dtype),
        fp_dtype=dtype_name(storage.fp_dtype),
        rotation_owned=storage.rotation_owned,
        key_rotation=storage.key_rotation is not None,
        value_rotation=storage.value_rotation is not None,
        body=storage.body is not None,
        masked_slots=storage.masked_slots,
    )
    tensors = optional_tensors(**{name: getattr(storage, name) for name in _EXACT})
    if storage.fresh is not None:
        tensors["fresh_k"], tensors["fresh_v"] = storage.fresh
    if storage.rotation_owned:
        tensors.update(optional_tensors(key_rotation=storage.key_rotation, value_rotation=storage.value_rotation))
    if storage.body is not None:
        tensors.update(prefixed(body_state(storage.body), "body."))
    return tensors, meta


def quantized_from_state(cls: type, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Any:
    """Inverse of :func:`quantized_state`: a ``cls`` (:class:`~kvpress.quant.storage.QuantizedStorage`, passed in
    so that this module never imports the storage it serves)."""
    storage = cls(spec_from_json(meta["spec"]), int(meta.get("layer_idx", 0)))
    storage.kernels = meta.get("kernels")
    if not meta.get("initialised"):
        return storage
    storage.cfg = _config_from_json(meta["cfg"])
    storage.dtype = dtype_from_name(meta["dtype"], "quantized storage dtype")
    storage.fp_dtype = dtype_from_name(meta["fp_dtype"], "quantized storage fp_dtype")
    for name in _EXACT:
        setattr(storage, name, tensors.get(name))
    if storage.sink_k is None or storage.res_k is None:
        raise ValueError("quantized storage state lacks its sink or residual tensors")
    if "fresh_k" in tensors:
        storage.fresh = (tensors["fresh_k"], tensors["fresh_v"])
    storage.rotation_owned = bool(meta["rotation_owned"])
    if storage.rotation_owned:
        storage.key_rotation, storage.value_rotation = tensors.get("key_rotation"), tensors.get("value_rotation")
    elif meta["key_rotation"] or meta["value_rotation"]:
        rk, rv, _ = storage.spec.rotations(storage.cfg.head_dim, storage.sink_k.device)
        storage.key_rotation = rk if meta["key_rotation"] else None
        storage.value_rotation = rv if meta["value_rotation"] else None
    if meta["body"]:
        storage.body = body_from_state(storage.cfg, under(tensors, "body."))
    storage.masked_slots = int(meta.get("masked_slots", 0))
    return storage
