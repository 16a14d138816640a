"""Model factory: preset sizes, stock architectures, and the secret init seed."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pmp.config import ModelConfig
from pmp.model import PinnedSeedWarning, build_model, count_parameters, draw_init_seed, hf_config
from pmp.presets import PRESETS


def n_params(preset: str, **kw) -> int:
    cfg = hf_config(ModelConfig(preset=preset, **kw), PRESETS[preset].vocab_size, 0, 0)
    with torch.device("meta"):  # count without allocating (the 1.1 B shape needs 4.4 GB)
        return count_parameters(AutoModelForCausalLM.from_config(cfg))


@pytest.mark.parametrize("preset, lo, hi", [
    ("tiny", 1e6, 2e6), ("small", 5e6, 20e6), ("base125m", 110e6, 140e6), ("tinyllama1b", 1.0e9, 1.2e9),
])
def test_preset_parameter_counts(preset, lo, hi):
    assert lo <= n_params(preset) <= hi


def test_gpt2_and_overrides():
    cfg = hf_config(ModelConfig(preset="tiny", arch="gpt2", num_layers=3), 500, 0, 0)
    assert cfg.model_type == "gpt2" and cfg.n_layer == 3
    with pytest.raises(ValueError, match="divisible"):
        hf_config(ModelConfig(preset="tiny", hidden_size=30, num_heads=4), 500, 0, 0)


def test_same_seed_same_weights_and_global_rng_untouched():
    cfg = hf_config(ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64), 300, 0, 0)
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    a, b = build_model(cfg, 7), build_model(cfg, 7)
    assert torch.equal(torch.rand(3), before)  # building did not consume the caller's random stream
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_model(cfg, 8)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_init_seed_from_os_entropy_unless_pinned():
    seeds = {draw_init_seed(None) for _ in range(20)}
    assert len(seeds) == 20 and all(0 <= s < 2**128 for s in seeds) and max(seeds) > 2**64
    with pytest.warns(PinnedSeedWarning, match="read the private mask"):
        assert draw_init_seed(1234) == 1234


def test_seed_uses_all_bits_not_just_32():
    """torch.manual_seed keeps the low 32 bits on CPU; our init must differ for s and s + 2**32 (and s + 2**100)."""
    cfg = hf_config(ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64), 300, 0, 0)
    w = {s: build_model(cfg, s).model.embed_tokens.weight for s in (5, 5 + 2**32, 5 + 2**100)}
    assert not torch.equal(w[5], w[5 + 2**32]) and not torch.equal(w[5], w[5 + 2**100])
    assert torch.equal(w[5], build_model(cfg, 5).model.embed_tokens.weight)
    assert abs(float(w[5].std()) - 0.02) < 0.002  # still the architecture's init distribution


def test_no_zeroed_embedding_row():
    """A pad row zeroed at init would sit exactly at 0.0 in the complement: a structural tell."""
    cfg = hf_config(ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64), 300, 0, 0)
    emb = build_model(cfg, 3).model.embed_tokens.weight
    assert not (emb == 0).all(dim=1).any()
