"""Sliding-window storage: a bounded ring of the last ``window - 1`` tokens of a local-attention layer.

A sliding-window layer (Gemma 2/3, Mistral's sliding variants) lets the query at position ``p`` attend to the
keys at positions ``p - window + 1 .. p``. transformers' ``DynamicSlidingWindowLayer`` holds the last
``window - 1`` tokens between forwards and hands attention those plus the forward's new tokens; this storage
does the same, with the tokens held by any inner :class:`~kvpress.storage.KVStorage` (dense, or quantized under
``KVQuant``), so quantization and byte accounting treat every layer alike.

After each :meth:`SlidingWindowStorage.append`, the view attention reads in this step (held + new tokens) is
captured, then the tokens no later query can attend to are dropped. The inner storage holds positions relative to
``first``; views carry absolute positions. A dense inner storage that nothing was evicted from is sliced (no
positions held, the same tensors transformers would hand attention); any other inner storage drops its oldest
tokens through ``select`` (quantized: codes gathered, nothing re-quantized), during decoding ``SLIDE_EVERY``
tokens at a time (attention masks the stale ones by position until then).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvpress.storage.base import (
    AttentionView,
    KVStorage,
    LazyAttentionView,
    StorageState,
    wrapped_from_state,
    wrapped_state,
)
from kvpress.storage.dense import DenseStorage


SLIDE_EVERY = 16  # decode steps between slides of a non-plain ring (one gather per 16 steps instead of each step)


def check_window(window: object) -> int:
    """Validate a sliding window (tokens a query sees, itself included): an int >= 2."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"sliding window must be an int >= 2, got {window!r}")
    return window


