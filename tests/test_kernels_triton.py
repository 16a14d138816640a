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


# ---------------------------------------------------------------- split-K dW
# 301 tokens = 3 interpreter BLOCK_K=128 steps (the last partial), divisible by neither 2 nor 3
SPLIT_T = 301
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _check_split(out, no_split, dtype):
    if INTERPRETING:  # interpreted fp32 dot is exact IEEE and slices are whole BLOCK_K steps summed in order
        assert torch.equal(out, no_split)
    else:  # GPU: another summation order
        torch.testing.assert_close(out, no_split, rtol=DW_RTOL[dtype], atol=DW_RTOL[dtype] * _absmax(no_split))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_sddmm_split_k(dtype, density, split_k):
    O, I = 67, 131  # partial tiles in both dims
    mask = _mask((O, I), density)
    layout = MaskLayout.from_bool(mask)
    dy = torch.randn(SPLIT_T, O, device=DEVICE).to(dtype)
    x = torch.randn(SPLIT_T, I, device=DEVICE).to(dtype)
    out = sddmm.masked_weight_grad(dy, x, layout, out=_nan(layout.nnz), split_k=split_k)
    _check_dw(out, dy, x, mask, dtype)
    _check_split(out, sddmm.masked_weight_grad(dy, x, layout, split_k=1), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("split_k", [2, 3])
def test_sddmm_blocks_split_k(dtype, density, split_k):
    bs = 64
    O, I = 2 * bs + 13, bs + 37
    mask = _block_mask(O, I, bs, density)
    layout = MaskLayout.from_bool(mask, block_size=bs)
    dy = torch.randn(SPLIT_T, O, device=DEVICE).to(dtype)
    x = torch.randn(SPLIT_T, I, device=DEVICE).to(dtype)
    out = sddmm.masked_weight_grad_blocks(dy, x, layout, out=_nan(layout.nnz), split_k=split_k)
    _check_dw(out, dy, x, mask, dtype)
    _check_split(out, sddmm.masked_weight_grad_blocks(dy, x, layout, split_k=1), dtype)


@pytest.mark.parametrize("T, split_k, slices", [(301, 2, 2), (301, 3, 3), (200, 3, 2), (5, 8, 1), (257, 7, 3)])
def test_split_k_slices_never_empty(T, split_k, slices):
    """Slices are whole BLOCK_K steps; a split_k above the token blocks gives fewer, non-empty slices."""
    S, k_slice = sddmm._token_slices(T, split_k, 128)
    assert S == slices and (S - 1) * k_slice < T <= S * k_slice and k_slice % 128 == 0
    O, I = 40, 70
    mask = _mask((O, I), 0.5)
    layout = MaskLayout.from_bool(mask)
    dy, x = torch.randn(T, O, device=DEVICE), torch.randn(T, I, device=DEVICE)
    out = sddmm.masked_weight_grad(dy, x, layout, out=_nan(layout.nnz), split_k=split_k)
    _check_dw(out, dy, x, mask, torch.float32)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_split_k_rejects_bad_values(bad):
    layout = MaskLayout.from_bool(_mask((8, 40), 0.5))
    dy, x = torch.randn(16, 8, device=DEVICE), torch.randn(16, 40, device=DEVICE)
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        sddmm.masked_weight_grad(dy, x, layout, split_k=bad)
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        sddmm.masked_weight_grad(dy, x, MaskLayout.from_bool(_block_mask(64, 64, 32, 0.5), block_size=32), split_k=bad)


def test_auto_split_k_rule():
    """The slice count minimising ceil(S x tiles / SMs) x (1/S + epilogue), grids below 2 x SMs only."""
    assert sddmm.auto_split_k(36, 16384, 132) == 3  # base125m 768x768 at 128x128 tiles: 108 CTAs, one wave
    assert sddmm.auto_split_k(48, 16384, 132) == 2
    assert sddmm.auto_split_k(96, 16384, 132) == 1  # 2 or 3 slices would start a second partial wave
    assert sddmm.auto_split_k(144, 16384, 132) == 2  # 1.09 waves: 3 balanced waves of half tiles beat 2
    assert sddmm.auto_split_k(264, 16384, 132) == 1  # 2 x SMs: not split
    assert sddmm.auto_split_k(1, 16384, 132) == sddmm.SPLIT_K_MAX
    assert sddmm.auto_split_k(36, 2048, 132) == 2  # at least 1024 tokens per slice
    assert sddmm.auto_split_k(36, 1000, 132) == 1
    assert sddmm.auto_split_k(36, 16384, None) == 1  # CPU / interpreter: no SM count, no split
    for tiles in range(1, 264):  # never more slices than the cap, never a split of a grid of 2 x SMs
        assert 1 <= sddmm.auto_split_k(tiles, 16384, 132) <= sddmm.SPLIT_K_MAX


class _RecordingTuner:
    """Stands in for the GPU tuner (the interpreter cannot time): records the candidates, picks one by index."""

    def __init__(self, index):
        self.index, self.configs = index, None

    def pick(self, key, configs, launch):
        self.configs = list(configs)
        return self.configs[self.index]


def test_split_k_is_a_tuner_candidate_on_small_grids(monkeypatch):
    """With an SM count (as on a GPU) and a grid below 2 x SMs, the tuner gets each tile config with and without
    split-K; the split candidate computes the right thing."""
    tuner = _RecordingTuner(-1)
    monkeypatch.setattr(sddmm, "_TUNER", tuner)
    monkeypatch.setattr(sddmm, "_sm_count", lambda device: 132)
    O, I, T = 67, 131, 2048  # 4 tiles of 64x128, at most 2048 // 1024 = 2 slices: auto_split_k = 2
    mask = _mask((O, I), 0.3)
    layout = MaskLayout.from_bool(mask)
    dy, x = torch.randn(T, O, device=DEVICE), torch.randn(T, I, device=DEVICE)
    out = sddmm.masked_weight_grad_unstructured(dy, x, layout, out=_nan(layout.nnz))
    plain = sddmm.dw_configs(torch.float32, sddmm._input_precision(torch.float32))
    assert tuner.configs[: len(plain)] == plain
    assert tuner.configs[len(plain)] == dict(plain[0], SPLIT=True)
    _check_dw(out, dy, x, mask, torch.float32)
    # an explicit split_k is used as given: no split candidates, no panel fallback
    sddmm.masked_weight_grad_unstructured(dy, x, layout, split_k=3)
    assert tuner.configs == plain
    # block layouts: no split vs auto_split_k slices of the active tiles
    bmask = _block_mask(O, I, 64, 1.0)
    blayout = MaskLayout.from_bool(bmask, block_size=64)
    out = sddmm.masked_weight_grad_blocks(dy, x, blayout, out=_nan(blayout.nnz))
    assert tuner.configs == [1, 2]
    _check_dw(out, dy, x, bmask, torch.float32)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (full-size tiles, compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [None, 1, 2, 3, 7])
def test_gpu_split_k_full_size(dtype, split_k):
    """Split-K on the compiled kernels at a base125m-like small grid (36 tiles of 128x128), odd token count."""
    O, I, T = 768, 768 + 13, 16384 + 93
    mask = _mask((O, I), 0.3)
    layout = MaskLayout.from_bool(mask)
    dy = torch.randn(T, O, device=DEVICE).to(dtype)
    x = torch.randn(T, I, device=DEVICE).to(dtype)
    out = sddmm.masked_weight_grad(dy, x, layout, out=_nan(layout.nnz), split_k=split_k)
    _check_dw(out, dy, x, mask, dtype)
    again = sddmm.masked_weight_grad(dy, x, layout, split_k=split_k)
    assert torch.equal(out, again)  # deterministic: no atomics, fixed reduction order


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


# ---------------------------------------------------------------- multi-tensor masked AdamW
# (shape, density, master?): an empty and a full mask, 1-D / 2-D / 3-D, nnz below, at and above a chunk (BLOCK 256)
MULTI = [((67, 131), 0.3, False), ((37,), 0.5, True), ((40, 50), 0.0, False), ((16, 16), 1.0, False),
         ((30, 300), 0.2, True), ((5, 7, 3), 0.4, True), ((3, 600), 1.0, True)]


def _multi_entries(dense_dtype, n_dense=2):
    """Masked entries (bf16 weights need a master) plus fp32 densely trained parameters; a reference copy."""
    entries, refs, masks = [], [], []
    for shape, density, with_master in MULTI:
        mask = _mask(shape, density)
        layout = MaskLayout.from_bool(mask)
        with_master = with_master or dense_dtype != torch.float32
        dense = torch.randn(shape, device=DEVICE).to(dense_dtype)
        master = dense[mask].float() if with_master else None
        state = [torch.zeros(layout.nnz, device=DEVICE), torch.rand(layout.nnz, device=DEVICE)]
        entries.append([dense, master, None, *state, layout])
        refs.append([dense.clone(), master.clone() if with_master else None, None, *(t.clone() for t in state),
                     layout])
        masks.append(mask)
    for shape in [(13, 17), (300,)][:n_dense]:
        p = torch.randn(shape, device=DEVICE)
        state = [torch.randn(shape, device=DEVICE), torch.rand(shape, device=DEVICE)]
        entries.append([p, None, None, *state, None])
        refs.append([p.clone(), None, None, *(t.clone() for t in state), None])
        masks.append(None)
    return entries, refs, masks


def _step_multi(entries, refs, step, cache, hyper):
    grads = [torch.randn(e[0].numel() if e[5] is None else e[5].nnz, device=DEVICE).view(
        e[0].shape if e[5] is None else (-1,)) for e in entries]
    masked_adamw.masked_adamw_multi_([kernels.AdamWEntry(*e[:2], g, *e[3:]) for e, g in zip(entries, grads)],
                                     step=step, cache=cache, **hyper)
    reference.masked_adamw_multi_([kernels.AdamWEntry(*e[:2], g, *e[3:]) for e, g in zip(refs, grads)],
                                  step=step, **hyper)


def _check_multi(entries, refs, masks, frozen):
    for e, r, mask, fz in zip(entries, refs, masks, frozen):
        for got, want in zip((e[1], e[3], e[4]), (r[1], r[3], r[4])):
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        dense, dt = e[0], e[0].dtype
        assert not dense.isnan().any()
        rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dt]
        torch.testing.assert_close(dense.float(), r[0].float(), rtol=rtol, atol=1e-6)
        if mask is not None:  # the complement is never written
            assert torch.equal(dense[~mask].view(BITS[dt]), fz.view(BITS[dt]))


