"""Tiny random causal LMs of real architectures, for tests that must run in milliseconds.

The models are built from configs (2 layers, hidden 32) with the vocabulary of the one real
tokenizer available offline, SmolLM2's (49,152 tokens), so prompts tokenise as they would for a
real model. The tokenizer comes from the curvzo cache when SmolLM2 is cached there, and otherwise
straight from the downloaded GGUF (a few seconds, once per test session).

Usage::

    from tiny import ARCHS, tiny_model, tokenizer

    model = tiny_model("opt", seed=1)
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from curvzo.models import load_tokenizer

__all__ = ["ARCHS", "tiny_config", "tiny_model", "tokenizer"]

ARCHS = ("llama", "opt", "gpt2", "qwen2")

HIDDEN = 32
LAYERS = 2
HEADS = 4
CONTEXT = 128
# Larger than the usual 0.02 so that logits vary enough for equivalence tests to mean something.
INIT_STD = 0.1


@functools.cache
def tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (adds no BOS; eos = pad = ``<|im_end|>``), loaded once per session."""
    return load_tokenizer("smollm2-135m")


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """A 2-layer config of ``arch`` (one of :data:`ARCHS`) sized for SmolLM2's vocabulary."""
    tok = tokenizer()
    special = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    common = {"vocab_size": len(tok), "initializer_range": INIT_STD, **special}
    if arch in ("llama", "qwen2"):  # the same decoder shape under two config classes
        config = (LlamaConfig if arch == "llama" else Qwen2Config)(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS // 2,
            max_position_embeddings=CONTEXT,
            **common,
        )
    elif arch == "opt":
        config = OPTConfig(
            hidden_size=HIDDEN,
            ffn_dim=2 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=CONTEXT,
            **common,
        )
    elif arch == "gpt2":
        config = GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT, **common)
    else:
        raise ValueError(f"Unknown tiny architecture {arch!r}; expected one of {ARCHS}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised ``arch`` causal LM in eval mode, the same for the same ``seed``.

    ``overrides`` are set on the config (e.g. ``tie_word_embeddings=True``). The global RNG is
    seeded inside ``fork_rng`` so that building a model leaves other tests' randomness alone.
    """
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()
