"""`pmp protect rescale`: a protected run that export, verify-release and the attacks treat like any run; the
release computes the base's function; the key never reaches it; bad input is refused before anything is written."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch
from corpus_fixture import generate_text, write_corpus
from transformers import AutoModelForCausalLM

from pmp.cli import main
from pmp.config import ExportConfig, ProtectConfig, ProtectTrainConfig, load_config
from pmp.eval import sweep as sweep_module
from pmp.eval.attack_inputs import resolve_models, resolve_tasks
from pmp.eval.attacks import Budget, Suite, get_attack
from pmp.eval.d0 import _hvp_of, _short_run, top_eigenvalue
from pmp.eval.d0_run import D0Settings, Reference, ensure_d0
from pmp.eval.durable import DurableSweep
from pmp.eval.durable_spec import DurableSpec
from pmp.eval.models import load_model, load_tokenizer
from pmp.eval.sweep import Sweep
from pmp.eval.task_data import prepare_task
from pmp.protect import protect
from pmp.release import export_release
from pmp.rescale import fold_norms
from pmp.run_dir import RunDir
from pmp.train.trainer import pretrain
from pmp.verify_release import verify_release


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("protect")
    files = write_corpus(d)
    sets = {"data.corpus": files, "data.cache_dir": str(d / "cache"), "data.seq_len": 32, "data.val_fraction": 0.1,
            "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32,
            "model.intermediate_size": 64, "train.steps": 10, "train.batch_size": 4, "train.warmup_steps": 2,
            "train.eval_every": 10, "train.eval_batches": 2, "train.ckpt_every": 10, "train.progress": False,
            "train.threads": 1, "pmp.min_warmup_steps": 3, "pmp.max_warmup_steps": 3, "pmp.iou_lag_steps": 3}
    over = [f"{k}={v}" for k, v in sets.items()]
    dense = pretrain(load_config(None, over + ["train.method=dense"]), d / "dense").root
    pmp_run = pretrain(load_config(None, over), d / "pmp").root
    return d, dense, pmp_run


def logits(path, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)(input_ids=ids).logits.double()


def test_protect_export_verify_same_function(runs, tmp_path, capsys):
    _, dense, _ = runs
    out = tmp_path / "locked"
    assert main(["protect", "rescale", "--base", str(dense), "--out", str(out), "--strength", "100"]) == 0
    run = RunDir(out)
    status = run.read_status()
    assert status["method"] == "rescale" and status["status"] == "finished" and status["strength"] == 100.0
    assert status["function_check"]["fp32_max_rel_diff"] < 1e-4
    assert stat.S_IMODE(run.rescale_key.stat().st_mode) == 0o600
    rel = export_release(ExportConfig(run=str(out), out=str(tmp_path / "rel")))
    base_rel = export_release(ExportConfig(run=str(dense), out=str(tmp_path / "base_rel")))
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    ref, got = logits(base_rel, ids), logits(rel, ids)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4
    w_base = AutoModelForCausalLM.from_pretrained(str(base_rel)).model.layers[0].mlp.up_proj.weight
    w_rel = AutoModelForCausalLM.from_pretrained(str(rel)).model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(w_base, w_rel)  # the weights differ: the scales are there
    report = verify_release(rel, out, load=False)
    assert report.ok and "no rescale key bytes in any file" in [c.name for c in report.checks], str(report)
    card = (rel / "README.md").read_text()
    assert "secret rescaling" in card and "100" not in card.split("## Protection")[1].split("##")[0]


def test_a_leaked_key_fails_verify_release(runs, tmp_path):
    _, dense, _ = runs
    out = protect(ProtectConfig(base=str(dense), out=str(tmp_path / "locked"), strength=10))
    rel = export_release(ExportConfig(run=str(out), out=str(tmp_path / "rel")))
    leak = tmp_path / "leaky"
    shutil.copytree(rel, leak)
    (leak / "tokenizer_config.json").write_bytes((leak / "tokenizer_config.json").read_bytes()
                                                 + RunDir(out).rescale_key.read_bytes()[-200:])
    report = verify_release(leak, out, load=False)
    assert not report.ok and any("rescale key" in line for line in report.failed())


@pytest.mark.parametrize("change, match", [
    ({"method": "sdd_reject", "train": ProtectTrainConfig(sdd_refusal=" ")}, "needs a refusal sentence"),
    ({"method": "sdd", "train": ProtectTrainConfig(sdd_max_similarity=1.5)}, "sdd_max_similarity must be in"),
    ({"method": "magic"}, "protect method must be one of"),
    ({"strength": 1.0}, "strength must be > 1"),
    ({"base": ""}, "needs --base"),
])
def test_bad_settings_are_refused(runs, tmp_path, change, match):
    _, dense, _ = runs
    cfg = {"base": str(dense), "out": str(tmp_path / "never"), **change}
    with pytest.raises(ValueError, match=match):
        protect(ProtectConfig(**cfg))
    assert not (tmp_path / "never").exists()


def test_bad_bases_and_outs_are_refused(runs, tmp_path):
    d, dense, pmp_run = runs
    with pytest.raises(ValueError, match="rescale protects a dense model"):
        protect(ProtectConfig(base=str(pmp_run), out=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="overlaps the base run"):
        protect(ProtectConfig(base=str(dense), out=str(dense / "inside")))
    with pytest.raises(FileNotFoundError, match="not a pmp run directory"):
        protect(ProtectConfig(base=str(tmp_path), out=str(tmp_path / "b")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        protect(ProtectConfig(base=str(dense), out=str(tmp_path / "busy")))
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"
    assert json.loads((dense / "run.json").read_text())["method"] == "dense"


# ------------------------------------------------------------------------ the owner's arm: un-scale, fine-tune
def test_the_owners_authorized_arm_unscales_then_trains_every_parameter(runs, tmp_path, monkeypatch):
    """`pmp attack --private NAME=RUN` of a rescale run: the owner's authorized fine-tuning first inverts its own
    secret scales (back to the base's balanced, norm-folded weights), then trains every parameter; another run's
    release and a run without a secret are refused before anything is written."""
    _, dense, _ = runs
    locked = protect(ProtectConfig(base=str(dense), out=str(tmp_path / "locked"), strength=100))
    rel = export_release(ExportConfig(run=str(locked), out=str(tmp_path / "rel")))
    other = protect(ProtectConfig(base=str(dense), out=str(tmp_path / "other"), strength=100))
    with pytest.raises(ValueError, match="is not the rescaled model of"):
        resolve_models({"locked": str(rel)}, {"locked": str(other)})
    with pytest.raises(ValueError, match="holds no owner secret"):
        resolve_models({"locked": str(rel)}, {"locked": str(dense)})

    seen = {}
    real = sweep_module.finetune

    def spy(model, pt, attack, *a, **k):
        seen[attack.kind] = {n: p.detach().clone() for n, p in model.named_parameters()}
        res = real(model, pt, attack, *a, **k)
        seen[attack.kind + "_trainable"] = res["trainable_parameters"]
        return res

    monkeypatch.setattr(sweep_module, "finetune", spy)
    lm = tmp_path / "heldout.txt"
    lm.write_text(generate_text(6000, seed=77))
    budget = Budget(steps=2, batch_size=2, max_len=16, max_train=8, max_val=3, max_test=3, eval_every=1)
    suite = Suite("owner", (get_attack("probe"), get_attack("authorized_1e-3_cos")), classification=budget,
                  lm=budget, seeds=1).validate()
    models = resolve_models({"locked": str(rel)}, {"locked": str(locked)}, scratch=False)
    Sweep(models, resolve_tasks("none", lm_file=str(lm)), suite, tmp_path / "attack", progress=False,
          log=lambda *_: None).run()
    cell = json.loads((tmp_path / "attack" / "cells" / "locked__heldout__authorized_1e-3_cos__s0.json").read_text())
    assert cell["adaptive"] == {"unscaled": True, "strength": 100.0}
    assert cell["mask"]["source"] == "private rescale key"
    balanced = AutoModelForCausalLM.from_pretrained(str(RunDir(dense).final), dtype=torch.float32)
    fold_norms(balanced)  # what `protect` did before scaling: un-scaling returns exactly here
    for n, p in balanced.named_parameters():
        assert torch.allclose(seen["authorized"][n], p, rtol=1e-5, atol=1e-7), n
    assert seen["authorized_trainable"] == sum(p.numel() for p in balanced.parameters())
    assert not torch.allclose(seen["probe"]["model.layers.0.mlp.up_proj.weight"],
                              balanced.model.layers[0].mlp.up_proj.weight)  # the attacker's view stays scaled


# ------------------------------------------------------------------------ D0 with the owner's rescale key
def test_d0_of_a_rescaled_release_compares_the_attacker_with_the_owners_unscaled_model(runs, tmp_path):
    """D0 names the cause for a rescale key as for a mask: the attacker's updates of the released (scaled) weights
    against the owner's updates of the un-scaled model, and the sharpness of each. The owner's arm must be exactly
    a dense run (and a Hessian) of the balanced base: un-scaling is what makes it the owner's."""
    _, dense, _ = runs
    locked = protect(ProtectConfig(base=str(dense), out=str(tmp_path / "locked"), strength=100))
    rel = export_release(ExportConfig(run=str(locked), out=str(tmp_path / "rel")))
    lm = tmp_path / "heldout.txt"
    lm.write_text(generate_text(6000, seed=77))
    task = resolve_tasks("none", lm_file=str(lm))[0]
    budget = Budget(steps=2, batch_size=2, max_len=16, max_train=8, max_val=3, max_test=3, eval_every=1)
    [m] = resolve_models({"locked": str(rel)}, {"locked": str(locked)}, scratch=False)
    key = RunDir(locked).load_rescale_key()
    suite = Suite("d0", (get_attack("probe"),), classification=budget, lm=budget, seeds=1,
                  durable=DurableSpec(trials=1, data_sizes_lm=(), d0_lrs=(1e-3,), d0_steps=(1, 2))).validate()
    sweep = DurableSweep([m], [task], suite, tmp_path / "res", progress=False, log=lambda *_: None)
    assert [(x.name, type(k).__name__, whose) for x, k, whose in sweep.d0_models()] == [("locked", "RescaleKey",
                                                                                          "locked")]
    settings = D0Settings(lrs=(1e-3, 1e-2), steps=(1, 2), hessian_iters=6, hessian_batches=1)
    pt = prepare_task(task, load_tokenizer(m.tokenizer_dir), budget, 0)
    path = tmp_path / "d0.json"
    rec, ran = ensure_d0(path, m, task, key, "locked", budget, 0, settings, "sha", lambda: pt)
    assert ran and rec["secret"] == "rescale key" and rec["owner"] == "rescale key" and rec["owner_density"] is None
    assert all(set(u) == {"lr", "dense", "owner"} for u in rec["updates"])  # no random-mask arm
    assert set(rec["curvature"]) == {"dense", "owner", "batches"}
    assert "than the owner's updates after un-scaling" in rec["verdict"]
    assert "released / un-scaled sharpness ratio" in rec["verdict"]

    def balanced():
        b = AutoModelForCausalLM.from_pretrained(str(RunDir(dense).final), dtype=torch.float32)
        fold_norms(b)  # what `protect` did before scaling: un-scaling returns here
        return b

    for u in rec["updates"]:
        want = _short_run(balanced, pt, "dense", {}, None, u["lr"], (1, 2), budget.batch_size, 0)
        assert u["owner"] == pytest.approx(want, rel=1e-4), u["lr"]
    named, hvp = _hvp_of(balanced(), pt, budget.batch_size, 0, 1)
    lam = top_eigenvalue(hvp, [p for _, p in named], iters=6, seed=0)["eigenvalue"]
    assert rec["curvature"]["owner"]["eigenvalue"] == pytest.approx(lam, rel=1e-3)
    assert rec["curvature"]["dense"]["eigenvalue"] != pytest.approx(lam, rel=1e-2)  # the scales change the Hessian
    again, ran = ensure_d0(path, m, task, key, "locked", budget, 0, settings, "sha", lambda: pt)
    assert not ran and again == rec


def test_d0_of_a_protection_without_a_secret_compares_it_with_its_unprotected_reference(runs, tmp_path):
    """`--references NAME=RELEASE` (SOPHON, MLAC, SDD have no owner secret): D0's "owner" arm is the same updates
    of the model the protection started from -- exactly a dense run and a Hessian of that release."""
    _, dense, pmp_run = runs
    base = export_release(ExportConfig(run=str(dense), out=str(tmp_path / "base")))
    prot = export_release(ExportConfig(run=str(pmp_run), out=str(tmp_path / "prot")))  # stands in for a protection
    lm = tmp_path / "heldout.txt"
    lm.write_text(generate_text(6000, seed=77))
    task = resolve_tasks("none", lm_file=str(lm))[0]
    budget = Budget(steps=2, batch_size=2, max_len=16, max_train=8, max_val=3, max_test=3, eval_every=1)
    [m] = resolve_models({"prot": str(prot)}, scratch=False, references={"prot": str(base)})
    assert m.reference == base and m.private is None
    suite = Suite("d0", (get_attack("probe"),), classification=budget, lm=budget, seeds=1,
                  durable=DurableSpec(trials=1, data_sizes_lm=(), d0_lrs=(1e-3,), d0_steps=(1, 2))).validate()
    [(spec, secret, whose)] = DurableSweep([m], [task], suite, tmp_path / "res", progress=False,
                                          log=lambda *_: None).d0_models()
    assert (spec.name, secret, whose) == ("prot", Reference(base), "prot")
    settings = D0Settings(lrs=(1e-3,), steps=(1, 2), hessian_iters=6, hessian_batches=1)
    pt = prepare_task(task, load_tokenizer(m.tokenizer_dir), budget, 0)
    rec, ran = ensure_d0(tmp_path / "d0.json", m, task, secret, "prot", budget, 0, settings, "sha", lambda: pt)
    assert ran and rec["secret"] == "reference" and rec["owner"] == "reference"
    assert "than the same updates of the unprotected reference" in rec["verdict"]

    def reference():
        return load_model(base, "lm", 0, 0, pad_id=pt.pad_id)

    want = _short_run(reference, pt, "dense", {}, None, 1e-3, (1, 2), budget.batch_size, 0)
    assert rec["updates"][0]["owner"] == pytest.approx(want, rel=1e-5)
    named, hvp = _hvp_of(reference(), pt, budget.batch_size, 0, 1)
    lam = top_eigenvalue(hvp, [p for _, p in named], iters=6, seed=0)["eigenvalue"]
    assert rec["curvature"]["owner"]["eigenvalue"] == pytest.approx(lam, rel=1e-4)
    assert rec["updates"][0]["dense"] != rec["updates"][0]["owner"]  # the attacker's arm trains the protected model

    # bad input: a name that is not a model, a model with both a secret and a reference, another architecture
    with pytest.raises(ValueError, match=r"--references names \['other'\] that are not in --models"):
        resolve_models({"prot": str(prot)}, scratch=False, references={"other": str(base)})
    with pytest.raises(ValueError, match="has both --private and --references"):
        resolve_models({"pmp": str(prot)}, {"pmp": str(pmp_run)}, scratch=False, references={"pmp": str(base)})
    wide = tmp_path / "wide"
    shutil.copytree(base, wide)
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2}))
    with pytest.raises(ValueError, match="is another architecture than"):
        resolve_models({"prot": str(prot)}, scratch=False, references={"prot": str(wide)})