class SlidingWindowStorage(KVStorage):
    """The last ``window - 1`` tokens of one sliding-window layer, held by ``inner``.

    Args:
        inner: the storage that holds the tokens (empty; e.g. :class:`DenseStorage` or a quantized storage).
        window: the layer's sliding window (``config.sliding_window``).
    """

    def __init__(self, inner: KVStorage, window: int):
        self.inner = inner
        self.window = check_window(window)
        self.first = 0  # absolute position that the inner storage's position 0 stands for
        self.step_view: AttentionView | None = None  # what attention reads in the forward in progress
        self.step_plain = False  # that view is dense with contiguous positions (transformers' own tensors)
        self.step_positions: torch.Tensor | None = None  # [batch, kv_heads, seq] absolute positions of that view
        self.step_valid: torch.Tensor | None = None
        self.evicted = False  # a policy evicted tokens inside the window
        self.slid_to = 0  # cutoff of the last slide of a non-plain inner storage (see _slide)

    @property
    def plain(self) -> bool:
        """Dense, nothing evicted: the held tokens are exactly transformers' (contiguous positions)."""
        return isinstance(self.inner, DenseStorage) and self.inner.positions is None

    # -- KVStorage -------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, start_position: int) -> None:
        if start_position < self.first:
            raise ValueError(f"start_position {start_position} precedes the ring's first position {self.first}")
        self.inner.append(keys, values, start_position - self.first)
        self.step_plain = self.plain
        self.step_view = self._absolute(self.inner.view())
        self.step_positions, self.step_valid = self.step_view.positions, self.step_view.valid
        self._slide(start_position + keys.shape[-2], new=keys.shape[-2])

    def view(self) -> AttentionView:
        """This step's view (held + new tokens) once after an append, then the held tokens."""
        if self.step_view is not None:
            out, self.step_view = self.step_view, None
            return out
        return self._absolute(self.inner.view())

    def select(self, keep: torch.Tensor) -> KVStorage:
        """Evict inside the window; the ring stays a ring.

        ``keep`` (``[batch, kv_heads, seq]`` bool) is over the slots of the held tokens' view, or over the slots
        of the view of the last forward (held + new, before the oldest slid out: what a policy scored right
        after attention); decisions are carried to the held tokens by position.
        """
        if bool(keep.all()):
            return self
        held_pos, held_valid = self._relative_positions()
        if keep.shape[-1] != held_pos.shape[-1]:
            if self.step_positions is None or keep.shape[-1] != self.step_positions.shape[-1]:
                raise ValueError(
                    f"keep covers {keep.shape[-1]} slots; the ring holds {held_pos.shape[-1]} and its last "
                    f"forward's view had {None if self.step_positions is None else self.step_positions.shape[-1]}"
                )
            keep = self._carry(keep, held_pos + self.first, held_valid)
        if held_valid is not None:
            keep = keep & held_valid
        out = self._copy()
        out.inner = self.inner.select(keep)
        out.step_view = None
        out.step_positions = out.step_valid = None
        out.evicted = True
        return out

    def _carry(self, keep: torch.Tensor, held_pos: torch.Tensor, held_valid: torch.Tensor | None) -> torch.Tensor:
        """``keep`` over the last forward's slots -> over the held slots (matched by absolute position)."""
        step_pos, step_valid = self.step_positions, self.step_valid
        real = keep if step_valid is None else keep & step_valid
        lo = int(step_pos.min())
        span = int(step_pos.max()) - lo + 1
        by_position = torch.zeros(*keep.shape[:2], span, dtype=torch.int32, device=keep.device)
        by_position.scatter_add_(-1, step_pos - lo, real.to(torch.int32))
        index = (held_pos - lo).clamp(0, span - 1)
        carried = by_position.gather(-1, index) > 0
        return carried if held_valid is None else carried & held_valid

    def settle(self, seen: int) -> KVStorage:
        inner = self.inner.settle(seen - self.first)  # the inner storage counts positions from `first`
        if inner is self.inner:
            return self
        out = self._copy()
        out.inner = inner
        return out

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors()

    def lengths(self) -> torch.Tensor:
        return self.inner.lengths()

    def index_batch(self, index: torch.Tensor) -> KVStorage:
        out = self._copy()
        out.inner = self.inner.index_batch(index)
        out.step_view = None
        out.step_positions = out.step_valid = None
        return out

    def storage_nbytes(self) -> int:
        return self.inner.storage_nbytes()

    # -- helpers ---------------------------------------------------------------------------------------------
    def state(self) -> StorageState:
        """The ring between forwards: its inner storage, window, first position and whether a policy evicted
        inside it (the per-forward view is not part of it)."""
        return wrapped_state(self.inner, window=self.window, first=self.first, evicted=self.evicted,
                             slid_to=self.slid_to)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "SlidingWindowStorage":
        inner = wrapped_from_state(tensors, meta, ("window", "first"), "sliding-window storage")
        out = cls(inner, int(meta["window"]))
        out.first = int(meta["first"])
        out.evicted = bool(meta.get("evicted", False))
        out.slid_to = int(meta.get("slid_to", 0))
        return out

    def _copy(self) -> "SlidingWindowStorage":
        out = SlidingWindowStorage.__new__(SlidingWindowStorage)
        out.__dict__.update(self.__dict__)
        return out

    def snapshot(self) -> "SlidingWindowStorage":
        """A copy sharing the held tensors (appends and slides replace them, never write them): restore it to
        undo forwards that must leave no trace (KVzip's reconstruction)."""
        out = self._copy()
        out.inner = _shallow(self.inner)
        out.step_view = None
        return out

    def _relative_positions(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        view = self.inner.view()
        b, h, n = view.shape[:3]
        pos = view.positions
        if pos is None:
            pos = torch.arange(n, device=view.device).expand(b, h, n)
        return pos, view.valid

    def _absolute(self, view: AttentionView) -> AttentionView:
        """``view`` with absolute positions ``[batch, kv_heads, seq]`` int64 (always explicit)."""
        b, h, n = view.shape[:3]
        pos = view.positions
        if pos is None:
            pos = torch.arange(n, device=view.device).expand(b, h, n)
        pos = pos + self.first
        if isinstance(view, LazyAttentionView):
            view.positions = pos  # a fresh view object per call
            return view
        return dataclasses.replace(view, positions=pos)

    def _slide(self, seen: int, new: int) -> None:
        """Drop what no query from position ``seen`` on can attend to: keep positions ``>= seen - window + 1``.

        A dense ring nothing was evicted from is sliced at every step (as transformers does). Any other inner
        storage drops its oldest tokens through ``select`` (a gather of the whole ring: quantized codes, ragged
        heads), so during decoding it lets up to ``SLIDE_EVERY - 1`` stale tokens wait and drops them together:
        attention masks them by position meanwhile (``allowed_slots`` applies the window), so what a query sees
        is unchanged, and the ring holds at most ``SLIDE_EVERY - 1`` tokens more than ``window - 1``."""
        cutoff = seen - (self.window - 1)
        if cutoff <= self.first:
            return
        inner = self.inner
        if self.plain:
            held = inner.keys.shape[-2]
            drop = min(cutoff - self.first, held)
            keys, values = inner.keys[..., drop:, :], inner.values[..., drop:, :]
            if new > 1:  # a multi-token forward: do not pin its whole concatenation (a decode step pins one token)
                keys, values = keys.clone(), values.clone()
            self.inner = DenseStorage(keys, values, None)
            self.first += drop
            return
        if new == 1 and cutoff - self.slid_to < SLIDE_EVERY:
            return  # a decode step: the stale tokens wait, masked by position, until SLIDE_EVERY can go at once
        pos, valid = self._relative_positions()
        keep = pos >= cutoff - self.first
        if valid is not None:
            keep = keep & valid
        if not bool(keep.all()):
            self.inner = inner.select(keep)
        self.slid_to = cutoff


def _shallow(storage: KVStorage) -> KVStorage:
    out = storage.__class__.__new__(storage.__class__)
    out.__dict__.update(storage.__dict__)
    return out
