"""Masked training state: exact freezing of the complement, and equivalence with plain AdamW on the masked subset."""

import copy

import pytest
import torch
from torch.func import functional_call

from pmp.config import ModelConfig
from pmp.kernels import MaskLayout
from pmp.masked_optim import MaskedAdamW
from pmp.masked_state import MaskedLinearFunction, MaskedModel
from pmp.model import build_model, hf_config

VOCAB = 97


def tiny_model(seed=0, tie=False):
    cfg = hf_config(ModelConfig(preset="tiny", hidden_size=32, num_heads=4, intermediate_size=64, num_layers=2),
                    VOCAB, 0, 0, 64)
    cfg.tie_word_embeddings = tie
    return build_model(cfg, seed)


def random_masks(model, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()}


def batches(n, seed=1, bs=4, T=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (bs, T), generator=g) for _ in range(n)]


def test_masked_linear_grad_matches_dense_grad_at_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 11, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(7, 11) < 0.4
    layout = MaskLayout.from_bool(mask)
    compact = torch.nn.Parameter(w[mask].clone())
    y = MaskedLinearFunction.apply(x, w, b, compact, layout)
    dy = torch.randn_like(y)
    y.backward(dy)
    w_ref = w.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = b.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, w_ref, b_ref).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)
    # the compact gradient is accumulated in fp32 whatever the input dtype
    torch.testing.assert_close(compact.grad, w_ref.grad[mask].to(compact.grad.dtype), rtol=1e-6, atol=1e-6)


def make_optimizer(mm, fused, **kw):
    """fused: MaskedAdamW stepping the dense weight (no master); else torch AdamW on compact masters + sync_."""
    return MaskedAdamW(mm, **kw) if fused else torch.optim.AdamW(mm.param_groups(kw.pop("weight_decay")), **kw)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_complement_bit_exact_and_changed_count(tie, fused):
    model = tiny_model(tie=tie)
    init = copy.deepcopy(model.state_dict())
    masks = random_masks(model, 0.3)
    mm = MaskedModel(model, {n: MaskLayout.from_bool(m) for n, m in masks.items()}, master=not fused)
    opt = make_optimizer(mm, fused, lr=1e-2, weight_decay=0.1)
    for batch in batches(5):
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(mm.trainable_parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mm.sync_()
    mm.detach()
    changed = 0
    for n, p in model.named_parameters():
        m = masks[n]
        assert torch.equal(p.detach()[~m], init[n][~m]), f"complement of {n} moved"
        changed += int((p.detach() != init[n]).sum())
    assert 0 < changed <= sum(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("fused", [False, True])
def test_masked_adamw_matches_torch_adamw_on_masked_subset(fused):
    """Our path (custom backward + hooks + compact AdamW) vs an independent one: autograd through
    index_put of leaf tensors holding only the masked entries, stepped by torch.optim.AdamW, with weight decay
    and gradient clipping, for 24 steps."""
    torch.manual_seed(0)
    model = tiny_model(seed=3)
    ref_model = copy.deepcopy(model)
    masks = random_masks(model, 0.4, seed=5)
    mm = MaskedModel(model, {n: MaskLayout.from_bool(m) for n, m in masks.items()}, master=not fused)
    opt = make_optimizer(mm, fused, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)

    base = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    leaves = {n: base[n][masks[n]].clone().requires_grad_(True) for n in base}
    decay = [leaves[n] for n in leaves if base[n].dim() >= 2]
    no_decay = [leaves[n] for n in leaves if base[n].dim() < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=3e-3, betas=(0.9, 0.95))

    def ref_params():
        return {n: base[n].index_put((masks[n].nonzero(as_tuple=True)), leaves[n]) for n in base}

    for i, batch in enumerate(batches(24, seed=7)):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(mm.trainable_parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mm.sync_()

        ref_loss = functional_call(ref_model, ref_params(), kwargs={"input_ids": batch, "labels": batch}).loss
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(list(leaves.values()), 0.5)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"loss differs at step {i}")
        torch.testing.assert_close(norm, ref_norm, rtol=1e-4, atol=1e-6)
    final = ref_params()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), final[n], rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach()[~masks[n]], base[n][~masks[n]])


def test_mask_of_another_model_is_refused():
    model = tiny_model()
    other = {n: torch.ones(3, 3, dtype=torch.bool) for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="another model"):
        MaskedModel(model, {n: MaskLayout.from_bool(m) for n, m in other.items()})
    with pytest.raises(ValueError, match="does not have"):
        MaskedModel(model, {"nope.weight": MaskLayout.from_bool(torch.ones(2, 2, dtype=torch.bool))})


def test_without_master_no_copy_of_masked_values():
    model = tiny_model()
    masks = random_masks(model, 0.5)
    mm = MaskedModel(model, {n: MaskLayout.from_bool(m) for n, m in masks.items()}, master=False)
    for t in mm.tensors:
        assert t.compact.untyped_storage().nbytes() == 4  # a zero-stride gradient sink
    assert mm.state_bytes()["master"] == 0
