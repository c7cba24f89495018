"""kvpress.memory: freed heap pages go back to the OS every RELEASE_EVERY forwards of a patched model; tensors
rebuilt at ever new sizes come from memory maps of their own and go back whole when freed."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from tiny_models import tiny_model

import kvpress
import kvpress.patching
from kvpress.compat import cache_kwargs
from kvpress.memory import OS_BACKED_MIN_BYTES, RELEASE_EVERY, os_backed_empty, release_freed_memory
from kvpress.policies import StreamingLLM


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc")
def test_release_returns_freed_pages_on_glibc():
    release_freed_memory()
    # 64 MiB in 16 KiB blocks (below glibc's mmap threshold: heap), all freed but the last, which keeps the heap's
    # top in use, so free() alone cannot give the pages back
    blocks = [torch.empty(16384, dtype=torch.uint8).fill_(1) for _ in range(4096)]
    del blocks[:-1]
    before = _rss()
    assert release_freed_memory()
    assert before - _rss() > 32 * 2**20


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_os_backed_tensors_return_their_pages_when_freed():
    before = _rss()
    big = os_backed_empty((1024, 16384), torch.float32, "cpu")  # 64 MiB
    assert big.shape == (1024, 16384) and big.dtype == torch.float32 and big.is_contiguous()
    big.fill_(2.0)
    assert _rss() - before > 60 * 2**20
    assert float(big[-1, -1]) == 2.0
    del big
    assert _rss() - before < 4 * 2**20  # no trim needed: the map is gone


def test_os_backed_empty_writes_through_out_and_keeps_small_tensors_on_the_heap():
    source = torch.randn(5000, 64)
    index = torch.tensor([4999, 0, 17, 17, 2500])
    out = os_backed_empty((5, 64), source.dtype, "cpu")  # small: an ordinary tensor
    torch.index_select(source, 0, index, out=out)
    assert torch.equal(out, source[index])
    index = torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:4000]
    out = os_backed_empty((4000, 64), source.dtype, "cpu")
    assert out.numel() * 4 >= OS_BACKED_MIN_BYTES
    torch.index_select(source, 0, index, out=out)
    assert torch.equal(out, source[index])
    assert os_backed_empty((3, 0), torch.float16, "cpu").shape == (3, 0)
