"""kvpress.memory: freed heap pages go back to the OS every RELEASE_EVERY forwards of a patched model."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import tiny_model

import kvpress
import kvpress.patching
from kvpress.compat import cache_kwargs
from kvpress.memory import RELEASE_EVERY, release_freed_memory
from kvpress.policies import StreamingLLM


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_returns_freed_pages_on_glibc():
    blocks = [torch.empty(2**20 + 4096 * i, dtype=torch.uint8).fill_(1) for i in range(64)]  # heap, then freed
    del blocks[::2]
    assert isinstance(release_freed_memory(), bool)


def test_the_patch_releases_every_release_every_forwards(monkeypatch):
    calls = []
    monkeypatch.setattr(kvpress.patching, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(kvpress.patching, "RELEASE_EVERY", 4)
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvpress.patch(model, StreamingLLM(n_sink=2, window=4)) as session:
        cache = session.new_cache()
        out = model(ids, **cache_kwargs(model, cache))
        for _ in range(8):  # 9 forwards: releases after the 4th and the 8th
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache))
    assert len(calls) == 2
    assert RELEASE_EVERY >= 64  # rare enough to cost nothing per step
