# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Quantization trade-offs: bits x rotation x low-rank
#
# `KVQuant` stores keys per channel and values per token as packed codes (KIVI axes), optionally Hadamard-rotated,
# with an optional GEAR low-rank correction of the quantization error. Each setting is a point of a sweep grid
# written as in Python, `kvquant(bits=[2, 3, 4], rotate=[True, False], rank=[0, 4])`, measured by perplexity
# through the cache (chunks of 128 tokens, so most tokens leave the full-precision residual window) against the
# bytes the cache holds. The model is float32, so "effective bits" = 32 x bytes held / uncompressed bytes.

# %%
import io
import tempfile

from IPython.display import Image, Markdown, display

from kvpress.sweep import SweepSpec, load_rows, plot_score_vs_bytes, run_sweep



def show(fig) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    display(Image(buffer.getvalue()))


spec = SweepSpec.from_dict({
    "name": "notebook-03",
    "tasks": ["perplexity"],
    "policies": ["kvquant(bits=[2, 3, 4], rotate=[True, False], rank=[0, 4])"],
    "lengths": [512],
    "samples": 1,
    "task": {"perplexity": {"mode": "chunked", "chunk_size": 128}},
})
store = tempfile.mkdtemp(prefix="kvpress-quant-")
print(run_sweep(spec, store, progress=False).line())

# %%
rows = load_rows(store)
full = next(r for r in rows if r["policy"] == "none")
lines = ["| configuration | perplexity | vs full | effective bits |", "|---|---:|---:|---:|"]
for r in sorted(rows, key=lambda r: r["kv_fraction"]):
    lines.append(f"| `{r['policy']}` | {r['score']:.3f} | {100 * (r['score'] / full['score'] - 1):+.2f}% "
                 f"| {32 * r['kv_fraction']:.2f} |")
display(Markdown("\n".join(lines)))

# %% [markdown]
# Perplexity against bytes held: the Pareto front shows which settings are worth their bytes. Expect rotation to
# matter at 2 bits and hardly at 3-4 bits, and the rank-4 correction (two fp16 factors per token: more bytes) to
# help most where the quantization error is largest, at 2 bits; the table above has this run's numbers.

# %%
show(plot_score_vs_bytes(rows))

# %%
for r in rows:
    if r["policy"].startswith("kvquant(bits=2"):
        print(f"{r['policy']:>38}: perplexity {r['score']:.3f}, {32 * r['kv_fraction']:.2f} effective bits")
