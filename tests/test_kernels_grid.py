"""Launch grids stay within CUDA's limits, and every GPU launch config computes the right thing (run under the
interpreter with each config forced in turn).

CUDA caps grid axis 0 at 2**31 - 1 programs and axes 1-2 at 65,535. Routing and masked AdamW used to put
cdiv(cols, 1024) on axis 1, so a 1-D tensor over ~67 M entries could not launch. The interpreter checks no limit
and runs ~0.6 ms per program (measured here), so a launch past 65,535 column tiles would take ~40 s: the grid
function is tested at that shape directly, and the kernels' 1-D tile decoding with one launch over many column
tiles on a tiny tile.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from pmp.kernels import MaskLayout, masked_adamw, reference, routing, sddmm  # noqa: E402
from pmp.kernels.triton_utils import MAX_GRID_X, elementwise_menu, tile_grid  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# dense weight after a cast of the fp32 master: one ulp of the dense dtype (interpreter bf16 stores truncate)
CAST_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.fixture(autouse=True)
def _triton_dispatch(monkeypatch):
    monkeypatch.setenv("PMP_KERNELS", "triton")


@pytest.mark.parametrize("tile", elementwise_menu(), ids=lambda t: f"{t['BLOCK_R']}x{t['BLOCK_C']}")
@pytest.mark.parametrize("shape", [(1, (1 << 26) + (1 << 20)), (1, 2**31 - 1), (50257, 4096), (4096, 11008)])
def test_grid_is_1d_and_within_cuda_limits(tile, shape):
    rows, cols = shape
    grid = tile_grid(rows, cols, tile["BLOCK_R"], tile["BLOCK_C"])
    assert len(grid) == 1 and 1 <= grid[0] <= MAX_GRID_X
    assert grid[0] == -(-rows // tile["BLOCK_R"]) * -(-cols // tile["BLOCK_C"])


def test_old_grid_would_have_exceeded_axis_1():
    cols = (1 << 26) + (1 << 20)  # a 1-D tensor of 68.2 M entries, the review's probe
    assert -(-cols // 1024) > 65535  # what the 2-D grid put on axis 1
    assert tile_grid(1, cols, 1, 1024) == (-(-cols // 1024),)
    with pytest.raises(ValueError, match="int32"):
        tile_grid(1, 1 << 31, 1, 1024)


def _force_tile(monkeypatch, tile):
    for mod in (routing, masked_adamw):
        monkeypatch.setattr(mod, "elementwise_config", lambda rows, cols, tile=tile: dict(tile))


# a tiny tile gives 38 column tiles per row tile: the 1-D decoding (row tile, column tile) is exercised
TILES = [dict(BLOCK_R=2, BLOCK_C=32, num_warps=4)] + elementwise_menu()


def _shape(tile):
    """Partial tiles in both dims, few programs (the interpreter's cost is per program)."""
    if tile["BLOCK_C"] == 32:
        return (3, 1201)
    return (2 * tile["BLOCK_R"] + 1, 2 * tile["BLOCK_C"] + 37)


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t['BLOCK_R']}x{t['BLOCK_C']}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_routing_every_tile(monkeypatch, tile, dtype):
    _force_tile(monkeypatch, tile)
    shape = _shape(tile)
    mask = torch.rand(shape, device=DEVICE) < 0.3
    layout = MaskLayout.from_bool(mask)
    dense = torch.randn(shape, device=DEVICE).to(dtype)
    assert torch.equal(routing.gather_compact(dense, layout), dense[mask])
    target = dense.clone()
    target[mask] = float("nan")
    before = target.clone()
    values = torch.randn(layout.nnz, device=DEVICE)
    routing.scatter_compact_(target, values, layout)
    assert torch.equal(target[~mask].view(BITS[dtype]), before[~mask].view(BITS[dtype]))
    torch.testing.assert_close(target[mask].float(), values.to(dtype).float(), rtol=CAST_RTOL[dtype], atol=0)


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t['BLOCK_R']}x{t['BLOCK_C']}")
@pytest.mark.parametrize("with_master", [True, False])
def test_masked_adamw_every_tile(monkeypatch, tile, with_master):
    _force_tile(monkeypatch, tile)
    monkeypatch.setattr(masked_adamw, "compact_config", lambda: dict(BLOCK=256, num_warps=4))  # several programs
    shape = _shape(tile)
    mask = torch.rand(shape, device=DEVICE) < 0.3
    layout = MaskLayout.from_bool(mask)
    dense = torch.randn(shape, device=DEVICE)
    dense_ref = dense.clone()
    frozen = dense[~mask].clone()
    master = dense[mask].clone() if with_master else None
    master_ref = master.clone() if with_master else None
    m, v = torch.zeros(layout.nnz, device=DEVICE), torch.zeros(layout.nnz, device=DEVICE)
    m_ref, v_ref = m.clone(), v.clone()
    for step in (1, 2):
        g = torch.randn(layout.nnz, device=DEVICE)
        masked_adamw.masked_adamw_(dense, master, g, m, v, layout, step=step, **HYPER)
        reference.masked_adamw_(dense_ref, master_ref, g, m_ref, v_ref, layout, step=step, **HYPER)
    torch.testing.assert_close(dense, dense_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(dense[~mask].view(torch.int32), frozen.view(torch.int32))


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t['BLOCK_R']}x{t['BLOCK_C']}")
def test_masked_adamw_multi_every_tile(monkeypatch, tile):
    """The multi-tensor dense write decodes (tensor, tile) from its work table with each GPU tile: two weights of
    different shapes per launch, one fp32 without master (update applied) and bf16 / fp32 ones with a master."""
    _force_tile(monkeypatch, tile)
    monkeypatch.setattr(masked_adamw, "compact_config", lambda: dict(BLOCK=256, num_warps=4))
    specs = [(_shape(tile), torch.float32, False), ((_shape(tile)[0] + 2, _shape(tile)[1] - 5), torch.float32, False),
             (_shape(tile), torch.bfloat16, True), ((_shape(tile)[0] + 1, _shape(tile)[1] + 9), torch.bfloat16, True),
             (_shape(tile), torch.float32, True)]
    got, want, masks = [], [], []
    for shape, dtype, with_master in specs:
        mask = torch.rand(shape, device=DEVICE) < 0.3
        layout = MaskLayout.from_bool(mask)
        dense = torch.randn(shape, device=DEVICE).to(dtype)
        master = dense[mask].float() if with_master else None
        m, v = torch.zeros(layout.nnz, device=DEVICE), torch.zeros(layout.nnz, device=DEVICE)
        got.append([dense, master, None, m, v, layout])
        want.append([dense.clone(), master.clone() if with_master else None, None, m.clone(), v.clone(), layout])
        masks.append(mask)
    frozen = [e[0][~mk].clone() for e, mk in zip(got, masks)]
    cache = {}
    for step in (1, 2):
        grads = [torch.randn(e[5].nnz, device=DEVICE) for e in got]
        masked_adamw.masked_adamw_multi_([reference.AdamWEntry(*e[:2], g, *e[3:]) for e, g in zip(got, grads)],
                                         step=step, cache=cache, **HYPER)
        for e, g in zip(want, grads):
            reference.masked_adamw_(e[0], e[1], g, e[3], e[4], e[5], step=step, **HYPER)
    for e, r, mk, fz in zip(got, want, masks, frozen):
        dt = e[0].dtype
        torch.testing.assert_close(e[0].float(), r[0].float(), rtol=CAST_RTOL[dt], atol=1e-6)
        torch.testing.assert_close(e[3], r[3], rtol=1e-5, atol=1e-6)
        assert torch.equal(e[0][~mk].view(BITS[dt]), fz.view(BITS[dt]))
    # one dense launch per (with master?, dtype, tile): 3 here, whatever the number of weights
    (plan,) = cache.values()
    assert [len(b.dense) for b in plan.batches] == [3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(len(sddmm.dw_configs(torch.bfloat16, interpreter=False))))
