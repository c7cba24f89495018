"""Decode attention per step of one layer: dense SDPA against kvpress's quantized and ragged decode paths.

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention.json

On a CUDA device with Triton (GPU rows; run unchanged on a GPU machine): one decode step of one layer at
N in {1k, 4k, 16k, 64k, 128k} tokens, batch {1, 8}, head_dim 128, GQA 8:1 (32 query heads, 4 KV heads), fp16:
dense fp16 SDPA (and FlashAttention's ``flash_attn_with_kvcache`` / compiled FlexAttention where they run),
transformers' ``QuantizedCache`` step (quanto, where installed), kvpress's previous path (dequantize the whole
layer, then SDPA), the fused kernel at 4 and 2 bits (the kernel alone, and kvpress's whole decode step: exact
sinks and window, merge), and the ragged kernel with heads holding 25-75% of N (50% on average). Columns: time
(median, ``triton.testing.do_bench``), speed-up against dense SDPA, bytes the path reads, achieved bandwidth and
its fraction of a measured device-to-device copy bandwidth (read + write bytes / time of a 1 GiB copy), and for
the kvpress rows the largest absolute difference between the Triton and the torch path on the same inputs (the
kernels' correctness check on the device: the unit tests run them through Triton's CPU interpreter).

On CPU (always): the torch paths on SmolLM2-135M-sized layers (1 row, 3 KV heads, 9 query heads, head_dim 64,
float32): the previous full dequantization (build the layer's keys and values, then SDPA) against the chunked
decode path at 2 and 4 bits, per-step time and peak temporary memory (``torch.profiler`` with
``profile_memory=True``: the highest total of bytes allocated during one call), and decode tokens/s of SmolLM2 at
2k and 8k tokens (uncompressed, 2-bit through the full dequantization, 2-bit through the chunked path). The two
quantized paths alternate step by step on the same cache, so machine load hits both alike.

``--smoke``: runs the GPU rows' code on CPU through ``TRITON_INTERPRET=1`` at toy sizes (checks the script
end to end on a machine without a GPU; its times mean nothing).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports triton (torch._dynamo does): the interpreter is read then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvpress  # noqa: E402
import kvpress.attention  # noqa: E402
from kvpress import kernels  # noqa: E402
from kvpress.attention import attend  # noqa: E402
from kvpress.quant import KVQuant  # noqa: E402
from kvpress.storage import RaggedStorage  # noqa: E402

# -- timing and memory --------------------------------------------------------------------------------------------


def bench_ms(fn: Callable[[], object], device: torch.device, rounds: int = 7) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA, wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_temporary_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Highest number of bytes allocated at once during one call of ``fn`` (beyond what was held before)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"
              and e["args"].get("Device Type", 0) == 0]  # fmt: skip
    return max(totals, default=0)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write) of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3)


# -- one layer held four ways -------------------------------------------------------------------------------------


def quantized_storage(keys: torch.Tensor, values: torch.Tensor, spec: KVQuant, new: tuple[torch.Tensor, torch.Tensor]):
    """A QuantizedStorage holding ``keys``/``values`` ``[B, H, N, D]`` plus one decode token (held, not fresh)."""
    st = spec.create_storage(0)
    st.append(keys, values, 0)
    st.view()
    st.append(*new, keys.shape[2])
    st.view()  # consume the exact copy: every timed step reads what is stored
    return st


def materialised_step(st, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """kvpress's previous decode path: build the layer's keys and values, then SDPA."""
    view = st.view()
    view.keys  # noqa: B018 - builds keys and values
    return attend(query, view, None, scaling)


def decode_step(st, query: torch.Tensor, scaling: float, backend: str = "auto") -> torch.Tensor:
    """kvpress's decode path (lazy view: exact segments + the body read in place), through ``backend``."""
    view = st.view()
    allowed = None if view.valid is None else view.valid.unsqueeze(2)  # ragged heads: their padding slots
    with kernels.force_backend(backend):
        return attend(query, view, allowed, scaling)


