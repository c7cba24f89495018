"""Which implementation runs: the fused Triton kernels (CUDA), the fused C++ kernels (CPU) or the torch paths,
and the entry points storage calls.

Choice, first match wins:

1. an explicit ``backend=`` argument, then :func:`force_backend` (a context manager), then the environment
   variable ``KVPRESS_KERNELS``: ``"torch"`` forces the torch path; ``"triton"`` forces the Triton kernels and
   ``"cpp"`` the C++ CPU kernels, each raising a ``ValueError`` naming the reason when they cannot run (Triton not
   importable, a CPU tensor without ``TRITON_INTERPRET=1``, the C++ kernel not buildable, an unsupported head_dim,
   bit width, value group, dtype or GEAR terms); ``"auto"`` (default):
2. CUDA tensors use the Triton kernels and CPU tensors the C++ kernels (:mod:`kvpress.kernels.cpu_decode`) when
   they support the case, and otherwise fall back to torch with one warning per reason (quantize-and-pack with
   a scale dtype the C++ kernel does not take uses the torch quantizer without a warning).

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

from kvpress.kernels import cpu_decode
from kvpress.kernels.layout import PackedBody
from kvpress.kernels.partial import AttentionPartial, dense_partial, merge
from kvpress.kernels.quant_decode_torch import quant_decode_torch
from kvpress.kernels.ragged_decode_torch import ragged_decode_torch, segment_offsets

ENV_VAR = "KVPRESS_KERNELS"
BACKENDS = ("auto", "torch", "triton", "cpp")
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


def cpp_unsupported(device: torch.device, cpp: dict | None) -> str | None:
    """Why the C++ CPU kernel cannot run a case (``cpp``: the arguments of :func:`cpu_decode.unsupported` plus
    ``gear``; ``None``: the operation has no C++ kernel), or ``None`` when it can. Builds the kernel on first use."""
    if cpp is None:
        return "this operation has no C++ kernel"
    if device.type != "cpu":
        return f"tensors are on {device.type}: the C++ kernels run on CPU"
    case = dict(cpp)
    if case.pop("gear", False):
        return "GEAR low-rank terms are not fused in the C++ kernel"
    return cpu_decode.unsupported(**case) or cpu_decode.load_error()


def _warn_once(what: str, instead_of: str, reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"kvpress: {what} runs the torch path instead of the {instead_of}: {reason}",
                      RuntimeWarning, stacklevel=4)  # fmt: skip


def choose_backend(what: str, backend: str | None = None, cpp: dict | None = None, **case) -> str:
    """``"triton"``, ``"cpp"`` or ``"torch"`` for one call (``case``: the arguments of :func:`triton_unsupported`;
    ``cpp``: the case as the C++ kernel sees it, ``None`` when the operation has none).

    Raises:
        ValueError: Triton or C++ was forced (argument, :func:`force_backend` or ``KVPRESS_KERNELS``) and
            cannot run this case.
    """
    asked = requested_backend(backend)
    if asked == "torch" or (asked == "cpp" and cpp is None):  # forcing C++ leaves operations without one on torch
        return "torch"
    if asked == "cpp" or (asked == "auto" and case["device"].type != "cuda"):
        reason = cpp_unsupported(case["device"], cpp)
        if reason is None:
            return "cpp"
        if asked == "cpp":
            raise ValueError(f"the C++ {what} kernel was forced ({ENV_VAR}=cpp or backend='cpp') but cannot run: "
                             f"{reason}")  # fmt: skip
        if cpp is not None:
            _warn_once(what, "C++ kernel", reason)
        return "torch"
    reason = triton_unsupported(**case)
    if asked == "triton":
        if reason:
            raise ValueError(f"the Triton {what} kernel was forced ({ENV_VAR}=triton or backend='triton') but "
                             f"cannot run: {reason}")  # fmt: skip
        return "triton"
    if reason:
        _warn_once(what, "Triton kernel", reason)
        return "torch"
    return "triton"


# -- entry points ----------------------------------------------------------------------------------------------
def _quant_cases(query: torch.Tensor, body: PackedBody, dtype: torch.dtype | None) -> tuple[dict, dict]:
    triton_case = dict(device=query.device, dtype=dtype or query.dtype, head_dim=body.head_dim,
                       bits=(body.key_bits, body.value_bits), value_group=body.value_group,
                       scale_dtype=body.k_scale.dtype)  # fmt: skip
    cpp_case = dict(rows=query.shape[2], head_dim=body.head_dim, dtype=dtype or query.dtype,
                    bits=(body.key_bits, body.value_bits), gear=bool(body.rank))  # fmt: skip
    return triton_case, cpp_case


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
    path and the C++ kernel compute in float32 throughout.
    """
    triton_case, cpp_case = _quant_cases(query, body, dtype)
    choice = choose_backend("quantized decode attention", backend, cpp=cpp_case, **triton_case)
    if choice == "triton":
        from kvpress.kernels.quant_decode_triton import quant_decode_triton

        dot = dtype or query.dtype
        return quant_decode_triton(query, body, mask, dot_dtype=dot if dot in KERNEL_DTYPES else torch.float32)
    if choice == "cpp":
        b, h, _, d = query.shape
        none = query.new_zeros(b, h, 0, d)
        return cpu_decode.quant_decode_cpu(query, body, none, none, _q_len(mask), body_mask=mask)
    return quant_decode_torch(query, body, mask)


