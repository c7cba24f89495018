"""Sink-and-window storage: a layer's heads that keep only their first tokens and a window of recent ones.

DuoAttention's streaming heads (and StreamingLLM's rule) keep, after every forward, the first ``n_sink`` real tokens
and the tokens at positions ``>= seen - window``. Applied by the policy, that costs a policy call per layer and
decode step (a context, the rule over a merged view of every head group, a split of the mask). This wrapper applies
the same rule itself, so the policy need not be called at decode steps (``DuoAttention.acts_at("decode")``): the
patch calls :meth:`SinkWindowStorage.settle` right after each such step's attention, where the policy would have
run, so every attention sees, and every report between forwards counts, exactly what the policy would leave. The
next append applies the rule too, for any forward that skipped it.

Prefill and extend forwards still go through the policy (after attention, a forward's many new tokens), so the
wrapper only ever finds what one decode step left behind, or nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from kvpress.storage.base import AttentionView, KVStorage, StorageState, wrapped_from_state, wrapped_state


class SinkWindowStorage(KVStorage):
    """``inner`` (any storage kind) trimmed to its first ``n_sink`` real tokens and the ``window`` newest positions
    at the start of every append (see the module docstring)."""

    def __init__(self, inner: KVStorage, n_sink: int, window: int):
        self.inner = inner
        self.n_sink = n_sink
        self.window = window
        self.started = False  # something was appended (an empty inner storage has no view)

    def _trim(self, seen: int) -> None:
        """Apply the rule as it stood after the last forward (``seen`` tokens then)."""
        view = self.inner.view()
        batch, heads, slots = view.shape[:3]
        if slots <= self.n_sink + self.window or heads == 0:
            return
        slot = torch.arange(slots, device=view.device)
        positions = view.positions if view.positions is not None else slot
        if view.valid is None:
            keep = (slot < self.n_sink) | (positions >= seen - self.window)
        else:
            rank = view.valid.long().cumsum(-1) - 1
            keep = view.valid & ((rank < self.n_sink) | (positions >= seen - self.window))
        keep = keep.expand(batch, heads, slots)
        if not bool(keep.all()):
            self.inner = self.inner.select(keep)

    # -- KVStorage ---------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, start_position: int) -> None:
        if self.started:
            self._trim(start_position)
        self.inner.append(keys, values, start_position)
        self.started = True

    def settle(self, seen: int) -> KVStorage:
        """Right after a decode step's attention, where the policy would have evicted."""
        if self.started:
            self._trim(seen)
        return self

    def view(self) -> AttentionView:
        return self.inner.view()

    def select(self, keep: torch.Tensor) -> KVStorage:
        return self._wrap(self.inner.select(keep))

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors()

    def lengths(self) -> torch.Tensor:
        return self.inner.lengths()

    def index_batch(self, index: torch.Tensor) -> KVStorage:
        return self._wrap(self.inner.index_batch(index))

    def storage_nbytes(self) -> int:
        return self.inner.storage_nbytes()

    def state(self) -> StorageState:
        return wrapped_state(self.inner, n_sink=self.n_sink, window=self.window, started=self.started)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "SinkWindowStorage":
        inner = wrapped_from_state(tensors, meta, ("n_sink", "window"), "sink-and-window storage")
        out = cls(inner, int(meta["n_sink"]), int(meta["window"]))
        out.started = bool(meta.get("started", True))
        return out

    def _wrap(self, inner: KVStorage) -> "SinkWindowStorage":
        out = SinkWindowStorage(inner, self.n_sink, self.window)
        out.started = self.started
        return out


class SinkWindowSpec:
    """Storage spec: ``inner``'s storage (e.g. :class:`~kvpress.storage.dense.DenseSpec`, a quantizer) wrapped in
    :class:`SinkWindowStorage`."""

    def __init__(self, inner: Any, n_sink: int, window: int):
        self.inner = inner
        self.n_sink = n_sink
        self.window = window

    def create_storage(self, layer_idx: int) -> SinkWindowStorage:
        return SinkWindowStorage(self.inner.create_storage(layer_idx), self.n_sink, self.window)

    def __getattr__(self, name: str) -> Any:  # bits, params... of the inner spec (reports, sweeps)
        if name in ("inner", "n_sink", "window"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"SinkWindowSpec({self.inner!r}, n_sink={self.n_sink}, window={self.window})"
