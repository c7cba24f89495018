"""Saved compressed caches: ``cache.save(path)`` and ``kvpress.load_cache(path, model)``.

A kvpress cache physically holds less (evicted tokens are gone, quantized layers are packed codes), so its file is
small: compress a long document once, then answer questions about it from any process by loading the file
instead of prefilling the text again.

File format (safetensors, never pickle): every tensor of every layer under ``layers.<i>.<name>`` (a storage's
tensors under ``layers.<i>.storage.``, a policy's per-layer memory under ``layers.<i>.policy.``), the cache's
cross-layer policy memory under ``model_state.``, and one metadata entry ``kvpress`` holding JSON:

    format, format_version     "kvpress-cache", :data:`FORMAT_VERSION`
    kvpress_version            the version that wrote the file
    model                      :func:`model_signature` of the model that built the cache
    policy                     the policy expression that built it (text, may be ``None``)
    prompt_tokens              tokens of the prompt it holds (default: the tokens seen)
    layers                     per layer: its kind, tokens seen, dtype, storage metadata, policy memory skeleton
    layouts                    tensor name -> dimension order when a tensor is held in another memory order
    checksum                   sha256 over every tensor's bytes (in name order), to refuse a corrupted file

Loading refuses another model (architecture, dtype or weights), an unknown format version, a truncated or
corrupted file, and a directory, each with a :class:`CacheFileError` naming the problem. Tensors keep their exact
dtype and memory order, so a loaded cache continues token for token as the saved one would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from kvpress.cache import SIGNATURE_FIELDS as _SIGNATURE_FIELDS
from kvpress.cache import CompressedLayer, KVPressCache, config_signature, set_cache_writer
from kvpress.storage.base import prefixed, storage_from_state, storage_state, under

FORMAT = "kvpress-cache"
FORMAT_VERSION = 1
META_KEY = "kvpress"
_FINGERPRINT_ELEMENTS = 256  # first elements of every parameter hashed into the weights fingerprint


class CacheFileError(ValueError):
    """A saved cache that cannot be loaded (wrong model, unknown format version, truncated or corrupted file)."""


# ------------------------------------------------------------------------------------------------ model signature
def model_signature(model: Any) -> dict[str, Any]:
    """What identifies the model a cache belongs to: architecture fields, parameter dtype, a fingerprint of the
    weights (sha256 of the first elements of every parameter), and its name (informational only)."""
    digest = hashlib.sha256()
    dtype = None
    for name, param in model.named_parameters():
        dtype = dtype or param.dtype
        head = param.detach().reshape(-1)[:_FINGERPRINT_ELEMENTS].to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(head.numpy().tobytes())
    return {
        **config_signature(model.config),
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "weights": digest.hexdigest()[:32],
        "name": getattr(model.config, "_name_or_path", None) or None,
    }


def _signature_of(cache: "KVPressCache", model: Any) -> dict[str, Any]:
    if model is None:
        ref = getattr(cache, "source_model", None)
        model = ref() if isinstance(ref, weakref.ref) else None
    if model is not None:
        return model_signature(model)
    return {**cache.config_signature, "dtype": None, "weights": None, "name": None}


def check_signature(saved: dict[str, Any], model: Any, path: Any) -> None:
    """Raise :class:`CacheFileError` when ``model`` is not the model the cache at ``path`` was saved from."""
    current = model_signature(model)
    for name in (*_SIGNATURE_FIELDS, "dtype", "weights"):
        if saved.get(name) is None and name in ("dtype", "weights"):
            continue  # saved without a model at hand: architecture only
        if saved.get(name) != current.get(name):
            what = "weights" if name == "weights" else f"{name} {saved.get(name)!r} (this model: {current.get(name)!r})"
            raise CacheFileError(
                f"{path}: saved from another model ({saved.get('name') or 'unnamed'}): its {what} differ"
                if name == "weights"
                else f"{path}: saved from another model ({saved.get('name') or 'unnamed'}): {what}"
            )


# ------------------------------------------------------------------------------------------- nested plain values
def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON skeleton of ``value`` (dicts, lists, tuples, tensors, plain scalars); tensors go to ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"tensor": path}
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise TypeError(f"cannot save {path}: key {key!r} is not an int or a str")
            items.append([key, _encode(item, tensors, f"{path}.{key}")])
        return {"dict": items}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot save {path}: a {type(value).__name__} is not a tensor or plain value")


def _decode(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(skeleton, dict) or len(skeleton) != 1:
        raise CacheFileError(f"malformed policy state entry {skeleton!r}")
    (kind, body), = skeleton.items()
    if kind == "tensor":
        if body not in tensors:
            raise CacheFileError(f"policy state names a missing tensor {body!r}")
        return tensors[body]
    if kind == "dict":
        return {key: _decode(item, tensors) for key, item in body}
    if kind == "list":
        return [_decode(v, tensors) for v in body]
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in body)
    if kind == "value":
        return body
    raise CacheFileError(f"malformed policy state entry {skeleton!r}")


# ---------------------------------------------------------------------------------------------- tensor layouts
def _layout(t: torch.Tensor) -> list[int] | None:
    """A dimension order in which ``t`` is contiguous when it is not contiguous as is (e.g. a column-major
    factor), so it is written without a copy and read back with the same strides; ``None`` otherwise."""
    if t.is_contiguous() or t.dim() < 2:
        return None
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    return order if t.permute(order).is_contiguous() else None


def _plain_bytes(t: torch.Tensor) -> bytes | memoryview:
    flat = t.reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else b""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}:{str(t.dtype)}:{tuple(t.shape)};".encode())
        digest.update(_plain_bytes(t))
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------------- save
def save_cache(
    cache: "KVPressCache",
    path: str | os.PathLike,
    *,
    model: Any = None,
    policy: str | None = None,
    prompt_tokens: int | None = None,
    extra: dict[str, Any] | None = None,
) -> int:
    """Write ``cache`` to ``path`` (safetensors); returns the file's bytes.

    Args:
        model: the model the cache belongs to (default: the one whose ``kvpress.patch`` built the cache).
        policy: the policy expression that built the cache (e.g.
            ``"learned(compression_ratio=0.5) | kvquant(bits=4)"``), recorded for ``kvpress cache info`` and to continue under the same policy; default: the cache's own
            ``policy_expression`` if set.
        prompt_tokens: tokens of the prompt the cache holds (default: tokens seen by the cache).
        extra: further JSON-able metadata (e.g. how the CLI formatted the prompt).
    """
    from kvpress import __version__

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"save: {path} is a directory; give a file path such as {path / 'cache.kvc'}")
    raw: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any]] = []
    seen = 0
    for idx, layer in enumerate(cache.layers):
        prefix = f"layers.{idx}."
        if isinstance(layer, CompressedLayer):
            entry: dict[str, Any] = {
                "kind": "compressed",
                "seen_tokens": layer.seen_tokens,
                "initialized": layer.is_initialized,
                "dtype": str(getattr(layer, "dtype", None)).replace("torch.", "") if layer.is_initialized else None,
                # bytes of one token in the uncompressed layer (the report's reference)
                "token_nbytes": getattr(layer, "token_nbytes", None),
            }
            if layer.is_initialized:
                tensors, meta = storage_state(layer.storage)
                raw.update(prefixed(tensors, prefix + "storage."))
                entry["storage"] = meta
            entry["policy_state"] = _encode(layer.policy_state, raw, prefix + "policy")
            seen = max(seen, layer.seen_tokens)
        else:
            attributes = _layer_attributes(layer, raw, prefix)
            entry = {"kind": "transformers", "class": type(layer).__name__, "attributes": attributes}
        layers.append(entry)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kvpress_version": __version__,
        "model": _signature_of(cache, model),
        "policy": policy if policy is not None else getattr(cache, "policy_expression", None),
        "prompt_tokens": int(prompt_tokens if prompt_tokens is not None else cache.prompt_tokens or seen),
        "tokens_seen": seen,
        "layers": layers,
        "model_state": _encode(cache.model_state, raw, "model_state"),
        "extra": extra if extra is not None else dict(getattr(cache, "extra", None) or {}),
    }
    tensors, layouts = _writable(raw)
    header["layouts"] = layouts
    header["checksum"] = _checksum(tensors)
    data = save_safetensors(tensors, metadata={META_KEY: json.dumps(header)})
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # never leave a half-written file under the final name
    return len(data)


def _writable(raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """CPU, contiguous, unshared copies of ``raw`` (no copy where not needed) and the layouts of permuted ones."""
    out: dict[str, torch.Tensor] = {}
    layouts: dict[str, list[int]] = {}
    seen_storage: set[int] = set()
    for name, t in raw.items():
        t = t.detach()
        order = _layout(t)
        if order is not None:
            layouts[name] = order
            t = t.permute(order)
        t = t.to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen_storage.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out, layouts


def _layer_attributes(layer: Any, raw: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """A transformers cache layer's attributes (sliding-window layers): tensors to ``raw``, the rest as JSON."""
    attributes: dict[str, Any] = {}
    for name, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            raw[prefix + "attr." + name] = value
            attributes[name] = {"tensor": prefix + "attr." + name}
        elif isinstance(value, torch.dtype):
            attributes[name] = {"dtype": str(value).replace("torch.", "")}
        elif isinstance(value, torch.device):
            attributes[name] = {"device": None}  # restored as the loading device
        elif value is None or isinstance(value, (bool, int, float, str)):
            attributes[name] = {"value": value}
        else:
            raise TypeError(f"cannot save layer {prefix[:-1]} ({type(layer).__name__}): attribute {name!r} is a "
                            f"{type(value).__name__}")  # fmt: skip
    return attributes


