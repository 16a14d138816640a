"""Curvature audit attacks (`pmp.eval.recovery_curvature`): the Hutchinson estimate against the explicit Hessian
diagonal, finite differences against double backprop, the release left bit-exact, and bad settings."""

import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, LlamaConfig

from pmp.cli import main
from pmp.eval.config import AuditSettings
from pmp.eval.recovery_curvature import curvature_scores, hutchinson, lm_loss_fn
from pmp.eval.release_weights import Release


def _tiny_lm(dtype=torch.float64, seed=0) -> torch.nn.Module:
    """A 1-layer Llama of 244 parameters: small enough to form its whole Hessian."""
    cfg = LlamaConfig(vocab_size=12, hidden_size=4, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=16, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # norm weights off 1.0, so no entry's curvature vanishes by symmetry alone
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    """A separable loss has a diagonal Hessian: z_i^2 = 1, so one probe gives diag H exactly and (Hz)^2 = diag^2."""
    g = torch.Generator().manual_seed(1)
    w = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(),
         "b": torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()}
    c = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in w.items()}

    def loss(p):  # sum c w^2 / 2 + sum w^3 / 6 -> d2L/dw_i^2 = c_i + w_i
        return sum((c[n] * p[n] ** 2 / 2 + p[n] ** 3 / 6).sum() for n in p)

    s = hutchinson(loss, w, 1, torch.Generator().manual_seed(0))
    assert s.probes == 1
    for n, p in w.items():
        diag = (c[n] + p).detach()
        torch.testing.assert_close(s.diag[n], diag, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.row[n], diag ** 2, rtol=1e-12, atol=1e-12)


def test_hutchinson_matches_the_explicit_hessian_diagonal():
    """On a tiny Llama (244 parameters, float64) against torch.autograd.functional.hessian. Hutchinson's error on
    entry i after K probes is (1/K) sum_k sum_{j!=i} H_ij z_ki z_kj: zero mean, sub-Gaussian with standard deviation
    sigma_i = sqrt(sum_{j!=i} H_ij^2 / K). So every entry must lie within 6 sigma_i (a failure chance below 1e-5 for
    all entries together, by the sub-Gaussian tail 2 exp(-18) per entry), and the errors in units of sigma_i must
    have an RMS near 1 (0.91 measured at this seed; the entries share the probes, so the RMS over 236 of them
    scatters by about 0.1): a biased estimate (a wrong diagonal) would blow the first up, a wrong error model the
    second. The probes are seeded, so the test is deterministic."""
    model = _tiny_lm()
    x = torch.randint(0, 12, (2, 8), generator=torch.Generator().manual_seed(2))
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    loss_fn = lm_loss_fn(model, x)

    def flat_loss(v):
        return loss_fn({n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes, strict=True)})

    k = 80
    with sdpa_kernel(SDPBackend.MATH):
        h = torch.autograd.functional.hessian(flat_loss, torch.cat([p.detach().flatten() for p in params.values()]),
                                              vectorize=True)
        s = hutchinson(loss_fn, params, k, torch.Generator().manual_seed(3))
    assert h.shape == (244, 244) and s.probes == k
    diag, row_true = h.diagonal(), (h ** 2).sum(1)
    est = torch.cat([s.diag[n].flatten() for n in names]) / k
    row = torch.cat([s.row[n].flatten() for n in names]) / k
    # embedding rows of tokens absent from x have no gradient and a zero Hessian row: read exactly as 0
    dead = row_true == 0
    assert int(dead.sum()) == 8 and not bool(est[dead].any()) and not bool(row[dead].any())
    live = ~dead
    sigma = (row_true - diag ** 2).clamp_min(1e-30).div(k).sqrt()
    z_err = ((est - diag) / sigma)[live]
    assert float(z_err.abs().max()) < 6.0, float(z_err.abs().max())
    assert 0.7 < float(z_err.pow(2).mean().sqrt()) < 1.3, float(z_err.pow(2).mean().sqrt())
    # the estimate carries information: where |diag H| > 3 sigma it is within 50 % (0.29 measured)
    big = diag.abs() > 3 * sigma
    assert int(big.sum()) > 20 and float(((est - diag)[big] / diag[big]).abs().max()) < 0.5
    # (H z)^2 estimates the squared Hessian row norms from the same products: median |log ratio| 0.10 measured
    assert float((row[live] / row_true[live]).log().abs().median()) < 0.2


