"""lm-evaluation-harness adapter: evaluate a model *through* a kvpress compressed cache.

Importing this module registers the model name ``kvpress`` with lm-eval::

    import kvpress.eval.lm_eval_adapter  # registers "kvpress"
    import lm_eval
    lm_eval.simple_evaluate(model="kvpress",
                            model_args="pretrained=smollm2-135m,policy=snapkv,compression_ratio=0.5",
                            tasks=["kvpress_niah"], task_manager=kvpress_task_manager())

Model args: ``pretrained`` (default ``smollm2-135m``, loaded with :func:`kvpress.models.load_model`; any local
path or hub id works too), ``policy`` (a name for :func:`kvpress.policies.get_policy`, default ``none``), the
policy's parameters (``window``, ``n_sink``, ``compression_ratio``, ``budget``, ...: every arg HFLM does not
know goes to the policy), ``dtype`` (default float32), ``rolling_mode`` / ``rolling_chunk_size`` (how
``loglikelihood_rolling`` streams a text, see below) and the usual HFLM args (``max_length``, ...).

Why not plain HFLM: HFLM scores a (context, continuation) pair with ONE forward over context+continuation and
no cache, so a cache policy would never run and the scores would be the uncompressed model's. Here every
scoring path goes through the cache:

``loglikelihood``
    Requests are grouped by context. The context is prefilled in one forward under :func:`kvpress.patch` (the
    policy compresses it as at prefill), then each continuation is forwarded through a copy
    of that compressed cache; its log-probs come from the last context logit plus the continuation logits.
``loglikelihood_rolling``
    The whole text (after the prefix token) is teacher-forced through the cache with
    :func:`kvpress.eval.perplexity.score_through_cache`, in chunks of ``rolling_chunk_size`` (``rolling_mode=
    chunked``, score policies compress after every chunk) or token by token (``rolling_mode=token``). Unlike
    HFLM's disjoint windows the stream is not cut at ``max_length``: bound the cache with a policy
    (StreamingLLM) when texts are longer than the model's context.
``generate_until``
    HFLM's generation loop with ``model.generate`` run under :func:`kvpress.patch` (batch size 1, so no
    padding interacts with eviction).

HFLM's cache-less ``_model_call`` is disabled so that no path can silently bypass the cache.

Command line: lm-eval 0.4 has no plugin discovery for models, so the plain ``lm_eval`` command only knows
``kvpress`` once this module was imported. Three ways that work:

* ``python -m kvpress.eval.lm_eval_adapter run --model kvpress --model_args ... --tasks ...`` (or ``kvpress
  lm-eval ...``): lm-eval's own command line with this adapter registered (and our offline tasks on the
  include path).
* ``lm_eval run --model kvpress --tasks <path of a YAML in kvpress/eval/lm_eval_tasks>``: loading one of our
  task files imports this module (its dataset function lives in a module that imports the adapter) before lm-eval
  builds the model. Task *names* via ``--include_path`` are resolved after the model, so use the forms above.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from kvpress.compat import cache_kwargs
from kvpress.eval.perplexity import MODE_OVERRIDES, MODES, open_cache, score_through_cache
from kvpress.policies.expr import PolicyConfig

logger = logging.getLogger(__name__)

MODEL_NAME = "kvpress"
# HFLM constructor arguments this adapter forwards; any other model arg is a policy parameter.
_HFLM_ARGS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def _resolve_device(device: str | torch.device | None) -> str:
    """lm-eval's command line defaults to ``cuda:0``; fall back to the CPU where there is no GPU."""
    device = str(device) if device is not None else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is unavailable: using cpu", device)
        return "cpu"
    return device


