"""The function-preserving secret rescaling (pmp/rescale.py): same logits, exact inverse, and canonicalisation
recovers the base up to the symmetry -- whatever the secret scales."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pmp.rescale import canonicalise, draw_key, fold_norms, rescale, unscale


def tiny_llama(kv_heads: int = 2, tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # trained-looking norms, so folding has something to do
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits.double()


@pytest.mark.parametrize("kv_heads, tied", [(4, False), (2, False), (1, True)])
@pytest.mark.parametrize("strength", [10.0, 100.0])
def test_rescaled_model_computes_the_same_function(kv_heads, tied, strength):
    m = tiny_llama(kv_heads, tied)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = logits(m, ids)
    fold_norms(m)
    key = draw_key(m, strength, torch.Generator().manual_seed(2))
    w_before = m.model.layers[0].mlp.up_proj.weight.clone()
    rescale(m, key)
    assert not torch.allclose(m.model.layers[0].mlp.up_proj.weight, w_before)  # the weights did change
    out = logits(m, ids)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
    for layer in m.model.layers:  # the gains went into the next linear layers
        assert bool((layer.input_layernorm.weight == 1).all() and (layer.post_attention_layernorm.weight == 1).all())
    assert bool((m.model.norm.weight == 1).all()) == (not tied)  # a tied lm_head cannot take the final gain


def test_unscale_inverts_and_canonicalise_removes_the_secret():
    m = tiny_llama()
    fold_norms(m)
    base = {n: p.detach().clone() for n, p in m.named_parameters()}
    key = draw_key(m, 100.0, torch.Generator().manual_seed(3))
    rescale(m, key)
    locked = {n: p.detach().clone() for n, p in m.named_parameters()}
    unscale(m, key)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p, base[n], rtol=1e-5, atol=1e-7)
    # canonical forms of the base and of two differently locked copies are the same weights
    canonicalise(m)
    canon_base = {n: p.detach().clone() for n, p in m.named_parameters()}
    for seed in (3, 4):
        other = tiny_llama()
        other.load_state_dict({**base}, strict=False)
        rescale(other, draw_key(other, 100.0, torch.Generator().manual_seed(seed)))
        canonicalise(other)
        for n, p in other.named_parameters():
            torch.testing.assert_close(p, canon_base[n], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(locked[n], canon_base[n]) for n in locked)


def test_bf16_rescaled_logits_stay_close():
    m = tiny_llama()
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(5))
    ref = logits(m, ids)
    fold_norms(m)
    rescale(m, draw_key(m, 100.0, torch.Generator().manual_seed(6)))
    out = logits(m.to(torch.bfloat16), ids)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() / ref.abs().max() < 5e-2  # bf16 rounding of the scaled weights


@pytest.mark.parametrize("strength", [1.0, 0.5, float("inf")])
def test_bad_strength_is_refused(strength):
    with pytest.raises(ValueError, match="strength C must be a finite number > 1"):
        draw_key(tiny_llama(), strength, torch.Generator())


def test_other_families_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="implemented for llama models, not 'gpt2'"):
        draw_key(gpt2, 10.0, torch.Generator())
