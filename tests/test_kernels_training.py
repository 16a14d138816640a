"""A tiny model trained with PMP gives the same per-step losses on the Triton path (interpreted on CPU) and on
the torch reference path: the kernels drop in behind the trainer's calls with identical semantics."""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from pmp import kernels  # noqa: E402
from pmp.config import ModelConfig  # noqa: E402
from pmp.kernels import MaskLayout  # noqa: E402
from pmp.masked_optim import MaskedAdamW  # noqa: E402
from pmp.masked_state import MaskedModel  # noqa: E402
from pmp.model import build_model, hf_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(mode: str, monkeypatch, steps: int = 6) -> tuple[list[float], dict]:
    monkeypatch.setenv("PMP_KERNELS", mode)
    cfg = hf_config(ModelConfig(preset="tiny", hidden_size=32, num_heads=4, intermediate_size=48, num_layers=1),
                    67, 0, 0, 32)
    model = build_model(cfg, 11).to(DEVICE)
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=g) < 0.4 for n, p in model.named_parameters()}
    mm = MaskedModel(model, {n: MaskLayout.from_bool(m).to(DEVICE) for n, m in masks.items()}, master=False)
    opt = MaskedAdamW(mm, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for i in range(steps):
        b = torch.randint(0, 67, (2, 19), generator=torch.Generator().manual_seed(100 + i % 2)).to(DEVICE)
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mm.trainable_parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    mm.detach()
    return losses, {n: p.detach().cpu() for n, p in model.named_parameters()}, masks


def test_kernel_path_matches_torch_path(monkeypatch):
    ref_losses, ref_w, masks = run("torch", monkeypatch)
    assert kernels.backend(torch.zeros(1, device=DEVICE)) == "torch"
    tri_losses, tri_w, _ = run("triton", monkeypatch)
    assert kernels.backend(torch.zeros(1, device=DEVICE)) == "triton"
    # fp32 everywhere; the kernels accumulate in another order than torch's matmul: a few ulp per step
    torch.testing.assert_close(torch.tensor(tri_losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert ref_losses[-1] < ref_losses[0]
    for n in ref_w:
        torch.testing.assert_close(tri_w[n], ref_w[n], rtol=1e-4, atol=1e-5)
        assert torch.equal(tri_w[n][~masks[n]], ref_w[n][~masks[n]])  # complement identical on both paths
