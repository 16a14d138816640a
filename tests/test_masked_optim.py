"""MaskedAdamW's multi-tensor step: the Triton path (one `masked_adamw_multi_` call per param group and step, a
constant number of launches) equals the torch path tensor by tensor, and the checkpoint format is unchanged.

On CPU the Triton path runs under TRITON_INTERPRET=1 (conftest.py); gradients are set by hand so both paths see
identical inputs.
"""

import io
import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

import pmp.masked_optim  # noqa: E402
from pmp.kernels import MaskLayout, masked_adamw  # noqa: E402
from pmp.masked_optim import MaskedAdamW  # noqa: E402
from pmp.masked_state import MaskedModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
# parameter -> mask density; absent parameters train densely. An empty and a full mask, linear and generic paths.
DENSITIES = {"0.weight": 0.3, "0.bias": 0.0, "1.weight": 0.5, "2.weight": 1.0, "3.weight": 0.2}
# bf16 weights: every parameter masked (with an fp32 master); densely trained bf16 parameters would get bf16
# gradients, which neither path steps against fp32 moments
ALL_MASKED = {**DENSITIES, "1.bias": 0.6, "2.bias": 0.5}


def _model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 70), nn.LayerNorm(70), nn.Linear(70, 33), nn.Embedding(50, 24))
    return model.to(DEVICE, dtype)


def _setup(dtype, master, seed=1):
    model = _model(dtype)
    g = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    densities = ALL_MASKED if dtype != torch.float32 else DENSITIES
    layouts = {n: MaskLayout.from_bool(torch.rand(named[n].shape, generator=g) < d).to(DEVICE)
               for n, d in densities.items()}
    mm = MaskedModel(model, layouts, master=master)
    return model, mm, MaskedAdamW(mm, **HYPER)


def _set_grads(mm, seed):
    """The same gradients on every setup: compact ones for masked tensors, dense fp32 ones otherwise."""
    g = torch.Generator().manual_seed(seed)
    for t in mm.tensors:
        t.compact.grad = torch.randn(t.layout.nnz, generator=g).to(DEVICE)
    for p in mm.dense_trained.values():
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)


def _snapshot(model, mm, opt):
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masters = {t.name: t.compact.detach().clone() for t in mm.tensors if t.has_master}
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for i, s in opt.state_dict()["state"].items()}
    return weights, masters, state


def _assert_close(a, b, dense_dtype):
    rtol = 1e-2 if dense_dtype == torch.bfloat16 else 1e-5  # interpreter bf16 stores truncate: one bf16 ulp
    for n in a[0]:
        torch.testing.assert_close(a[0][n].float(), b[0][n].float(), rtol=rtol, atol=1e-6, msg=n)
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=1e-5, atol=1e-6, msg=n)
    assert a[2].keys() == b[2].keys()
    for i in a[2]:
        assert a[2][i].keys() == b[2][i].keys() and a[2][i]["step"] == b[2][i]["step"]
        for k in a[2][i]:
            if k != "step":
                torch.testing.assert_close(a[2][i][k], b[2][i][k], rtol=1e-5, atol=1e-6)


class _CountLaunches:
    """Wraps a Triton kernel to count its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)],
                         ids=["fp32", "fp32-master", "bf16-master"])
def test_multi_tensor_step_matches_per_tensor_torch_path(monkeypatch, dtype, master):
    """3 steps on the Triton path (one multi-tensor call per group) == the torch path (per tensor, as before)."""
    monkeypatch.setattr(masked_adamw, "compact_config", lambda: dict(BLOCK=256, num_warps=4))  # full + tail chunks
    torch_run, triton_run = _setup(dtype, master), _setup(dtype, master)
    calls = []
    real = pmp.masked_optim.masked_adamw_multi_
    monkeypatch.setattr(pmp.masked_optim, "masked_adamw_multi_", lambda entries, **kw: (calls.append(len(entries)),
                                                                                         real(entries, **kw)))
    compact = _CountLaunches(masked_adamw._adamw_compact_multi_kernel)
    dense = _CountLaunches(masked_adamw._dense_multi_kernel)
    monkeypatch.setattr(masked_adamw, "_adamw_compact_multi_kernel", compact)
    monkeypatch.setattr(masked_adamw, "_dense_multi_kernel", dense)
    for step in range(3):
        for mode, (_, mm, opt) in (("torch", torch_run), ("triton", triton_run)):
            monkeypatch.setenv("PMP_KERNELS", mode)
            _set_grads(mm, seed=10 + step)
            opt.step()
            opt.zero_grad(set_to_none=True)
    _assert_close(_snapshot(*triton_run), _snapshot(*torch_run), dtype)
    n_params = sum(len(g["params"]) for g in triton_run[2].param_groups)
    # one call per param group and step on each path, covering every parameter
    assert calls == [len(g["params"]) for g in triton_run[2].param_groups] * 6 and sum(calls[:2]) == n_params
    # Triton path: one compact launch per group; one dense launch per (with master?, dtype, tile) class of the
    # group's masked weights (the interpreter's tiles follow the shape; a GPU has 4 tiles), not one per weight
    groups = triton_run[2].param_groups
    assert compact.launches == 3 * len(groups)
    plans = [plan for cache in triton_run[2]._plans.values() for plan in cache.values()]
    assert len(plans) == len(groups)
    assert dense.launches == 3 * sum(len(b.dense) for plan in plans for b in plan.batches)
    # the complement of every masked weight never moved
    init = _model(dtype)
    named = dict(init.named_parameters())
    for t in triton_run[1].tensors:
        mask = t.layout.to_bool().reshape(t.dense.shape)
        assert torch.equal(t.dense.detach()[~mask], named[t.name].detach()[~mask])


def test_state_dict_round_trip_and_format(monkeypatch):
    """The state format is the per-tensor one (step, exp_avg, exp_avg_sq[, master]); a saved state loaded into an
    optimizer that already cached its launch tables (all state tensors replaced) continues exactly."""
    monkeypatch.setenv("PMP_KERNELS", "triton")
    a, b = _setup(torch.float32, False), _setup(torch.float32, False)
    for step in range(2):
        for _, mm, opt in (a, b):
            _set_grads(mm, seed=20 + step)
            opt.step()
            opt.zero_grad(set_to_none=True)
    buf = io.BytesIO()
    torch.save(a[2].state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    masked = {id(t.compact): t for t in a[1].tensors}
    params = [p for g in a[2].param_groups for p in g["params"]]
    for i, st in saved["state"].items():
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and st["step"] == 2
        t = masked.get(id(params[i]))
        assert st["exp_avg"].shape == ((t.layout.nnz,) if t is not None else params[i].shape)
    # a torch-path optimizer writes the same structure
    monkeypatch.setenv("PMP_KERNELS", "torch")
    c = _setup(torch.float32, False)
    _set_grads(c[1], seed=20)
    c[2].step()
    ref = c[2].state_dict()["state"]
    assert {i: set(s) for i, s in ref.items()} == {i: set(s) for i, s in saved["state"].items()}
    assert all(ref[i][k].shape == saved["state"][i][k].shape for i in ref for k in ("exp_avg", "exp_avg_sq"))
    monkeypatch.setenv("PMP_KERNELS", "triton")
    b[2].load_state_dict(saved)  # new state tensors: b's cached address tables must be rebuilt
    for _, mm, opt in (a, b):
        _set_grads(mm, seed=30)
        opt.step()
    sa, sb = _snapshot(*a), _snapshot(*b)
    for n in sa[0]:
        assert torch.equal(sa[0][n], sb[0][n]), n
    for i in sa[2]:
        assert all(torch.equal(sa[2][i][k], sb[2][i][k]) for k in ("exp_avg", "exp_avg_sq"))


def test_params_at_different_steps_are_stepped_with_their_own_bias_correction(monkeypatch):
    """A parameter without a gradient skips a step, so its step count falls behind: its group is split into one
    call per step value, each with its own bias correction, matching the torch path."""
    torch_run, triton_run = _setup(torch.float32, False), _setup(torch.float32, False)
    for step in range(3):
        for mode, (_, mm, opt) in (("torch", torch_run), ("triton", triton_run)):
            monkeypatch.setenv("PMP_KERNELS", mode)
            _set_grads(mm, seed=40 + step)
            if step == 0:
                mm.tensors[0].compact.grad = None  # 0.weight skips the first step
            opt.step()
            opt.zero_grad(set_to_none=True)
    snap_t, snap_r = _snapshot(*triton_run), _snapshot(*torch_run)
    assert sorted({s["step"] for s in snap_t[2].values()}) == [2, 3]
    _assert_close(snap_t, snap_r, torch.float32)
