"""patch() hooks in, and leaves the model exactly as it found it, exceptions included."""

import pytest
import torch
from tiny_models import left_padded_batch, tiny_model
from transformers import DynamicCache
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

import kvpress
from kvpress.compat import cache_kwargs, output_cache
from kvpress.policies import SnapKV, StreamingLLM


def _model_state(model):
    hooks = {
        name: (dict(m._forward_pre_hooks), dict(m._forward_hooks), dict(m._forward_pre_hooks_with_kwargs))
        for name, m in model.named_modules()
    }
    return model.config.to_dict(), model.config._attn_implementation, hooks


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_restored_after_exception(attn):
    model = tiny_model("llama", attn=attn)
    ids, mask = left_padded_batch([16, 10])
    before_logits = model(ids, attention_mask=mask).logits
    before = _model_state(model)
    with pytest.raises(KeyError):
        with kvpress.patch(model, SnapKV(compression_ratio=0.5, window=4)):
            assert model.config._attn_implementation == f"kvpress_{attn}"
            model(ids, attention_mask=mask, use_cache=True)
            raise KeyError("boom")
    assert _model_state(model) == before
    assert model.config._attn_implementation == attn
    assert "kvpress_sdpa" not in AttentionInterface._global_mapping
    assert "kvpress_eager" not in AttentionMaskInterface._global_mapping
    out = model(ids, attention_mask=mask, use_cache=True)
    assert torch.equal(out.logits, before_logits)
    assert type(output_cache(out)) is DynamicCache


def test_nested_patch_refused_and_outer_survives():
    model = tiny_model("llama")
    with kvpress.patch(model, None):
        with pytest.raises(RuntimeError, match="already under kvpress.patch"):
            with kvpress.patch(model, StreamingLLM(window=4)):
                pass
        # the outer patch is still active
        out = model(torch.randint(3, 100, (1, 8)), use_cache=True)
        assert isinstance(output_cache(out), kvpress.KVPressCache)
    assert model.config._attn_implementation == "sdpa"


def test_two_models_patched_at_once_keep_their_policies():
    a, b = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    ids = torch.randint(3, 100, (1, 40))
    with kvpress.patch(a, StreamingLLM(n_sink=2, window=8)), kvpress.patch(b, None):
        ca = output_cache(a(ids, use_cache=True))
        cb = output_cache(b(ids, use_cache=True))
    assert ca.report()[0].tokens_max == 10
    assert cb.report()[0].tokens_max == 40


def test_unsupported_attention_implementation():
    model = tiny_model("llama")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="unsupported attention implementation 'flash_attention_2'.*sdpa, eager"):
        with kvpress.patch(model):
            pass


def test_unsupported_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'; supported: llama"):
        with kvpress.patch(model):
            pass


def test_bad_policy_object():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="policy must be None"):
        with kvpress.patch(model, "snapkv"):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_non_empty_foreign_cache_refused():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 8))
    cache = output_cache(model(ids, use_cache=True))
    with kvpress.patch(model):
        with pytest.raises(ValueError, match="already holds tokens"):
            model(ids[:, :1], **cache_kwargs(model, cache), use_cache=True)


def test_explicit_cache_and_positions_after_eviction():
    """Rotary positions of new tokens count from the tokens seen, not the tokens held."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 30))
    with kvpress.patch(model, StreamingLLM(n_sink=2, window=6)) as session:
        cache = session.new_cache()
        model(ids, **cache_kwargs(model, cache), use_cache=True)
        assert cache.get_seq_length() == 30
        assert cache.report()[0].tokens_max == 8
        model(ids[:, :1], **cache_kwargs(model, cache), use_cache=True)
        assert cache.get_seq_length() == 31
        positions = cache.layers[0].storage.view().positions
    assert positions[0, 0].tolist() == [0, 1, 25, 26, 27, 28, 29, 30]


def test_use_cache_false_is_untouched():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 12))
    ref = model(ids, use_cache=False).logits
    with kvpress.patch(model, SnapKV(compression_ratio=0.5, window=2)):
        out = model(ids, use_cache=False)
    assert output_cache(out) is None
    assert torch.equal(out.logits, ref)
