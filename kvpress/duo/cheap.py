"""A training-free DuoAttention identifier: rank heads by the attention they put on a planted needle.

On a few synthetic passkey prompts (the same generator as :mod:`kvpress.duo.identify`), each (layer, KV head) is
scored by the attention mass that the answer span's queries (teacher-forced answer) put on the needle value's
tokens in the context, averaged over the query heads of the KV head, the span and the prompts. Heads that retrieve
the needle are the ones a long context needs; heads that put no mass there are made streaming. One forward per
prompt, no gradients: seconds. Gates are the scores divided by the largest one (in [0, 1]).
"""

from __future__ import annotations

from typing import Any

import torch

from kvpress.duo.mixing import MixState, final_hidden, identification_attention
from kvpress.duo.pattern import _model_shape


def needle_scores(model: Any, data: list, progress: bool = False) -> torch.Tensor:
    """``[layers, kv_heads]`` gates in [0, 1] from :class:`~kvpress.duo.identify.Example` prompts."""
    layers, kv_heads = _model_shape(model)
    total = torch.zeros(layers, kv_heads)
    iterator = data
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(data, desc="duo needle scores", unit="prompt")
    for example in iterator:
        state = MixState(0, 1, rows=example.span, columns=example.needle)
        with torch.no_grad(), identification_attention(model, state):
            final_hidden(model, example.ids)
        for layer, mass in state.record.items():
            total[layer] += mass.float().cpu()
    total /= max(1, len(data))
    return (total / total.max().clamp_min(1e-12)).clamp(0, 1)
