"""Tiny randomly initialised decoders of every supported architecture (seconds on CPU)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

ARCHITECTURES: dict[str, tuple[type, type, dict]] = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),
    # 4 layers, every other one sliding (window 8), so both layer kinds are exercised at short lengths.
    "gemma3": (
        tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
        {"head_dim": 16, "num_hidden_layers": 4, "sliding_window": 8,
         "layer_types": ["sliding_attention", "full_attention"] * 2},
    ),
}


def tiny_model(arch: str = "llama", *, attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.set_attn_implementation(attn)
    return model


def left_padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids ``[batch, max_len]`` left-padded with 0, and the matching attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask
