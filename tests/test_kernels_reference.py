"""Pure-torch reference ops vs float64 ground truth and torch.optim.AdamW (the semantics kernels must match)."""

import pytest
import torch

from pmp.kernels import MaskLayout, backend, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 accumulation of 93 products; the float64 truth uses the same (already rounded) inputs, so the tolerance
# is fp32-tight for every input dtype
DW_RTOL = 1e-4


def _mask(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_masked_weight_grad_vs_float64(dtype, density, monkeypatch):
    O, I, T = 67, 131, 93
    dy = torch.randn(3, 31, O).to(dtype)
    x = torch.randn(3, 31, I).to(dtype)
    mask = _mask((O, I), density)
    layout = MaskLayout.from_bool(mask)
    monkeypatch.setattr(reference, "_DW_CHUNK_ELEMS", 5 * I)  # force several row chunks
    out = reference.masked_weight_grad(dy, x, layout)
    truth = (dy.reshape(T, O).double().T @ x.reshape(T, I).double())[mask]
    assert out.dtype == torch.float32 and out.shape == (layout.nnz,)
    scale = truth.abs().max().clamp_min(1.0) if truth.numel() else 1.0
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=DW_RTOL * float(scale))


def test_masked_weight_grad_rejects_bad_shapes():
    layout = MaskLayout.from_bool(_mask((8, 16), 0.5))
    with pytest.raises(ValueError, match="do not match"):
        reference.masked_weight_grad(torch.randn(4, 9), torch.randn(4, 16), layout)
    with pytest.raises(ValueError, match="tokens"):
        reference.masked_weight_grad(torch.randn(4, 8), torch.randn(5, 16), layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37,), (67, 131), (2, 3, 5, 7)])
def test_gather_scatter(dtype, shape):
    mask = _mask(shape, 0.3, seed=4)
    layout = MaskLayout.from_bool(mask)
    dense = torch.randn(shape).to(dtype)
    vals = reference.gather_compact(dense, layout)
    assert vals.dtype == dtype and torch.equal(vals, dense[mask])
    assert reference.gather_compact(dense, layout, dtype=torch.float32).dtype == torch.float32
    before = dense.clone()
    new = torch.randn(layout.nnz, dtype=torch.float32)
    out = reference.scatter_compact_(dense, new, layout)
    assert out is dense
    assert torch.equal(dense[mask], new.to(dtype))
    assert torch.equal(dense[~mask].view(torch.uint8 if dtype == torch.float32 else torch.int16),
                       before[~mask].view(torch.uint8 if dtype == torch.float32 else torch.int16))


@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_masked_adamw_matches_torch_adamw(dense_dtype, weight_decay):
    """25 steps of the compact masked AdamW == torch.optim.AdamW on the masked subset; complement untouched."""
    torch.manual_seed(0)
    shape = (67, 131)
    mask = _mask(shape, 0.3, seed=5)
    layout = MaskLayout.from_bool(mask)
    dense = torch.randn(shape).to(dense_dtype)
    frozen = dense[~mask].clone()
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)

    p_ref = torch.nn.Parameter(dense.float()[mask].clone())
    opt = torch.optim.AdamW([p_ref], foreach=False, **hyper)
    master = dense.float()[mask].clone()
    m = torch.zeros_like(master)
    v = torch.zeros_like(master)
    for step in range(1, 26):
        grad = torch.randn(layout.nnz)
        p_ref.grad = grad.clone()
        opt.step()
        reference.masked_adamw_(dense, master, grad, m, v, layout, lr=hyper["lr"], beta1=0.9, beta2=0.95,
                                eps=hyper["eps"], weight_decay=weight_decay, step=step)
    st = opt.state[p_ref]
    torch.testing.assert_close(master, p_ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, st["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, st["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert torch.equal(dense[mask], master.to(dense_dtype))
    bits = torch.int16 if dense_dtype == torch.bfloat16 else torch.int32
    assert torch.equal(dense[~mask].view(bits), frozen.view(bits))


def test_masked_adamw_validates():
    layout = MaskLayout.from_bool(_mask((8, 16), 0.5))
    n = layout.nnz
    z = torch.zeros(n)
    with pytest.raises(ValueError, match="master=None .* needs fp32"):
        reference.masked_adamw_(torch.zeros(8, 16, dtype=torch.bfloat16), None, z, z.clone(), z.clone(), layout,
                                lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="grad"):
        reference.masked_adamw_(torch.zeros(8, 16), z.clone(), torch.zeros(n + 1), z.clone(), z.clone(), layout,
                                lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="1-based"):
        reference.masked_adamw_(torch.zeros(8, 16), z.clone(), z.clone(), z.clone(), z.clone(), layout,
                                lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=0)


def test_dispatch_env(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.setenv("PMP_KERNELS", "torch")
    assert backend(t) == "torch"
    monkeypatch.setenv("PMP_KERNELS", "auto")
    assert backend(t) == "torch"
    monkeypatch.setenv("PMP_KERNELS", "bogus")
    with pytest.raises(ValueError, match="PMP_KERNELS"):
        backend(t)


def test_masked_adamw_without_master_matches_torch_adamw():
    """fp32 dense weight as its own master (no compact copy): same trajectory as torch.optim.AdamW."""
    torch.manual_seed(1)
    mask = _mask((67, 131), 0.3, seed=2)
    layout = MaskLayout.from_bool(mask)
    dense = torch.randn(67, 131)
    frozen = dense[~mask].clone()
    p_ref = torch.nn.Parameter(dense[mask].clone())
    opt = torch.optim.AdamW([p_ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    m, v = torch.zeros(layout.nnz), torch.zeros(layout.nnz)
    for step in range(1, 26):
        grad = torch.randn(layout.nnz)
        p_ref.grad = grad.clone()
        opt.step()
        reference.masked_adamw_(dense, None, grad, m, v, layout, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                                weight_decay=0.1, step=step)
    torch.testing.assert_close(dense[mask], p_ref.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(dense[~mask].view(torch.int32), frozen.view(torch.int32))
