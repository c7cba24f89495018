"""Teacher-forced log-likelihood of the needle's answer under a compressed context: a fast, graded proxy for the
needle score when tuning a configuration.

    python benchmarks/answer_likelihood.py --model gemma3-270m --configs none "kvquant(bits=2, fp_dtype=torch.float16)" \
        "kvquant(bits=2, fp_dtype=torch.float16, group_size=16, value_group_size=32)" --out runs/answer_ll.json

Query-agnostic, as the needle benchmarks: the context (``prefix_ids``) is prefilled and compressed, then the
question (``suffix_ids``) and the reference answer run through the compressed cache in one forward, and the answer
tokens' log-probabilities are summed (the answer is tokenized with a leading space, as the model writes it after
the question's "... is"). A greedy needle score is 0 or 1 per sample; this is a number per sample that moves
before the answer flips, so a few samples separate configurations (mean over samples; higher is better; the
uncompressed cache gives the reference). Default samples: ``--samples`` indices per needle task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvpress  # noqa: E402
from kvpress.compat import cache_kwargs  # noqa: E402
from kvpress.eval import get_task  # noqa: E402
from kvpress.eval.generation import forward_last  # noqa: E402
from kvpress.policies.expr import expand  # noqa: E402

TASKS = ["niah_single_prose", "niah_single_noise", "niah_multikey_prose"]


@torch.no_grad()
def answer_loglik(model, tokenizer, policy, sample) -> tuple[float, int]:
    """Summed log-probability of `` reference`` after the question, and the bytes held after the context forward."""
    answer = tokenizer(" " + sample.references[0], add_special_tokens=False).input_ids
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        forward_last(model, sample.prefix_ids, cache)
        held = cache.nbytes()
        ids = torch.tensor([sample.suffix_ids + answer], device=model.device)
        logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits[0].float()
    logprobs = logits.log_softmax(-1)
    start = len(sample.suffix_ids) - 1  # the logits that predict the answer's first token
    target = torch.tensor(answer, device=logprobs.device)[:, None]
    return float(logprobs[start:start + len(answer)].gather(1, target).sum()), held


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--length", type=int, default=1500)
    p.add_argument("--tasks", nargs="*", default=TASKS)
    p.add_argument("--samples", type=int, nargs="*", default=list(range(6)), help="sample indices per task")
    p.add_argument("--configs", nargs="+", required=True, metavar="EXPR", help="policy expressions (`none`: uncompressed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = kvpress.load_model(args.model)
    samples = [get_task(t).make_sample(tokenizer, args.length, seed=0, index=i) for t in args.tasks for i in args.samples]
    rows = []
    print(f"| configuration | mean log-lik | min | bytes vs none | seconds |\n|---|---:|---:|---:|---:|", flush=True)
    full_bytes = None
    for config in args.configs:
        policy = None if config == "none" else expand(config)[0].build()
        started = time.perf_counter()
        scores, held = zip(*(answer_loglik(model, tokenizer, policy, s) for s in samples))
        held_mean = sum(held) / len(held)
        if config == "none":
            full_bytes = held_mean
        rows.append({"config": config, "loglik": list(scores), "kv_bytes": list(held),
                     "seconds": round(time.perf_counter() - started, 1)})
        ratio = f"{held_mean / full_bytes:.3f}" if full_bytes else "n/a"
        print(f"| {config} | {sum(scores) / len(scores):.3f} | {min(scores):.2f} | {ratio} | {rows[-1]['seconds']} |",
              flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            meta = {"model": args.model, "length": args.length, "tasks": args.tasks, "samples": args.samples,
                    "threads": args.threads}
            args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
