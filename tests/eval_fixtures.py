"""Offline fixtures for the evaluation tests: a byte-level tokenizer (with or without a chat template) and a
tiny random Llama sized for it. One character is one token, so prompts of a few hundred tokens are cheap."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny_models import tiny_model

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=2)
def byte_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(seed: int = 0):
    """A 2-layer random Llama (GQA: 4 query heads, 2 KV heads) over the byte tokenizer's vocabulary."""
    vocab = len(byte_tokenizer())
    return tiny_model("llama", seed=seed, vocab_size=vocab, max_position_embeddings=4096, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