def ragged_storage(keys: torch.Tensor, values: torch.Tensor, gen: torch.Generator) -> RaggedStorage:
    """Each (row, KV head) keeps a random 25-75% of the tokens (50% on average), AdaKV-style."""
    b, h, n, _ = keys.shape
    share = 0.25 + 0.5 * torch.rand(b, h, 1, generator=gen)
    keep = (torch.rand(b, h, n, generator=gen) < share).to(keys.device)
    positions = torch.arange(n, device=keys.device).expand(b, h, n)
    return RaggedStorage.from_padded(keys, values, positions, keep)


# -- GPU rows ------------------------------------------------------------------------------------------------------


def gpu_rows(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], float]:
    bw = copy_bandwidth(device, args.copy_bytes)
    rows: list[dict] = []
    flex = _compiled_flex() if args.flex else None
    for batch in args.batch:
        for n in args.tokens:
            gpu_case(args, device, batch, n, bw, rows, flex)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, bw


def gpu_case(args: argparse.Namespace, device: torch.device, batch: int, n: int, bw: float, rows: list[dict],
             flex: Callable | None) -> None:  # fmt: skip
    """Every GPU row of one (batch, N): appended to ``rows`` and printed."""
    dtype = torch.float16
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    groups = hq // hkv
    scaling = d**-0.5
    gen = torch.Generator().manual_seed(n + batch)
    keys = torch.randn(batch, hkv, n, d, generator=gen).to(device, dtype)
    values = torch.randn(batch, hkv, n, d, generator=gen).to(device, dtype)
    new = (torch.randn(batch, hkv, 1, d, generator=gen).to(device, dtype),
           torch.randn(batch, hkv, 1, d, generator=gen).to(device, dtype))  # fmt: skip
    query = torch.randn(batch, hq, 1, d, generator=gen).to(device, dtype)
    dense_bytes = 2 * keys.numel() * keys.element_size()
    grouped_q = query.view(batch, hkv, groups, d)

    def record(name: str, fn: Callable[[], object] | None, nbytes: int | None, error: str | None = None,
               check: Callable[[], float] | None = None) -> None:  # fmt: skip
        row = {"batch": batch, "tokens": n, "path": name, "bytes_read": nbytes}
        if check is not None:  # correctness on this device: the kernel against the torch path on the same inputs
            try:
                row["max_abs_diff_vs_torch_path"] = check()
            except Exception as err:
                row["check_error"] = f"{type(err).__name__}: {str(err)[:160]}"
        if error is None and fn is not None:
            try:
                row["ms"] = bench_ms(fn, device)
            except Exception as err:  # a path that fails on this device: say so, go on
                error = f"{type(err).__name__}: {str(err)[:160]}"
        if error is not None:
            row["error"] = error
        rows.append(row)
        print(_row_text(row, rows, bw), flush=True)

    record("dense fp16 SDPA", lambda: F.scaled_dot_product_attention(grouped_q, keys, values, scale=scaling),
           dense_bytes)  # fmt: skip
    fa, fa_error = _flash_attn()
    if fa is not None:
        k_bshd, v_bshd = keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()
        q_bshd = query.transpose(1, 2).contiguous()
        record("FlashAttention kvcache", lambda: fa(q_bshd, k_bshd, v_bshd, softmax_scale=scaling), dense_bytes)
    else:
        record("FlashAttention kvcache", None, dense_bytes, fa_error)
    if flex is not None:
        record("FlexAttention (compiled)", lambda: flex(query, keys, values, scale=scaling, enable_gqa=True),
               dense_bytes)  # fmt: skip
    hf_step, hf_error = _hf_quantized_step(keys, values, new, query, hq, scaling)
    record("transformers QuantizedCache 4-bit step", hf_step, None, hf_error)
    from kvpress.kernels.quant_decode_torch import quant_decode_torch
    from kvpress.kernels.quant_decode_triton import quant_decode_triton
    from kvpress.kernels.ragged_decode_triton import ragged_decode_triton

    for bits in (4, 2):
        spec = KVQuant(bits=bits, group_size=args.group_size, residual=args.residual)
        st = quantized_storage(keys, values, spec, new)
        packed = st._packed(st.n_body_slots)
        body_bytes = packed.nbytes_read()
        exact_bytes = 2 * (st.n_sink_slots + st.n_residual_slots) * batch * hkv * d * keys.element_size()
        q_body = (query.float() * scaling).reshape(batch, hkv, groups, d)
        if st.key_rotation is not None:
            q_body = q_body @ st.key_rotation
        record(f"dequantize + SDPA {bits}-bit (kvpress before)",
               lambda st=st: materialised_step(st, query, scaling), body_bytes + exact_bytes)  # fmt: skip
        record(f"fused kernel {bits}-bit (kernel only)",
               lambda q_body=q_body, packed=packed: quant_decode_triton(q_body, packed, dot_dtype=dtype),
               body_bytes, check=lambda q_body=q_body, packed=packed: _max_diff(
                   quant_decode_triton(q_body, packed, dot_dtype=dtype).out, quant_decode_torch(q_body, packed).out))
        record(f"fused kernel {bits}-bit (kvpress decode step)",
               lambda st=st: decode_step(st, query, scaling, "triton"), body_bytes + exact_bytes,
               check=lambda st=st: _max_diff(decode_step(st, query, scaling, "triton"),
                                             decode_step(st, query, scaling, "torch")))  # fmt: skip
    rg = ragged_storage(keys, values, gen)
    rg_bytes = 2 * rg.keys.numel() * rg.keys.element_size()
    q_rg = (query.float() * scaling).reshape(batch, hkv, groups, d)
    longest = int(rg.lengths_.max())
    record("ragged kernel, 50% tokens/head (kernel only)",
           lambda: ragged_decode_triton(q_rg, rg.keys, rg.values, rg.lengths_, None, max_length=longest),
           rg_bytes)  # fmt: skip
    record("ragged kernel, 50% tokens/head (kvpress decode step)", lambda: decode_step(rg, query, scaling, "triton"),
           rg_bytes, check=lambda: _max_diff(decode_step(rg, query, scaling, "triton"),
                                             decode_step(rg, query, scaling, "torch")))  # fmt: skip


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _flash_attn():
    try:
        from flash_attn import flash_attn_with_kvcache

        return flash_attn_with_kvcache, None
    except Exception as err:
        return None, f"not installed ({type(err).__name__})"