def test_finite_difference_curvature_matches_double_backprop():
    """Same probes, H z by central differences of gradients instead of double backprop. HF's LM loss upcasts the
    logits to float32 even in a float64 model, so the gradient differences carry float32 rounding: at eps 1e-4 the
    two agree to ~6e-5 relative (measured; truncation O(eps^2) and rounding O(1e-9 / eps) balance there)."""
    model = _tiny_lm()
    x = torch.randint(0, 12, (2, 8), generator=torch.Generator().manual_seed(2))
    params = dict(model.named_parameters())
    with sdpa_kernel(SDPBackend.MATH):
        s = hutchinson(lm_loss_fn(model, x), params, 3, torch.Generator().manual_seed(5), fd_eps=1e-4)
    assert s.diag_fd is not None and s.probes == 3
    scale = max(float(t.abs().max()) for t in s.diag.values())
    for n in params:
        torch.testing.assert_close(s.diag_fd[n], s.diag[n], rtol=1e-3, atol=1e-3 * scale)
    with sdpa_kernel(SDPBackend.MATH):  # a different probe seed gives a different (noisy) estimate
        other = hutchinson(lm_loss_fn(model, x), params, 3, torch.Generator().manual_seed(6))
    assert any(not torch.allclose(other.diag[n], s.diag[n], rtol=1e-2, atol=1e-3 * scale) for n in params)


def test_curvature_scores_leave_the_release_bit_exact():
    model = _tiny_lm(torch.float32, seed=4)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    before = {n: w.clone() for n, w in weights.items()}
    release = Release(Path("unused"), model.config, model, weights, torch.float32)
    batches = [torch.randint(0, 12, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    scores, info = curvature_scores(release, batches, probes=2, fd_eps=1e-3)
    assert set(scores) == {"hessian_diag", "hessian_row", "hessian_diag_fd"}
    assert info["batches"] == 3 and info["probes"] == 6 and info["tokens"] == 48
    for sc in scores.values():
        assert set(sc) == set(weights)
        for n, t in sc.items():
            assert t.shape == weights[n].shape and bool(torch.isfinite(t).all()) and bool((t >= 0).all())
    assert any(float(t.abs().max()) > 0 for t in scores["hessian_diag"].values())
    for n, w in weights.items():  # functional_call never writes the model's parameters
        assert torch.equal(w, before[n]), n
    # same probe seed -> same scores; a time limit still leaves one probe of one batch
    again, _ = curvature_scores(release, batches, probes=2, fd_eps=1e-3)
    assert all(torch.equal(again["hessian_diag"][n], scores["hessian_diag"][n]) for n in weights)
    _, quick = curvature_scores(release, batches, probes=5, max_seconds=1e-9)
    assert quick["batches"] == 1 and quick["probes"] == 1


def test_bad_curvature_settings(tmp_path, capsys):
    model = _tiny_lm(torch.float32)
    release = Release(Path("unused"), model.config, model, {n: p.detach() for n, p in model.named_parameters()},
                      torch.float32)
    x = [torch.zeros(1, 4, dtype=torch.long)]
    with pytest.raises(ValueError, match="at least 1 probe"):
        curvature_scores(release, x, probes=0)
    with pytest.raises(ValueError, match="at least one batch"):
        curvature_scores(release, [], probes=2)
    for eps in (-1e-3, math.nan):
        with pytest.raises(ValueError, match="finite-difference step must be finite and >= 0"):
            curvature_scores(release, x, probes=1, fd_eps=eps)
    with pytest.raises(ValueError, match="curvature_probes must be >= 1"):
        AuditSettings(curvature_probes=0).validate()
    with pytest.raises(ValueError, match="curvature_batches must be >= 0"):
        AuditSettings(curvature_batches=-1).validate()
    for eps in (-1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match="curvature_fd_eps must be a finite step"):
            AuditSettings(curvature_fd_eps=eps).validate()
    AuditSettings(curvature_batches=0, curvature_probes=1, curvature_fd_eps=1e-3).validate()
    # through the CLI: the settings are checked before any input is read; one error line, exit 2
    assert main(["audit", str(tmp_path / "rel"), "--private", str(tmp_path / "run"), "--curvature-probes", "0"]) == 2
    err = capsys.readouterr().err
    assert "curvature_probes must be >= 1" in err and "Traceback" not in err
