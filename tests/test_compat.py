"""The cache argument's name comes from signatures, and a patch that did not take effect raises (never a no-op)."""

import functools
import logging
import warnings

import pytest
import torch
import transformers
from tiny_models import left_padded_batch, tiny_model
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

import kvpress
from kvpress.compat import cache_argument, cache_kwargs, output_cache
from kvpress.policies import SnapKV, StreamingLLM


def _renamed(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


class _OldDecoder:
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs): ...


class _NewDecoder:
    @_renamed  # transformers' deprecate_kwarg wraps forward with functools.wraps, as this does
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs): ...


class _NoCache:
    def forward(self, input_ids=None): ...


def test_cache_argument_read_from_the_signature():
    assert cache_argument(_OldDecoder()) == "past_key_values"
    assert cache_argument(_NewDecoder()) == "cache"
    assert cache_kwargs(_NewDecoder(), "c") == {"cache": "c"}
    with pytest.raises(ValueError, match="takes no KV cache argument.*cache, past_key_values"):
        cache_argument(_NoCache())


def test_installed_models_agree_with_their_outputs():
    model = tiny_model("llama")
    name = cache_argument(model)
    assert name == cache_argument(model.model)
    out = model(torch.randint(3, 100, (1, 6)), use_cache=True)
    assert name in type(out).__dataclass_fields__
    assert type(output_cache(out)) is DynamicCache
    assert output_cache(model(torch.randint(3, 100, (1, 6)), use_cache=True, return_dict=False)) is not None
    assert output_cache(model(torch.randint(3, 100, (1, 6)), use_cache=False)) is None


@pytest.fixture
def no_warning_once_memory():
    """transformers' ``logger.warning_once`` remembers messages per process: forget them so a test sees them."""
    hf_logging.get_logger("transformers").warning_once.cache_clear()
    yield


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_patched_generate_and_forward_emit_no_cache_name_warning(arch, no_warning_once_memory, caplog):
    model = tiny_model(arch)
    ids, mask = left_padded_batch([12, 7])
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with kvpress.patch(model, SnapKV(compression_ratio=0.5, window=2)) as session:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
            cache = output_cache(out)
            assert isinstance(cache, kvpress.KVPressCache)
            explicit = session.new_cache()
            model(ids, attention_mask=mask, **cache_kwargs(model, explicit), use_cache=True)
            assert explicit.get_seq_length() == ids.shape[1]
    about_cache = [w for w in caught if "past_key_values" in str(w.message) or "`cache`" in str(w.message)]
    assert not about_cache, [str(w.message)[:200] for w in about_cache]
    assert not [r for r in caplog.records if "past_key_values" in r.getMessage()]


def test_old_spelling_passed_to_the_decoder_is_forwarded_under_the_declared_name():
    """A caller using the other name (e.g. code written for an older transformers) still gets kvpress's cache."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 20))
    other = next(n for n in ("cache", "past_key_values") if n != cache_argument(model.model))
    with kvpress.patch(model, StreamingLLM(n_sink=2, window=6)) as session:
        cache = session.new_cache()
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # kvpress renames before transformers' shim would warn
            model.model(ids, use_cache=True, **{other: cache})
    assert cache.get_seq_length() == 20 and cache.report()[0].tokens_max == 8


def _strip_cache_hook(session):
    """A pre-hook that runs after kvpress's and drops the cache: the decoder then builds its own DynamicCache,
    as it did when transformers 5.24 renamed the argument."""

    def hook(module, args, kwargs):
        kwargs[session.cache_arg] = None
        return args, kwargs

    return hook


def test_cache_bypassed_by_the_decoder_raises_naming_the_version():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 16))
    with kvpress.patch(model, SnapKV(compression_ratio=0.5, window=2)) as session:
        handle = session.decoder.register_forward_pre_hook(_strip_cache_hook(session), with_kwargs=True)
        try:
            with pytest.raises(RuntimeError, match=rf"did not take effect on transformers {transformers.__version__}.*"
                                                   r"never updated"):
                model(ids, use_cache=True)
        finally:
            handle.remove()
        # the session still works once the interference is gone
        assert isinstance(output_cache(model(ids, use_cache=True)), kvpress.KVPressCache)
    assert model.config._attn_implementation == "sdpa"
    assert not session.decoder._forward_pre_hooks and not session.decoder._forward_hooks


def test_pre_hook_that_never_ran_raises():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 16))
    with kvpress.patch(model, SnapKV(compression_ratio=0.5, window=2)) as session:
        hooks = dict(session.decoder._forward_pre_hooks)
        session.decoder._forward_pre_hooks.clear()
        try:
            with pytest.raises(RuntimeError, match="did not take effect.*pre-hook having run"):
                model(ids, use_cache=True)
        finally:
            session.decoder._forward_pre_hooks.update(hooks)
    assert not session.decoder._forward_pre_hooks


def test_attention_outside_kvpress_raises():
    """The cache was filled but attention ran through another implementation: the policy never ran."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 16))
    with kvpress.patch(model, SnapKV(compression_ratio=0.5, window=2)):
        model.set_attn_implementation("sdpa")
        with pytest.raises(RuntimeError, match="did not take effect.*attention did not run through kvpress"):
            model(ids, use_cache=True)
    assert model.config._attn_implementation == "sdpa"


def test_cache_repr_is_one_short_line():
    model = tiny_model("gemma3")
    ids = torch.randint(3, 100, (2, 40))
    with kvpress.patch(model, SnapKV(compression_ratio=0.5, window=2)):
        cache = output_cache(model(ids, use_cache=True))
    text = repr(cache)
    assert "\n" not in text and len(text) < 200, text
    assert text.startswith("KVPressCache(4 layers:") and "DenseStorage" in text
    assert "at most 20 of 40 tokens held" in text and f"{cache.nbytes():,} bytes" in text
    assert "KVPressCache(2 layers: 2x CompressedLayer" in repr(kvpress.KVPressCache(tiny_model("llama").config))
