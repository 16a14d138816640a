"""Ahead-of-time compile check: every kernel in every launch config the GPU dispatch can pick compiles for sm_90a
and sm_80 with triton's bundled ptxas (no GPU needed), fits the target's shared memory, and -- for the per-step
kernels -- does not spill registers. Configs that cannot compile are refused with a ValueError.

The compile runs ``python -m pmp.kernels.compile_check`` in a subprocess: under TRITON_INTERPRET=1 (set by
conftest.py on CPU machines) ``triton.jit`` returns interpreted functions, which cannot be compiled. 166 compiles on
2 cores (126 before split-K and the multi-tensor AdamW): 20 s (idle) to 43 s (cores shared, load ~5) for 126 with an
empty triton cache, ~13 s with a warm one.
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from pmp.kernels import MaskLayout, compile_check, sddmm  # noqa: E402
from pmp.kernels.mask_layout import _SUPPORTED_BLOCK_SIZES  # noqa: E402
from pmp.kernels.triton_utils import elementwise_menu  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not PTXAS.exists():
        pytest.skip(f"triton's bundled ptxas is missing ({PTXAS})")
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "pmp.kernels.compile_check", "--include-refused", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    print(proc.stdout)  # the resource table: registers / spills / shared memory per kernel and target (pytest -s)
    assert out.exists(), f"compile check crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())["results"]


def test_every_dispatch_config_compiles_within_limits(results):
    dispatch = [r for r in results if r["dispatch"]]
    bad = [f"{r['kernel']} [{r['config']}] {r['target']}: {'; '.join(r['problems'])}"
           for r in dispatch if r["problems"]]
    assert not bad, "\n".join(bad)
    assert {r["target"] for r in dispatch} == {"sm_90a", "sm_80"}
    kernels = {r["kernel"] for r in dispatch}
    assert kernels == {"sddmm", "block_sddmm", "split_reduce", "gather", "scatter", "adamw_compact",
                       "adamw_apply_update", "adamw_compact_multi", "adamw_dense_multi", "pack", "unpack",
                       "row_popcount"}
    for r in dispatch:  # the hot kernels all reported their resources
        assert r["registers"] is not None and r["shared"] <= r["shared_limit"]


def test_specs_cover_the_dispatch_menus():
    """The compile check's specs are built from the dispatch's own config functions, so none can be missed."""
    specs = compile_check.dispatch_specs()
    for dtype, precision, dt in ((torch.bfloat16, "tf32", "bf16"), (torch.float32, "ieee", "fp32")):
        n = len([s for s in specs if s.kernel == "sddmm" and s.config.startswith(f"{dt} {precision}") and s.aligned])
        assert n == len(sddmm.dw_configs(dtype, precision, interpreter=False))
    assert len([s for s in specs if s.kernel == "adamw_apply_update"]) == len(elementwise_menu())
    blocks = {int(s.config.split("BLOCK=")[1].split()[0]) for s in specs if s.kernel == "block_sddmm"}
    assert blocks == set(sddmm.BLOCK_SIZES) == set(_SUPPORTED_BLOCK_SIZES) - {0}
    # multi-tensor AdamW: the dense write for every tile of the menu (3 dense dtypes + the fp32 update variant)
    assert len([s for s in specs if s.kernel == "adamw_dense_multi"]) == 4 * len(elementwise_menu())


def test_split_k_runs_the_compiled_dw_binaries():
    """Split-K adds no dW specs: the token slice (K_SLICE) and the workspace stride (N) are runtime arguments of
    the same kernels, so the compiled no-split binary is the split binary; only the reduction is new."""
    for kernel in (sddmm._sddmm_kernel, sddmm._block_sddmm_kernel):
        params = inspect.signature(kernel.fn).parameters  # .fn: the python function, jitted or interpreted
        assert all("constexpr" not in str(params[name].annotation) for name in ("K_SLICE", "N"))
        assert "constexpr" in str(params["UPCAST"].annotation)
    specs = compile_check.dispatch_specs()
    assert {s.config for s in specs if s.kernel == "split_reduce"} == {compile_check._label(
        sddmm.split_reduce_config())}


def test_planted_block_256_is_caught_by_the_check(results):
    planted = [r for r in results if r["kernel"] == "block_sddmm" and "BLOCK=256" in r["config"]]
    assert planted and not any(r["dispatch"] for r in planted)
    sm90 = [r for r in planted if r["target"] == "sm_90a"]
    assert sm90 and all(any("shared memory" in p for p in r["problems"]) for r in sm90)
    assert all(r["spill_stores"] > 0 for r in planted)


def test_block_256_refused_with_a_clear_error():
    mask = torch.ones(512, 512, dtype=torch.bool)
    with pytest.raises(ValueError, match="256 needs 256 KiB"):
        MaskLayout.from_bool(mask, block_size=256)
    packed = MaskLayout.from_bool(mask).packed_bytes()
    with pytest.raises(ValueError, match="block_size must be one of"):
        MaskLayout.from_packed(packed, (512, 512), block_size=256)
    with pytest.raises(ValueError, match="shared memory"):
        sddmm.block_config(256, torch.bfloat16)
    # a layout built around the validation (e.g. by hand) is still refused by the dispatch, before any launch
    good = MaskLayout.from_bool(mask, block_size=128)
    bad = MaskLayout(tuple(mask.shape), good.words, good.word_prefix, good.nnz, 256,
                     torch.zeros(4, 2, dtype=torch.int32))
    dy = torch.randn(8, 512)
    with pytest.raises(ValueError, match="block sizes"):
        sddmm.masked_weight_grad_blocks(dy, dy, bad)
