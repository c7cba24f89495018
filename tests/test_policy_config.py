"""One policy configuration: every eviction policy takes ``compression_ratio`` by name, and every label a report
prints (benchmarks/LEADERBOARD.md, benchmarks/results/*.json) parses back to a configuration that builds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kvpress.context import LayerContext
from kvpress.policies import DecodingBudget, DuoAttention, Policy, StreamingLLM, available_policies, get_policy
from kvpress.policies.expr import PolicyConfig, expand, parse_config

ROOT = Path(__file__).resolve().parents[1]
EVICTION = [n for n in available_policies() if n not in ("none", "kvquant")]


@pytest.mark.parametrize("name", EVICTION)
def test_every_eviction_policy_takes_a_compression_ratio(name):
    policy = get_policy(name, compression_ratio=0.5)
    assert isinstance(policy, Policy) and policy.params()["compression_ratio"] == 0.5
    with pytest.raises(ValueError, match=r"compression_ratio must be (a number )?in \[0, 1\)"):
        get_policy(name, compression_ratio=1.5)
    # and a shared ratio reaches it in an expression, with a label that parses back to the same configuration
    (config,) = expand(name, [0.25])
    assert config.label == f"{name}(compression_ratio=0.25)"
    assert parse_config(config.label).build(400).params() == config.build(400).params()


def test_labels_of_python_parameters_parse_back():
    """Parameters given from Python (eval's --param, the benchmarks) print as literals the parser reads back."""
    config = PolicyConfig.of("adakv", {"scorer": "snapkv", "scorer_params": {"window": 16}}, 0.5)
    assert config.label == "adakv(compression_ratio=0.5, scorer='snapkv', scorer_params={'window': 16})"
    again = parse_config(config.label)
    assert again.label == config.label and again.build(400).params() == config.build(400).params()
    assert config.build(400).scorer.window == 16
    assert PolicyConfig.of("kvquant", {"bits": 4, "fp_dtype": torch.float16}).label == \
        "kvquant(bits=4, fp_dtype=torch.float16)"
    with pytest.raises(ValueError, match="dictionary holds literals only"):
        parse_config("adakv(scorer_params={'window': [8, 16]})")


def test_the_registry_is_all_covered():
    assert set(EVICTION) >= {"streaming_llm", "duo_attention", "decoding_budget", "snapkv"}
    assert get_policy("kvquant", bits=4) is not None  # a quantizer, not an eviction policy: no ratio


def _ctx(seq: int, phase: str = "prefill", heads: int = 2) -> LayerContext:
    keys = torch.randn(1, heads, seq, 8)
    positions = torch.arange(seq).expand(1, heads, seq)

    def allowed(n):
        return positions.unsqueeze(2) <= torch.arange(seq - n, seq).view(1, 1, n, 1)

    return LayerContext(0, 1, phase, torch.randn(1, heads, seq, 8), keys, keys, positions, allowed, 8**-0.5, seq)


def test_streaming_llm_sizes_its_window_at_the_first_forward():
    policy = StreamingLLM(n_sink=4, compression_ratio=0.75)
    keep = policy.select(_ctx(400))
    assert policy.window == round(400 * 0.25) - 4 and int(keep[0, 0].sum()) == 100
    policy.select(_ctx(800))  # a fresh cache's first forward sizes it again
    assert policy.window == 196
    policy.size_for(400)  # fixed: later forwards do not re-size it
    policy.select(_ctx(800))
    assert policy.window == 96
    with pytest.raises(ValueError, match="either window or compression_ratio"):
        StreamingLLM(window=8, compression_ratio=0.5)


def test_decoding_budget_and_duo_attention_size_from_the_ratio():
    budget = get_policy("decoding_budget", compression_ratio=0.5)
    budget.size_for(512)
    assert budget.budget == 256 and isinstance(budget, DecodingBudget)
    duo = DuoAttention(pattern=torch.rand(3, 2), compression_ratio=0.5, n_sink=4, window=16)
    duo.size_for(200)  # a streaming head keeps 20 of 200 tokens: 0.5 / (1 - 0.1) of the heads stream
    assert duo.sparsity == pytest.approx(0.5 / 0.9) and int(duo.streaming_heads.sum()) == 3
    with pytest.raises(ValueError, match="one of sparsity, threshold or compression_ratio"):
        DuoAttention(sparsity=0.5, compression_ratio=0.5)


def _leaderboard_labels() -> dict[str, list[float]]:
    """``{label: ratios}`` of every table row of LEADERBOARD.md: a row of a table with ``r=...`` columns names a
    policy family (the configuration is the family at each ratio), every other row one configuration."""
    text = (ROOT / "benchmarks" / "LEADERBOARD.md").read_text(encoding="utf-8")
    labels: dict[str, list[float]] = {}
    ratios: list[float] = []
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if not cells[0].startswith("`"):  # a header row: which ratios its columns are
            ratios = [float(m) for m in re.findall(r"^r=([0-9.]+)$", "\n".join(cells), re.M)]
            continue
        labels[cells[0].strip("`").replace("\\|", "|")] = ratios
    return labels


def _json_labels() -> set[str]:
    labels = set()

    def walk(value, key=None):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif key in ("label", "policy") and isinstance(value, str):
            labels.add(value)

    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):  # run folders included
        walk(json.loads(path.read_text(encoding="utf-8")))
    return labels


def test_the_leaderboard_labels_are_found():
    labels = _leaderboard_labels()
    assert {"none", "snapkv(compression_ratio=0.5) | kvquant(bits=4)", "streaming_llm(compression_ratio=0.25)",
            "duo_attention", "kvquant(bits=2)", "decoding_budget"} <= set(labels), labels
    assert labels["decoding_budget"] == [0.25, 0.5, 0.75] and labels["kvquant(bits=2)"] == []
    assert len(_json_labels()) > 20


@pytest.mark.parametrize("label", sorted(set(_leaderboard_labels()) | _json_labels()))
def test_every_committed_label_parses_back_and_builds(label, monkeypatch):
    monkeypatch.chdir(ROOT)  # pattern files are named relative to the repository
    ratios = _leaderboard_labels().get(label) or []
    configs = expand(label, ratios) if ratios else [parse_config(label)]
    for config in configs:
        assert isinstance(config, PolicyConfig)
        assert parse_config(config.label).label == config.label  # the printed form parses back to itself
        policy = config.build(1024)
        assert (policy is None) == (label in ("none", "full"))
    if not ratios:  # a configuration's label: what it prints is what was read (up to a positional's keyword)
        assert configs[0].label == label or configs[0].label == _with_keywords(label)


def _with_keywords(label: str) -> str:
    """``adakv(snapkv)`` as printed: ``adakv(scorer=snapkv)`` (benchmarks name a wrapper by its scorer); ``full``
    (the perplexity runs' name of the uncompressed cache) as ``none``."""
    if label == "full":
        return "none"
    return re.sub(r"^(adakv|pyramidkv)\((\w+)\)$", r"\1(scorer=\2)", label)