def _compiled_flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention

        return torch.compile(flex_attention, dynamic=False)
    except Exception:
        return None


def _hf_quantized_step(keys, values, new, query, q_heads, scaling):
    """transformers' QuantizedCache (quanto, 4-bit): one decode step = update (re-reads its quantized part) + SDPA."""
    try:
        from transformers import LlamaConfig
        from transformers.cache_utils import QuantizedCache

        b, hkv, n, d = keys.shape
        config = LlamaConfig(num_hidden_layers=1, num_attention_heads=q_heads, num_key_value_heads=hkv,
                             hidden_size=q_heads * d, head_dim=d)  # fmt: skip
        cache = QuantizedCache("quanto", config, nbits=4)
        cache.update(keys, values, 0)
        groups = q_heads // hkv
        grouped_q = query.view(b, hkv, groups, d)

        def step():
            k, v = cache.update(new[0], new[1], 0)
            return F.scaled_dot_product_attention(grouped_q, k, v, scale=scaling)

        return step, None
    except Exception as err:
        return None, f"unavailable ({type(err).__name__}: {str(err)[:100]})"


def _row_text(row: dict, rows: list[dict], bw: float) -> str:
    dense = next((r for r in rows if r["batch"] == row["batch"] and r["tokens"] == row["tokens"]
                  and r["path"] == "dense fp16 SDPA" and "ms" in r), None)  # fmt: skip
    if "ms" in row:
        row["speedup_vs_dense"] = dense["ms"] / row["ms"] if dense else None
        if row.get("bytes_read"):
            row["gb_per_s"] = row["bytes_read"] / (row["ms"] * 1e-3) / 1e9
            row["fraction_of_copy_bw"] = row["gb_per_s"] * 1e9 / bw
    cells = [str(row["batch"]), f"{row['tokens']:,}", row["path"]]
    diff = row.get("check_error") or ("" if "max_abs_diff_vs_torch_path" not in row
                                      else f"{row['max_abs_diff_vs_torch_path']:.1e}")  # fmt: skip
    if "error" in row:
        return "| " + " | ".join(cells + [row["error"], "", "", "", "", diff]) + " |"
    mb = "" if not row.get("bytes_read") else f"{row['bytes_read'] / 2**20:.1f}"
    gbs = "" if "gb_per_s" not in row else f"{row['gb_per_s']:.0f}"
    frac = "" if "fraction_of_copy_bw" not in row else f"{row['fraction_of_copy_bw']:.0%}"
    speed = "" if row.get("speedup_vs_dense") is None else f"{row['speedup_vs_dense']:.2f}x"
    return "| " + " | ".join(cells + [f"{row['ms']:.3f}", speed, mb, gbs, frac, diff]) + " |"


