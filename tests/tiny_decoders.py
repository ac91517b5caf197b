"""Tiny random-weight decoders (hidden 32, 2 layers) with a real byte-level BPE tokenizer trained
here on a few sentences: no downloads. The tokenizer has EOS but no pad token, like GPT-2's and
Llama's stock tokenizers."""

from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model learns to count one two three four five",
    "hello world, this is a small corpus for tests",
    "red green blue yellow purple orange black white",
    "monday tuesday wednesday thursday friday saturday sunday",
    "question: what colour is the sky? answer: blue",
]


def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2 style) trained on SENTENCES, with EOS and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def tiny_decoder(model_type: str, vocab_size: int, eos_id: int, seed: int = 0):
    """A tiny causal LM of `model_type` ("llama" or "gpt2") with random weights and no pad token id."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if model_type == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                            eos_token_id=eos_id, bos_token_id=eos_id)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         eos_token_id=eos_id, bos_token_id=eos_id)
    return LlamaForCausalLM(config)


def save_tiny_decoder(path: Path, model_type: str = "llama", seed: int = 0) -> Path:
    tokenizer = bpe_tokenizer()
    tiny_decoder(model_type, len(tokenizer), tokenizer.eos_token_id, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def text_rows(n: int = 24) -> list[dict]:
    return [{"text": SENTENCES[i % len(SENTENCES)]} for i in range(n)]


def prompt_rows(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        words = SENTENCES[i % len(SENTENCES)].split()
        rows.append({"prompt": " ".join(words[:3]), "completion": " " + " ".join(words[3:])})
    return rows
