"""Sweep specs and policy expressions: parsing (ast, nothing evaluated), validation against the registry's
signatures, grid expansion, cell keys. No model is loaded here."""

from __future__ import annotations

import pytest

from kvpress.policies import Pipeline, SnapKV, StreamingLLM, register_policy
from kvpress.policies.registry import _REGISTRY
from kvpress.quant import KVQuant
from kvpress.sweep import PolicyConfig, SpecError, SweepSpec, expand, plan
from kvpress.sweep.cells import config_key
from kvpress.policies.expr import Dtype, factory_parameters

from sweep_fixtures import save_tiny_model


def labels(text, ratios=None):
    return [c.label for c in expand(text, ratios)]


def spec(**kw):
    base = {"tasks": ["niah_single_noise"], "policies": ["snapkv"]}
    return SweepSpec.from_dict({**base, **kw})


def test_expressions_expand_grids_and_pipelines():
    assert labels("snapkv") == ["snapkv"]
    assert labels("snapkv", [0.25, 0.5]) == ["snapkv(compression_ratio=0.25)", "snapkv(compression_ratio=0.5)"]
    assert labels("kvquant(bits=[2, 4], rotate=[True, False])") == [
        "kvquant(bits=2, rotate=True)", "kvquant(bits=2, rotate=False)",
        "kvquant(bits=4, rotate=True)", "kvquant(bits=4, rotate=False)"]
    # the sweep's ratio reaches the stage that takes one; the quantizer takes none
    assert labels("snapkv(window=16) | kvquant(bits=2)", [0.5]) == ["snapkv(compression_ratio=0.5, window=16) | kvquant(bits=2)"]
    # an explicit ratio or a fixed window is left alone; StreamingLLM without a window takes the ratio
    assert labels("snapkv(compression_ratio=0.9)", [0.25, 0.5]) == ["snapkv(compression_ratio=0.9)"]
    assert labels("streaming_llm(window=64)", [0.5]) == ["streaming_llm(window=64)"]
    assert labels("streaming_llm", [0.5]) == ["streaming_llm(compression_ratio=0.5)"]
    assert labels("none", [0.5]) == ["none"]
    # positionals bind in signature order
    assert labels("snapkv(0.5, None, 8)") == ["snapkv(compression_ratio=0.5, budget=None, window=8)"]


def test_built_policies_match_the_python_they_are_written_as():
    (cfg,) = expand("snapkv(compression_ratio=0.5, window=16) | kvquant(bits=2, fp_dtype=torch.float16)")
    built = cfg.build(1000)
    assert isinstance(built, Pipeline)
    expected = SnapKV(compression_ratio=0.5, window=16) | KVQuant(bits=2, fp_dtype=__import__("torch").float16)
    assert repr(built) == repr(expected)
    (stream,) = expand("streaming_llm(n_sink=2)", [0.5])
    policy = stream.build(1000)
    assert isinstance(policy, StreamingLLM) and policy.window == 500 - 2 and policy.n_sink == 2
    assert expand("kvquant(fp_dtype=torch.bfloat16)")[0].stages[0].params == (("fp_dtype", Dtype("bfloat16")),)
    assert expand("none")[0].build(10) is None


def test_new_policies_are_discovered_from_the_registry():
    """A policy registered later is usable at once: its parameters come from the factory's signature; a factory
    that takes a compression_ratio gets the shared ratio, one that takes only a budget runs once; '*' picks it up."""

    class Keep(SnapKV):
        pass

    def budget_only(budget: int = 8, window: int = 4):
        return Keep(budget=budget, window=window)

    def ratio_too(compression_ratio: float | None = None, window: int = 4) -> Keep:
        return Keep(compression_ratio=compression_ratio, window=window)

    register_policy("budget_only_test", budget_only)
    register_policy("ratio_test", ratio_too)
    try:
        assert set(factory_parameters("budget_only_test")[0]) == {"budget", "window"}
        (cfg,) = expand("budget_only_test(window=2)", [0.75])
        assert cfg.stages[0].ratio_via is None and cfg.label == "budget_only_test(window=2)"
        assert cfg.build(400).budget == 8
        (cfg,) = expand("ratio_test(window=2)", [0.75])
        assert cfg.label == "ratio_test(compression_ratio=0.75, window=2)" and cfg.build().compression_ratio == 0.75
        with pytest.raises(SpecError, match="has no parameter 'ratio'.*budget, window"):
            expand("budget_only_test(ratio=0.5)")
        s = spec(policies=["*"], ratios=[0.5])
        names = {c.name for c in s.policy_configs()}
        assert {"none", "snapkv", "streaming_llm", "kvquant", "budget_only_test", "ratio_test"} <= names
    finally:
        _REGISTRY.pop("budget_only_test")
        _REGISTRY.pop("ratio_test")