GPU_HEADER = ("| batch | N | path | ms | vs dense SDPA | MiB read | GB/s | of copy BW | max abs diff vs torch path |\n"
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip

# -- CPU rows ------------------------------------------------------------------------------------------------------


def cpu_layer_rows(args: argparse.Namespace) -> list[dict]:
    """SmolLM2-sized layer: full dequantization vs chunked decode, time and peak temporary memory."""
    rows: list[dict] = []
    print("| N | bits | path | ms / layer-step | peak temporary MiB |\n|---:|---:|---|---:|---:|")
    for n in args.cpu_tokens:
        rows += cpu_layer_case(n, args.rounds)
    return rows


def cpu_layer_case(n: int, rounds: int) -> list[dict]:
    device = torch.device("cpu")
    b, hkv, hq, d = 1, 3, 9, 64
    gen = torch.Generator().manual_seed(n)
    keys, values = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
    new = (torch.randn(b, hkv, 1, d, generator=gen), torch.randn(b, hkv, 1, d, generator=gen))
    query = torch.randn(b, hq, 1, d, generator=gen)
    grouped_q = query.view(b, hkv, hq // hkv, d)
    scaling = d**-0.5
    paths: dict[str, tuple[int | None, Callable[[], object]]] = {
        "dense float32 SDPA": (None, lambda: F.scaled_dot_product_attention(grouped_q, keys, values, scale=scaling)),
    }
    for bits in (2, 4):
        st = quantized_storage(keys, values, KVQuant(bits=bits), new)
        before = f"full dequantization + SDPA (before) {bits}"
        paths[before] = (bits, lambda st=st: materialised_step(st, query, scaling))
        paths[f"chunked torch decode {bits}"] = (bits, lambda st=st: decode_step(st, query, scaling))
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):  # interleaved: load hits every path alike
        for name, (_, fn) in paths.items():
            times[name].append(bench_ms(fn, device, rounds=1))
    rows = []
    for name, (bits, fn) in paths.items():
        row = {"tokens": n, "bits": bits, "path": name.rsplit(" ", 1)[0] if bits else name,
               "ms": statistics.median(times[name]),
               "peak_temporary_bytes": peak_temporary_bytes(fn, device)}  # fmt: skip
        rows.append(row)
        mib = row["peak_temporary_bytes"] / 2**20
        print(f"| {n:,} | {bits or ''} | {row['path']} | {row['ms']:.2f} | {mib:.2f} |", flush=True)
    return rows


def cpu_model_rows(args: argparse.Namespace) -> list[dict]:
    """SmolLM2 decode tokens/s at each prompt length: uncompressed, 2-bit full dequantization, 2-bit chunked."""
    from kvpress.compat import cache_kwargs

    model, tokenizer = kvpress.load_model("smollm2-135m")
    text = " ".join(["The keeper of the lighthouse wrote down the weather, the ships and the tides."] * 2000)
    rows = []
    print("| prompt tokens | cache | decode tokens/s | median step ms |\n|---:|---|---:|---:|")
    for n in args.model_tokens:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
        settings = {"uncompressed": (None, [("uncompressed", None)]),
                    "2-bit": (KVQuant(bits=2), [("2-bit, full dequantization (before)", 0),
                                                ("2-bit, chunked decode", None)])}  # fmt: skip
        default_limit = kvpress.attention.DECODE_MAX_QUERIES
        for spec, variants in settings.values():
            times: dict[str, list[float]] = {name: [] for name, _ in variants}
            with torch.no_grad(), kvpress.patch(model, spec) as session:
                cache = session.new_cache()
                for start in range(0, n, args.prefill_chunk):  # chunked prefill keeps attention memory small
                    chunk = ids[:, start : start + args.prefill_chunk]
                    out = model(chunk, **cache_kwargs(model, cache), use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                for _ in range(args.steps):
                    for name, limit in variants:
                        if limit is not None:
                            kvpress.attention.DECODE_MAX_QUERIES = limit
                        t0 = time.perf_counter()
                        out = model(token, **cache_kwargs(model, cache), use_cache=True)
                        times[name].append(time.perf_counter() - t0)
                        token = out.logits[:, -1:].argmax(-1)
                        kvpress.attention.DECODE_MAX_QUERIES = default_limit
            for name, values in times.items():
                step = statistics.median(values)
                rows.append({"prompt_tokens": n, "cache": name, "tokens_per_s": 1 / step, "median_step_s": step})
                print(f"| {n:,} | {name} | {1 / step:.1f} | {step * 1e3:.1f} |", flush=True)
    return rows


# -- main ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--copy-bytes", type=int, default=1 << 30)
    p.add_argument("--no-flex", dest="flex", action="store_false", help="skip compiled FlexAttention rows")
    p.add_argument("--cpu-tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--model-tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--steps", type=int, default=12, help="decode steps per path (model rows)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (CPU layer rows)")
    p.add_argument("--skip-cpu", action="store_true", help="GPU rows only")
    p.add_argument("--skip-model", action="store_true", help="no SmolLM2 tokens/s rows")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="GPU rows' code on CPU via TRITON_INTERPRET at toy sizes")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    has_gpu = torch.cuda.is_available() and kernels.dispatch.triton_import_error() is None
    if has_gpu or args.smoke:
        device = torch.device("cuda" if has_gpu else "cpu")
        if args.smoke and not has_gpu:
            args.tokens, args.batch, args.q_heads, args.kv_heads, args.head_dim = [96], [1, 2], 8, 1, 64
            args.copy_bytes, args.flex, args.residual = 1 << 20, False, 16
        name = torch.cuda.get_device_name(device) if has_gpu else "CPU (smoke run through the Triton interpreter)"
        record["device"] = name
        print(f"## GPU rows on {name} (GQA {args.q_heads}:{args.kv_heads}, head_dim {args.head_dim}, fp16)\n")
        print(GPU_HEADER)
        rows, bw = gpu_rows(args, device)
        record.update(gpu_rows=rows, copy_bandwidth_gb_per_s=bw / 1e9)
        print(f"\ndevice-to-device copy bandwidth: {bw / 1e9:.0f} GB/s")
    else:
        reason = "no CUDA device" if not torch.cuda.is_available() else kernels.dispatch.triton_import_error()
        record["gpu_rows"] = f"not run: {reason}; the GPU rows need a CUDA GPU with Triton"
        print(f"GPU rows not run ({reason}): they need a CUDA GPU with Triton; CPU rows follow.\n")
    if not args.skip_cpu and not args.smoke:
        print(f"## CPU rows ({torch.get_num_threads()} threads)\n")
        record["cpu_layer_rows"] = cpu_layer_rows(args)
        if not args.skip_model:
            print()
            record["cpu_model_rows"] = cpu_model_rows(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