def quantized_layer_decode(
    query: torch.Tensor,
    body: PackedBody | None,
    exact_keys: torch.Tensor,
    exact_values: torch.Tensor,
    q_len: int,
    body_mask: torch.Tensor | None = None,
    exact_mask: torch.Tensor | None = None,
    key_rotation: torch.Tensor | None = None,
    value_rotation: torch.Tensor | None = None,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
) -> AttentionPartial:
    """Decode attention over a whole quantized layer: the packed body (held as ``K @ R`` / ``V @ Rv``) and the
    exact full-precision tokens (plain basis), merged.

    Args:
        query: ``[B, H, M, D]`` float32, scaled, plain basis (``M = groups * q_len``).
        body: the packed body, or ``None`` (nothing quantized yet).
        exact_keys, exact_values: ``[B, H, E, D]`` sinks, window and this step's tokens.
        body_mask: ``[B, H, q_len, body.n_tokens]``; exact_mask: ``[B, H, q_len, E]`` (bool, or ``None``).

    Returns:
        the partial in the plain value basis. The C++ kernel does all of it in one call; otherwise the exact part
        is :func:`dense_partial`, the body goes through :func:`quantized_decode` and the two are merged.
    """
    if body is not None and body.n_tokens:
        triton_case, cpp_case = _quant_cases(query, body, dtype)
    else:
        d = exact_keys.shape[-1]
        triton_case = dict(device=query.device, dtype=dtype or query.dtype, head_dim=d)
        cpp_case = dict(rows=query.shape[2], head_dim=d, dtype=dtype or query.dtype)
    choice = choose_backend("quantized decode attention", backend, cpp=cpp_case, **triton_case)
    if choice == "cpp":
        return cpu_decode.quant_decode_cpu(query, body, exact_keys, exact_values, q_len, body_mask, exact_mask,
                                           key_rotation, value_rotation)  # fmt: skip
    parts = [dense_partial(query, exact_keys, exact_values, exact_mask)]
    if body is not None and body.n_tokens:
        q_body = query if key_rotation is None else query @ key_rotation.float()
        part = quantized_decode(q_body, body, body_mask, backend=choice, dtype=dtype)
        out = part.out if value_rotation is None else part.out @ value_rotation.float().T
        parts.append(AttentionPartial(out, part.lse))
    return merge(parts)


def ragged_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
    max_length: int | None = None,
    tail: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    offsets: torch.Tensor | None = None,
) -> AttentionPartial:
    """Decode attention over ragged heads; see :func:`~kvpress.kernels.ragged_decode_torch.ragged_decode_torch`.

    ``tail = (keys, values, mask)``: tokens every head holds after its ragged segment, ``[B, H, n_tail, D]``
    with ``mask`` ``[B, H, L, n_tail]`` or ``None``, attended and merged in the same step. ``offsets``: the
    segments' start offsets ``[B * H + 1]`` when the caller has them.
    """
    cpp_case = dict(rows=query.shape[2], head_dim=keys.shape[-1], dtype=keys.dtype)
    choice = choose_backend("ragged decode attention", backend, cpp=cpp_case, device=query.device, dtype=keys.dtype,
                            head_dim=keys.shape[-1])  # fmt: skip
    if choice == "cpp":
        if offsets is None:
            offsets = segment_offsets(lengths)
        q_len = mask.shape[1] if mask is not None else (tail[2].shape[2] if tail and tail[2] is not None else 1)
        tail_k, tail_v, tail_mask = tail if tail is not None else (None, None, None)
        return cpu_decode.ragged_decode_cpu(query, keys, values, offsets, mask, tail_k, tail_v, tail_mask, q_len)
    if choice == "triton":
        from kvpress.kernels.ragged_decode_triton import ragged_decode_triton

        part = ragged_decode_triton(query, keys, values, lengths, mask, max_length=max_length)
    else:
        part = ragged_decode_torch(query, keys, values, lengths, mask)
    if tail is None or tail[0].shape[2] == 0:
        return part
    return merge([part, dense_partial(query, tail[0], tail[1], tail[2])])


def _q_len(mask: torch.Tensor | None) -> int:
    return 1 if mask is None else mask.shape[2]


def pack_backend(x: torch.Tensor, bits: int, group_size: int, axis: str, scale_dtype: torch.dtype,
                 backend: str | None = None) -> str:  # fmt: skip
    """Backend for quantize-and-pack of ``x`` ``[..., T, D]``: ``"triton"``, ``"cpp"``, or ``"torch"`` (use
    ``kvpress.quant``'s quantizer)."""
    cpp = None if scale_dtype not in cpu_decode.SCALE_CODES else dict(
        rows=1, head_dim=x.shape[-1], dtype=torch.float32, bits=(bits,))
    return choose_backend(
        "quantize-and-pack",
        backend,
        cpp=cpp,
        device=x.device,
        dtype=x.dtype,
        head_dim=x.shape[-1],
        bits=(bits,),
        value_group=group_size if axis == "token" else None,
        scale_dtype=scale_dtype,
    )


def quantize_pack(x: torch.Tensor, bits: int, group_size: int, axis: str, scale_dtype: torch.dtype,
                  backend: str = "triton"):
    """The fused quantize-and-pack of ``backend`` (a choice of :func:`pack_backend`): ``(codes, scale, zero)``,
    bit-exact with :func:`kvpress.quant.quantizer.quantize` (see :mod:`kvpress.kernels.quant_pack_triton` and
    :func:`kvpress.kernels.cpu_decode.quantize_pack_cpu`)."""
    if backend == "cpp":
        return cpu_decode.quantize_pack_cpu(x, bits, group_size, axis, scale_dtype)
    from kvpress.kernels.quant_pack_triton import quantize_pack_triton

    return quantize_pack_triton(x, bits, group_size, axis, scale_dtype)
