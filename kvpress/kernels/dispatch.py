"""Which implementation runs: the fused Triton kernels or the torch paths, and the entry points storage calls.

Choice, first match wins:

1. an explicit ``backend=`` argument, then :func:`force_backend` (a context manager), then the environment
   variable ``KVPRESS_KERNELS``: ``"torch"`` forces the torch path; ``"triton"`` forces the kernels and raises
   a ``ValueError`` naming the reason when they cannot run (Triton not importable, a CPU tensor without
   ``TRITON_INTERPRET=1``, an unsupported head_dim, bit width, value group or dtype); ``"auto"`` (default):
2. CUDA tensors use the kernels when they support the case, and otherwise fall back to torch with one warning
   per reason; CPU tensors use the torch paths (their intended path: no warning).

``TRITON_INTERPRET=1`` (set before the kernels are first used) runs the Triton kernels on CPU through Triton's
interpreter, which the tests use with ``KVPRESS_KERNELS=triton``; it is about a thousand times slower than torch.
"""

from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from kvpress.kernels.layout import PackedBody
from kvpress.kernels.partial import AttentionPartial
from kvpress.kernels.quant_decode_torch import quant_decode_torch
from kvpress.kernels.ragged_decode_torch import ragged_decode_torch

ENV_VAR = "KVPRESS_KERNELS"
BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_BITS = (2, 3, 4, 8)

_forced: list[str] = []
_warned: set[str] = set()


def _check_backend(value: str, source: str) -> str:
    if value not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {value!r}")
    return value


@contextmanager
def force_backend(backend: str) -> Iterator[None]:
    """Use ``backend`` (``"auto"``, ``"torch"`` or ``"triton"``) for kernel dispatch inside the block."""
    _forced.append(_check_backend(backend, "force_backend(backend)"))
    try:
        yield
    finally:
        _forced.pop()


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: argument, then :func:`force_backend`, then ``KVPRESS_KERNELS``, else ``"auto"``."""
    if backend is not None:
        return _check_backend(backend, "backend")
    if _forced:
        return _forced[-1]
    return _check_backend(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """``None`` when Triton imports, else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install 'kvpress[triton]'"
    return None


def triton_unsupported(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    bits: tuple[int, ...] = (),
    value_group: int | None = None,
    scale_dtype: torch.dtype | None = None,
) -> str | None:
    """Why the Triton kernels cannot run this case, or ``None`` when they can."""
    error = triton_import_error()
    if error:
        return error
    if device.type != "cuda" and not interpreting():
        return f"tensors are on {device.type}: the Triton kernels need CUDA (or TRITON_INTERPRET=1 for tests)"
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not supported (kernels take {', '.join(str(d) for d in KERNEL_DTYPES)})"
    if not (16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0):
        return f"head_dim={head_dim} is not supported (a power of two in [16, 256])"
    for b in bits:
        if b not in KERNEL_BITS:
            return f"bits={b} is not supported (kernels take {KERNEL_BITS})"
    if value_group is not None and (head_dim % value_group or value_group & (value_group - 1)):
        return f"value group of {value_group} channels is not supported (a power of two dividing head_dim)"
    if scale_dtype is not None and scale_dtype not in KERNEL_DTYPES:
        return f"scale dtype {scale_dtype} is not supported"
    return None


def choose_backend(what: str, backend: str | None = None, **case) -> str:
    """``"triton"`` or ``"torch"`` for one call (``case``: the arguments of :func:`triton_unsupported`).

    Raises:
        ValueError: Triton was forced (argument, :func:`force_backend` or ``KVPRESS_KERNELS=triton``) and
            cannot run this case.
    """
    asked = requested_backend(backend)
    if asked == "torch":
        return "torch"
    reason = triton_unsupported(**case)
    if asked == "triton":
        if reason:
            raise ValueError(f"the Triton {what} kernel was forced ({ENV_VAR}=triton or backend='triton') but "
                             f"cannot run: {reason}")  # fmt: skip
        return "triton"
    if case["device"].type != "cuda":
        return "torch"
    if reason:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"kvpress: {what} runs the torch path instead of the Triton kernel: {reason}",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
        return "torch"
    return "triton"


# -- entry points ----------------------------------------------------------------------------------------------
def quantized_decode(
    query: torch.Tensor,
    body: PackedBody,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
) -> AttentionPartial:
    """Decode attention over a packed quantized body; see
    :func:`~kvpress.kernels.quant_decode_torch.quant_decode_torch` for the contract.

    ``dtype`` is the model's compute dtype (what the kernel support is checked against; default the query's). The
    Triton kernel runs its dots in it (tensor cores for float16 / bfloat16, float32 FMA for float32); the torch
    path computes in float32 throughout.
    """
    choice = choose_backend(
        "quantized decode attention",
        backend,
        device=query.device,
        dtype=dtype or query.dtype,
        head_dim=body.head_dim,
        bits=(body.key_bits, body.value_bits),
        value_group=body.value_group,
        scale_dtype=body.k_scale.dtype,
    )
    if choice == "triton":
        from kvpress.kernels.quant_decode_triton import quant_decode_triton

        dot = dtype or query.dtype
        return quant_decode_triton(query, body, mask, dot_dtype=dot if dot in KERNEL_DTYPES else torch.float32)
    return quant_decode_torch(query, body, mask)


def ragged_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
    max_length: int | None = None,
) -> AttentionPartial:
    """Decode attention over ragged heads; see :func:`~kvpress.kernels.ragged_decode_torch.ragged_decode_torch`."""
    choice = choose_backend(
        "ragged decode attention", backend, device=query.device, dtype=keys.dtype, head_dim=keys.shape[-1]
    )
    if choice == "triton":
        from kvpress.kernels.ragged_decode_triton import ragged_decode_triton

        return ragged_decode_triton(query, keys, values, lengths, mask, max_length=max_length)
    return ragged_decode_torch(query, keys, values, lengths, mask)


def pack_backend(x: torch.Tensor, bits: int, group_size: int, axis: str, scale_dtype: torch.dtype,
                 backend: str | None = None) -> str:  # fmt: skip
    """Backend for quantize-and-pack of ``x`` ``[..., T, D]`` (``"torch"`` means: use ``kvpress.quant``'s
    quantizer)."""
    return choose_backend(
        "quantize-and-pack",
        backend,
        device=x.device,
        dtype=x.dtype,
        head_dim=x.shape[-1],
        bits=(bits,),
        value_group=group_size if axis == "token" else None,
        scale_dtype=scale_dtype,
    )


def quantize_pack(x: torch.Tensor, bits: int, group_size: int, axis: str, scale_dtype: torch.dtype):
    """The Triton quantize-and-pack (see :mod:`kvpress.kernels.quant_pack_triton`)."""
    from kvpress.kernels.quant_pack_triton import quantize_pack_triton

    return quantize_pack_triton(x, bits, group_size, axis, scale_dtype)
