"""Helpers for storage tests."""

from __future__ import annotations

import kvpress.storage.base as storage_base


def select_at_once(storage, keep):
    """``storage.select(keep)`` with eviction deferral off (``DEFER_SLOTS = 0``): every evicted token is dropped now,
    never only masked (the reference a deferred select must match)."""
    saved = storage_base.DEFER_SLOTS
    storage_base.DEFER_SLOTS = 0
    try:
        return storage.select(keep)
    finally:
        storage_base.DEFER_SLOTS = saved
