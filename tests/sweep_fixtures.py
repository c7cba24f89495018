"""Shared pieces of the sweep tests: a tiny random Llama + byte tokenizer saved as a local model directory, the
6-cell spec used by the resume and Ray tests, and helpers to compare stores."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from eval_fixtures import byte_tokenizer, tiny_llama

# 6 cells: the baseline and SnapKV at two ratios share one prefill per sample (one unit), three single units.
SIX_CELLS = """
name = "six"
models = ["{model}"]
tasks = ["niah_single_noise"]
policies = ["snapkv", "streaming_llm(window=64)", "kvquant(bits=2)", "snapkv(compression_ratio=0.5, window=8) | kvquant(bits=4)"]
ratios = [0.25, 0.5]
lengths = [700]
samples = 2
[task.niah_single_noise]
max_new_tokens = 3
"""
# Fields that depend on the machine, the backend or the moment, not on the configuration.
VOLATILE = {"seconds", "prefill_seconds", "decode_seconds", "environment", "finished_at", "fanout"}


def save_tiny_model(path: Path) -> Path:
    """A 2-layer random Llama and its byte tokenizer (with chat template), saved with save_pretrained."""
    path = Path(path)
    if not (path / "config.json").is_file():
        tiny_llama().save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
    return path


def write_spec(path: Path, model: Path, text: str = SIX_CELLS) -> Path:
    path.write_text(text.replace("{model}", str(model)), encoding="utf-8")
    return path


def stable(record: dict) -> dict:
    """A record without its volatile fields (times, environment), samples included."""
    out = {k: v for k, v in record.items() if k not in VOLATILE}
    out["samples"] = [{k: v for k, v in s.items() if k not in VOLATILE} for s in record["samples"]]
    return out


def stable_records(store_dir: Path) -> dict[str, dict]:
    return {p.stem: stable(json.loads(p.read_text())) for p in sorted((Path(store_dir) / "cells").glob("*.json"))}


def snapshot(root: Path) -> dict[str, str]:
    """Content hash of every file under ``root`` (to show nothing was changed), except a killed writer's ``.tmp``
    leftovers: they are not records, and reopening the store for writing removes them."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.suffix != ".tmp"}


def report_without_times(md: Path) -> str:
    return md.read_text(encoding="utf-8").split("## Times")[0]
