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
# # 04 · Bounded memory over a long generation
#
# StreamingLLM keeps the first `n_sink` tokens (attention sinks) and a window of recent ones, evicting after
# every forward, so the cache stops growing however long the model writes; with `reposition=True` (its default)
# attention uses positions within the cache. A token-by-token loop shows the bytes the cache holds at every step,
# next to the uncompressed cache, which grows linearly.

# %%
import io
import time

import torch
from IPython.display import Image, display
from matplotlib.figure import Figure

import kvpress
from kvpress.policies import StreamingLLM

model, tokenizer = kvpress.load_model()
messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
prompt = prompt["input_ids"]
STEPS = 300


def show(fig: Figure) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    display(Image(buffer.getvalue()))


@torch.inference_mode()
def generate(policy, steps: int = STEPS):
    """Greedy decoding one token per forward; the cache's bytes after every step."""
    held, tokens = [], []
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        out = model(input_ids=prompt, **kvpress.cache_kwargs(model, cache), use_cache=True)
        for _ in range(steps):
            token = out.logits[0, -1].argmax().view(1, 1)
            tokens.append(int(token))
            out = model(input_ids=token, **kvpress.cache_kwargs(model, cache), use_cache=True)
            held.append(cache.nbytes())
    return held, tokenizer.decode(tokens, skip_special_tokens=True)


runs = {}
for name, policy in {"full cache": None, "StreamingLLM 4 + 64": StreamingLLM(n_sink=4, window=64)}.items():
    started = time.perf_counter()
    runs[name] = generate(policy)
    print(f"{name}: {time.perf_counter() - started:.1f} s, final cache {runs[name][0][-1] / 2**20:.2f} MiB")

# %%
bounded = runs["StreamingLLM 4 + 64"][0]
print(f"prompt: {prompt.shape[1]} tokens; StreamingLLM holds {min(bounded):,} to {max(bounded):,} bytes over "
      f"{STEPS} steps (constant once the window is full)")
print("text under StreamingLLM:", runs["StreamingLLM 4 + 64"][1][:300].replace("\n", " "), "...")

# %%
fig = Figure(figsize=(7, 3.5))
ax = fig.subplots()
for name, (held, _) in runs.items():
    ax.plot(range(1, len(held) + 1), [b / 2**20 for b in held], label=name)
ax.set_xlabel("generated tokens")
ax.set_ylabel("KV cache (MiB)")
ax.set_title("Cache size during generation")
ax.legend()
ax.grid(alpha=0.3)
fig.tight_layout()
show(fig)
