"""Fused CPU kernels (``kvpress/kernels/cpu/decode.cpp``: decode attention; ``quantize.cpp``: quantize-and-pack),
built once with torch's extension tooling.

Why a C++ kernel: a decode step over a quantized or ragged layer in torch is ~40 small ops per 1,024-token chunk
(unpack, scale, softmax pieces, merges), whose dispatch costs more on CPU than the bytes they save. The kernel
reads each held byte once in one pass per (batch, KV head, token split): codes are unpacked in registers, the key
group's per-channel scale is folded into the query, values are dequantized per token and accumulated under an
online softmax, and the exact segment (sinks, residual window, this step's tokens) is merged in the same call.
Work is spread with ``at::parallel_for`` over torch's intra-op threads (``torch.set_num_threads`` applies).

Building: ``torch.utils.cpp_extension.load`` with ``-O3 -march=native`` (ninja and the machine's C++ compiler,
both installed by ``make setup``; no other system package), cached under torch's extension directory by a name
that includes a hash of the source and the CPU's feature flags, so a cache shared across machines never runs
code built for another CPU. ``python -m kvpress.kernels.cpu_decode`` builds it ahead of time (``make setup`` does).
Where the build fails :func:`load_error` says why, and :mod:`kvpress.kernels.dispatch` falls back to the torch
paths with one warning. torch serialises builds with a ``lock`` file in the build directory and waits for it
without a timeout, so a process killed mid-build would hang every later one: a lock older than
:data:`STALE_LOCK_S` (a build takes about a minute) is removed with a warning before loading.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from kvpress.kernels.layout import PackedBody, check_scale_range
from kvpress.kernels.partial import AttentionPartial

# One extension: the decode kernels, and the quantize-and-pack kernel that fills what they read.
SOURCES = (Path(__file__).with_name("cpu") / "decode.cpp", Path(__file__).with_name("cpu") / "quantize.cpp")
MAX_ROWS = 64  # query rows per KV head (q_heads / kv_heads * q_len) the kernel takes
MAX_HEAD_DIM = 256
BITS = (2, 3, 4, 8)
STALE_LOCK_S = 600.0  # a build lock older than this was left by a killed build
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # scale dtypes quantize_pack takes, as codes


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


# -O3 -march=native: vector code for this CPU. Reassociating float sums (without -ffast-math's finite-math
# assumptions, which would break the -inf of masked logits) lets GCC vectorise the dot products' reductions.
# -fopenmp: at::parallel_for is an inline OpenMP loop in torch's headers; without the flag it compiles to a serial
# loop. The extension then shares torch's own libgomp (same soname, already loaded), so one thread pool serves both.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
          "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _build_name() -> str:
    flags = " ".join(CFLAGS + LDFLAGS)
    sources = b"".join(path.read_bytes() for path in SOURCES)
    key = sources + _cpu_flags().encode() + torch.__version__.encode() + flags.encode()
    digest = hashlib.sha256(key).hexdigest()
    return f"kvpress_cpu_decode_{digest[:12]}"


def clear_stale_lock(name: str, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove the build lock of extension ``name`` if it is older than ``max_age_s`` (left by a killed build,
    which would make torch wait forever); True if one was removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age_s:
        return False
    warnings.warn(f"kvpress: removing a stale C++ kernel build lock ({lock}, {age:.0f} s old: a build was killed)",
                  RuntimeWarning, stacklevel=2)
    lock.unlink(missing_ok=True)
    return True


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("KVPRESS_NO_CPP") == "1":
        return None, "KVPRESS_NO_CPP=1"
    try:
        from torch.utils.cpp_extension import load

        clear_stale_lock(_build_name())
        module = load(
            name=_build_name(),
            sources=[str(path) for path in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch paths still work
        return None, f"the C++ decode kernel could not be built ({type(exc).__name__}: {str(exc).strip()[:300]})"
    return module, None


def load_error() -> str | None:
    """``None`` when the kernel is built (building it on first call), else why it cannot run here."""
    return _load()[1]


def unsupported(rows: int, head_dim: int, dtype: torch.dtype, bits: tuple[int, ...] = ()) -> str | None:
    """Why the kernel cannot take a case (``None`` when it can); the build is not attempted here."""
    if rows > MAX_ROWS:
        return f"{rows} query rows per KV head (the C++ kernel takes at most {MAX_ROWS})"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim={head_dim} (the C++ kernel takes at most {MAX_HEAD_DIM})"
    if dtype not in DTYPES:
        return f"dtype {dtype} (the C++ kernel takes {', '.join(map(str, DTYPES))})"
    for b in bits:
        if b not in BITS:
            return f"bits={b} (the C++ kernel takes {BITS})"
    return None


def quant_decode_cpu(
    query: torch.Tensor,
    body: PackedBody | None,
    exact_keys: torch.Tensor,
    exact_values: torch.Tensor,
    q_len: int,
    body_mask: torch.Tensor | None = None,
    exact_mask: torch.Tensor | None = None,
    key_rotation: torch.Tensor | None = None,
    value_rotation: torch.Tensor | None = None,
) -> AttentionPartial:
    """Attention over a packed body and an exact segment, merged, in one call.

    Args:
        query: ``[B, H, M, D]`` float32, scaled, in the plain (unrotated) basis; ``M = groups * q_len``.
        body: the packed body (GEAR outliers fused; no low-rank terms), or ``None`` when the layer has none yet.
        exact_keys, exact_values: ``[B, H, E, D]`` full-precision tokens (plain basis).
        body_mask: ``[B, H, q_len, body.n_tokens]`` bool or ``None``; exact_mask ``[B, H, q_len, E]`` or ``None``.
        key_rotation, value_rotation: ``[D, D]`` when the body holds ``K @ R`` / ``V @ Rv``.

    Returns:
        the merged partial; ``out`` in the plain value basis.
    """
    module, error = _load()
    if module is None:
        raise RuntimeError(error)
    q = query.float().contiguous()
    ex_k, ex_v = exact_keys.float().contiguous(), exact_values.float().contiguous()
    if body is None or body.n_tokens == 0:
        b, h, _, d = q.shape
        empty = q.new_zeros(b, h, 1, 1)
        empty_i = torch.zeros(b, h, 1, 1, dtype=torch.int32)
        out, lse = _profiled("quant_decode", module.quant_decode,
            q, empty_i, empty, empty, empty_i, empty, empty, None, None, None, None,
            ex_k, ex_v, _bool(exact_mask), 2, 2, 1, 1, 0, q_len, None, None, None, None,
        )  # fmt: skip
        return AttentionPartial(out, lse)
    if body.rank:
        raise ValueError("the C++ quantized decode kernel does not take GEAR low-rank terms")
    outliers: list[torch.Tensor | None] = [None] * 4
    if body.n_outliers:  # exact values in the scales' dtype, channel indices as int32
        outliers = [body.k_out_val.to(body.k_scale.dtype).contiguous(), body.k_out_idx.to(torch.int32).contiguous(),
                    body.v_out_val.to(body.k_scale.dtype).contiguous(), body.v_out_idx.to(torch.int32).contiguous()]
    out, lse = _profiled("quant_decode", module.quant_decode,
        q, *(t.contiguous() for t in (body.k_codes, body.k_scale, body.k_zero, body.v_codes, body.v_scale,
                                      body.v_zero)),
        None if body.group_ids is None else body.group_ids.to(torch.int32).contiguous(), _bool(body_mask), _f32(key_rotation), _f32(value_rotation),
        ex_k, ex_v, _bool(exact_mask), body.key_bits, body.value_bits, body.group_size, body.value_group,
        body.n_tokens, q_len, *outliers,
    )  # fmt: skip
    return AttentionPartial(out, lse)


def ragged_decode_cpu(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    mask: torch.Tensor | None = None,
    tail_keys: torch.Tensor | None = None,
    tail_values: torch.Tensor | None = None,
    tail_mask: torch.Tensor | None = None,
    q_len: int = 1,
) -> AttentionPartial:
    """Attention of ``query`` ``[B, H, M, D]`` (float32, scaled) over ragged ``keys``/``values`` ``[T, D]``
    (segment ``s`` at ``offsets[s]:offsets[s+1]``, ``offsets`` ``[B*H+1]`` int64) and a dense tail
    ``[B, H, n_tail, D]`` (same dtype) merged in. ``mask``: ``[T, L]`` bool per token and query token;
    ``tail_mask``: ``[B, H, L, n_tail]``."""
    module, error = _load()
    if module is None:
        raise RuntimeError(error)
    out, lse = _profiled("ragged_decode", module.ragged_decode,
        query.float().contiguous(), keys.contiguous(), values.contiguous(), offsets.long().contiguous(),
        _bool(mask), None if tail_keys is None else tail_keys.to(keys.dtype).contiguous(),
        None if tail_values is None else tail_values.to(keys.dtype).contiguous(), _bool(tail_mask), q_len,
    )  # fmt: skip
    return AttentionPartial(out, lse)


def _profiled(name: str, fn, *args):
    """``fn(*args)``, named ``kvpress::<name>`` in a ``torch.profiler`` trace (extension calls are not aten ops)."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(f"kvpress::{name}"):
            return fn(*args)
    return fn(*args)