# -------------------------------------------------------------------------------------------------------- read
def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], int]:
    """``(kvpress metadata, safetensors tensor table, data offset)`` of a saved cache, checked for format,
    version and completeness without reading the tensors."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a saved kvpress cache file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such saved cache file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CacheFileError(f"{path}: truncated or not a kvpress cache ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CacheFileError(f"{path}: truncated or not a kvpress cache (header of {n} bytes, file of {size})")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CacheFileError(f"{path}: corrupted header ({err})") from None
    if not isinstance(table, dict):
        raise CacheFileError(f"{path}: corrupted header (not a JSON object)")
    meta_entry = table.pop("__metadata__", None) or {}
    if META_KEY not in meta_entry:
        raise CacheFileError(f"{path}: a safetensors file without kvpress metadata, not a saved kvpress cache")
    try:
        meta = json.loads(meta_entry[META_KEY])
    except json.JSONDecodeError as err:
        raise CacheFileError(f"{path}: corrupted kvpress metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CacheFileError(f"{path}: not a kvpress cache (format {found!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheFileError(
            f"{path}: format version {version!r} written by kvpress {meta.get('kvpress_version')}; this kvpress reads "
            f"version {FORMAT_VERSION} only"
        )
    end = max((int(info["data_offsets"][1]) for info in table.values()), default=0)
    if 8 + n + end != size:
        raise CacheFileError(f"{path}: truncated or corrupted ({size} bytes, the header describes {8 + n + end})")
    return meta, table, 8 + n


def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """What ``kvpress cache info`` prints: model, policy, tokens, bytes per layer (from the header only)."""
    meta, table, _ = read_header(path)
    per_layer = [0] * len(meta["layers"])
    for name, info in table.items():
        if name.startswith("layers."):
            idx = int(name.split(".")[1])
            per_layer[idx] += int(info["data_offsets"][1]) - int(info["data_offsets"][0])
    kinds = []
    for entry in meta["layers"]:
        if entry["kind"] == "compressed":
            kinds.append(entry.get("storage", {}).get("kind", "empty"))
        else:
            kinds.append(entry["class"])
    return {
        "file_bytes": Path(path).stat().st_size,
        "model": meta["model"],
        "policy": meta.get("policy"),
        "prompt_tokens": meta.get("prompt_tokens"),
        "tokens_seen": meta.get("tokens_seen"),
        "kvpress_version": meta.get("kvpress_version"),
        "format_version": meta.get("format_version"),
        "layer_kinds": kinds,
        "layer_bytes": per_layer,
        "extra": meta.get("extra") or {},
    }


def load_cache(path: str | os.PathLike, model: Any, *, device: str | torch.device | None = None) -> "KVPressCache":
    """Read a cache saved by :meth:`KVPressCache.save` for ``model``.

    Continue from it under ``kvpress.patch(model, policy)`` by passing it as the model's cache: greedy decoding
    then gives the tokens the saved cache would have given. ``cache.policy_expression``,
    ``cache.prompt_tokens`` and ``cache.extra`` hold the saved metadata.

    Raises:
        IsADirectoryError / FileNotFoundError: ``path`` is a directory / does not exist.
        CacheFileError: another model, an unknown format version, a truncated or corrupted file.
    """

    meta, _, _ = read_header(path)
    check_signature(meta["model"], model, path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # noqa: BLE001 - safetensors' own error types vary by version
        raise CacheFileError(f"{path}: corrupted tensor data ({err})") from None
    if _checksum(tensors) != meta.get("checksum"):
        raise CacheFileError(f"{path}: corrupted: the tensors' checksum does not match the one saved")
    target = torch.device(device) if device is not None else model.device
    for name, order in (meta.get("layouts") or {}).items():
        inverse = sorted(range(len(order)), key=order.__getitem__)
        tensors[name] = tensors[name].permute(inverse)
    tensors = {name: t.to(target) for name, t in tensors.items()}

    cache = KVPressCache(model.config)
    if len(meta["layers"]) != len(cache.layers):
        raise CacheFileError(f"{path}: {len(meta['layers'])} layers saved, the model has {len(cache.layers)}")
    factory = None
    try:
        for idx, (entry, layer) in enumerate(zip(meta["layers"], cache.layers)):
            prefix = f"layers.{idx}."
            if entry["kind"] == "compressed":
                if not isinstance(layer, CompressedLayer):
                    raise CacheFileError(f"{path}: layer {idx} was saved compressed, the model's is "
                                         f"{type(layer).__name__}")  # fmt: skip
                _restore_compressed(layer, entry, tensors, prefix, target)
                spec = getattr(layer.storage, "spec", None)
                if factory is None and spec is not None and hasattr(spec, "create_storage"):
                    factory = spec.create_storage
            else:
                if type(layer).__name__ != entry["class"]:
                    raise CacheFileError(f"{path}: layer {idx} was saved as {entry['class']}, the model's is "
                                         f"{type(layer).__name__}")  # fmt: skip
                _restore_attributes(layer, entry["attributes"], tensors, target)
        cache.model_state = _decode(meta["model_state"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CacheFileError):
            raise
        raise CacheFileError(f"{path}: corrupted cache structure ({type(err).__name__}: {err})") from None
    if factory is not None:
        cache.storage_factory = factory
        for layer in cache.layers:
            if isinstance(layer, CompressedLayer):
                layer.storage_factory = factory
    cache.source_model = weakref.ref(model)
    cache.policy_expression = meta.get("policy")
    cache.prompt_tokens = meta.get("prompt_tokens")
    cache.extra = meta.get("extra") or {}
    return cache


def _restore_compressed(layer: Any, entry: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str,
                        device: torch.device) -> None:  # fmt: skip
    layer.seen_tokens = int(entry["seen_tokens"])
    layer.policy_state = _decode(entry["policy_state"], tensors)
    if entry["initialized"]:
        layer.storage = storage_from_state(under(tensors, prefix + "storage."), entry["storage"])
        layer.is_initialized = True
        layer.dtype = getattr(torch, entry["dtype"])
        layer.device = device
        if entry.get("token_nbytes") is not None:
            layer.token_nbytes = int(entry["token_nbytes"])


def _restore_attributes(layer: Any, attributes: dict[str, Any], tensors: dict[str, torch.Tensor],
                        device: torch.device) -> None:  # fmt: skip
    for name, saved in attributes.items():
        (kind, value), = saved.items()
        if kind == "tensor":
            setattr(layer, name, tensors[value])
        elif kind == "dtype":
            setattr(layer, name, getattr(torch, value))
        elif kind == "device":
            setattr(layer, name, device)
        else:
            setattr(layer, name, value)


# ----------------------------------------------------------------------------------------------- one storage
def storage_to_bytes(storage: Any) -> bytes:
    """One layer's storage as a safetensors blob, in the same form a saved cache holds it (tests, transport)."""
    tensors, meta = storage_state(storage)
    tensors, layouts = _writable(tensors)
    header = {"storage": meta, "layouts": layouts, "checksum": _checksum(tensors)}
    return save_safetensors(tensors, metadata={META_KEY: json.dumps(header)})


def storage_from_bytes(data: bytes, device: str | torch.device = "cpu") -> Any:
    """Inverse of :func:`storage_to_bytes`."""
    tensors = load_safetensors(data)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(json.loads(data[8:8 + n])["__metadata__"][META_KEY])
    if _checksum(tensors) != header["checksum"]:
        raise CacheFileError("storage blob: corrupted (checksum mismatch)")
    for name, order in header["layouts"].items():
        tensors[name] = tensors[name].permute(sorted(range(len(order)), key=order.__getitem__))
    return storage_from_state({k: t.to(device) for k, t in tensors.items()}, header["storage"])


set_cache_writer(save_cache)  # KVPressCache.save writes through this module
