"""SOPHON / SOPHON-NLP / MLAC (`pmp protect sophon|sophon_nlp|mlac`): the suppression losses have the intended sign
and bound, the simulated attacker never touches the real model, MLAC's head adversary is differentiated through,
the retain guard rolls back, a protection run resumes exactly after SIGKILL, the output is a run that exports to a
stock model, and bad input is refused before anything is written."""

from __future__ import annotations

import csv
import dataclasses
import random
from pathlib import Path

import pytest
import torch
from cli_runs import assert_stock_loadable, kill_at_checkpoint, pmp_cli
from corpus_fixture import generate_text, write_corpus
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import pmp.train.protect_data as protect_data
from pmp.cli import main
from pmp.config import ExportConfig, ProtectConfig, ProtectTrainConfig, load_config
from pmp.release import export_release
from pmp.run_dir import RunDir
from pmp.train.mlac import adapted_head_suppression
from pmp.train.protect_data import Sampler, load_restricted_task, tokenize_restricted
from pmp.train.protect_run import protect_by_training
from pmp.train.sophon import suppression_gradient
from pmp.train.suppression import inverse_cross_entropy, kl_from_uniform
from pmp.train.trainer import pretrain

FAST = {"train.seq_len": 16, "train.batch_size": 4, "train.inner_steps": 2, "train.check_every": 2,
        "train.ckpt_every": 2, "train.eval_batches": 2, "train.log_every": 0, "train.threads": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("protect_train")
    files = write_corpus(d, chars_per_file=4000)
    sets = {"data.corpus": files, "data.cache_dir": str(d / "cache"), "data.seq_len": 32, "data.val_fraction": 0.1,
            "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32,
            "model.intermediate_size": 64, "train.steps": 8, "train.batch_size": 4, "train.warmup_steps": 2,
            "train.eval_every": 0, "train.eval_batches": 1, "train.ckpt_every": 0, "train.progress": False,
            "train.threads": 1, "train.method": "dense"}
    dense = pretrain(load_config(None, [f"{k}={v}" for k, v in sets.items()]), d / "dense").root
    lm = d / "restricted.txt"
    lm.write_text(generate_text(12000, seed=99).replace("the", "a"))
    rng = random.Random(0)
    cls = d / "restricted.csv"
    with cls.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(120):
            y = rng.randint(0, 1)
            w.writerow([f"the captain saw a {rng.choice(['good', 'fine'] if y else ['bad', 'poor'])} ship {i}", y])
    return {"dense": dense, "lm": lm, "cls": cls, "corpus": files, "dir": d}


def cfg_of(setup, out, method="sophon", restricted=None, **sets) -> ProtectConfig:
    train = {k.split(".", 1)[1]: v for k, v in {**FAST, **sets}.items()}
    return ProtectConfig(method=method, base=str(setup["dense"]), out=str(out),
                         restricted=str(restricted or setup["lm"]), train=ProtectTrainConfig(**train))


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(next(Path(path).glob("*.safetensors"))))


# ---------------------------------------------------------------------------------------------- losses
def test_inverse_ce_falls_as_true_probability_falls_and_stays_finite():
    target = torch.tensor([0])
    values = [float(inverse_cross_entropy(torch.tensor([[z, 0.0, 0.0]]), target)) for z in (4.0, 2.0, 0.0, -2.0)]
    assert values == sorted(values, reverse=True) and values[-1] > 0  # less true-class mass -> smaller loss
    p = torch.softmax(torch.tensor([1.0, 0.5, -1.0]), -1)
    assert float(inverse_cross_entropy(torch.tensor([[1.0, 0.5, -1.0]]), target)) == pytest.approx(
        -float(torch.log1p(-p[0])), rel=1e-5)
    z = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)  # p_true = 1 - 1e-87: -log(1 - p) from p is inf
    loss = inverse_cross_entropy(z, target)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert float(loss.detach()) == pytest.approx(200.0 - float(torch.log(torch.tensor(2.0))), rel=1e-4)
    assert torch.isfinite(z.grad).all()
    far = torch.tensor([[-30.0, 0.0, 0.0]], requires_grad=True)  # error already large: gradient ~ p_true, tiny
    inverse_cross_entropy(far, target).sum().backward()
    assert far.grad.abs().max() < 1e-10


def test_kl_from_uniform_is_zero_at_uniform_and_its_gradient_is_p_minus_u():
    assert float(kl_from_uniform(torch.zeros(1, 5))) == pytest.approx(0.0, abs=1e-7)
    z = torch.tensor([[2.0, -1.0, 0.5, 0.0]], requires_grad=True)
    loss = kl_from_uniform(z)
    loss.sum().backward()
    assert float(loss.detach()) > 0
    assert torch.allclose(z.grad, torch.softmax(z.detach(), -1) - 0.25, atol=1e-6)