def _bool(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.to(torch.bool).contiguous()


def _f32(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float().contiguous()


def quantize_pack_cpu(x: torch.Tensor, bits: int, group_size: int, axis: str,
                      scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and pack ``x`` ``[..., T, D]`` (float32) in one pass: ``(codes, scale, zero)``, bit-exact with
    :func:`kvpress.quant.quantizer.quantize` (no ``exclude``) and :func:`kvpress.quant.packing.pack`.

    Returns:
        codes ``[..., T, packed_words(D, bits)]`` int32; scale and zero ``[..., ceil(T / G), D]`` (``axis="channel"``)
        or ``[..., T, D / G]`` (``axis="token"``) in ``scale_dtype`` (float32, float16 or bfloat16).

    Raises:
        ValueError: ``x`` is not finite, or its range does not fit ``scale_dtype`` (as the torch quantizer).
    """
    module, error = _load()
    if module is None:
        raise RuntimeError(error)
    if scale_dtype not in SCALE_CODES:
        raise ValueError(f"scale_dtype must be one of {tuple(SCALE_CODES)}, got {scale_dtype}")
    lead, (t, d) = x.shape[:-2], x.shape[-2:]
    flat = x.float().reshape(-1, t, d).contiguous()
    codes, scale, zero = _profiled("quantize_pack", module.quantize_pack, flat, bits, group_size,
                                   axis == "channel", SCALE_CODES[scale_dtype])
    check_scale_range(zero, scale, scale_dtype)
    return (codes.reshape(*lead, t, codes.shape[-1]), scale.reshape(*lead, *scale.shape[1:]),
            zero.reshape(*lead, *zero.shape[1:]))


if __name__ == "__main__":  # `python -m kvpress.kernels.cpu_decode`: build ahead of time (make setup)
    err = load_error()
    print("kvpress C++ decode kernel:", "ready" if err is None else err)
    raise SystemExit(0)

