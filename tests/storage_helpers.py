"""Helpers for storage tests."""

from __future__ import annotations

from types import ModuleType


def select_at_once(storage, keep, module: ModuleType):
    """``storage.select(keep)`` with ``module``'s deferral off (``DEFER_SLOTS = 0``): every evicted token is dropped
    now, never only masked (the reference a deferred select must match)."""
    saved = module.DEFER_SLOTS
    module.DEFER_SLOTS = 0
    try:
        return storage.select(keep)
    finally:
        module.DEFER_SLOTS = saved