class KVPressLM(HFLM):
    """HFLM whose scoring and generation run through a :class:`kvpress.KVPressCache` under a policy."""

    def __init__(
        self,
        pretrained: Any = "smollm2-135m",
        policy: Any = "none",
        tokenizer: Any = None,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int | str | None = 1,
        rolling_mode: str = "chunked",
        rolling_chunk_size: int = 512,
        **kwargs: Any,
    ) -> None:
        hf_kwargs = {k: v for k, v in kwargs.items() if k in _HFLM_ARGS}
        policy_params = {k: v for k, v in kwargs.items() if k not in _HFLM_ARGS}
        if str(batch_size) not in ("1", "None"):
            logger.warning("kvpress scores one context at a time: batch_size=%s ignored (1 is used)", batch_size)
        if rolling_mode not in MODES:
            raise ValueError(f"rolling_mode must be one of {MODES}, got {rolling_mode!r}")
        if isinstance(pretrained, str):
            from kvpress.models import load_model

            model, loaded_tokenizer = load_model(pretrained, dtype=dtype, device=_resolve_device(device))
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
            self.model_name = pretrained
        else:
            model = pretrained
            if tokenizer is None:
                raise ValueError("pass the tokenizer with an already-loaded model")
            self.model_name = getattr(model.config, "name_or_path", "") or type(model).__name__
        for ignored in ("parallelize", "tp_plan", "peft", "delta", "autogptq", "gptqmodel"):
            hf_kwargs.pop(ignored, None)
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=1, backend="causal", **hf_kwargs)

        if isinstance(policy, str) or policy is None:
            self.policy_name = policy or "none"
            config = PolicyConfig.of(self.policy_name, policy_params, where="policy")
            self.policy = config.build(None, MODE_OVERRIDES["token"])
            self.rolling_policy = config.build(None, MODE_OVERRIDES[rolling_mode])
        else:  # an already-built Policy object
            if policy_params:
                raise ValueError(f"policy parameters {sorted(policy_params)} given with a policy object")
            self.policy_name = getattr(policy, "name", type(policy).__name__)
            self.policy = self.rolling_policy = policy
        self.rolling_mode = rolling_mode
        self.rolling_chunk_size = int(rolling_chunk_size)

    # ------------------------------------------------------------------------------------------ scoring

    def _model_call(self, inps, attn_mask=None, labels=None):  # noqa: ARG002
        raise RuntimeError(
            "KVPressLM never scores with a cache-less forward: its loglikelihood paths go through the cache"
        )

    def _truncate(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """HFLM's budget: at most ``max_length`` tokens fed (context cut from the left, one token kept)."""
        continuation = continuation[-self.max_length :]
        room = max(1, self.max_length + 1 - len(continuation))
        return context[-room:], continuation

    def _score_continuations(self, session, context: list[int], continuations: Sequence[list[int]]):
        """Prefill ``context`` once under the policy, then score each continuation through a copy of the cache."""
        device = self.device
        cache = session.new_cache()
        out = self.model(input_ids=torch.tensor([context], device=device), **cache_kwargs(self.model, cache), use_cache=True)
        last = out.logits[0, -1:]
        del out
        results = []
        for i, cont in enumerate(continuations):
            branch = cache if i == len(continuations) - 1 else cache.clone()
            logits = last
            if len(cont) > 1:
                step = self.model(
                    input_ids=torch.tensor([cont[:-1]], device=device), **cache_kwargs(self.model, branch), use_cache=True
                )
                logits = torch.cat([last, step.logits[0]], dim=0)
                del step
            logits = logits.to(self.softmax_dtype or torch.float32)
            target = torch.tensor(cont, device=device)
            logprobs = F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((logits.argmax(dim=-1) == target).all())
            results.append((float(logprobs.double().sum()), greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):  # noqa: ARG002
        import kvpress

        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            context, continuation = self._truncate(list(context), list(continuation))
            groups.setdefault(tuple(context), []).append((index, continuation))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc=f"loglikelihood [{self.policy_name}]")
        with torch.inference_mode(), kvpress.patch(self.model, self.policy) as session:
            # longest contexts first: memory problems show up at once and the time estimate is an over-estimate
            for context, members in sorted(groups.items(), key=lambda item: -len(item[0])):
                scored = self._score_continuations(session, list(context), [cont for _, cont in members])
                for (index, _), answer in zip(members, scored, strict=True):
                    results[index] = answer
                    request_str = requests[index][0]
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                bar.update(len(members))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc=f"rolling [{self.policy_name}]"):
            (text,) = request.args
            ids = torch.tensor([[self.prefix_token_id, *self.tok_encode(text)]], dtype=torch.long)
            if ids.shape[1] < 2:
                out.append(0.0)
                continue
            with open_cache(self.model, self.rolling_policy) as cache:
                stats = score_through_cache(
                    self.model, ids, cache, mode=self.rolling_mode, chunk_size=self.rolling_chunk_size
                )
            loglikelihood = -stats["nll_sum"]
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), loglikelihood)
            out.append(loglikelihood)
        return out

    # ------------------------------------------------------------------------------------------ generation

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        import kvpress

        with torch.inference_mode(), kvpress.patch(self.model, self.policy):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # ------------------------------------------------------------------------------------------ reporting

    def get_model_info(self) -> dict:
        """What lm-eval stores in its results: the policy and its parameters (no hub look-up)."""
        return {
            "model_name": self.model_name,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "kvpress_policy": self.policy_name,
            "kvpress_policy_params": self.policy.params() if self.policy is not None else {},
            "kvpress_rolling_mode": self.rolling_mode,
            "kvpress_rolling_chunk_size": self.rolling_chunk_size,
        }


def task_include_path() -> str:
    """Directory of the offline task YAMLs shipped with kvpress (for ``--include_path`` / ``TaskManager``)."""
    from pathlib import Path

    return str(Path(__file__).with_name("lm_eval_tasks"))


def kvpress_task_manager(include_defaults: bool = False, **kwargs: Any):
    """An lm-eval ``TaskManager`` over the offline kvpress tasks; ``include_defaults=True`` adds lm-eval's
    built-in tasks (indexing those takes ~10-60 s, and most of them download their data)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_include_path(), include_defaults=include_defaults, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the ``kvpress`` model registered and the kvpress tasks on the include path."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv and any(a in ("-t", "--tasks") or a.startswith("--tasks=") for a in argv):
        argv += ["--include_path", task_include_path()]
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    # Run as a script: register the importable module's class (not this __main__ copy), then hand over.
    from kvpress.eval.lm_eval_adapter import main as _main

    sys.exit(_main())
else:
    register_model(MODEL_NAME)(KVPressLM)
