"""The bad-input table: every way into kvpress (Python API, CLI, sweep spec files, DuoAttention pattern files,
learned-scorer predictor files) given something wrong, asserting the exception type or exit status AND that the
message names what is wrong (the parameter, option, key or file).

The CLI runs in-process through ``kvpress.cli.main(argv)``: every error is one line on stderr,
``kvpress <command>: error: ...``, exit status 2 (argparse's own errors too, with the sub-action in the prefix:
``kvpress duo identify: error: ...``). Every
case here fails before a model would load, or loads only the tiny random model of tests/tiny_models.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

import kvpress
from kvpress.cli import main as kvpress_main
from kvpress.duo.pattern import FORMAT, DuoPattern, load_pattern
from kvpress.policies import (
    H2O, TOVA, AdaKV, DecodingBudget, KeyNorm, KVzip, Pipeline, PyramidKV, SnapKV, StreamingLLM, get_policy,
)
from kvpress.policies.duo_attention import DuoAttention
from kvpress.policies.learned import Learned
from kvpress.quant import KVQuant
from kvpress.scorer.predictor import ScorePredictor, load_predictor, model_signature
from kvpress.scorer.train import TrainConfig
from kvpress.sweep.spec import SpecError, load_spec
from tiny_models import tiny_model

LAYERS, HIDDEN, KV_HEADS = 2, 64, 2  # the tiny llama of tests/tiny_models.py


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def raises(fn: Callable[[], Any], exc: type[BaseException] | tuple, pattern: str) -> str:
    """Run ``fn``, expect ``exc`` whose message matches ``pattern`` (the name of what is wrong); the message."""
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``kvpress argv`` in-process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = kvpress_main(argv)
    except SystemExit as err:  # argparse's own errors
        code = err.code
    return code, capsys.readouterr().err


def assert_cli_error(argv: list[str], pattern: str, capsys, command: str | None = None) -> None:
    """Exit status 2, and the last stderr line is ``kvpress <command>: error: ...`` matching ``pattern``."""
    code, err = run_cli(argv, capsys)
    assert code == 2, f"exit {code} for {argv}; stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line for {argv}, got: {err}"
    command = command or argv[0]
    # ours: "kvpress <command>: error:"; argparse's, for a sub-action: "kvpress <command> <action>: error:"
    assert re.match(rf"kvpress {command}( [a-z]+)?: error: ", lines[-1]), lines[-1]
    assert "Traceback" not in err, err
    assert re.search(pattern, lines[-1]), f"{pattern!r} not in {lines[-1]!r}"


# ---------------------------------------------------------------------------------------------------- API
NAN = float("nan")
API_CASES: list[tuple[str, Callable[[], Any], type | tuple, str]] = [
    # (id, call, exception, pattern naming the parameter)
    ("snapkv-ratio-1.5", lambda: SnapKV(compression_ratio=1.5), ValueError, "compression_ratio"),
    ("snapkv-ratio-1", lambda: SnapKV(compression_ratio=1.0), ValueError, "compression_ratio"),
    ("snapkv-ratio-neg", lambda: SnapKV(compression_ratio=-0.1), ValueError, "compression_ratio"),
    ("snapkv-ratio-nan", lambda: SnapKV(compression_ratio=NAN), ValueError, "compression_ratio"),
    ("snapkv-ratio-str", lambda: SnapKV(compression_ratio="0.5"), ValueError, "compression_ratio"),
    ("snapkv-ratio-bool", lambda: SnapKV(compression_ratio=True), ValueError, "compression_ratio"),
    ("snapkv-budget-0", lambda: SnapKV(budget=0), ValueError, "budget"),
    ("snapkv-budget-float", lambda: SnapKV(budget=1.5), ValueError, "budget"),
    ("snapkv-window-neg", lambda: SnapKV(compression_ratio=0.5, window=-1), ValueError, "window"),
    ("streaming-n_sink-neg", lambda: StreamingLLM(n_sink=-1), ValueError, "n_sink"),
    ("streaming-window-0", lambda: StreamingLLM(window=0), ValueError, "window"),
    ("streaming-window-float", lambda: StreamingLLM(window=8.5), ValueError, "window"),
    ("streaming-reposition-str", lambda: StreamingLLM(reposition="yes"), ValueError, "reposition"),
    ("h2o-ratio-2", lambda: H2O(compression_ratio=2.0), ValueError, "compression_ratio"),
    ("tova-ratio-inf", lambda: TOVA(compression_ratio=float("inf")), ValueError, "compression_ratio"),
    ("knorm-budget-neg", lambda: KeyNorm(budget=-3), ValueError, "budget"),
    ("kvzip-ratio-1", lambda: KVzip(compression_ratio=1.0), ValueError, "compression_ratio"),
    ("kvzip-scope", lambda: KVzip(compression_ratio=0.5, scope="galaxy"), ValueError, "scope"),
    ("learned-threshold-nan", lambda: Learned(threshold=NAN), ValueError, "threshold"),
    ("learned-threshold-and-ratio", lambda: Learned(threshold=0.0, compression_ratio=0.5), ValueError,
     "threshold.*compression_ratio"),
    ("learned-window-neg", lambda: Learned(threshold=0.0, window=-1), ValueError, "window"),
    ("learned-missing-file", lambda: Learned(predictor="/no/such/predictor.safetensors"), FileNotFoundError,
     "predictor file '/no/such/predictor.safetensors'"),
    ("adakv-floor", lambda: AdaKV(SnapKV(), compression_ratio=0.5, floor=2.0), ValueError, "floor"),
    ("adakv-scorer-name", lambda: get_policy("adakv", scorer="streaming_llm", compression_ratio=0.5), ValueError,
     "scorer"),
    ("pyramidkv-ratio", lambda: PyramidKV(SnapKV(), compression_ratio=1.5), ValueError, "compression_ratio"),
    ("decoding-budget-0", lambda: DecodingBudget(H2O(), budget=0), ValueError, "budget"),
    ("decoding-interval-0", lambda: DecodingBudget(H2O(), budget=64, interval=0), ValueError, "interval"),
    ("decoding-window-ge-budget", lambda: DecodingBudget(H2O(), budget=8, window=8), ValueError, "window"),
    ("decoding-policy", lambda: DecodingBudget(StreamingLLM(), budget=8), ValueError, "policy"),
    ("duo-sparsity", lambda: DuoAttention(pattern=torch.rand(2, 2), sparsity=1.5), ValueError, "sparsity"),
    ("duo-threshold", lambda: DuoAttention(pattern=torch.rand(2, 2), threshold=-0.5), ValueError, "threshold"),
    ("duo-n_sink", lambda: DuoAttention(pattern=torch.rand(2, 2), n_sink=-1), ValueError, "n_sink"),
    ("duo-window", lambda: DuoAttention(pattern=torch.rand(2, 2), window=0), ValueError, "window"),
    ("duo-pattern-int", lambda: DuoAttention(pattern=3), ValueError, "pattern"),
    ("duo-pattern-1d", lambda: DuoAttention(pattern=torch.rand(4)), ValueError, r"\[layers, kv_heads\]"),
    ("duo-pattern-nan", lambda: DuoAttention(pattern=torch.full((2, 2), NAN)), ValueError, "gates"),
    ("duo-retrieval-policy", lambda: DuoAttention(pattern=torch.rand(2, 2), retrieval_policy="snapkv"), ValueError,
     "retrieval_policy"),
    ("duo-retrieval-kvzip", lambda: DuoAttention(pattern=torch.rand(2, 2), retrieval_policy=KVzip()), ValueError,
     "retrieval_policy"),
    ("kvquant-bits-5", lambda: KVQuant(bits=5), ValueError, "bits"),
    ("kvquant-bits-str", lambda: KVQuant(bits="4"), ValueError, "bits"),
    ("kvquant-key_bits", lambda: KVQuant(key_bits=7), ValueError, "key_bits"),
    ("kvquant-value_bits", lambda: KVQuant(value_bits=1), ValueError, "value_bits"),
    ("kvquant-group_size-0", lambda: KVQuant(group_size=0), ValueError, "group_size"),
    ("kvquant-value_group_size", lambda: KVQuant(value_group_size=-4), ValueError, "value_group_size"),
    ("kvquant-residual-neg", lambda: KVQuant(residual=-1), ValueError, "residual"),
    ("kvquant-n_sink-neg", lambda: KVQuant(n_sink=-1), ValueError, "n_sink"),
    ("kvquant-rotate", lambda: KVQuant(rotate="both"), ValueError, "rotate"),
    ("kvquant-rank-gt-group", lambda: KVQuant(rank=64, group_size=32), ValueError, "rank"),
    ("kvquant-outlier_fraction", lambda: KVQuant(outlier_fraction=1.5), ValueError, "outlier_fraction"),
    ("kvquant-lowrank_block", lambda: KVQuant(rank=2, lowrank_block=48, group_size=32), ValueError, "lowrank_block"),
    ("kvquant-power_iters", lambda: KVQuant(power_iters=-1), ValueError, "power_iters"),
    ("kvquant-scale_dtype", lambda: KVQuant(scale_dtype=torch.int8), ValueError, "scale_dtype"),
    ("kvquant-fp_dtype", lambda: KVQuant(fp_dtype="half"), ValueError, "fp_dtype"),
    ("get_policy-none", lambda: get_policy(None), ValueError, "policy name"),
    ("get_policy-int", lambda: get_policy(3), ValueError, "policy name"),
    ("get_policy-unknown", lambda: get_policy("snapkvv"), ValueError, "unknown policy 'snapkvv'"),
    ("get_policy-bad-param", lambda: get_policy("snapkv", windw=3), ValueError, "windw"),
    ("get_policy-bad-ratio", lambda: get_policy("snapkv", compression_ratio=1.5), ValueError, "compression_ratio"),
    ("get_policy-none-param", lambda: get_policy("none", window=3), ValueError, "window"),
    ("pipeline-two-quantizers", lambda: KVQuant(bits=2) | KVQuant(bits=4), ValueError, "one storage spec"),
    ("pipeline-bad-stage", lambda: Pipeline(SnapKV(compression_ratio=0.5), "kvquant"), ValueError, "stages"),
    ("pipeline-ragged-quantized", lambda: AdaKV(SnapKV(), compression_ratio=0.5) | KVQuant(bits=4), ValueError,
     "AdaKV.*ragged"),
    ("predictor-kind", lambda: ScorePredictor(2, 64, 2, kind="conv"), ValueError, "kind"),
    ("train-sequences-0", lambda: TrainConfig(sequences=0), ValueError, "sequences"),
    ("train-held_out-gt", lambda: TrainConfig(sequences=4, held_out=5), ValueError, "held_out"),
    ("train-width-neg", lambda: TrainConfig(width=-3), ValueError, "width"),
    ("train-steps-0", lambda: TrainConfig(steps=0), ValueError, "steps"),
    ("train-batch-0", lambda: TrainConfig(batch=0), ValueError, "batch"),
    ("train-length", lambda: TrainConfig(length=8), ValueError, "length"),
    ("train-lr-nan", lambda: TrainConfig(lr=NAN), ValueError, "lr"),
    ("train-eps-0", lambda: TrainConfig(eps=0.0), ValueError, "eps"),
    ("train-ridge-neg", lambda: TrainConfig(ridge=-1.0), ValueError, "ridge"),
    ("train-kind", lambda: TrainConfig(kind="cnn"), ValueError, "kind"),
    ("train-text_file", lambda: TrainConfig(text_file="/no/such.txt"), FileNotFoundError, "text_file"),
    ("pattern-shape", lambda: DuoPattern(torch.rand(2, 2, 2)), ValueError, r"\[layers, kv_heads\]"),
    ("pattern-range", lambda: DuoPattern(torch.full((2, 2), 1.5)), ValueError, r"gates must be finite numbers in \[0, 1\]"),
    ("pattern-streaming-both", lambda: DuoPattern(torch.rand(2, 2)).streaming(sparsity=0.5, threshold=0.5), ValueError,
     "sparsity or threshold"),
    ("load_model-none", lambda: kvpress.load_model(None), ValueError, "model"),
    ("load_model-empty", lambda: kvpress.load_model(""), ValueError, "model"),
    ("load_model-abs-missing", lambda: kvpress.load_model("/no/such/model"), FileNotFoundError, "'/no/such/model'"),
    ("load_model-rel-missing", lambda: kvpress.load_model("./no-such-model"), FileNotFoundError, "'./no-such-model'"),
    ("load_model-deep-missing", lambda: kvpress.load_model("a/b/c"), FileNotFoundError, "'a/b/c'"),
    ("load_model-typo-offline", lambda: kvpress.load_model("smollm2-13m"), OSError,
     "model 'smollm2-13m' is not an embedded model"),
    ("load_model-hub-id-offline", lambda: kvpress.load_model("no-such-org/no-such-model"), OSError,
     "model 'no-such-org/no-such-model' is not an embedded model"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(call, exc, pattern):
    raises(call, exc, pattern)


def test_load_model_directory_without_config(tmp_path):
    raises(lambda: kvpress.load_model(str(tmp_path)), FileNotFoundError, "config.json")


def test_load_model_path_under_existing_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    raises(lambda: kvpress.load_model("runs/model"), FileNotFoundError, "'runs/model'")


PATCH_CASES = [
    ("not-a-model", lambda m: kvpress.patch(torch.nn.Linear(2, 2), SnapKV(compression_ratio=0.5)), ValueError,
     "PreTrainedModel"),
    ("policy-string", lambda m: kvpress.patch(m, "snapkv"), ValueError, "polic"),
    ("policy-int", lambda m: kvpress.patch(m, 3), ValueError, "polic"),
]


@pytest.mark.parametrize("make,exc,pattern", [c[1:] for c in PATCH_CASES], ids=[c[0] for c in PATCH_CASES])
def test_patch_bad_input(model, make, exc, pattern):
    def enter():
        with make(model):
            pass

    raises(enter, exc, pattern)


@pytest.mark.parametrize("policy", [None, SnapKV(compression_ratio=0.5), StreamingLLM(window=4)],
                         ids=["full", "snapkv", "streaming"])
@pytest.mark.parametrize("how", ["forward", "generate", "embeds"])
def test_empty_prompt_is_refused_and_the_model_restored(model, policy, how):
    ids = torch.empty(1, 0, dtype=torch.long)
    impl = model.config._attn_implementation

    def run():
        with kvpress.patch(model, policy):
            if how == "forward":
                model(input_ids=ids)
            elif how == "generate":
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
            else:
                model(inputs_embeds=torch.zeros(1, 0, HIDDEN))

    raises(run, ValueError, "input_ids holds 0 tokens" if how != "embeds" else "inputs_embeds holds 0 tokens")
    assert model.config._attn_implementation == impl
    with kvpress.patch(model, policy):  # and the model still works under kvpress afterwards
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_nested_patch_is_refused(model):
    with kvpress.patch(model, None):
        raises(lambda: kvpress.patch(model, None).__enter__(), RuntimeError, "already under kvpress.patch")


# ------------------------------------------------------------------------------ quantizer under a bounded policy
@pytest.mark.parametrize("make,warns", [
    (lambda: StreamingLLM(window=64) | KVQuant(bits=4), True),  # 68 held <= 4 + 128 + 31: nothing quantized
    (lambda: KVQuant(bits=4) | StreamingLLM(window=64), True),
    (lambda: DecodingBudget(H2O(), budget=100) | KVQuant(bits=2), True),
    (lambda: H2O(budget=128) | KVQuant(bits=4), True),
    (lambda: TOVA(budget=64) | KVQuant(bits=4, residual=64), True),
    (lambda: TOVA(budget=512) | KVQuant(bits=4), False),
    (lambda: H2O(compression_ratio=0.5) | KVQuant(bits=4), False),
    (lambda: StreamingLLM(window=1024) | KVQuant(bits=4), False),
    (lambda: StreamingLLM(window=64) | KVQuant(bits=4, residual=32), False),  # the largest residual that acts
    (lambda: StreamingLLM(window=64) | KVQuant(bits=4, residual=33), True),
    (lambda: SnapKV(compression_ratio=0.5) | KVQuant(bits=4), False),  # a ratio is not a bound
])
def test_quantizer_that_cannot_act_warns(make, warns):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert bool(messages) == warns, messages
    if warns:
        assert "nothing would ever be quantized" in messages[0] and "residual" in messages[0]


def test_the_warning_is_true_streaming_llm_over_kvquant_holds_full_precision_bytes(model):
    """The warned composition holds exactly the bytes of StreamingLLM alone; the suggested residual saves."""
    import warnings

    ids = torch.randint(3, 100, (1, 200), generator=torch.Generator().manual_seed(0))

    def held(policy):
        with kvpress.patch(model, policy) as session:
            cache = session.new_cache()
            model(input_ids=ids, **kvpress.cache_kwargs(model, cache))
            for step in range(40):
                model(input_ids=ids[:, step:step + 1], **kvpress.cache_kwargs(model, cache))
            return cache

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = held(StreamingLLM(n_sink=4, window=64)).nbytes()
        warned = held(StreamingLLM(n_sink=4, window=64) | KVQuant(bits=4, group_size=16))
        sized = held(StreamingLLM(n_sink=4, window=64) | KVQuant(bits=4, group_size=16, residual=16))
    # nothing quantized: every token held in full precision (plus the evicted tokens a quantized layer masks
    # before dropping them together, at most 2 of 68 slots here)
    assert all(layer.storage.body is None for layer in warned.layers)
    assert alone <= warned.nbytes() <= alone * (1 + 2 / 66) + 68 * 3
    assert all(layer.storage.body is not None for layer in sized.layers)
    assert sized.nbytes() < 0.8 * alone


# ---------------------------------------------------------------------------------------------- files
def _predictor(kind: str = "linear", seed: int = 0, layers: int = LAYERS) -> ScorePredictor:
    p = ScorePredictor(layers, HIDDEN, KV_HEADS, kind=kind, width=8,
                       metadata={"model": "tiny", "model_signature": model_signature(tiny_model("llama").config)})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in p.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return p


def _tensors(kind: str = "linear") -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in _predictor(kind).named_parameters()}


def _meta(kind: str = "linear", **extra: str) -> dict[str, str]:
    return {"kind": kind, "num_layers": str(LAYERS), "hidden_size": str(HIDDEN), "kv_heads": str(KV_HEADS), **extra}


def _with(tensors: dict[str, torch.Tensor], name: str, index: tuple, value: float) -> dict[str, torch.Tensor]:
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors[name][index] = value
    return tensors


def _bad_predictors(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, pattern its error must match)."""
    good = root / "good-predictor.safetensors"
    _predictor("mlp").save(good)
    raw = good.read_bytes()
    out: dict[str, tuple[Path, str]] = {}

    def write(name: str, tensors=None, meta=None, data: bytes | None = None, pattern: str = "") -> None:
        path = root / f"predictor-{name}.safetensors"
        if data is not None:
            path.write_bytes(data)
        else:
            save_file(tensors, str(path), metadata=meta)
        out[name] = (path, pattern or "")

    not_one = "is not a kvpress score predictor"
    write("truncated", data=raw[: len(raw) // 2], pattern=not_one)
    write("truncated-header", data=raw[:20], pattern=not_one)
    write("empty", data=b"", pattern=not_one)
    write("text", data=b"kind = 'linear'\n", pattern=not_one)
    write("corrupted-header", data=raw[:8] + b"\x00\xff" * 20 + raw[48:], pattern=not_one)
    write("nan", _with(_tensors(), "w", (0, 0, 0), NAN), _meta(), pattern=r"tensor 'w' holds 1 non-finite")
    write("nan16", {"w": torch.full((LAYERS, HIDDEN, KV_HEADS), NAN).index_fill(1, torch.arange(8, HIDDEN), 0.0)
                    .clone(), "b": torch.zeros(LAYERS, KV_HEADS)}, _meta(), pattern="non-finite")
    write("inf", _with(_tensors(), "b", (1, 1), float("inf")), _meta(), pattern=r"tensor 'b' holds 1 non-finite")
    write("huge", _with(_tensors(), "w", (1, 3, 1), 1e30), _meta(), pattern=r"tensor 'w'.*magnitude 1e\+30")
    write("mlp-meta-linear-weights", _tensors("linear"), _meta("mlp"), pattern=r"kind='mlp'.*w1.*the file holds")
    write("linear-meta-mlp-weights", _tensors("mlp"), _meta("linear"), pattern=r"kind='linear'.*the file holds")
    write("unknown-kind", _tensors(), _meta("conv"), pattern="kind must be one of")
    write("no-kind", _tensors(), {k: v for k, v in _meta().items() if k != "kind"}, pattern=f"{not_one}.*kind")
    write("no-metadata", _tensors(), None, pattern=not_one)
    write("layers-not-int", _tensors(), _meta(num_layers="two"), pattern=not_one)
    write("layers-zero", _tensors(), _meta(num_layers="0"), pattern="num_layers")
    write("wrong-shape", {"w": torch.zeros(3, HIDDEN, KV_HEADS), "b": torch.zeros(3, KV_HEADS)}, _meta(),
          pattern="has tensors.*expected")
    write("transposed", {"w": torch.zeros(LAYERS, KV_HEADS, HIDDEN), "b": torch.zeros(LAYERS, KV_HEADS)}, _meta(),
          pattern="has tensors.*expected")
    write("int-weights", {"w": torch.zeros(LAYERS, HIDDEN, KV_HEADS, dtype=torch.int32),
                          "b": torch.zeros(LAYERS, KV_HEADS, dtype=torch.int32)}, _meta(), pattern="floating point")
    write("a-duo-pattern", {"gates": torch.rand(LAYERS, KV_HEADS)},
          {"format": FORMAT, "num_layers": str(LAYERS), "kv_heads": str(KV_HEADS)}, pattern=not_one)
    return out


PREDICTOR_FILES = ["truncated", "truncated-header", "empty", "text", "corrupted-header", "nan", "nan16", "inf", "huge",
                   "mlp-meta-linear-weights", "linear-meta-mlp-weights", "unknown-kind", "no-kind", "no-metadata",
                   "layers-not-int", "layers-zero", "wrong-shape", "transposed", "int-weights", "a-duo-pattern"]


@pytest.fixture(scope="module")
def bad_predictors(tmp_path_factory):
    return _bad_predictors(tmp_path_factory.mktemp("predictors"))


@pytest.mark.parametrize("name", PREDICTOR_FILES)
@pytest.mark.parametrize("entry", ["load_predictor", "Learned", "get_policy"])
def test_bad_predictor_file(bad_predictors, name, entry):
    path, pattern = bad_predictors[name]
    call = {"load_predictor": lambda: load_predictor(path),
            "Learned": lambda: Learned(predictor=path, compression_ratio=0.5),
            "get_policy": lambda: get_policy("learned", predictor=str(path), threshold=0.0)}[entry]
    message = raises(call, ValueError, pattern)
    assert path.name in message  # names the file


@pytest.mark.parametrize("name", PREDICTOR_FILES)
def test_bad_predictor_file_cli(bad_predictors, name, capsys):
    path, pattern = bad_predictors[name]
    assert_cli_error(["scorer", "info", str(path)], pattern, capsys)


def test_predictor_for_another_model_is_refused_at_patch(model, tmp_path):
    path = _predictor(layers=5).save(tmp_path / "five.safetensors")  # other layer count, signature of the tiny model
    raises(lambda: kvpress.patch(model, Learned(predictor=path, compression_ratio=0.5)).__enter__(), ValueError,
           r"five.safetensors was trained for tiny \(layers, hidden size, KV heads = \(5, 64, 2\)\)")
    other = _predictor()
    other.metadata["model_signature"] = "0123456789abcdef"
    path = other.save(tmp_path / "other.safetensors")
    raises(lambda: kvpress.patch(model, Learned(predictor=path, compression_ratio=0.5)).__enter__(), ValueError,
           "other.safetensors was trained for tiny.*signature 0123456789abcdef")
    assert model.config._attn_implementation == "sdpa"  # the refused patch left nothing behind


def test_good_predictor_files_still_load(bad_predictors, tmp_path):
    good = load_predictor(bad_predictors["nan"][0].parent / "good-predictor.safetensors")
    assert good.kind == "mlp" and all(bool(torch.isfinite(p).all()) for p in good.parameters())
    linear = _predictor("linear").save(tmp_path / "linear.safetensors")
    assert load_predictor(linear).kind == "linear"


def _bad_patterns(root: Path) -> dict[str, tuple[Path, str]]:
    good = root / "good-pattern.safetensors"
    DuoPattern(torch.rand(LAYERS, KV_HEADS, generator=torch.Generator().manual_seed(0)), {"model": "tiny"}).save(good)
    raw = good.read_bytes()
    meta = {"format": FORMAT, "num_layers": str(LAYERS), "kv_heads": str(KV_HEADS)}
    out: dict[str, tuple[Path, str]] = {}
    not_one = "is not a kvpress DuoAttention pattern"

    def write(name: str, tensors=None, metadata=None, data: bytes | None = None, pattern: str = "") -> None:
        path = root / f"pattern-{name}.safetensors"
        if data is not None:
            path.write_bytes(data)
        else:
            save_file(tensors, str(path), metadata=metadata)
        out[name] = (path, pattern)

    write("truncated", data=raw[: len(raw) // 2], pattern=not_one)
    write("empty", data=b"", pattern=not_one)
    write("text", data=b"gates = [0.5]\n", pattern=not_one)
    write("corrupted-header", data=raw[:8] + b"\x00\xff" * 20 + raw[48:], pattern=not_one)
    write("nan", {"gates": torch.full((LAYERS, KV_HEADS), NAN)}, meta, pattern=r"gates must be finite")
    write("inf", {"gates": torch.full((LAYERS, KV_HEADS), float("inf"))}, meta, pattern=r"gates must be finite")
    write("above-1", {"gates": torch.full((LAYERS, KV_HEADS), 1.5)}, meta, pattern=r"in \[0, 1\]")
    write("negative", {"gates": torch.full((LAYERS, KV_HEADS), -0.5)}, meta, pattern=r"in \[0, 1\]")
    write("wrong-format", {"gates": torch.rand(LAYERS, KV_HEADS)}, {**meta, "format": "duo/0"},
          pattern=f"{not_one}.*format 'duo/0'")
    write("no-metadata", {"gates": torch.rand(LAYERS, KV_HEADS)}, None, pattern=not_one)
    write("no-gates", {"alpha": torch.rand(LAYERS, KV_HEADS)}, meta, pattern=f"{not_one}.*alpha")
    write("shape-vs-metadata", {"gates": torch.rand(3, KV_HEADS)}, meta, pattern=r"gates of shape \(3, 2\)")
    write("one-dimensional", {"gates": torch.rand(LAYERS * KV_HEADS)}, meta, pattern=r"gates of shape \(4,\)")
    write("a-predictor", _tensors(), _meta(), pattern=f"{not_one}.*format None")
    return out


PATTERN_FILES = ["truncated", "empty", "text", "corrupted-header", "nan", "inf", "above-1", "negative", "wrong-format",
                 "no-metadata", "no-gates", "shape-vs-metadata", "one-dimensional", "a-predictor"]


@pytest.fixture(scope="module")
def bad_patterns(tmp_path_factory):
    return _bad_patterns(tmp_path_factory.mktemp("patterns"))


@pytest.mark.parametrize("name", PATTERN_FILES)
@pytest.mark.parametrize("entry", ["load_pattern", "DuoAttention"])
def test_bad_pattern_file(bad_patterns, name, entry):
    path, pattern = bad_patterns[name]
    call = {"load_pattern": lambda: load_pattern(path), "DuoAttention": lambda: DuoAttention(pattern=path)}[entry]
    raises(call, ValueError, pattern)


@pytest.mark.parametrize("name", PATTERN_FILES)
def test_bad_pattern_file_cli(bad_patterns, name, capsys):
    path, pattern = bad_patterns[name]
    assert_cli_error(["duo", "info", str(path)], pattern, capsys)


def test_pattern_for_another_model_is_refused_at_patch(model, tmp_path):
    path = DuoPattern(torch.rand(5, KV_HEADS), {"model": "five"}).save(tmp_path / "five.safetensors")
    raises(lambda: kvpress.patch(model, DuoAttention(pattern=path)).__enter__(), ValueError,
           r"five.safetensors was identified on five \(layers, KV heads = \(5, 2\)\)")
    path = DuoPattern(torch.rand(LAYERS, KV_HEADS), {"model": "x", "model_signature": "0123456789abcdef"}).save(
        tmp_path / "sig.safetensors")
    raises(lambda: kvpress.patch(model, DuoAttention(pattern=path)).__enter__(), ValueError,
           "sig.safetensors was identified on x.*signature 0123456789abcdef")


# ------------------------------------------------------------------------------------------- spec files
SPEC_FILES: list[tuple[str, bytes, str]] = [
    # (id, file content, pattern)
    ("not-utf8", b'name = "\xff\xfe"\ntasks = ["vt"]\npolicies = ["snapkv"]\n', "not UTF-8 text"),
    ("latin1", 'name = "caf\u00e9"\n'.encode("latin-1"), "not UTF-8 text"),
    ("not-toml", b"tasks = [vt\n", "not valid TOML"),
    ("empty", b"", "missing key 'tasks'"),
    ("no-policies", b'tasks = ["vt"]\n', "missing key 'policies'"),
    ("unknown-key", b'tasks = ["vt"]\npolicies = ["snapkv"]\nratio = [0.5]\n', "unknown key 'ratio'"),
    ("unknown-task", b'tasks = ["nope"]\npolicies = ["snapkv"]\n', r"tasks\[0\]: unknown task 'nope'"),
    ("unknown-policy", b'tasks = ["vt"]\npolicies = ["snapkvv"]\n', r"policies\[0\].*unknown policy 'snapkvv'"),
    ("policy-param", b'tasks = ["vt"]\npolicies = ["snapkv(windw=8)"]\n', r"policies\[0\].*windw"),
    ("policy-code", b'tasks = ["vt"]\npolicies = ["__import__(\'os\').system(\'true\')"]\n', r"policies\[0\]"),
    ("ratio-1.5", b'tasks = ["vt"]\npolicies = ["snapkv"]\nratios = [1.5]\n', r"ratios\[0\]"),
    ("ratio-nan", b'tasks = ["vt"]\npolicies = ["snapkv"]\nratios = [nan]\n', r"ratios\[0\]"),
    ("ratio-str", b'tasks = ["vt"]\npolicies = ["snapkv"]\nratios = ["half"]\n', r"ratios\[0\]"),
    ("lengths-0", b'tasks = ["vt"]\npolicies = ["snapkv"]\nlengths = [0]\n', r"lengths\[0\]"),
    ("lengths-float", b'tasks = ["vt"]\npolicies = ["snapkv"]\nlengths = [512.5]\n', r"lengths\[0\]"),
    ("samples-0", b'tasks = ["vt"]\npolicies = ["snapkv"]\nsamples = 0\n', "samples"),
    ("depths-2", b'tasks = ["vt"]\npolicies = ["snapkv"]\ndepths = [2]\n', r"depths\[0\]"),
    ("seeds-dup", b'tasks = ["vt"]\npolicies = ["snapkv"]\nseeds = [0, 0]\n', r"seeds\[1\]"),
    ("modes", b'tasks = ["vt"]\npolicies = ["snapkv"]\nmodes = ["aware"]\n', r"modes\[0\]"),
    ("tasks-empty", b'tasks = []\npolicies = ["snapkv"]\n', "tasks: the axis is empty"),
    ("task-param", b'tasks = ["perplexity"]\npolicies = ["snapkv"]\n[task.perplexity]\nchunk = 3\n',
     "task.perplexity.chunk"),
    ("kvquant-bits", b'tasks = ["vt"]\npolicies = ["kvquant(bits=5)"]\n', r"policies\[0\].*bits"),
]


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("specs")
    for name, data, _ in SPEC_FILES:
        (root / f"{name}.toml").write_bytes(data)
    return root


@pytest.mark.parametrize("name,pattern", [(c[0], c[2]) for c in SPEC_FILES], ids=[c[0] for c in SPEC_FILES])
def test_bad_spec_file(spec_dir, name, pattern):
    raises(lambda: load_spec(spec_dir / f"{name}.toml"), SpecError, pattern)


@pytest.mark.parametrize("name,pattern", [(c[0], c[2]) for c in SPEC_FILES], ids=[c[0] for c in SPEC_FILES])
@pytest.mark.parametrize("action", ["plan", "run"])
def test_bad_spec_file_cli(spec_dir, tmp_path, name, pattern, action, capsys):
    extra = ["--out", str(tmp_path / "out")] if action == "run" else []
    assert_cli_error(["sweep", action, str(spec_dir / f"{name}.toml"), *extra], pattern, capsys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_and_directory_spec(tmp_path, capsys):
    raises(lambda: load_spec(tmp_path / "nope.toml"), SpecError, "spec file .*nope.toml.* does not exist")
    raises(lambda: load_spec(tmp_path), SpecError, "does not exist")
    assert_cli_error(["sweep", "plan", str(tmp_path / "nope.toml")], "nope.toml", capsys)


# ----------------------------------------------------------------------------------------------------- CLI
MISSING_MODEL = "/no/such/model-dir"
CLI_CASES: list[tuple[str, list[str], str]] = [
    # (id, argv, pattern of the error line)
    ("eval-samples-0", ["eval", "vt", "--samples", "0"], "--samples"),
    ("eval-samples-neg", ["eval", "vt", "--samples", "-2"], "--samples"),
    ("eval-samples-text", ["eval", "vt", "--samples", "five"], "--samples"),
    ("eval-lengths-0", ["eval", "vt", "--lengths", "0"], "--lengths"),
    ("eval-depth-2", ["eval", "niah-grid", "--depths", "2"], "--depths"),
    ("eval-depth-nan", ["eval", "niah-grid", "--depths", "nan"], "--depths"),
    ("eval-ratio-text", ["eval", "vt", "--compression-ratio", "half"], "--compression-ratio"),
    ("eval-param-no-eq", ["eval", "vt", "--param", "window"], "--param"),
    ("eval-mode", ["eval", "vt", "--mode", "aware"], "--mode"),
    ("eval-no-task", ["eval"], "give a task"),
    ("eval-unknown-task", ["eval", "nope", "--model", MISSING_MODEL], "unknown task 'nope'"),
    ("eval-unknown-policy", ["eval", "vt", "--policy", "snapkvv", "--model", MISSING_MODEL], "unknown policy 'snapkvv'"),
    ("eval-bad-param", ["eval", "vt", "--policy", "snapkv", "--param", "window=-1", "--model", MISSING_MODEL],
     "window"),
    ("eval-missing-model", ["eval", "vt", "--model", MISSING_MODEL, "--no-progress"], f"model '{MISSING_MODEL}'"),
    ("eval-relative-model", ["eval", "vt", "--model", "./no-such-dir", "--no-progress"], "model './no-such-dir'"),
    ("eval-haystack-file", ["eval", "niah-grid", "--haystack", "prose", "--haystack-file", "/no/such.txt",
                            "--model", MISSING_MODEL], "/no/such.txt"),
    ("perplexity-missing-model", ["perplexity", "--model", MISSING_MODEL], f"model '{MISSING_MODEL}'"),
    ("perplexity-chunk-0", ["perplexity", "--mode", "chunked", "--chunk-size", "0"], "--chunk-size"),
    ("perplexity-max-tokens-1", ["perplexity", "--max-tokens", "1"], "--max-tokens"),
    ("perplexity-max-tokens-neg", ["perplexity", "--max-tokens", "-5"], "--max-tokens"),
    ("perplexity-text-missing", ["perplexity", "--text", "/no/such.txt"], "--text '/no/such.txt'"),
    ("perplexity-policy", ["perplexity", "--policy", "snapkvv"], "unknown policy 'snapkvv'"),
    ("perplexity-window", ["perplexity", "--window", "0"], "window"),
    ("perplexity-ratio", ["perplexity", "--policy", "snapkv", "--compression-ratio", "1.5"], "compression_ratio"),
    ("perplexity-segment", ["perplexity", "--segment-tokens", "0"], "--segment-tokens"),
    ("perplexity-mode", ["perplexity", "--mode", "fast"], "--mode"),
    ("scorer-sequences-0", ["scorer", "train", "--out", "x.safetensors", "--sequences", "0"], "sequences"),
    ("scorer-held-out", ["scorer", "train", "--out", "x.safetensors", "--sequences", "4", "--held-out", "9"],
     "held_out"),
    ("scorer-width", ["scorer", "train", "--out", "x.safetensors", "--width", "-3"], "width"),
    ("scorer-steps", ["scorer", "train", "--out", "x.safetensors", "--steps", "0"], "steps"),
    ("scorer-lr", ["scorer", "train", "--out", "x.safetensors", "--lr", "nan"], "lr"),
    ("scorer-ridge", ["scorer", "train", "--out", "x.safetensors", "--ridge", "-1"], "ridge"),
    ("scorer-kind", ["scorer", "train", "--out", "x.safetensors", "--kind", "cnn"], "--kind"),
    ("scorer-no-out", ["scorer", "train"], "--out"),
    ("scorer-text-file", ["scorer", "train", "--out", "x.safetensors", "--text-file", "/no/such.txt"], "text_file"),
    ("scorer-missing-model", ["scorer", "train", "--out", "x.safetensors", "--model", MISSING_MODEL],
     f"model '{MISSING_MODEL}'"),
    ("scorer-info-missing", ["scorer", "info", "/no/such.safetensors"], "predictor file '/no/such.safetensors'"),
    ("duo-steps", ["duo", "identify", "--out", "x.safetensors", "--steps", "0"], "steps"),
    ("duo-method", ["duo", "identify", "--out", "x.safetensors", "--method", "guess"], "--method"),
    ("duo-loss", ["duo", "identify", "--out", "x.safetensors", "--loss", "l1"], "--loss"),
    ("duo-missing-model", ["duo", "identify", "--out", "x.safetensors", "--model", MISSING_MODEL],
     f"model '{MISSING_MODEL}'"),
    ("duo-model-typo", ["duo", "identify", "--out", "x.safetensors", "--model", "smollm2-13m"],
     "model 'smollm2-13m' is not an embedded model"),
    ("duo-info-missing", ["duo", "info", "/no/such.safetensors"], "pattern file '/no/such.safetensors'"),
    ("sweep-no-spec", ["sweep", "plan"], "give a spec file"),
    ("sweep-ratio-nan", ["sweep", "plan", "--tasks", "vt", "--policies", "snapkv", "--ratios", "nan"], r"ratios\[0\]"),
    ("sweep-lengths-0", ["sweep", "plan", "--tasks", "vt", "--policies", "snapkv", "--lengths", "0"], r"lengths\[0\]"),
    ("sweep-samples-0", ["sweep", "plan", "--tasks", "vt", "--policies", "snapkv", "--samples", "0"], "samples"),
    ("sweep-task-param", ["sweep", "plan", "--tasks", "vt", "--policies", "snapkv", "--task-param", "chunk=3"],
     "--task-param"),
    ("sweep-policy", ["sweep", "plan", "--tasks", "vt", "--policies", "snapkv(bogus=1)"], "bogus"),
    ("sweep-backend", ["sweep", "run", "--tasks", "vt", "--policies", "snapkv", "--out", "o", "--backend", "slurm"],
     "--backend"),
    ("sweep-report-missing", ["sweep", "report", "/no/such/dir"], "/no/such/dir"),
    ("demo-length", ["demo", "--length", "0"], "--length"),
    ("demo-depth", ["demo", "--depth", "1.5"], "--depth"),
]


@pytest.mark.parametrize("argv,pattern", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(argv, pattern, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs (x.safetensors, o/) land here, and must not be written
    assert_cli_error(argv, pattern, capsys)
    assert not (tmp_path / "x.safetensors").exists()


def test_unknown_command(capsys):
    code, err = run_cli(["nope"], capsys)
    assert code == 2 and err.startswith("kvpress: error: argument COMMAND: invalid choice: 'nope'")
    assert err.count("\n") == 1


@pytest.mark.parametrize("how", ["flag", "flag-first", "env"])
def test_debug_shows_the_traceback(how, capsys, monkeypatch):
    argv = ["scorer", "info", "/no/such.safetensors"]
    if how == "flag":
        argv.append("--debug")
    elif how == "flag-first":
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv("KVPRESS_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="predictor file '/no/such.safetensors'"):
        kvpress_main(argv)


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys):
    """A bug (not a user error) is still one line, marked as unexpected, with the way to its traceback."""
    import kvpress.scorer.predictor as predictor

    def broken(path):
        raise RuntimeError("boom")

    monkeypatch.setattr(predictor, "load_predictor", broken)
    code, err = run_cli(["scorer", "info", "x"], capsys)
    assert code == 2
    assert err.strip() == "kvpress scorer: error: RuntimeError: boom (unexpected; rerun with --debug for the traceback)"


def test_every_command_errors_the_same_way(capsys):
    """One error path for every command (kvpress.cli.main), not one per command."""
    for argv, command in ([["eval", "nope", "--model", MISSING_MODEL], "eval"],
                          [["perplexity", "--model", MISSING_MODEL], "perplexity"],
                          [["scorer", "info", "/nope"], "scorer"], [["duo", "info", "/nope"], "duo"],
                          [["sweep", "plan", "/nope.toml"], "sweep"], [["demo", "--length", "1"], "demo"]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"kvpress {command}: error: "), (argv, err)


def test_eval_samples_zero_runs_nothing(tmp_path, capsys):
    """`--samples 0` used to run 5 samples and exit 0: now argparse refuses it before anything runs."""
    code, err = run_cli(["eval", "vt", "--samples", "0", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "argument --samples: must be an integer >= 1, got 0" in err
    assert not (tmp_path / "run").exists()