def test_star_leaves_out_policies_that_need_arguments_with_a_note():
    def needs_pattern(pattern: str, compression_ratio: float = 0.5):
        raise ValueError("no such pattern")

    register_policy("needs_arg_test", needs_pattern)
    try:
        s = spec(policies=["*", "kvquant(bits=[2, 4])"], ratios=[0.5])
        configs = [c.label for c in s.policy_configs()]
        assert not any(label.startswith("needs_arg_test") for label in configs)
        assert any("needs_arg_test" in note for note in s.notes)
        # the explicit kvquant entry replaces kvquant's default from '*'
        assert [c for c in configs if c.startswith("kvquant")] == ["kvquant(bits=2)", "kvquant(bits=4)"]
        with pytest.raises(SpecError, match="needs_arg_test"):
            spec(policies=["needs_arg_test(pattern='x')"])  # named explicitly: an error, not a note
    finally:
        _REGISTRY.pop("needs_arg_test")


@pytest.mark.parametrize("text,message", [
    ("snapkvv", "unknown policy 'snapkvv'; available policies: .*snapkv"),
    ("snapkv(windw=8)", "policy 'snapkv' has no parameter 'windw'; its parameters: compression_ratio, budget, window"),
    ("kvquant(bitz=2)", "policy 'kvquant' has no parameter 'bitz'; its parameters: bits, group_size"),
    ("snapkv(compression_ratio=1.5)", r"compression_ratio must be in \[0, 1\)"),
    ("kvquant(bits=5)", "bits"),
    ("snapkv(window=[])", "empty list"),
    ("snapkv(window=", "cannot parse"),
    ("__import__('os').system('echo hacked')", "expected a policy name or call"),
    ("__import__('os')", "unknown policy '__import__'"),
    ("snapkv(window=().__class__)", "unsupported value"),
    ("snapkv(window=open('x'))", "unknown policy 'open'"),
    ("snapkv(**{'window': 3})", r"\*\*-unpacking"),
    ("snapkv(1, 2, 3, 4, 5, 6)", "at most 5 positional"),
    ("none(window=3)", "no parameter 'window'"),
])
def test_bad_expressions_name_the_key(text, message):
    with pytest.raises(SpecError, match=r"policies\[0\]") as err:
        spec(policies=[text])
    assert err.match(message)


@pytest.mark.parametrize("data,message", [
    ({"tasks": ["niah_single_noise"]}, "missing key 'policies'"),
    ({"tasks": ["nope"], "policies": ["snapkv"]}, r"tasks\[0\]: unknown task 'nope'; available tasks: niah_single_noise"),
    ({"tasks": ["lm_eval:nope"], "policies": ["snapkv"]}, "unknown lm-eval task 'lm_eval:nope'"),
    ({"tasks": [], "policies": ["snapkv"]}, "tasks: the axis is empty"),
    ({"tasks": ["vt"], "policies": []}, "policies: the axis is empty"),
    ({"tasks": ["vt"], "policies": ["snapkv"], "lengths": [0]}, r"lengths\[0\]: expected an integer >= 1"),
    ({"tasks": ["vt"], "policies": ["snapkv"], "ratios": [1.0]}, r"ratios\[0\]: a compression ratio is in \[0, 1\)"),
    ({"tasks": ["vt"], "policies": ["snapkv"], "depths": [2]}, r"depths\[0\]: a needle depth is in \[0, 1\]"),
    ({"tasks": ["vt"], "policies": ["snapkv"], "modes": ["aware"]}, r"modes\[0\]: mode must be one of"),
    ({"tasks": ["vt"], "policies": ["snapkv"], "samples": 0}, "samples: expected an integer >= 1"),
    ({"tasks": ["vt"], "policies": ["snapkv"], "seeds": [0, 0]}, r"seeds\[1\]: duplicate value 0"),
    ({"tasks": ["vt"], "policies": ["snapkv"], "ratio": [0.5]}, "unknown key 'ratio'; allowed keys"),
    ({"tasks": ["perplexity"], "policies": ["snapkv"], "task": {"perplexity": {"chunk": 3}}},
     "task.perplexity.chunk: unknown parameter; parameters of perplexity tasks: mode, chunk_size"),
    ({"tasks": ["perplexity"], "policies": ["snapkv"], "task": {"perplexity": {"mode": "fast"}}},
     "task.perplexity.mode: expected 'chunked' or 'token'"),
    ({"tasks": ["vt"], "policies": ["snapkv"], "task": {"perplexity": {}}}, "task.perplexity: parameters for a task"),
    ({"tasks": ["niah_single_prose"], "policies": ["snapkv"], "task": {"niah_single_prose": {"haystack_file": "/nope"}}},
     "task.niah_single_prose.haystack_file: expected the path of an existing text file"),
])
def test_bad_specs_name_the_key(data, message):
    with pytest.raises(SpecError, match=message):
        SweepSpec.from_dict(data)