@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16])
def test_masked_adamw_multi_matches_per_tensor(monkeypatch, dense_dtype):
    """One multi-tensor call per step == the per-tensor reference, over 3 steps, for tensors of different shapes and
    densities (empty and full masks, with and without master, densely trained parameters)."""
    monkeypatch.setattr(masked_adamw, "compact_config", lambda: dict(BLOCK=256, num_warps=4))  # full + tail chunks
    entries, refs, masks = _multi_entries(dense_dtype)
    frozen = [e[0][~m].clone() if m is not None else None for e, m in zip(entries, masks)]
    for e, m in zip(entries, masks):  # poisoned: the master must be written at every masked entry
        if m is not None and e[1] is not None:
            e[0][m] = float("nan")
    cache = {}
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    for step in (1, 2, 3):
        _step_multi(entries, refs, step, cache, hyper)
    _check_multi(entries, refs, masks, frozen)
    assert len(cache) == 1  # one plan for the group, reused every step


def test_masked_adamw_multi_reuses_and_rebuilds_tables(monkeypatch):
    """Address tables are rebuilt exactly when an address changes (new gradients, state loaded from a checkpoint)."""
    monkeypatch.setattr(masked_adamw, "compact_config", lambda: dict(BLOCK=256, num_warps=4))
    entries, refs, masks = _multi_entries(torch.float32)
    frozen = [e[0][~m].clone() if m is not None else None for e, m in zip(entries, masks)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
    cache = {}
    grads = [torch.randn(e[0].numel() if e[5] is None else e[5].nnz, device=DEVICE).view(
        e[0].shape if e[5] is None else (-1,)) for e in entries]

    def step(n, grads):
        masked_adamw.masked_adamw_multi_([kernels.AdamWEntry(*e[:2], g, *e[3:]) for e, g in zip(entries, grads)],
                                         step=n, cache=cache, **hyper)
        reference.masked_adamw_multi_([kernels.AdamWEntry(*e[:2], g, *e[3:]) for e, g in zip(refs, grads)],
                                      step=n, **hyper)
        (plan,) = cache.values()
        return [b.tables for b in plan.batches]

    t1 = step(1, grads)
    for g in grads:  # same gradient tensors refilled in place: nothing to rebuild
        g.normal_()
    t2 = step(2, grads)
    assert all(a is b for a, b in zip(t1, t2))
    t3 = step(3, [g.clone() for g in grads])  # new gradient tensors
    assert not any(a is b for a, b in zip(t2, t3))
    for e in entries:  # state replaced by new tensors (as load_state_dict does)
        e[3], e[4] = e[3].clone(), e[4].clone()
    t4 = step(4, grads)
    assert not any(a is b for a, b in zip(t3, t4))
    _check_multi(entries, refs, masks, frozen)


def test_masked_adamw_multi_batches_the_update_buffer(monkeypatch):
    """Weights without a master share a transient update buffer; over the cap the entries go in several batches."""
    monkeypatch.setattr(masked_adamw, "UPDATE_BUFFER_ENTRIES", 600)
    entries, refs, masks = _multi_entries(torch.float32)
    frozen = [e[0][~m].clone() if m is not None else None for e, m in zip(entries, masks)]
    cache = {}
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    for step in (1, 2):
        _step_multi(entries, refs, step, cache, hyper)
    (plan,) = cache.values()
    # no-master entries with nnz: ~2630 (67x131 at 0.3) and 256 (16x16 full): the cap is the largest entry
    assert len(plan.batches) == 2
    cap = max(e[5].nnz + 4 for e in entries if e[5] is not None and e[1] is None)
    assert all(b.update_entries <= cap for b in plan.batches)
    _check_multi(entries, refs, masks, frozen)


def test_masked_adamw_multi_dense_params_not_fp32_use_torch():
    """A densely trained bf16 parameter (or a non-contiguous one) is stepped by torch ops, like the reference."""
    p = torch.randn(9, 11, device=DEVICE).to(torch.bfloat16)
    q = torch.randn(11, 9, device=DEVICE).T  # non-contiguous fp32
    mask = _mask((20, 40), 0.5)
    layout = MaskLayout.from_bool(mask)
    w = torch.randn(20, 40, device=DEVICE)
    tensors = [[p, None, torch.randn(9, 11, device=DEVICE), torch.zeros(9, 11, device=DEVICE),
                torch.zeros(9, 11, device=DEVICE), None],
               [q, None, torch.randn(9, 11, device=DEVICE), torch.zeros(9, 11, device=DEVICE),
                torch.zeros(9, 11, device=DEVICE), None],
               [w, None, torch.randn(layout.nnz, device=DEVICE), torch.zeros(layout.nnz, device=DEVICE),
                torch.zeros(layout.nnz, device=DEVICE), layout]]
    refs = [[t.clone() if isinstance(t, torch.Tensor) else t for t in e] for e in tensors]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    masked_adamw.masked_adamw_multi_([kernels.AdamWEntry(*e) for e in tensors], **hyper)
    reference.masked_adamw_multi_([kernels.AdamWEntry(*e) for e in refs], **hyper)
    for e, r in zip(tensors, refs):
        torch.testing.assert_close(e[0].float(), r[0].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e[3], r[3], rtol=1e-5, atol=1e-6)


def test_masked_adamw_multi_errors():
    mask = _mask((8, 40), 0.5)
    layout = MaskLayout.from_bool(mask)
    n = layout.nnz
    good = kernels.AdamWEntry(torch.randn(8, 40, device=DEVICE), None, torch.randn(n, device=DEVICE),
                              torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE), layout)
    hyper = dict(lr=1e-2, beta2=0.95, eps=1e-8, weight_decay=0.1)
    with pytest.raises(ValueError, match="beta1 > 0.5"):
        masked_adamw.masked_adamw_multi_([good], beta1=0.4, step=1, **hyper)
    with pytest.raises(ValueError, match="1-based"):
        masked_adamw.masked_adamw_multi_([good], beta1=0.9, step=0, **hyper)
    with pytest.raises(ValueError, match="grad"):  # a gradient of the wrong size
        masked_adamw.masked_adamw_multi_([good._replace(grad=torch.randn(n + 1, device=DEVICE))], beta1=0.9, step=1,
                                         **hyper)
    with pytest.raises(ValueError, match="needs fp32"):  # bf16 weight without a master
        masked_adamw.masked_adamw_multi_([good._replace(dense=good.dense.to(torch.bfloat16))], beta1=0.9, step=1,
                                         **hyper)
    with pytest.raises(ValueError, match="master must be None"):
        masked_adamw.masked_adamw_multi_([good._replace(layout=None, master=good.grad)], beta1=0.9, step=1, **hyper)
    cache = {}  # a gradient that changes size on a later step is caught by the cheap per-step check too
    masked_adamw.masked_adamw_multi_([good], beta1=0.9, step=1, cache=cache, **hyper)
    with pytest.raises(ValueError, match="grad must be a contiguous fp32"):
        masked_adamw.masked_adamw_multi_([good._replace(grad=torch.randn(n, device=DEVICE).to(torch.float16))],
                                         beta1=0.9, step=2, cache=cache, **hyper)


def test_masked_adamw_multi_dispatch():
    """The public op reaches the kernels under PMP_KERNELS=triton (autouse fixture) and skips empty lists."""
    kernels.masked_adamw_multi_([], lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1)
    mask = _mask((8, 40), 0.5)
    layout = MaskLayout.from_bool(mask)
    n = layout.nnz
    w = torch.randn(8, 40, device=DEVICE)
    w_ref = w.clone()
    g, m, v = torch.randn(n, device=DEVICE), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    m_ref, v_ref = m.clone(), v.clone()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    kernels.masked_adamw_multi_([kernels.AdamWEntry(w, None, g, m, v, layout)], cache={}, **hyper)
    reference.masked_adamw_(w_ref, None, g, m_ref, v_ref, layout, **hyper)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
