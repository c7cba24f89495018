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
# # 02 · Comparing policies with a small sweep
#
# The same grid `kvpress sweep run SPEC --out DIR` runs, through the Python API: policies x ratios x modes on a
# needle task, one stored record per cell, a resumed run that recomputes nothing, and the report's tables and
# plots. Query-agnostic compresses the context before the question is seen (a cache reused across questions);
# query-aware compresses with the question in the first forward.

# %%
import io
import tempfile

from IPython.display import Image, Markdown, display

from kvpress.sweep import (SweepSpec, load_rows, plan, plot_score_vs_bytes, plot_score_vs_ratio, run_sweep,
                           write_report)



def show(fig) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    display(Image(buffer.getvalue()))


spec = SweepSpec.from_dict({
    "name": "notebook-02",
    "tasks": ["niah_single_prose"],
    "policies": ["snapkv", "streaming_llm"],   # any registry policy or expression, e.g. "snapkv(window=16)"
    "ratios": [0.25, 0.5, 0.75],
    "lengths": [512],
    "samples": 2,
    "modes": ["query-agnostic", "query-aware"],
})
cells = plan(spec).cells
print(f"{len(cells)} cells, e.g. {cells[1].describe()}")

# %%
store = tempfile.mkdtemp(prefix="kvpress-sweep-")
summary = run_sweep(spec, store, progress=False)
print(summary.line())
print(run_sweep(spec, store, progress=False).line())  # everything is stored: nothing runs again

# %% [markdown]
# One row per (task, mode, policy configuration): the score, its 95% interval over the samples, the score as a
# percentage of the uncompressed one, and the fraction of the uncompressed cache's bytes held.

# %%
rows = load_rows(store)
header = "| mode | policy | score | % of full | KV held % |\n|---|---|---:|---:|---:|\n"
display(Markdown(header + "\n".join(
    f"| {r['mode']} | `{r['policy']}` | {r['score']:.0f} | {r['pct_of_full'] or 0:.0f} | {100 * r['kv_fraction']:.0f} |"
    for r in rows)))

# %%
show(plot_score_vs_ratio(rows))
show(plot_score_vs_bytes(rows))

# %% [markdown]
# `write_report` writes the same as `kvpress sweep report DIR`: report.md, scores.csv, times.csv and the plots.

# %%
files = write_report(store, f"{store}/report")
print("\n".join(str(f) for f in files))
