"""A tiny random causal LM and a byte-level tokenizer, built from a config (no download).

Tests, CI and local smoke runs use it through the model name `TINY_MODEL_NAME`; it is deterministic
for a given seed, so two processes (a test and a Ray actor) build the very same model.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

TINY_MODEL_NAME = "codefast/tiny-random"
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: one token per byte, so any text round-trips exactly."""
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    vocab[EOS_TOKEN] = len(vocab)
    vocab[PAD_TOKEN] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, padding_side="left")


def build_tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        # Larger output weights make the random model's next-token choice less flat, so greedy
        # decoding is stable across batch layouts (no near-ties in float32).
        model.lm_head.weight.data.mul_(4.0)
    return model.eval()


def build_tiny_model_and_tokenizer(seed: int = 0, dtype: torch.dtype = torch.float32, num_heads: int = 4):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=seed, num_heads=num_heads).to(dtype)
    return model, tokenizer


# vLLM's CPU attention needs heads of at least 32 dimensions (64 hidden / 4 heads is 16): the
# tiny model that vLLM tests load (guard/export.py saves it as a folder) has two heads.
TINY_VLLM_NUM_HEADS = 2
