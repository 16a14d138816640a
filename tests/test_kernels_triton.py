"""Triton kernels vs the pure-torch references and float64 truth.

On CPU they run under TRITON_INTERPRET=1 (set by conftest.py): small shapes, large tiles. Every output is
poisoned with NaN before the kernel runs so an unwritten entry fails the test, and every in-place op is checked
to leave entries outside the mask bit-identical.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from pmp import kernels  # noqa: E402
from pmp.kernels import MaskLayout, bitmask, masked_adamw, reference, routing, sddmm  # noqa: E402  # noqa: E402

# triton 3.6's interpreter converts a runtime loop bound through a 1-element array (numpy >= 1.25 warns); harmless
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 accumulate everywhere; the truth uses the same rounded inputs. fp32 inputs on a GPU may go through tf32 if
# the user enabled it; bf16/fp16 stay loose for GPU MMA order and the interpreter's bf16 upcast path.
DW_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(autouse=True)
def _triton_dispatch(monkeypatch):
    monkeypatch.setenv("PMP_KERNELS", "triton")


def _mask(shape, density):
    return torch.rand(shape, device=DEVICE) < density


def _block_mask(rows, cols, bs, density):
    rb, cb = -(-rows // bs), -(-cols // bs)
    blocks = torch.rand(rb, cb, device=DEVICE) < density
    return blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:rows, :cols].contiguous()


def _absmax(t):
    return float(t.abs().max()) if t.numel() else 1.0


def _nan(n, dtype=torch.float32):
    return torch.full((n,), float("nan"), dtype=dtype, device=DEVICE)


def test_dispatch_picks_triton():
    t = torch.zeros(2, device=DEVICE)
    assert kernels.backend(t) == "triton"


# ---------------------------------------------------------------- bitmask
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 37), (67, 131), (2, 3, 5, 7), (5, 64)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_bitmask(shape, density):
    mask = _mask(shape, density)
    words = bitmask.pack_mask(mask)
    assert torch.equal(words, reference.pack_mask(mask))
    rows, cols = MaskLayout.from_bool(mask).rows, MaskLayout.from_bool(mask).cols
    assert torch.equal(bitmask.unpack_mask(words, rows, cols), mask.reshape(rows, cols))
    assert torch.equal(bitmask.row_popcount(words), reference.row_popcount(words))
    # the public dispatch reaches the same kernels
    assert torch.equal(kernels.pack_mask(mask), words)


def test_bitmask_sign_bit():
    mask = torch.zeros(3, 70, dtype=torch.bool, device=DEVICE)
    mask[0, 31] = True
    mask[1] = True
    words = bitmask.pack_mask(mask)
    assert words[0, 0].item() == -(2**31) and words[1, 0].item() == -1
    assert bitmask.row_popcount(words).tolist() == [1, 70, 0]
    assert torch.equal(bitmask.unpack_mask(words, 3, 70), mask)


# ---------------------------------------------------------------- masked dW (SDDMM)
def _check_dw(out, dy, x, mask, dtype):
    O, I = mask.shape
    truth = (dy.reshape(-1, O).double().T @ x.reshape(-1, I).double())[mask]
    assert out.dtype == torch.float32 and not out.isnan().any(), "unwritten compact entries"
    if truth.numel():
        scale = float(truth.abs().max().clamp_min(1.0))
        torch.testing.assert_close(out.double(), truth, rtol=0, atol=DW_RTOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
def test_sddmm_unstructured(dtype, density):
    O, I = 67, 131
    dy = torch.randn(3, 31, O, device=DEVICE).to(dtype)  # 93 tokens, leading dims flattened
    x = torch.randn(3, 31, I, device=DEVICE).to(dtype)
    mask = _mask((O, I), density)
    layout = MaskLayout.from_bool(mask)
    out = sddmm.masked_weight_grad(dy, x, layout, out=_nan(layout.nnz))
    _check_dw(out, dy, x, mask, dtype)
    ref = reference.masked_weight_grad(dy, x, layout)
    torch.testing.assert_close(out, ref, rtol=DW_RTOL[dtype], atol=DW_RTOL[dtype] * _absmax(ref))
    torch.testing.assert_close(kernels.masked_weight_grad(dy, x, layout), out, rtol=0, atol=0)


@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_sddmm_blocks(bs, dtype, density):
    O, I = 2 * bs + 13, bs + 37  # partial edge tiles
    mask = _block_mask(O, I, bs, density)
    layout = MaskLayout.from_bool(mask, block_size=bs)
    dy = torch.randn(93, O, device=DEVICE).to(dtype)
    x = torch.randn(93, I, device=DEVICE).to(dtype)
    out = sddmm.masked_weight_grad_blocks(dy, x, layout, out=_nan(layout.nnz))
    _check_dw(out, dy, x, mask, dtype)
    # the unstructured kernel agrees on block layouts too
    out2 = sddmm.masked_weight_grad_unstructured(dy, x, layout, out=_nan(layout.nnz))
    torch.testing.assert_close(out2, out, rtol=DW_RTOL[dtype], atol=DW_RTOL[dtype] * _absmax(out))


def test_sddmm_non_contiguous_inputs():
    O, I = 40, 70
    mask = _mask((O, I), 0.4)
    layout = MaskLayout.from_bool(mask)
    dy = torch.randn(O, 50, device=DEVICE).T  # [50, O], column-major
    x = torch.randn(50, 2 * I, device=DEVICE)[:, ::2]
    out = sddmm.masked_weight_grad(dy, x, layout, out=_nan(layout.nnz))
    _check_dw(out, dy, x, mask, torch.float32)


# ---------------------------------------------------------------- routing
@pytest.mark.parametrize("shape", [(37,), (67, 131), (2, 3, 5, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_gather_scatter(shape, dtype, density):
    mask = _mask(shape, density)
    layout = MaskLayout.from_bool(mask)
    dense = torch.randn(shape, device=DEVICE).to(dtype)
    out = routing.gather_compact(dense, layout, out=_nan(layout.nnz, dtype))
    assert torch.equal(out, dense[mask])
    out32 = routing.gather_compact(dense, layout, dtype=torch.float32, out=_nan(layout.nnz))
    assert torch.equal(out32, dense[mask].float())

    values = torch.randn(layout.nnz, device=DEVICE)
    target = dense.clone()
    target[mask] = float("nan")  # poisoned: every masked entry must be written
    before = target.clone()
    routing.scatter_compact_(target, values, layout)
    assert not target.isnan().any()
    assert torch.equal(target[~mask].view(BITS[dtype]), before[~mask].view(BITS[dtype]))
    # interpreter fp32 -> bf16 stores truncate: compare with one bf16 ulp of slack
    torch.testing.assert_close(target[mask].float(), values.to(dtype).float(), rtol=1e-2 if dtype != torch.float32
                               else 0, atol=0)


# ---------------------------------------------------------------- fused masked AdamW
@pytest.mark.parametrize("shape", [(37,), (67, 131), (2, 3, 5, 7)])
@pytest.mark.parametrize("dense_dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_masked_adamw(shape, dense_dtype, density):
    mask = _mask(shape, density)
    layout = MaskLayout.from_bool(mask)
    dense = torch.randn(shape, device=DEVICE).to(dense_dtype)
    dense_ref = dense.clone()
    dense[mask] = float("nan")  # poisoned: the kernel must write every masked entry
    frozen = dense[~mask].clone()
    master = torch.randn(layout.nnz, device=DEVICE)
    state = [master, torch.zeros_like(master), torch.zeros_like(master)]
    state_ref = [t.clone() for t in state]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    for step in range(1, 6):
        grad = torch.randn(layout.nnz, device=DEVICE)
        masked_adamw.masked_adamw_(dense, state[0], grad, state[1], state[2], layout, step=step, **hyper)
        reference.masked_adamw_(dense_ref, state_ref[0], grad, state_ref[1], state_ref[2], layout, step=step, **hyper)
    for got, want in zip(state, state_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not dense.isnan().any()
    # one ulp of the dense dtype: the master agrees to a few fp32 ulp, so its cast may round the other way
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dense_dtype]
    torch.testing.assert_close(dense[mask].float(), state_ref[0].to(dense_dtype).float(), rtol=rtol, atol=1e-6)
    bits = BITS[dense_dtype]
    assert torch.equal(dense[~mask].view(bits), frozen.view(bits))


def test_masked_adamw_dispatch_matches_torch_adamw():
    """Through the public op, 10 steps on the kernel path == torch.optim.AdamW on the masked subset."""
    mask = _mask((67, 131), 0.25)
    layout = MaskLayout.from_bool(mask)
    dense = torch.randn(67, 131, device=DEVICE)
    p = torch.nn.Parameter(dense[mask].clone())
    opt = torch.optim.AdamW([p], lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, foreach=False)
    master, m, v = dense[mask].clone(), torch.zeros(layout.nnz, device=DEVICE), torch.zeros(layout.nnz, device=DEVICE)
    for step in range(1, 11):
        g = torch.randn(layout.nnz, device=DEVICE)
        p.grad = g.clone()
        opt.step()
        kernels.masked_adamw_(dense, master, g, m, v, layout, lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.05, step=step)
    torch.testing.assert_close(master, p.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(dense[mask], master)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (full-size tiles, compiled kernels)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [0, 64, 128])
def test_gpu_full_size(dtype, block_size):
    O, I, T = 1024 + 67, 768 + 32, 4096 + 93
    mask = _block_mask(O, I, block_size, 0.3) if block_size else _mask((O, I), 0.1)
    layout = MaskLayout.from_bool(mask, block_size=block_size)
    dy = torch.randn(T, O, device=DEVICE).to(dtype)
    x = torch.randn(T, I, device=DEVICE).to(dtype)
    out = sddmm.masked_weight_grad(dy, x, layout, out=_nan(layout.nnz))
    _check_dw(out, dy, x, mask, dtype)
    dense = torch.randn(O, I, device=DEVICE).to(torch.bfloat16)
    frozen = dense[~mask].clone()
    master = torch.randn(layout.nnz, device=DEVICE)
    g, m, v = torch.randn_like(master), torch.zeros_like(master), torch.zeros_like(master)
    masked_adamw.masked_adamw_(dense, master, g, m, v, layout, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                               weight_decay=0.1, step=1)
    assert torch.equal(dense[mask], master.to(torch.bfloat16))
    assert torch.equal(dense[~mask].view(torch.int16), frozen.view(torch.int16))


@pytest.mark.parametrize("shape", [(67, 131), (37,)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_masked_adamw_without_master(shape, density):
    """HAS_MASTER=False: the fp32 dense weight is read and written in place of a compact master."""
    mask = _mask(shape, density)
    layout = MaskLayout.from_bool(mask)
    dense = torch.randn(shape, device=DEVICE)
    dense_ref = dense.clone()
    frozen = dense[~mask].clone()
    m, v = torch.zeros(layout.nnz, device=DEVICE), torch.zeros(layout.nnz, device=DEVICE)
    m_ref, v_ref = m.clone(), v.clone()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    for step in range(1, 6):
        grad = torch.randn(layout.nnz, device=DEVICE)
        masked_adamw.masked_adamw_(dense, None, grad, m, v, layout, step=step, **hyper)
        reference.masked_adamw_(dense_ref, None, grad, m_ref, v_ref, layout, step=step, **hyper)
    torch.testing.assert_close(dense, dense_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(dense[~mask].view(torch.int32), frozen.view(torch.int32))
