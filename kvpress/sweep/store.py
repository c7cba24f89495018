"""The result store: a directory with one JSON record per finished cell, written atomically and never overwritten.

    DIR/store.json              {"format": "kvpress-sweep", "schema_version": 1, "kvpress_version": ..., "created": ...}
    DIR/cells/<key>.json        one record per finished cell (see kvpress/sweep/README.md for its fields)
    DIR/errors/<key>-<time>.json    one per failed attempt (error and traceback); a later success does not remove it
    DIR/runs.jsonl              one line per `run` (spec, backend, counts), appended

A record is written to a temporary file in ``cells/`` and hard-linked to its final name: the name appears only
with complete content, and linking fails if the name exists, so a record is never overwritten (two runs on
one store finishing the same cell keep the first). A write that fails (a full disk) removes its temporary file
and raises; a killed process leaves at most stray ``.tmp`` files, which no reader takes for records. A temporary
file's name carries its writer's host and pid, so opening the store for writing removes those left by writers
that are gone (on this host; another host's files are left alone, as their writer may still be running).

Version rule: the store records the kvpress version that created it. ``run`` refuses a store made by another
kvpress version (its cells are keyed on that version, so none would be reused and the report would mix
versions); its records stay untouched and a new ``--out`` starts a fresh store. ``report`` reads any store
written with this store schema.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

FORMAT = "kvpress-sweep"
SCHEMA_VERSION = 1


class StoreError(RuntimeError):
    """A results directory that cannot be used as asked (another kvpress version, another format)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _host() -> str:
    return socket.gethostname().replace(".", "_")  # no dots: the temporary name is split on them


def _write_new(path: Path, payload: dict[str, Any]) -> bool:
    """Write ``payload`` as JSON to ``path`` atomically if ``path`` does not exist; False if it did."""
    tmp = path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1, ensure_ascii=False, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:  # a failed write (full disk, ...): no record, and no partial file left behind
        tmp.unlink(missing_ok=True)
        raise
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class ResultStore:
    """Records of finished cells under one directory (see the module docstring for the layout and rules)."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        self.cells_dir = self.root / "cells"
        self.errors_dir = self.root / "errors"

    @property
    def kvpress_version(self) -> str:
        return self.manifest["kvpress_version"]

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, *, create: bool = False, for_writing: bool = False) -> "ResultStore":
        """Open the store at ``root``. ``create``: make it if missing. ``for_writing``: enforce the version rule."""
        from kvpress.sweep.cells import kvpress_version

        root = Path(root)
        manifest_path = root / "store.json"
        if not manifest_path.is_file():
            if root.exists() and (not root.is_dir() or any(root.iterdir())):
                raise StoreError(f"{root} exists and is not a kvpress sweep store (no store.json): choose another "
                                 "--out; nothing there was changed")
            if not create:
                raise StoreError(f"{root} is not a kvpress sweep store (no store.json)")
            root.mkdir(parents=True, exist_ok=True)
            manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "kvpress_version": kvpress_version(),
                        "created": _now()}
            _write_new(manifest_path, manifest)
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"{manifest_path}: unreadable store manifest ({err})") from None
        if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{root}: store format {manifest.get('format')!r} schema "
                             f"{manifest.get('schema_version')!r}; this kvpress reads {FORMAT!r} schema {SCHEMA_VERSION}")
        store = cls(root, manifest)
        if for_writing and store.kvpress_version != kvpress_version():
            raise StoreError(
                f"{root} holds results of kvpress {store.kvpress_version}, this is kvpress {kvpress_version()}: cell "
                "keys include the kvpress version, so every cell would re-run and the report would mix versions. "
                "Refusing to add to it (its records are untouched): run with a new --out directory"
            )
        store.cells_dir.mkdir(exist_ok=True)
        store.errors_dir.mkdir(exist_ok=True)
        if for_writing:
            store.remove_orphaned_temporaries()
        return store

    def remove_orphaned_temporaries(self) -> list[Path]:
        """Remove the ``.tmp`` files of writers on this host that no longer run (a killed sweep); the removed paths."""
        removed = []
        host = _host()
        for folder in (self.cells_dir, self.errors_dir):
            for tmp in folder.glob(".*.tmp"):
                fields = tmp.name[:-len(".tmp")].rsplit(".", 3)
                if len(fields) != 4 or fields[1] != host or not fields[2].isdigit():
                    continue  # another host's writer, or not a name this store writes
                if _process_alive(int(fields[2])):
                    continue
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        return removed

    # -- reading -------------------------------------------------------------------------------------------
    def finished_keys(self) -> set[str]:
        return {p.stem for p in self.cells_dir.glob("*.json")}

    def has(self, key: str) -> bool:
        return (self.cells_dir / f"{key}.json").is_file()

    def read(self, key: str) -> dict[str, Any]:
        return json.loads((self.cells_dir / f"{key}.json").read_text(encoding="utf-8"))

    def records(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.cells_dir.glob("*.json")):
            yield json.loads(path.read_text(encoding="utf-8"))

    def errors(self) -> list[dict[str, Any]]:
        """The latest error of every cell that has no record."""
        done = self.finished_keys()
        latest: dict[str, dict[str, Any]] = {}
        for path in sorted(self.errors_dir.glob("*.json")):
            error = json.loads(path.read_text(encoding="utf-8"))
            if error["key"] not in done:
                latest[error["key"]] = error
        return list(latest.values())

    # -- writing -------------------------------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> bool:
        """Store a finished cell's record; False (and nothing written) if the cell already has one."""
        return _write_new(self.cells_dir / f"{record['key']}.json", record)

    def write_error(self, error: dict[str, Any]) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}"
        path = self.errors_dir / f"{error['key']}-{stamp}.json"
        _write_new(path, error)
        return path

    def log_run(self, entry: dict[str, Any]) -> None:
        with (self.root / "runs.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"at": _now(), **entry}, default=str) + "\n")
