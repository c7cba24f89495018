"""Kernel dispatch (KVPRESS_KERNELS, fallbacks and their one warning, forced-path errors) and the lazy attention
view: decode steps of a patched model never build the dequantized / padded layer, while a policy that reads keys
still gets them; the decode path gives the logits of the materialised path, through torch and through Triton."""

import warnings

import pytest
import torch
from kernels_reference import triton_missing
from tiny_models import left_padded_batch, tiny_model

import kvpress
import kvpress.attention
from kvpress import kernels
from kvpress.compat import cache_kwargs, output_cache
from kvpress.kernels import dispatch
from kvpress.policies import Policy
from kvpress.quant import KVQuant
from kvpress.storage import LazyAttentionView

needs_triton = pytest.mark.skipif(triton_missing() is not None, reason=str(triton_missing()))
CUDA = torch.device("cuda")  # only its type is read: no GPU needed
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def test_bad_backend_names_raise(monkeypatch):
    monkeypatch.setenv("KVPRESS_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"KVPRESS_KERNELS must be one of \('auto', 'torch', 'triton', 'cpp'\)"):
        dispatch.requested_backend()
    with pytest.raises(ValueError, match="force_backend"):
        with kernels.force_backend("fast"):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.requested_backend("gpu")


def test_precedence_argument_context_environment(monkeypatch):
    monkeypatch.setenv("KVPRESS_KERNELS", "triton")
    assert dispatch.requested_backend() == "triton"
    with kernels.force_backend("torch"):
        assert dispatch.requested_backend() == "torch"
        assert dispatch.requested_backend("auto") == "auto"
    monkeypatch.setenv("KVPRESS_KERNELS", "")
    assert dispatch.requested_backend() == "auto"


def test_cpu_auto_is_cpp_without_warning_and_torch_where_no_cpp_kernel_exists():
    case = dict(rows=3, head_dim=64, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.choose_backend("x", cpp=case, device=CPU, dtype=torch.float32, head_dim=64) == "cpp"
        assert dispatch.choose_backend("x", device=CPU, dtype=torch.float32, head_dim=64) == "torch"
        # forcing C++ leaves an operation that has no C++ kernel (quantize-and-pack) on torch
        assert dispatch.choose_backend("x", "cpp", device=CPU, dtype=torch.float32, head_dim=64) == "torch"


def test_cpp_unsupported_cases_fall_back_with_one_warning_or_raise_when_forced():
    gear = dict(rows=3, head_dim=64, dtype=torch.float32, bits=(2, 2), gear=True)
    with pytest.warns(RuntimeWarning, match="GEAR") as record:
        assert dispatch.choose_backend("x", cpp=gear, device=CPU, dtype=torch.float32, head_dim=64) == "torch"
        assert dispatch.choose_backend("x", cpp=gear, device=CPU, dtype=torch.float32, head_dim=64) == "torch"
    assert len(record) == 1
    for case, what in ((gear, "GEAR"), (dict(rows=65, head_dim=64, dtype=torch.float32), "65 query rows"),
                       (dict(rows=1, head_dim=512, dtype=torch.float32), "head_dim=512"),
                       (dict(rows=1, head_dim=64, dtype=torch.float32, bits=(5,)), "bits=5")):  # fmt: skip
        with pytest.raises(ValueError, match=f"C\\+\\+ x kernel was forced.*{what}"):
            dispatch.choose_backend("x", "cpp", cpp=case, device=CPU, dtype=torch.float32, head_dim=64)


def test_cpp_build_failure_falls_back_with_one_warning(monkeypatch):
    from kvpress.kernels import cpu_decode

    monkeypatch.setattr(cpu_decode, "load_error", lambda: "no compiler here")
    case = dict(rows=3, head_dim=64, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert dispatch.choose_backend("x", cpp=case, device=CPU, dtype=torch.float32, head_dim=64) == "torch"


def test_unsupported_case_on_cuda_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)  # as if Triton were installed
    case = dict(device=CUDA, dtype=torch.float16, head_dim=80, bits=(2, 2))
    with pytest.warns(RuntimeWarning, match="head_dim=80 is not supported"):
        assert dispatch.choose_backend("quantized decode attention", **case) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns once
        assert dispatch.choose_backend("quantized decode attention", **case) == "torch"
    with pytest.warns(RuntimeWarning, match="bits=5"):
        dispatch.choose_backend("x", device=CUDA, dtype=torch.float16, head_dim=64, bits=(5,))
    with pytest.warns(RuntimeWarning, match="dtype torch.float64"):
        dispatch.choose_backend("x", device=CUDA, dtype=torch.float64, head_dim=64)


def test_missing_triton_falls_back_or_raises_when_forced(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "triton is not importable (test)")
    with pytest.warns(RuntimeWarning, match="not importable"):
        assert dispatch.choose_backend("x", device=CUDA, dtype=torch.float16, head_dim=64) == "torch"
    with pytest.raises(ValueError, match=r"forced .* not importable"):
        dispatch.choose_backend("x", backend="triton", device=CUDA, dtype=torch.float16, head_dim=64)


@needs_triton
def test_forced_triton_raises_on_unsupported_cases(monkeypatch):
    with pytest.raises(ValueError, match="head_dim=96"):
        dispatch.choose_backend("x", backend="triton", device=CPU, dtype=torch.float32, head_dim=96)
    with pytest.raises(ValueError, match="value group of 24"):
        dispatch.choose_backend("x", backend="triton", device=CPU, dtype=torch.float32, head_dim=96 // 2 * 2 + 32,
                                value_group=24)  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA"):
        dispatch.choose_backend("x", backend="triton", device=CPU, dtype=torch.float32, head_dim=64)


def test_forced_triton_on_an_unsupported_layer_raises_clearly(monkeypatch):
    st = KVQuant(bits=2, group_size=16, residual=4).create_storage(0)
    st.append(torch.randn(1, 2, 40, 80), torch.randn(1, 2, 40, 80), 0)  # head_dim 80
    st.view()
    st.append(torch.randn(1, 2, 1, 80), torch.randn(1, 2, 1, 80), 40)
    assert st.n_body_slots > 0
    q = torch.randn(1, 2, 1, 80)
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)  # as if Triton were installed
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KVPRESS_KERNELS", "triton")
    with pytest.raises(ValueError, match="KVPRESS_KERNELS=triton.*head_dim=80"):
        st.view().decode(q, None, 0.1)
    monkeypatch.setenv("KVPRESS_KERNELS", "torch")
    assert torch.isfinite(st.view().decode(q, None, 0.1)).all()


class _CountMaterialisations:
    def __init__(self, monkeypatch):
        self.n = 0
        built = LazyAttentionView._built

        def spy(view):
            if view._kv is None:
                self.n += 1
            return built(view)

        monkeypatch.setattr(LazyAttentionView, "_built", spy)


class ReadKeys(Policy):
    """Keeps everything, but reads ctx.keys at every step (a key-reading policy)."""

    def __init__(self):
        self.seen = []

    def select(self, ctx):
        self.seen.append(ctx.keys.shape)
        return None


def test_decode_never_materialises_without_a_policy_but_a_policy_reads_keys(monkeypatch):
    counter = _CountMaterialisations(monkeypatch)
    model = tiny_model("llama")
    ids, mask = left_padded_batch([30, 22], seed=2)
    spec = KVQuant(bits=2, group_size=8, residual=4, n_sink=2)
    with torch.no_grad(), kvpress.patch(model, spec):
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    layers = model.config.num_hidden_layers
    assert counter.n == 0  # the prefill reads its exact tokens as a plain view; no decode step builds one
    counter.n = 0
    policy = ReadKeys()
    with torch.no_grad(), kvpress.patch(model, policy | spec):
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    # built on demand, once per layer and decode step (the prefill's view is plain)
    assert counter.n == layers * 4 and len(policy.seen) == layers * 5
    assert all(shape[:2] == (2, model.config.num_key_value_heads) for shape in policy.seen)


def test_update_hands_the_model_zero_stride_stand_ins():
    cache = kvpress.KVPressCache(tiny_model("llama").config, KVQuant(bits=4, group_size=8).create_storage)
    k, v = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    keys, values = cache.update(k[:, :, :11], v[:, :, :11], 0)
    assert torch.equal(keys, k[:, :, :11])  # a prefill: its exact tokens as they are
    keys, values = cache.update(k[:, :, 11:], v[:, :, 11:], 0)
    assert keys.shape == (2, 2, 12, 16) and keys.stride() == (0, 0, 0, 0) and keys.dtype == k.dtype
    assert isinstance(cache.layers[0].last_view, LazyAttentionView)
    assert not cache.layers[0].last_view.is_materialised


def _generate_logits(model, spec, ids, mask, steps=4):
    with torch.no_grad(), kvpress.patch(model, spec):
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        logits = []
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits)
            token = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("spec", [
    KVQuant(bits=2, group_size=8, residual=4, n_sink=2),  # rotated (auto at 2 bits)
    KVQuant(bits=4, group_size=8, residual=0, n_sink=0, rank=2, lowrank_block=16),
], ids=["2bit-rotated", "4bit-lowrank-residual0"])  # fmt: skip
def test_decode_path_equals_materialised_path(monkeypatch, arch, spec):
    model = tiny_model(arch)
    ids, mask = left_padded_batch([36, 25, 9], seed=4)
    decode = _generate_logits(model, spec, ids, mask)
    monkeypatch.setattr(kvpress.attention, "DECODE_MAX_QUERIES", 0)  # every step through the built view + SDPA
    materialised = _generate_logits(model, spec, ids, mask)
    torch.testing.assert_close(decode, materialised, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_path_equals_torch_path_in_a_model():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([30, 21], seed=6)
    spec = KVQuant(bits=2, group_size=16, residual=4, n_sink=2)
    with kernels.force_backend("torch"):
        torch_logits = _generate_logits(model, spec, ids, mask, steps=3)
    with kernels.force_backend("triton"):
        triton_logits = _generate_logits(model, spec, ids, mask, steps=3)
    torch.testing.assert_close(triton_logits, torch_logits, rtol=1e-5, atol=1e-5)


def test_reposition_rotates_exact_sinks_without_building_the_layer():
    """StreamingLLM-style eviction on quantized storage: the moved keys are KVQuant's exact sinks, so
    re-positioning keeps the view lazy (decode reads the body in place) and gives what the built view gives."""
    from kvpress.reposition import reposition

    model = tiny_model("llama")
    inv_freq = kvpress.reposition.rope_inv_freqs(model)[0]
    spec = KVQuant(bits=4, group_size=8, residual=4, n_sink=2)
    g = torch.Generator().manual_seed(0)
    st = spec.create_storage(0)
    st.append(torch.randn(2, 2, 60, 16, generator=g), torch.randn(2, 2, 60, 16, generator=g), 0)
    keep = torch.zeros(2, 2, 60, dtype=torch.bool)
    keep[..., :2] = True  # the sinks
    keep[..., 30:] = True  # a window
    st = st.select(keep)
    st.append(torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g), 60)
    fresh = st.fresh
    q = torch.randn(2, 4, 1, 16, generator=g)
    lazy = reposition(st.view(), 61, inv_freq)
    assert isinstance(lazy, LazyAttentionView) and not lazy.is_materialised
    out = kvpress.attention.attend(q, lazy, None, 0.25)
    assert not lazy.is_materialised
    st.fresh = fresh
    built = st.view()
    built.keys  # noqa: B018 - the fallback: build the layer, rotate the moved keys in it
    expected = kvpress.attention.attend(q, reposition(built, 61, inv_freq), None, 0.25)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lazy.keys, reposition(built, 61, inv_freq).keys, rtol=1e-5, atol=1e-5)
    # a moved key inside the quantized body: re-positioning builds the layer instead
    st2 = spec.create_storage(0)
    st2.append(torch.randn(1, 2, 60, 16, generator=g), torch.randn(1, 2, 60, 16, generator=g), 0)
    keep = torch.zeros(1, 2, 60, dtype=torch.bool)
    keep[..., 10:12] = True
    keep[..., 40:] = True
    st2 = st2.select(keep)
    moved = reposition(st2.view(), 60, inv_freq)
    assert moved.is_materialised