def test_sddmm_every_gpu_config(monkeypatch, dtype, index):
    """Each tuned GPU config (tile shape, GROUP_M, contiguous-store epilogue) computed by the interpreter."""
    configs = sddmm.dw_configs(dtype, "tf32", interpreter=False)
    if index >= len(configs):
        pytest.skip(f"{dtype} has {len(configs)} configs")
    cfg = dict(configs[index], num_stages=1)
    monkeypatch.setattr(sddmm, "dw_configs", lambda *a, **k: [cfg])
    O, I, T = 131, 300, 70  # partial tiles in both dims, several tiles with 64-wide rows
    mask = torch.rand(O, I, device=DEVICE) < 0.3
    layout = MaskLayout.from_bool(mask)
    dy = torch.randn(T, O, device=DEVICE).to(dtype)
    x = torch.randn(T, I, device=DEVICE).to(dtype)
    out = sddmm.masked_weight_grad_unstructured(dy, x, layout,
                                                out=torch.full((layout.nnz,), float("nan"), device=DEVICE))
    truth = (dy.double().T @ x.double())[mask]
    assert not out.isnan().any()
    rtol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=rtol * float(truth.abs().max().clamp_min(1.0)))


@pytest.mark.parametrize("rows_per_panel", [1, 7, 1000])
def test_sddmm_panel_fallback(monkeypatch, rows_per_panel):
    """The torch.mm-over-row-panels fallback gathers each panel into the right compact slice (the fp32-output
    torch.mm it uses on CUDA is replaced by an fp32 matmul on CPU)."""
    monkeypatch.setattr(sddmm, "_mm_fp32", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(sddmm, "_PANEL_BYTES", 4 * 300 * rows_per_panel)
    monkeypatch.setattr(sddmm, "dw_configs", lambda *a, **k: [sddmm._PANELS])
    O, I, T = 131, 300, 70
    mask = torch.rand(O, I, device=DEVICE) < 0.3
    layout = MaskLayout.from_bool(mask)
    dy, x = torch.randn(T, O, device=DEVICE), torch.randn(T, I, device=DEVICE)
    out = sddmm.masked_weight_grad_unstructured(dy, x, layout,
                                                out=torch.full((layout.nnz,), float("nan"), device=DEVICE))
    truth = (dy.double().T @ x.double())[mask]
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=1e-4 * float(truth.abs().max()))