def test_unknown_model_is_refused_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpecError, match="unknown model 'no-such/model-xyz'"):
        plan(spec(models=["no-such/model-xyz"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="without a config.json"):
        plan(spec(models=[str(tmp_path / "empty")]))


def test_plan_cells_and_stable_keys(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    data = {"models": [str(model)], "tasks": ["niah_single_noise", "vt", "perplexity"],
            "policies": ["snapkv", "kvquant(bits=[2, 4])"], "ratios": [0.25, 0.5], "lengths": [512, 700],
            "depths": [0.0, 1.0], "samples": 2, "seeds": [0, 1]}
    p = plan(SweepSpec.from_dict(data))
    n_policy = 1 + 2 + 2  # baseline, snapkv x 2 ratios, kvquant x 2 bits
    # needle task: lengths x depths x seeds; vt: lengths x seeds (no depth); perplexity: lengths only
    assert len(p.cells) == n_policy * (2 * 2 * 2 + 2 * 2 + 2)
    assert len({c.key for c in p.cells}) == len(p.cells)
    again = plan(SweepSpec.from_dict(dict(data)))
    assert [c.key for c in again.cells] == [c.key for c in p.cells]  # stable across plans
    assert all(c.key == config_key(c.config) for c in p.cells)
    # the key covers the configuration: a different answer budget is a different cell
    other = plan(SweepSpec.from_dict({**data, "task": {"vt": {"max_new_tokens": 5}}}))
    vt_keys = {c.key for c in p.cells if c.task == "vt"}
    assert vt_keys.isdisjoint(c.key for c in other.cells if c.task == "vt")
    assert {c.key for c in p.cells if c.task != "vt"} == {c.key for c in other.cells if c.task != "vt"}
    cfg = p.cells[1].config
    assert set(cfg) == {"kvpress_version", "model", "dtype", "policy", "task", "length", "depth", "mode", "samples",
                        "seed"}
    assert cfg["model"]["kind"] == "local" and cfg["task"]["haystack_sha256"]


def test_policy_config_is_a_policy_spec_for_the_eval_runner():
    cfg = PolicyConfig()
    assert cfg.is_baseline and cfg.label == "none" and cfg.name == "none" and cfg.build(5) is None
    (snap,) = expand("snapkv", [0.5])
    assert snap.compression_ratio == 0.5 and snap.name == "snapkv" and not snap.is_baseline


def test_report_helpers(tmp_path):
    from kvpress.sweep import pareto_front
    from kvpress.sweep.report import README_END, README_START, family, update_readme

    points = [(1.0, 90.0), (0.5, 80.0), (0.5, 85.0), (0.3, 20.0), (0.7, 70.0), (0.2, 20.0)]
    assert pareto_front(points) == [(0.2, 20.0), (0.5, 85.0), (1.0, 90.0)]
    assert pareto_front([(1.0, 10.0), (0.5, 12.0), (0.3, 11.0)], higher_is_better=False) == [(0.3, 11.0), (1.0, 10.0)]
    assert family("snapkv(compression_ratio=0.5, window=8) | kvquant(bits=4)") == "snapkv(window=8) | kvquant(bits=4)"
    assert family("streaming_llm(compression_ratio=0.25)") == "streaming_llm" and family("none") == "none"
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{README_START}\nold\n{README_END}\nb\n")
    update_readme(readme, "| new |", source="x.md")
    text = readme.read_text()
    assert text.startswith("a\n") and text.endswith("b\n") and "| new |" in text and "old" not in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- kvpress-leaderboard:start -->"):
        update_readme(readme, "t", source="x")


def test_headline_never_averages_accuracy_bytes_with_perplexity_peaks():
    """Accuracy tasks hold the compressed context, chunked perplexity reports its peak: separate columns."""
    from kvpress.sweep.report import headline_table

    def row(task, family, ratio, frac, higher):
        return {"task": task, "family": family, "policy": family if ratio is None else f"{family}(r={ratio})",
                "ratio": ratio, "pct_of_full": 90.0, "kv_fraction": frac, "higher_is_better": higher,
                "score": 1.0}

    rows = [row("niah", "kvzip", 0.5, 0.50, True), row("perplexity", "kvzip", 0.5, 0.90, False),
            row("niah", "kvquant", None, 0.30, True), row("perplexity", "kvquant", None, 0.34, False)]
    table = headline_table(rows)
    kvzip_line = next(line for line in table.splitlines() if line.startswith("| `kvzip`"))
    assert kvzip_line.endswith("| 50 | 90 |"), kvzip_line
    quant_line = next(line for line in table.splitlines() if line.startswith("| `kvquant`"))
    assert quant_line.endswith("| 30.0 | 34.0 |"), quant_line
