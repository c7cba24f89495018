"""Cell records as compact JSON lines: the provenance committed next to a report (``benchmarks/leaderboard/
records.jsonl`` beside ``benchmarks/LEADERBOARD.md``), from which ``kvpress sweep report`` rebuilds the report
without running a model.

One line per finished cell (its full record, as stored) and one per failed cell (``status == "error"``, without its
traceback), sorted by cell key, each ``json.dumps(..., sort_keys=True, separators=(",", ":"))``. Strings holding the
exporting directory's absolute path are made relative to it, so the file names no path of the machine that wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from kvpress.sweep.store import ResultStore, StoreError


def portable(value: Any, base: str) -> Any:
    """``value`` with every ``base + "/"`` inside its strings removed (recursively through dicts and lists)."""
    if isinstance(value, str):
        return value.replace(base.rstrip(os.sep) + os.sep, "")
    if isinstance(value, dict):
        return {k: portable(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, base) for v in value]
    return value


def export_records(store: str | Path | ResultStore, path: str | Path, keys: Iterable[str] | None = None,
                   base: str | Path | None = None) -> Path:
    """Write the records (and the latest errors) of ``store`` (only ``keys`` when given) to ``path`` as JSON lines;
    ``base`` (default: the working directory) is the absolute path stripped from strings."""
    if not isinstance(store, ResultStore):
        store = ResultStore.open(store)
    wanted = None if keys is None else set(keys)
    base = str(Path(base or Path.cwd()).resolve())
    entries = [r for r in store.records() if wanted is None or r["key"] in wanted]
    entries += [{k: v for k, v in e.items() if k != "traceback"} for e in store.errors()
                if wanted is None or e["key"] in wanted]
    lines = [json.dumps(portable(e, base), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
             for e in sorted(entries, key=lambda e: (e["key"], e["status"]))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


class RecordsFile:
    """A JSON-lines export read like a :class:`~kvpress.sweep.store.ResultStore` (``records()``, ``errors()``)."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        if not self.root.is_file():
            raise StoreError(f"{self.root}: no such records file")
        self._entries = [json.loads(line) for line in self.root.read_text(encoding="utf-8").splitlines() if line]
        for i, entry in enumerate(self._entries):
            if entry.get("status") not in ("ok", "error") or "key" not in entry:
                raise StoreError(f"{self.root}:{i + 1}: not a cell record (needs 'key' and status 'ok' or 'error')")

    def records(self) -> Iterator[dict[str, Any]]:
        return iter([e for e in self._entries if e["status"] == "ok"])

    def errors(self) -> list[dict[str, Any]]:
        done = {e["key"] for e in self._entries if e["status"] == "ok"}
        return [e for e in self._entries if e["status"] == "error" and e["key"] not in done]


def open_results(source: str | Path | ResultStore | RecordsFile) -> ResultStore | RecordsFile:
    """A result store directory or a records file (``.jsonl``), opened for reading."""
    if isinstance(source, (ResultStore, RecordsFile)):
        return source
    path = Path(source)
    return RecordsFile(path) if path.is_file() else ResultStore.open(path)
