"""Mask secrecy audit: metric arithmetic, a planted leak is found, a random release scores at chance, bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from corpus_fixture import write_corpus
from transformers import AutoConfig

from pmp.cli import main
from pmp.config import load_config
from pmp.eval.audit import run_audit
from pmp.eval.audit_metrics import Sample, auroc, evaluate, precision_at_k
from pmp.eval.audit_truth import load_private
from pmp.eval.config import AuditConfig
from pmp.eval.init_knowledge import init_distribution
from pmp.eval.recovered_mask import recovered_mask, recovered_mask_sparse_attack_inputs
from pmp.eval.recovery_shadow import shadow_scores
from pmp.eval.recovery_weight_stats import init_mixture
from pmp.eval.release_weights import load_release
from pmp.mask import PrivateMask, tensor_kind
from pmp.model import build_model
from pmp.train.trainer import pretrain

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session")
def pinned(tmp_path_factory):
    """A tiny PMP run whose init seed is pinned to 0: its release keeps a seed-0 complement (a planted leak).
    scope=all puts the norms under the mask too, so the norm tell (frozen entries exactly at 1.0) is planted."""
    d = tmp_path_factory.mktemp("audit")
    files = write_corpus(d)
    ov = {"data.corpus": files, "data.cache_dir": str(d / "cache"), "data.seq_len": 32, "data.val_fraction": 0.1,
          "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32,
          "model.intermediate_size": 64, "model.init_seed": 0, "train.steps": 30, "train.batch_size": 4,
          "train.warmup_steps": 3, "train.eval_every": 0, "train.eval_batches": 2, "train.log_every": 5,
          "train.ckpt_every": 0, "train.progress": False, "train.threads": 1, "pmp.min_warmup_steps": 10,
          "pmp.max_warmup_steps": 10, "pmp.density": 0.5, "pmp.scope": "all"}
    with pytest.warns(UserWarning, match="pinned"):
        pretrain(load_config(None, [f"{k}={v}" for k, v in ov.items()]), d / "run")
    return d, d / "run", files.split(",")[0]


def _release_like(run: Path, out: Path, model: torch.nn.Module) -> Path:
    model.save_pretrained(str(out))
    for f in TOKENIZER_FILES:
        shutil.copy(run / "final" / f, out / f)
    return out


# ---------------------------------------------------------------------------------------------- metrics
def test_auroc_hand_made():
    y = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert auroc(torch.zeros(4), y) == 0.5
    # pairs (pos, neg): (1 vs 0) 1, (1 vs 1) 0.5, (2 vs 0) 1, (2 vs 1) 1 -> 3.5 / 4
    assert auroc(torch.tensor([0.0, 1.0, 1.0, 2.0]), y) == 0.875
    assert torch.isnan(torch.tensor(auroc(torch.rand(4), torch.ones(4))))
    g = torch.Generator().manual_seed(0)
    s, lab = torch.randint(0, 5, (300,), generator=g).float(), torch.rand(300, generator=g) < 0.4
    pos, neg = s[lab], s[~lab]
    brute = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert auroc(s, lab) == pytest.approx(float(brute), abs=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 1]))


def test_precision_at_k_with_ties():
    y = torch.tensor([1, 0, 1, 0, 0])
    assert precision_at_k(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), y, 2) == 0.5
    assert precision_at_k(torch.tensor([5.0, 1.0, 4.0, 2.0, 0.0]), y, 2) == 1.0
    assert precision_at_k(torch.zeros(5), y, 2) == pytest.approx(0.4)  # all tied: the base rate
    # threshold tie: one sure positive above, one slot among {pos, neg, neg} tied -> (1 + 1/3) / 2
    assert precision_at_k(torch.tensor([9.0, 1.0, 1.0, 1.0, 0.0]), torch.tensor([1, 1, 0, 0, 1]), 2) == \
        pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(ValueError):
        precision_at_k(torch.zeros(3), torch.ones(3), 0)


def test_tensor_types():
    assert tensor_kind("model.embed_tokens.weight") == "embeddings"
    assert tensor_kind("model.layers.3.self_attn.k_proj.weight") == "attn_k"
    assert tensor_kind("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert tensor_kind("model.layers.0.input_layernorm.weight") == "norms"
    assert tensor_kind("lm_head.weight") == "lm_head"
    assert tensor_kind("transformer.h.0.attn.c_attn.weight") == "attn_qkv"


# ---------------------------------------------------------------------------------------------- planted leak
def test_planted_seed_leak_is_found(pinned, capsys):
    d, run, text = pinned
    out = d / "audit_out"
    assert main(["audit", str(run / "final"), "--private", str(run), "--text", text, "--out", str(out),
                 "--max-seed", "5", "--grad-batches", "2", "--max-seconds", "120", "--curvature-batches", "1",
                 "--curvature-probes", "2", "--curvature-fd-eps", "1e-3", "--activation-batches", "2"]) == 0
    rep = json.loads((out / "audit.json").read_text())
    sg = rep["seed_guess"]
    assert sg["matched_seed"] == 0 and sg["method"] == "bulk skip"
    assert not sg["seed_truncated_to_32_bits"]  # pmp.model.seed_rng uses every bit of the seed
    assert rep["attacks"]["seed_guess"]["metrics"]["global"]["auroc"] > 0.99
    assert rep["best_attack"] == "seed_guess"
    assert rep["recovered_mask"]["precision"] > 0.99
    # the structural tell reads every norm entry right: trained norm weights moved off 1.0, the rest did not
    assert rep["attacks"]["structural"]["metrics"]["norms"]["auroc"] == 1.0
    assert rep["attacks"]["random (control)"]["metrics"]["global"]["auroc"] == pytest.approx(0.5, abs=0.05)
    md = (out / "audit.md").read_text()
    assert "Best attack: `seed_guess`" in md
    # the curvature and activation attacks are scored like the others and listed in the same table
    assert rep["curvature"]["probes"] == 2 and rep["curvature"]["batches"] == 1 and rep["curvature"]["fd_eps"] == 1e-3
    assert rep["activations"]["batches"] >= 1 and rep["activations"]["layers"] > 0
    for name, family in {"hessian_diag": "curvature", "hessian_row": "curvature", "hessian_diag_fd": "curvature",
                         "act_wanda": "activations", "act_in_rms": "activations", "act_out_rms": "activations"}.items():
        a = rep["attacks"][name]
        assert a["family"] == family and 0.0 <= a["metrics"]["global"]["auroc"] <= 1.0, name
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} | {family} |"))
        assert f"{a['metrics']['global']['auroc']:.4f}" in row
    assert "## Curvature attacks" in md and "## Activation-statistics attacks" in md
    rec = PrivateMask.load(out / "recovered_mask")
    truth = PrivateMask.load(run / "private")
    assert rec.density() == pytest.approx(truth.density(), abs=1e-4)
    inputs = recovered_mask_sparse_attack_inputs(out / "recovered_mask", run / "final")
    assert inputs["sha256"] == rec.fingerprint() and set(inputs["layouts"]) == set(truth.layouts)


def test_recovered_mask_is_global_top_rho(pinned):
    _, run, _ = pinned
    release = load_release(run / "final")
    scores = {n: torch.arange(w.numel(), dtype=torch.float32).view(w.shape) + 1e6 * i
              for i, (n, w) in enumerate(release.weights.items())}
    rec = recovered_mask(release, scores, 0.25)
    total = sum(w.numel() for w in release.weights.values())
    assert rec.nnz == round(0.25 * total)
    last = list(release.weights)[-1]  # the highest scores: the last tensor's top entries first
    assert rec.layouts[last].to_bool().flatten()[-1]
    with pytest.raises(ValueError, match="rho"):
        recovered_mask(release, scores, 0.0)


# ---------------------------------------------------------------------------------------------- chance level
def test_random_release_scores_at_chance(pinned):
    """Fresh random weights + a random mask unrelated to them: no attack may beat chance."""
    d, run, text = pinned
    cfg = AutoConfig.from_pretrained(str(run / "final"))
    rel = _release_like(run, d / "random_release", build_model(cfg, 987_654_321))  # not a guessed seed
    g = torch.Generator().manual_seed(7)
    fake = d / "random_private"
    masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in build_model(cfg, 0).named_parameters()}
    PrivateMask.from_bool(masks, {"density": 0.5}).save(fake / "private")
    out = d / "random_audit"
    report = run_audit(AuditConfig(release=str(rel), private=str(fake), text=text, out=str(out), max_seed=3,
                                   grad_batches=2, max_seconds=120), log=lambda *_: None)
    rep = json.loads((out / "audit.json").read_text())
    assert rep["best_attack"] == report["best_attack"]  # run_audit returns what audit.json holds
    assert rep["seed_guess"]["matched_seed"] is None
    assert {"magnitude", "init_mixture", "grad", "fisher", "shadow_grad", "structural", "hessian_diag", "hessian_row",
            "act_wanda", "act_in_rms", "act_out_rms"} <= set(rep["attacks"])
    for name, a in rep["attacks"].items():
        m = a["metrics"]["global"]
        assert m["entries"] > 100
        assert abs(m["auroc"] - 0.5) < 0.1, (name, m)


def test_curvature_and_activation_attacks_can_be_turned_off(pinned):
    d, run, text = pinned
    out = d / "audit_off"
    rep = run_audit(AuditConfig(release=str(run / "final"), private=str(run), text=text, out=str(out), max_seed=1,
                                grad_batches=1, curvature_batches=0, activation_batches=0, max_seconds=60),
                    log=lambda *_: None)
    assert not {"hessian_diag", "hessian_row", "act_wanda", "act_in_rms", "act_out_rms"} & set(rep["attacks"])
    assert "grad" in rep["attacks"]
    assert rep["curvature"]["skipped"] == "curvature_batches = 0"
    md = (out / "audit.md").read_text()
    assert "skipped: curvature_batches = 0" in md and "skipped: activation_batches = 0" in md


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(pinned, capsys):
    d, run, text = pinned
    cfg = AutoConfig.from_pretrained(str(run / "final"))
    # another model of the same shape: its weights are not the run's complement
    other = _release_like(run, d / "other_release", build_model(cfg, 99))
    with pytest.raises(ValueError, match="does not belong"):
        load_private(run, load_release(other))
    # another shape
    cfg2 = AutoConfig.from_pretrained(str(run / "final"))
    cfg2.intermediate_size = 48
    wrong = _release_like(run, d / "wrong_shape_release", build_model(cfg2, 1))
    with pytest.raises(ValueError, match="does not match"):
        load_private(run, load_release(wrong))
    rel = load_release(run / "final")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_private(d / "missing", rel)
    with pytest.raises(ValueError, match="private run directory"):
        load_private(run / "final", rel)
    # through the CLI: one error line, exit 2
    assert main(["audit", str(run / "final"), "--private", str(run / "final"), "--text", text]) == 2
    assert "private run dir" in capsys.readouterr().err
    assert main(["audit", str(run / "final"), "--private", str(d / "missing")]) == 2
    assert main(["audit", str(run), "--private", str(run)]) == 2  # the run dir is not a release
    assert "final/" in capsys.readouterr().err


def test_evaluate_ignores_no_opinion_entries():
    truth = {"a": torch.tensor([True, False, True, False]), "b": torch.tensor([True, False])}
    sample = Sample.build(truth)
    scores = {"a": torch.tensor([1.0, 0.0, float("nan"), float("nan")]), "b": torch.tensor([0.0, 1.0])}
    m = evaluate(scores, sample)
    assert m["global"]["entries"] == 4 and m["global"]["coverage"] == pytest.approx(4 / 6)
    assert m["global"]["auroc"] == 0.5  # a: right (1 pair), b: wrong (1 pair), cross pairs: 1 right, 1 wrong


def test_shadow_attacks_use_the_shadow_mask(pinned):
    """A shadow run whose mask equals the truth reads it exactly; its per-tensor density becomes the prior."""
    _, run, _ = pinned
    release = load_release(run / "final")
    truth = PrivateMask.load(run / "private")
    masks = truth.to_bool()
    fits: dict = {}
    mix = init_mixture(release, init_distribution(release), fits=fits)
    sc = shadow_scores(release, masks, mix, fits)
    sample = Sample.build(masks)
    assert evaluate(sc["shadow_mask"], sample)["global"]["auroc"] == 1.0
    name = next(iter(masks))
    assert float(sc["shadow_density"][name].flatten()[0]) == pytest.approx(float(masks[name].float().mean()))
    assert set(sc["shadow_prior+mixture"]) == set(masks)