# ---------------------------------------------------------------------------------------------- inner loops
def _restricted(setup, kind):
    tok = AutoTokenizer.from_pretrained(str(RunDir(setup["dense"]).tokenizer))
    return tokenize_restricted(load_restricted_task(str(setup[kind]), ""), tok, 16, 0)


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_simulated_attacker_leaves_the_model_untouched(setup, kind):
    model = AutoModelForCausalLM.from_pretrained(str(RunDir(setup["dense"]).final), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = _restricted(setup, kind)
    cfg = ProtectTrainConfig(batch_size=4, inner_steps=3, inner_lr_min=1e-2, inner_lr_max=1e-2)
    grads, info = suppression_gradient(model, r, Sampler(r.size(), 4, 1), Sampler(r.size(), 4, 2), cfg,
                                       torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert set(grads) == {n for n, _ in model.named_parameters()}
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert info["attacker_loss"] == info["attacker_loss"]  # the simulated attacker trained (a finite loss)


def test_mlac_head_adversary_is_differentiated_through(setup):
    """The adapted head's loss reaches the body through the features AND through the adaptation (second order):
    with a zero inner learning rate the second-order part vanishes and the gradient changes."""
    r = _restricted(setup, "cls")
    model = AutoModelForCausalLM.from_pretrained(str(RunDir(setup["dense"]).final), dtype=torch.float32)
    body = model.model.layers[0].mlp.up_proj.weight

    def grad_with(lr):
        model.zero_grad(set_to_none=True)
        cfg = ProtectTrainConfig(inner_steps=3, inner_lr_min=lr, inner_lr_max=lr, sgd_lr_factor=1.0)
        sup, _ = adapted_head_suppression(model, r, Sampler(r.size(), 4, 1), Sampler(r.size(), 4, 2), cfg,
                                          torch.Generator().manual_seed(0))
        sup.backward()
        return body.grad.clone()

    adapted, unadapted = grad_with(5.0), grad_with(1e-12)
    assert adapted.abs().sum() > 0 and unadapted.abs().sum() > 0
    assert not torch.allclose(adapted, unadapted, rtol=1e-3, atol=1e-9)


# ---------------------------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("method, kind", [("sophon", "lm"), ("sophon_nlp", "cls"), ("mlac", "lm"), ("mlac", "cls")])
def test_protect_run_exports_to_a_stock_model(setup, tmp_path, method, kind):
    out = tmp_path / "prot"
    protect_by_training(cfg_of(setup, out, method, setup[kind], **{"train.steps": 4}))
    status = RunDir(out).read_status()
    assert status["status"] == "finished" and status["method"] == method and status["protect_steps"] == 4
    assert status["cost"]["token_passes"] > 0 and status["cost"]["wall_s"] >= 0
    for when in ("started_with", "finished_with"):  # provenance: which code and libraries made this run
        assert status[when]["git_commit"] and status[when]["versions"]["torch"] == torch.__version__
    assert status["after"]["retain_ppl"] <= status["before"]["retain_ppl"] * 1.10 + 1e-9  # the guard's promise
    assert (status["after"]["restricted_ppl"] is None) == (kind == "cls")
    assert not all(torch.equal(a, b) for a, b in zip(weights(RunDir(out).final).values(),
                                                     weights(RunDir(setup["dense"]).final).values()))
    rel = export_release(ExportConfig(run=str(out), out=str(tmp_path / "rel")))
    assert "restricted-domain-protection" in (rel / "README.md").read_text()
    assert_stock_loadable(rel, tmp_path)


def test_a_release_can_be_the_base(setup, tmp_path):
    rel = export_release(ExportConfig(run=str(setup["dense"]), out=str(tmp_path / "base_rel")))
    out = tmp_path / "from_rel"
    cfg = cfg_of(setup, out, "mlac", **{"train.steps": 2})
    cfg.base, cfg.retain = str(rel), setup["corpus"]
    protect_by_training(cfg)
    status = RunDir(out).read_status()
    assert status["base_release"] is True and status["cost"]["x_pretraining"] is None
    card = (export_release(ExportConfig(run=str(out), out=str(tmp_path / "rel2"))) / "README.md").read_text()
    assert "Based on a released causal LM that pmp did not pre-train" in card and "Pre-trained from scratch" not in card


def test_retain_guard_rolls_back_a_model_that_forgets(setup, tmp_path):
    """Suppression at a huge learning rate wrecks the retain perplexity: every check rolls back, so the final model
    is the base's, bit for bit."""
    out = tmp_path / "wrecked"
    protect_by_training(cfg_of(setup, out, **{"train.steps": 4, "train.lr": 1.0, "train.alpha": 1.0,
                                             "train.ntr_steps": 0, "train.grad_clip": 0.0,
                                             "train.retain_tolerance": 1e-6}))
    status = RunDir(out).read_status()
    assert status["rollbacks"] == 2
    base = weights(RunDir(setup["dense"]).final)
    assert all(torch.equal(base[k], v) for k, v in weights(RunDir(out).final).items())



def test_protect_resumes_exactly_after_sigkill(setup, tmp_path):
    sets = [f"--set={k}={v}" for k, v in {**FAST, "train.steps": 12}.items()]
    args = ["protect", "sophon", "--base", str(setup["dense"]), "--restricted", str(setup["lm"])] + sets
    whole = tmp_path / "whole"
    proc = pmp_cli([*args, "--out", str(whole)])
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    killed = tmp_path / "killed"
    proc = pmp_cli([*args, "--out", str(killed)])
    kill_at_checkpoint(proc, killed, 4)
    assert not (killed / "final").exists()
    again = pmp_cli([*args, "--out", str(killed)])
    out = again.communicate(timeout=600)[0]
    assert again.returncode != 0 and "--resume" in out  # a second start without --resume is refused
    again = pmp_cli([*args, "--out", str(killed), "--resume"])
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "resuming" in out, out
    a, b = weights(RunDir(whole).final), weights(RunDir(killed).final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = RunDir(whole).read_status(), RunDir(killed).read_status()
    assert sa["after"] == sb["after"] and sa["rollbacks"] == sb["rollbacks"]
    rows = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == len([line for line in (whole / "metrics.jsonl").read_text().splitlines() if line])


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_and_nothing_is_written(setup, tmp_path):
    never = tmp_path / "never"
    with pytest.raises(ValueError, match="also the retain corpus"):
        protect_by_training(ProtectConfig(method="sophon", base=str(setup["dense"]), out=str(never),
                                          restricted=str(setup["lm"]), retain=f"{setup['lm']},{setup['cls']}"))
    first_book = setup["corpus"].split(",")[0]
    with pytest.raises(ValueError, match="part of the base run's pre-training corpus"):
        protect_by_training(cfg_of(setup, never, restricted=first_book))
    with pytest.raises(ValueError, match="protect method must be one of"):
        protect_by_training(ProtectConfig(method="magic", base=str(setup["dense"]), out=str(never)))
    with pytest.raises(FileNotFoundError, match="neither a pmp run directory"):
        protect_by_training(ProtectConfig(method="mlac", base=str(setup["dir"]), out=str(never),
                                          restricted=str(setup["lm"])))
    with pytest.raises(ValueError, match="sophon_nlp protects a classification task"):
        protect_by_training(cfg_of(setup, never, "sophon_nlp", setup["lm"]))
    with pytest.raises(ValueError, match="neither a task"):
        protect_by_training(cfg_of(setup, never, restricted="no_such_task"))
    with pytest.raises(ValueError, match="attack-suite formulation only; protect sms_spam"):
        protect_by_training(cfg_of(setup, never, restricted="sms_spam:lm"))
    with pytest.raises(ValueError, match="unknown formulation 'votes'"):
        protect_by_training(cfg_of(setup, never, restricted="sms_spam:votes"))
    with pytest.raises(ValueError, match="ckpt_every"):
        protect_by_training(cfg_of(setup, never, **{"train.ckpt_every": 3}))
    with pytest.raises(ValueError, match="inner_optimizers"):
        protect_by_training(cfg_of(setup, never, **{"train.inner_optimizers": ["lbfgs"]}))
    assert not never.exists()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text('{"status": "running", "step": 3}')
    with pytest.raises(ValueError, match="not finished"):
        protect_by_training(ProtectConfig(method="sophon", base=str(unfinished), out=str(never)))
    assert main(["protect", "sophon", "--base", str(setup["dense"]), "--out", str(never), "--restricted",
                 str(setup["lm"]), "--set", "train.loss=mse"]) == 2
    assert not never.exists()


def test_resume_with_other_settings_is_refused(setup, tmp_path):
    out = tmp_path / "p"
    protect_by_training(cfg_of(setup, out, **{"train.steps": 2}))
    with pytest.raises(ValueError, match="different settings"):
        c = cfg_of(setup, out, **{"train.steps": 2, "train.alpha": 9.0})
        c.resume = True
        protect_by_training(c)


def test_restricted_task_texts_as_an_lm_domain(setup, monkeypatch):
    """TASK:text protects a classification task's texts as an LM domain (the attack suite's second valid task)."""
    cls = load_restricted_task(str(setup["cls"]), "")
    monkeypatch.setattr(protect_data, "list_tasks", lambda: ["planted"])
    monkeypatch.setattr(protect_data, "load_task", lambda name, cache: dataclasses.replace(cls, name=name))
    task = load_restricted_task("planted:text", "")
    assert (task.name, task.kind) == ("planted:text", "lm")
    assert list(task.train["text"]) == [str(t) for t in cls.train["text"]]
    tok = AutoTokenizer.from_pretrained(str(RunDir(setup["dense"]).tokenizer))
    r = tokenize_restricted(task, tok, 16, 0)
    assert r.kind == "lm" and r.train["blocks"].shape[1] == 16
