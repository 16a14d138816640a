"""Model factory: stock `transformers` causal LMs built from a preset, with a securely drawn init seed.

The initial weights are a secret in PMP: the frozen complement stays at its init values in the release, so
anyone who can regenerate the init reads the mask off by comparison. Hence the seed comes from OS entropy
unless the user pins one, and pinning warns.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
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
            tie_word_embeddings=p.tie_embeddings, bos_token_id=bos_id, eos_token_id=eos_id,
        )
    return GPT2Config(
        vocab_size=vocab_size, n_embd=p.hidden_size, n_layer=p.num_layers, n_head=p.num_heads,
        n_inner=p.intermediate_size, n_positions=max_pos, tie_word_embeddings=p.tie_embeddings,
        bos_token_id=bos_id, eos_token_id=eos_id,
    )


# No pad_token_id in the model config: with one, HF zeroes that embedding row at init, and the frozen complement
# of a row that sits exactly at 0.0 tells an attacker which entries were trained (found by `pmp audit`).

SEED_BITS = 128


def draw_init_seed(pinned: int | None) -> int:
    """OS entropy (128 bits) unless pinned; pinning warns because it makes the init (and the complement) guessable."""
    if pinned is None:
        return secrets.randbits(SEED_BITS)
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
        seed_rng(seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    return model


# torch's CPU generator state (CPUGeneratorImplState): legacy_pod {uint64 the_initial_seed; int left; int seeded;
# uint64 next; uint64 state[624]; double normal_x, normal_y, normal_rho; int normal_is_valid}, then float
# next_float_normal_sample; bool is_next_float_normal_sample_valid.
_MT_STATE_OFFSET = 8 + 4 + 4 + 8
_MT_WORDS = 624


def seed_rng(seed: int) -> None:
    """Seed torch's global CPU Mersenne Twister from the whole secret, not from 32 bits of it.

    `torch.manual_seed(s)` keeps only the low 32 bits on CPU (s and s + 2**32 give the same weights), so a 63-bit
    secret seed had just 2**32 possible initialisations. Here all 624 state words come from
    shake_256("pmp-init-v1" || seed), so every bit of a 128-bit seed matters. Deterministic for a given seed.
    """
    if seed < 0 or seed >= 2**256:
        raise ValueError(f"init seed must be in [0, 2**256), got {seed}")
    torch.manual_seed(0)  # a valid state with left=1 (twist on the next draw) and empty normal caches
    state = torch.random.get_rng_state()
    raw = bytearray(state.numpy().tobytes())
    end = _MT_STATE_OFFSET + _MT_WORDS * 8
    if len(raw) < end + 3 * 8 + 4:
        raise RuntimeError(f"unexpected torch CPU RNG state of {len(raw)} bytes: pmp.model.seed_rng needs updating "
                           "for this torch version")
    words = hashlib.shake_256(b"pmp-init-v1" + seed.to_bytes(32, "little")).digest(_MT_WORDS * 4)
    for i in range(_MT_WORDS):  # each 32-bit MT word is stored in a uint64 slot
        raw[_MT_STATE_OFFSET + 8 * i:_MT_STATE_OFFSET + 8 * i + 8] = struct.pack("<Q", int.from_bytes(
            words[4 * i:4 * i + 4], "little"))
    raw[0:8] = struct.pack("<Q", seed & (2**64 - 1))  # the_initial_seed: informational only
    torch.random.set_rng_state(torch.frombuffer(raw, dtype=torch.uint8).clone())


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
