"""Model factory: stock `transformers` causal LMs built from a preset, with a securely drawn init seed.

The initial weights are a secret in PMP: the frozen complement stays at its init values in the release, so
anyone who can regenerate the init reads the mask off by comparison. Hence the seed comes from OS entropy
unless the user pins one, and pinning warns.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from pmp.config import ModelConfig
from pmp.presets import PRESETS, Preset


class PinnedSeedWarning(UserWarning):
    """A pinned init seed makes the initial weights (and thus the frozen complement) reproducible by others."""


def resolve_preset(cfg: ModelConfig) -> Preset:
    p = PRESETS[cfg.preset]
    over = {
        "arch": cfg.arch or p.arch,
        "hidden_size": cfg.hidden_size or p.hidden_size,
        "num_layers": cfg.num_layers or p.num_layers,
        "num_heads": cfg.num_heads or p.num_heads,
        "intermediate_size": cfg.intermediate_size or p.intermediate_size,
    }
    p = replace(p, **over)
    if p.hidden_size % p.num_heads:
        raise ValueError(f"model.hidden_size ({p.hidden_size}) must be divisible by model.num_heads ({p.num_heads})")
    kv = p.num_kv_heads or p.num_heads
    if p.num_heads % kv:
        raise ValueError(f"num_heads ({p.num_heads}) must be a multiple of num_kv_heads ({kv})")
    return p


def hf_config(cfg: ModelConfig, vocab_size: int, bos_id: int | None = None, eos_id: int | None = None,
              max_position: int | None = None) -> PretrainedConfig:
    """The stock HF config of the requested shape."""
    p = resolve_preset(cfg)
    max_pos = max(max_position or 0, p.max_position)
    if p.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
            num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
            num_key_value_heads=p.num_kv_heads or p.num_heads, max_position_embeddings=max_pos,
            tie_word_embeddings=p.tie_embeddings, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )
    return GPT2Config(
        vocab_size=vocab_size, n_embd=p.hidden_size, n_layer=p.num_layers, n_head=p.num_heads,
        n_inner=p.intermediate_size, n_positions=max_pos, tie_word_embeddings=p.tie_embeddings,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def draw_init_seed(pinned: int | None) -> int:
    """OS entropy unless pinned; pinning warns because it makes the init (and the complement) guessable."""
    if pinned is None:
        return secrets.randbits(63)
    warnings.warn(
        f"model.init_seed is pinned to {pinned}: anyone who guesses it can regenerate the initial weights and "
        "read the private mask off the release (the complement stays at init). Leave it null for real runs.",
        PinnedSeedWarning, stacklevel=2,
    )
    return int(pinned)


def build_model(hf_cfg: PretrainedConfig, seed: int) -> torch.nn.Module:
    """Build the stock model on CPU in fp32 with weights determined by `seed` alone.

    Always on CPU so the same seed gives the same weights whatever device trains it; the global RNG is
    forked so the caller's random state is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
