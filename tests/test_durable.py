"""The durable attacker (eval/durable.py) on tiny runs: equal tuning budgets per arm, selection on validation,
resume trial by trial, tuned re-runs, budget and data curves, D0, the durable report; bad input refused before
anything is written."""

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from corpus_fixture import generate_text
from tiny_runs import tiny_pmp_and_dense
from torch.func import functional_call

from pmp.cli import main
from pmp.data.tasks import lm_task_from_text
from pmp.eval import metrics as M
from pmp.eval import sweep as sweep_module
from pmp.eval.adaptive import heal, heal_blocks, reinit_complement, transfer_base
from pmp.eval.attack import run_attack
from pmp.eval.attack_inputs import resolve_models, resolve_tasks
from pmp.eval.attacks import ATTACKS, Attack, Budget, Suite, config_digest, get_attack, get_suite, load_suite_file
from pmp.eval.config import AttackConfig, ReportConfig
from pmp.eval.d0 import loss_hvp, top_eigenvalue, verdict
from pmp.eval.d0_run import D0Settings, d0_inputs_sha
from pmp.eval.durable import DurableSweep
from pmp.eval.durable_spec import DurableSpec
from pmp.eval.finetune import finetune, make_optimizer, random_layouts
from pmp.eval.general_ability import perplexity
from pmp.eval.models import load_model, load_tokenizer
from pmp.eval.report import write_report
from pmp.eval.search import best_trial, trial_attack
from pmp.eval.sweep import Sweep
from pmp.eval.task_data import prepare_task
from pmp.mask import PrivateMask

TINY_LM = Budget(steps=4, batch_size=2, max_len=16, max_train=12, max_val=3, max_test=3, eval_every=2)
TINY_CLS = Budget(steps=4, batch_size=4, max_len=16, max_train=24, max_val=8, max_test=12, eval_every=2)
TINY_SPEC = DurableSpec(trials=3, sampler="tpe", startup_trials=2, budget_factors=(1.0, 2.0), curve_top=1,
                        data_sizes_lm=(6, 12), data_sizes_classification=(12,), d0_lrs=(1e-3, 1e-2), d0_steps=(1, 2),
                        hessian_iters=3, hessian_batches=1, bootstrap=200,
                        general=False)  # on only where a test gives the general text: tests never read the data cache
QUIET = dict(progress=False, log=lambda *_: None)


def tiny_durable_suite(attacks=("probe", "random_mask_10pct_1e-3_cos", "reinit_complement_3e-4_cos"), **spec):
    return Suite("tinydurable", tuple(get_attack(a) for a in attacks), classification=TINY_CLS, lm=TINY_LM, seeds=2,
                 durable=dataclasses.replace(TINY_SPEC, **spec)).validate()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny PMP run and a dense run, held-out text, a heal text, and a 'recovered' mask of the PMP release."""
    d = tmp_path_factory.mktemp("durable")
    runs = tiny_pmp_and_dense(d)
    lm = d / "heldout.txt"
    lm.write_text(generate_text(6000, seed=77))
    heal = d / "generic.txt"
    heal.write_text(generate_text(4000, seed=5))
    rows = [{"text": generate_text(60, seed=300 + i).split(".")[0], "label": i % 2} for i in range(40)]
    cls = d / "cls.jsonl"
    cls.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # an attacker's recovered mask: the true mask with a tenth of its bits flipped, over the linear weights only
    true = PrivateMask.load(runs["pmp"] / "private").to_bool()
    g = torch.Generator().manual_seed(0)
    guess = {n: m ^ (torch.rand(m.shape, generator=g) < 0.1) for n, m in true.items() if "proj" in n}
    rec = d / "recovered"
    PrivateMask.from_bool(guess, {"attack": "test"}).save(rec)
    return SimpleNamespace(root=d, pmp=runs["pmp"], dense=runs["dense"], lm=lm, heal=heal, recovered=rec, cls=cls)


def models_of(env, recovered=True):
    return resolve_models({"pmp": str(env.pmp / "final"), "dense": str(env.dense / "final")}, {"pmp": str(env.pmp)},
                          recovered={"pmp": str(env.recovered)} if recovered else None)


def lm_tasks(env):
    return resolve_tasks("none", lm_file=str(env.lm))


def cells_of(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}


@pytest.fixture(scope="module")
def durable_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("durable_results")
    sweep = DurableSweep(models_of(env), lm_tasks(env), tiny_durable_suite(general=True), out,
                         general_file=str(env.heal), **QUIET)
    return out, sweep.run(), sweep


def test_every_arm_gets_the_same_budget_and_its_own_validation_best(durable_run):
    out, summary, sweep = durable_run
    cells = cells_of(out)
    arms = {(m.name, kind) for m, kind in sweep.arms()}
    assert arms == {("pmp", "full"), ("pmp", "authorized"), ("dense", "full"), ("from_scratch", "full")}
    search = [c for c in cells.values() if c.get("stage") == "search"]
    per_arm = {a: sorted(c["durable"]["trial"] for c in search if (c["model"], c["durable"]["arm"]) == a)
               for a in arms}
    assert all(trials == [0, 1, 2] for trials in per_arm.values())  # the same K for every arm
    # TPE's startup trials come from the same seeded draws: every arm starts from the same configurations
    first = {a: next(c["durable"]["params"] for c in search if (c["model"], c["durable"]["arm"]) == a
                     and c["durable"]["trial"] == 0) for a in arms}
    assert len({json.dumps(p, sort_keys=True) for p in first.values()}) == 1
    for name, kind in arms:
        mine = [c for c in search if (c["model"], c["durable"]["arm"]) == (name, kind)]
        best = min(mine, key=lambda c: (c["selected_val"], c["durable"]["trial"]))  # perplexity: lower is better
        for s in (0, 1):
            tuned = cells[f"{name}__heldout__tuned_{kind}__s{s}"]
            assert tuned["stage"] == "tuned" and tuned["durable"]["from_trial"] == best["durable"]["trial"]
            assert tuned["hyperparameters"]["lr"] == best["hyperparameters"]["lr"]
            assert tuned["attack_kind"] == kind and tuned["budget"]["steps_cap"] == TINY_LM.steps
        assert cells[f"{name}__heldout__tuned_{kind}__s0"]["after_val_selected"] == best["after_val_selected"]
        for tag, lr_scale in (("c0", 1.0), ("lr", 0.5)):  # budget curve x2: best configuration, and at lr / 2
            cur = cells[f"{name}__heldout__curve_{kind}_x2_{tag}__s0"]
            assert cur["budget"]["steps_cap"] == 8 and cur["budget"]["steps"] == 2 * best["hyperparameters"]["steps"]
            assert cur["hyperparameters"]["lr"] == pytest.approx(best["hyperparameters"]["lr"] * lr_scale)
        data = cells[f"{name}__heldout__data_{kind}_n6__s0"]
        assert data["budget"]["data"]["train_blocks"] == 6
        assert f"{name}__heldout__data_{kind}_n12__s0" not in cells  # 12 = the base budget: the search's own point
    assert all(c["complement_unchanged"] is True for c in cells.values()
               if c["attack_kind"] in ("authorized", "random_mask"))
    assert summary["run"] == len(cells) and summary["diagnostics_run"] == 2


def test_general_ability_after_each_attacker_arms_best_attack(env, durable_run):
    """SDD's evaluation: each attacker arm's best configuration re-run at the first seed (the same fine-tune as its
    tuned cell), then the general perplexity of the release and of the attacked model; not for from scratch (no
    release) nor the owner's arm, and outside the attack tables."""
    out, _, sweep = durable_run
    cells = cells_of(out)
    gen = {c["model"]: c for c in cells.values() if c.get("stage") == "general"}
    assert set(gen) == {"pmp", "dense"} and all(c["attack_kind"] == "full" for c in gen.values())
    blocks = sweep.general_text.blocks(load_tokenizer(env.dense / "final"), TINY_LM.max_len,
                                       load_tokenizer(env.dense / "final").eos_token_id)
    for name, c in gen.items():
        tuned = cells[f"{name}__heldout__tuned_full__s0"]
        assert c["durable"]["params"] == tuned["durable"]["params"]
        assert c["after_val_selected"] == pytest.approx(tuned["after_val_selected"], rel=1e-6)  # the same fine-tune
        g = c["general"]
        assert g["text"] == f"file {env.heal}" and g["blocks"] == len(blocks) > 0
        release = load_model((env.pmp if name == "pmp" else env.dense) / "final", "lm", 0, seed=0)
        assert g["ppl_release"] == pytest.approx(perplexity(release, blocks), rel=1e-6)
        assert g["ppl_after_attack"] != pytest.approx(g["ppl_release"], rel=1e-6)  # the attack moved the model
    assert not any(c.get("stage") == "general" for c in M.classic_cells(list(cells.values())))


def test_general_ability_also_reads_the_sweeps_other_perplexity_tasks(env, tmp_path):
    """Collateral on the other domains: a general cell on one LM task also measures the release and the attacked
    model on the test blocks of every other perplexity task of the sweep (not on itself, not on classification)."""
    other = tmp_path / "generic.txt"
    other.write_text(generate_text(20000, seed=11))
    heldout, generic = lm_tasks(env)[0], lm_task_from_text(other)
    cls = resolve_tasks("none", task_file=str(env.cls))[0]
    [pmp_m, *_] = models_of(env, recovered=False)
    sweep = DurableSweep([pmp_m], [heldout, generic, cls], tiny_durable_suite(general=True), tmp_path / "res",
                         general_file=str(env.heal), **QUIET)
    attack = trial_attack("general_full", "full", {"optimizer": "adamw", "lr": 1e-3, "schedule": "constant",
                                                    "steps": 2})
    model = load_model(env.pmp / "final", "lm", 0, seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # stands in for the attack
    g = sweep.after_finetune(pmp_m, heldout, attack, model, TINY_LM)["general"]
    assert set(g["other_tasks"]) == {generic.name}
    tok = load_tokenizer(env.pmp / "final")
    blocks = prepare_task(generic, tok, TINY_LM, 0).test["blocks"]
    release = load_model(env.pmp / "final", "lm", 0, seed=0)
    o = g["other_tasks"][generic.name]
    assert o["blocks"] == len(blocks) and o["ppl_release"] == pytest.approx(perplexity(release, blocks), rel=1e-6)
    assert o["ppl_after_attack"] == pytest.approx(perplexity(model, blocks), rel=1e-6) != o["ppl_release"]
    assert sweep.after_finetune(pmp_m, heldout, get_attack("full_adamw_3e-4_cos"), model, TINY_LM) is None
    # what a general cell measures is in its inputs: cells written before (without the other tasks) are recomputed,
    # every other cell keeps its digest
    assert sweep.extra_inputs(attack) == {"general_text": sweep.general_text.digest(), "general_format": 2}
    assert sweep.extra_inputs(get_attack("full_adamw_3e-4_cos")) == {}


def test_durable_run_resumes_trial_by_trial(env, durable_run):
    out, first, _ = durable_run
    again = DurableSweep(models_of(env), lm_tasks(env), tiny_durable_suite(general=True), out,
                         general_file=str(env.heal), **QUIET).run()
    assert again["run"] == 0 and again["skipped"] == first["run"] and again["diagnostics_run"] == 0
    victim = out / "cells" / "dense__heldout__search_full_t01__s0.json"
    victim.unlink()  # killed during trial 1: resuming re-runs it, and trial 2 (whose TPE suggestion depends on
    again = DurableSweep(models_of(env), lm_tasks(env), tiny_durable_suite(general=True), out,
                         general_file=str(env.heal), **QUIET).run()  # 0..1) is kept
    assert again["run"] == 1 and victim.is_file()


# ------------------------------------------------------------------------------------ selection on validation
def _fake_finetune(planted: dict):
    """A stand-in for training: validation perplexity 100 + |log10(lr) + 4| (best at lr 1e-4), test = validation,
    except the PLANTED configuration (trial 3 of every full arm): worst on validation, best on test."""

    def fake(model, pt, attack, budget, seed, mask_layouts=None, log=None):
        steps = attack.steps or budget.steps
        if attack.name == "search_full_t03":
            planted["lr"] = attack.lr
        if attack.kind == "probe":
            val = test = 500.0
        elif attack.kind == "full" and attack.lr == planted.get("lr"):
            val, test = 10_000.0, 1.0
        else:
            val = test = 100.0 + abs(math.log10(attack.lr) + 4)
        point = {"step": steps, "val": {"perplexity": val, "loss": math.log(val)},
                 "test": {"perplexity": test, "loss": math.log(test)}}
        return {"curve": [point], "train_losses": [], "trainable_parameters": 1, "complement_unchanged": None,
                "metric": "perplexity", "direction": "lower", "steps": steps,
                "selected": {"step": steps, "val": val, "test": test}, "final": {"step": steps, "test": test},
                "train_seconds": 0.0}

    return fake


def test_a_configuration_best_on_test_but_not_on_validation_is_not_chosen(env, tmp_path, monkeypatch):
    planted: dict = {}
    monkeypatch.setattr(sweep_module, "finetune", _fake_finetune(planted))
    suite = tiny_durable_suite(("probe",), trials=6, sampler="random", d0=False, data_sizes_lm=(), scratch_arm=False)
    DurableSweep(models_of(env), lm_tasks(env), suite, tmp_path, **QUIET).run()
    cells = cells_of(tmp_path)
    for model in ("pmp", "dense"):
        trials = sorted((c for c in cells.values() if c.get("stage") == "search" and c["model"] == model
                         and c["durable"]["arm"] == "full"), key=lambda c: c["durable"]["trial"])
        assert len(trials) == 6 and trials[3]["hyperparameters"]["lr"] == planted["lr"]
        assert min(trials, key=lambda c: c["after_val_selected"])["durable"]["trial"] == 3  # the oracle's pick
        want = min((c for c in trials if c["durable"]["trial"] != 3), key=lambda c: c["selected_val"])
        for s in (0, 1):
            tuned = cells[f"{model}__heldout__tuned_full__s{s}"]
            assert tuned["durable"]["from_trial"] == want["durable"]["trial"] != 3
            assert tuned["hyperparameters"]["lr"] == want["hyperparameters"]["lr"] != planted["lr"]
        curve = cells[f"{model}__heldout__curve_full_x2_c0__s0"]
        assert curve["durable"]["from_trial"] == want["durable"]["trial"]
    # the random sampler draws the same configurations for every arm (seeded): a paired comparison
    configs = {(c["model"], c["durable"]["arm"]): c["durable"]["params"] for c in cells.values()
               if c.get("stage") == "search" and c["durable"]["trial"] == 5}
    assert len({json.dumps(p, sort_keys=True) for p in configs.values()}) == 1
    md = write_report(ReportConfig(results=str(tmp_path))).read_text()
    assert "search_full" not in md.split("# Durable evaluation")[0]  # trials are summarized, not listed
    assert "(trial 3)" not in md and f"(trial {want['durable']['trial']})" in md


def test_best_trial_reads_validation_only_and_takes_the_earliest_tie():
    def t(i, val, test):
        return {"selected_val": val, "after_val_selected": test, "durable": {"trial": i}}

    trials = [t(0, 0.70, 0.60), t(1, 0.50, 0.95), t(2, 0.72, 0.61), t(3, 0.72, 0.50), t(4, float("nan"), 0.99)]
    assert best_trial(trials, "higher")["durable"]["trial"] == 2  # accuracy: 0.72 first, never trial 1's test
    assert best_trial(trials, "lower")["durable"]["trial"] == 1


# ------------------------------------------------------------------------------------ the durable report
def test_report_names_each_arms_best_the_intervals_the_budget_and_the_cause(durable_run):
    out, _, _ = durable_run
    md = write_report(ReportConfig(results=str(out))).read_text()
    classic, durable = md.split("# Durable evaluation")
    assert "## Main table" in classic and "`tuned_full`" in classic and "search_" not in classic
    for heading in ("### Equal tuning budgets", "### Fixed and adaptive attacks", "### Budget curves",
                    "### Data curves", "### Protection statement", "### D0 diagnostic: `pmp` (its own private mask)",
                    "### D0 diagnostic: `dense` (the mask of `pmp` (control))"):
        assert heading in durable, heading
    assert "Trials per arm: 3 (equal)" in durable
    assert "from scratch (validity reference): `from_scratch`" in durable
    assert "owner's authorized fine-tuning: `pmp`" in durable
    assert "[95% CI]" in durable and "(n=2)" in durable
    assert "| arm | x1 | x2 |" in durable
    statement = durable.split("### Protection statement")[1]
    assert "**`pmp` on `heldout`**" in statement and "declared budget" in statement and "K = 3" in statement
    assert durable.count("**Verdict:**") == 2 and "Cause:" in durable
    assert (out / "report" / "budget_heldout.png").stat().st_size > 1000


def test_pooled_report_shows_each_seeds_arms_curves_and_d0_beside_the_pooled_ratio(durable_run, tmp_path):
    """Two pre-training seeds: the durable run, and a copy whose PMP model gains 0.7 of what it gained there
    (perplexity after^0.7 before^0.3; the attacker's validation metric, so every choice, unchanged)."""
    out, _, _ = durable_run
    other = tmp_path / "s1"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("report*"))
    for f in (other / "cells").glob("pmp__*.json"):
        c = json.loads(f.read_text())
        if c["attack_kind"] != "probe":
            c["after_val_selected"] = c["before"] ** 0.3 * c["after_val_selected"] ** 0.7
            f.write_text(json.dumps(c))
    md = write_report(ReportConfig(results=str(out), more_results=[str(other)], names=["s0", "s1"],
                                   out=str(tmp_path / "pooled"))).read_text()
    durable = md.split("# Durable evaluation, pooled over pre-training seeds")[1]
    tuned = durable.split("### Equal tuning budgets, by pre-training seed and pooled")[1].split("###")[0]
    rows = {tuple(c.strip() for c in r.strip("|").split("|")[:2]): [c.strip() for c in r.strip("|").split("|")]
            for r in tuned.splitlines() if r.startswith("| attacker on the protected release")}
    assert set(rows) == {("attacker on the protected release: `pmp`", x) for x in ("`s0`", "`s1`", "**pooled**")}
    ratio = {s: sum(_gains(d, "pmp")) / sum(_gains(d, "dense")) for s, d in (("s0", out), ("s1", other))}
    assert ratio["s1"] == pytest.approx(0.7 * ratio["s0"])
    assert rows[("attacker on the protected release: `pmp`", "`s0`")][-1].startswith(f"{ratio['s0']:.2f} ")
    assert rows[("attacker on the protected release: `pmp`", "`s1`")][-1].startswith(f"{ratio['s1']:.2f} ")
    pooled = rows[("attacker on the protected release: `pmp`", "**pooled**")][-1]
    assert pooled.startswith(f"{0.85 * ratio['s0']:.2f} [") and pooled.endswith("(n=4)")
    for heading in ("### Budget curves by pre-training seed", "### Protection statement, pooled",
                    "### D0 diagnostic by pre-training seed", "# Durable evaluation at pre-training seed `s0`",
                    "# Durable evaluation at pre-training seed `s1`"):
        assert heading in durable, heading
    assert "| attacker on the protected release: `pmp` | mean |" in durable
    assert durable.count("| `pmp` (its own private mask) | `s") == 2 and "2 pre-training seeds**" in durable
    assert (tmp_path / "pooled" / "budget_heldout_s0.png").is_file()
    assert "![budget curves](budget_heldout_s1.png)" in durable


def _gains(results: Path, model: str) -> list[float]:
    cells = [json.loads(f.read_text()) for f in (results / "cells").glob(f"{model}__heldout__tuned_full__s*.json")]
    return [M.signed_gain(c["before"], c["after_val_selected"], "lower", "perplexity") for c in cells]


def test_bootstrap_interval_is_seeded_and_brackets_the_ratio():
    num = {0: 0.05, 1: 0.07, 2: 0.06, 3: 0.04}
    den = {0: 0.20, 1: 0.10, 2: 0.15, 3: 0.15}
    a = M.bootstrap_ratio(num, den, n_boot=500, seed=3)
    assert a == M.bootstrap_ratio(num, den, n_boot=500, seed=3)
    assert a["ratio"] == pytest.approx(0.22 / 0.60) and a["lo"] < a["ratio"] < a["hi"] and a["n"] == 4
    same = M.bootstrap_ratio({0: 1.0, 1: 2.0}, {0: 2.0, 1: 4.0})
    assert same["lo"] == pytest.approx(0.5) and same["hi"] == pytest.approx(0.5)
    one = M.bootstrap_ratio({0: 1.0}, {0: 2.0, 1: 3.0})
    assert one["ratio"] == 0.5 and one["lo"] is None and one["n"] == 1
    neg = M.bootstrap_ratio({0: 1.0, 1: 1.0}, {0: -1.0, 1: 2.0}, n_boot=400)
    assert 0 < neg["undefined"] < 1  # resamples of only the negative baseline gain have no ratio


# ------------------------------------------------------------------------------------ the suites
def test_durable_suite_declares_equal_budgets_and_quick_full_are_unchanged():
    s = get_suite("durable")
    assert s.durable.trials >= 20 and s.seeds >= 3
    assert {"adamw", "sgd", "adagrad", "soap"} <= set(s.durable.optimizers)
    assert (s.durable.lr_min, s.durable.lr_max) == (1e-6, 1e-2) and s.durable.budget_factors == (1.0, 3.0, 10.0)
    assert {"heal_then_ft", "reinit_complement"} <= {a.kind for a in s.attacks}
    assert {a.mask_density for a in s.attacks if a.kind == "random_mask"} == {0.01, 0.1, 0.5}
    quick = get_suite("quick")
    assert quick.names() == ["probe", "full_adamw_3e-4_cos", "lora_r8_1e-3_cos", "norm_bias_1e-3_cos",
                             "random_mask_1e-3_cos", "authorized_1e-3_cos", "recovered_mask_1e-3_cos"]
    assert quick.durable is None and quick.lm == Budget(80, 8, 64, 640, 32, 64, 40)
    assert quick.classification == Budget(60, 16, 48, 960, 200, 400, 30)
    full = get_suite("full")
    assert full.durable is None and len(full.attacks) == 51  # every attack registered before the adaptive ones
    assert not {"heal_then_ft", "reinit_complement"} & {a.kind for a in full.attacks}
    # attacks defined before the new fields keep their recorded form, so their results keep their digests
    a = ATTACKS["full_adamw_3e-4_cos"]
    assert set(a.to_dict()) == {"name", "kind", "optimizer", "lr", "schedule", "warmup_fraction", "min_lr_ratio",
                                "weight_decay", "momentum", "grad_clip", "lora_r", "lora_alpha", "steps", "scratch",
                                "note"}
    assert config_digest(a.to_dict()) == "a94366e406a8c3d9"  # as recorded by cells written before this change
    assert get_attack("random_mask_1pct_1e-3_cos").to_dict()["mask_density"] == 0.01


def test_suite_file_turns_on_the_durable_search(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: mine\nextends: durable\ndurable: {trials: 20, budget_factors: [1, 3], optimizers: [adamw, sgd]}"
                 "\n")
    s = load_suite_file(f)
    assert s.durable.trials == 20 and s.durable.budget_factors == (1.0, 3.0) and s.durable.optimizers == ("adamw",
                                                                                                           "sgd")
    assert s.durable.step_fractions == get_suite("durable").durable.step_fractions  # the rest from `extends`


# ------------------------------------------------------------------------------------ adaptive attacks
def _lm_model_and_task(env, budget=TINY_LM):

    rel = env.pmp / "final"
    tok = load_tokenizer(rel)
    pt = prepare_task(lm_tasks(env)[0], tok, budget, seed=0)
    return load_model(rel, "lm", 0, seed=0, pad_id=tok.eos_token_id), pt


@pytest.mark.parametrize("attack", ["random_mask_1pct_1e-3_cos", "random_mask_10pct_1e-3_cos",
                                    "random_mask_50pct_1e-3_cos"])
def test_sparse_random_mask_attacks_leave_their_complement_bit_exact(env, attack):

    model, pt = _lm_model_and_task(env)
    a = get_attack(attack)
    layouts = random_layouts(model, a.mask_density, seed=0, exclude=set())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = finetune(model, pt, a, TINY_LM, seed=0, mask_layouts=layouts)
    assert res["complement_unchanged"] is True
    after = dict(model.named_parameters())
    masked = sum(lay.nnz for lay in layouts.values())
    total = sum(p.numel() for p in before.values())
    assert masked / total == pytest.approx(a.mask_density, rel=0.1)
    changed_in = changed_out = 0
    for n, lay in layouts.items():
        m = lay.to_bool()
        diff = before[n] != after[n].detach()
        changed_in += int((diff & m).sum())
        changed_out += int((diff & ~m).sum())
    assert changed_out == 0 and changed_in > 0


def test_reinit_touches_exactly_the_complement_of_the_named_tensors(env):

    model, _ = _lm_model_and_task(env)
    fresh = load_model(None, "lm", 0, seed=9, config_from=env.pmp / "final", pad_id=0)
    mask = PrivateMask.load(env.recovered).to_bool()
    named = dict(model.named_parameters())
    skipped = next(n for n in mask if "q_proj" in n)
    before = {n: p.detach().clone() for n, p in named.items()}
    info = reinit_complement(model, mask, fresh, exclude={skipped})
    fresh_p = dict(fresh.named_parameters())
    for n, p in named.items():
        if n in mask and n != skipped:
            keep = mask[n]
            assert torch.equal(p.detach()[keep], before[n][keep])  # the suspected trained entries: untouched
            assert torch.equal(p.detach()[~keep], fresh_p[n].detach()[~keep])  # the complement: a fresh init
        else:
            assert torch.equal(p.detach(), before[n]), n  # tensors the mask does not name, and excluded ones
    assert info["reinit_entries"] == sum(int((~m).sum()) for n, m in mask.items() if n != skipped)


def test_heal_then_fine_tune_and_reinit_run_as_sweep_cells(env, tmp_path):
    """Heal on the attacker's text, on an LM task and on a classifier (the healed base carried into it, its new
    head the seeded one); re-init of the recovered complement; each cell records what its preparation did."""
    heal = Attack("heal_test", "heal_then_ft", lr=1e-3, heal_steps=3, heal_lr=1e-3)
    suite = Suite("adaptive", (get_attack("probe"), heal, get_attack("reinit_complement_3e-4_cos")),
                  classification=TINY_CLS, lm=TINY_LM, seeds=1).validate()
    tasks = resolve_tasks("none", task_file=str(env.cls), lm_file=str(env.lm))
    Sweep(models_of(env), tasks, suite, tmp_path, heal_file=str(env.heal), **QUIET).run()
    cells = cells_of(tmp_path)
    for task in ("cls", "heldout"):
        h = cells[f"pmp__{task}__heal_test__s0"]["adaptive"]
        assert h["heal_text"] == f"file {env.heal}" and h["heal_steps"] == 3 and h["heal_loss_last"] < 20
        assert ("transferred_tensors" in h) == (task == "cls")
        r = cells[f"pmp__{task}__reinit_complement_3e-4_cos__s0"]["adaptive"]
        mask = PrivateMask.load(env.recovered).to_bool()
        assert r["reinit_entries"] == sum(int((~m).sum()) for m in mask.values())
    assert "dense__heldout__reinit_complement_3e-4_cos__s0" not in cells  # needs a recovered mask
    assert "from_scratch__heldout__heal_test__s0" not in cells


def test_canonicalise_then_fine_tune_starts_from_the_same_function(env, tmp_path, monkeypatch):
    """The preparation re-balances the scale pairs (weights change) without changing the model's function; the
    cell records it; the rest is the full fine-tune."""
    seen = {}
    real = sweep_module.finetune

    def spy(model, *a, **k):
        ids = torch.arange(1, 17)[None]
        with torch.no_grad():
            seen["logits"] = model(input_ids=ids).logits.double()
            seen["up"] = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        return real(model, *a, **k)

    monkeypatch.setattr(sweep_module, "finetune", spy)
    suite = Suite("canon", (get_attack("probe"), get_attack("canonicalise_then_ft_3e-4_cos")), classification=TINY_CLS,
                  lm=TINY_LM, seeds=1).validate()
    tasks = resolve_tasks("none", lm_file=str(env.lm))
    Sweep([m for m in models_of(env, recovered=False) if m.name == "pmp"], tasks, suite, tmp_path, **QUIET).run()
    cell = cells_of(tmp_path)["pmp__heldout__canonicalise_then_ft_3e-4_cos__s0"]
    assert cell["adaptive"] == {"canonicalised": True} and cell["after_val_selected"] > 0
    rel = load_model(env.pmp / "final", "lm", 0, seed=0)
    with torch.no_grad():
        ref = rel(input_ids=torch.arange(1, 17)[None]).logits.double()
    assert (seen["logits"] - ref).abs().max() / ref.abs().max() < 1e-4  # same function ...
    assert not torch.allclose(seen["up"], rel.model.layers[0].mlp.up_proj.weight)  # ... other weights


def test_heal_moves_every_base_tensor_into_the_classifier_and_keeps_its_head(env):

    rel = env.pmp / "final"
    tok = load_tokenizer(rel)
    lm = load_model(rel, "lm", 0, seed=0, pad_id=tok.eos_token_id)
    start = {n: p.detach().clone() for n, p in lm.named_parameters()}
    blocks = heal_blocks([env.heal.read_text()], tok, 16, 6, seed=0)
    rec = heal(lm, blocks, Attack("h", "heal_then_ft", heal_steps=2, heal_lr=1e-3), batch_size=2, seed=0)
    assert rec["heal_steps"] == 2 and blocks.shape == (6, 16)
    assert all(not torch.equal(start[n], p.detach()) for n, p in lm.named_parameters())
    cls = load_model(rel, "classification", 2, seed=0, pad_id=tok.eos_token_id)
    head = cls.score.weight.detach().clone()
    n = transfer_base(lm, cls)
    healed = dict(lm.named_parameters())
    assert n == sum(1 for k in dict(cls.named_parameters()) if not k.startswith("score."))
    assert all(torch.equal(p.detach(), healed[k].detach()) for k, p in cls.named_parameters() if k in healed)
    assert torch.equal(cls.score.weight.detach(), head)


def test_soap_is_a_maintained_whitening_optimizer_and_trains():
    pytest.importorskip("pytorch_optimizer")

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    opt = make_optimizer(Attack("s", "full", optimizer="soap", lr=3e-3),
                         [{"params": list(net.parameters()), "weight_decay": 0.0}])
    assert type(opt).__module__.startswith("pytorch_optimizer")
    losses = []
    for _ in range(30):
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------ D0
def _explicit_hessian(net, loss_of):

    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def f(flat):
        return loss_of(lambda *a: functional_call(net, dict(zip(names, [t.view(s) for t, s in
                                                                        zip(flat.split(sizes), shapes)])), a))

    return torch.autograd.functional.hessian(f, torch.cat([p.detach().flatten() for p in params]))


def test_top_eigenvalue_matches_an_explicit_hessian_dense_and_restricted():

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    xs = [torch.randn(8, 3, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randn(8, 2, dtype=torch.float64) for _ in range(2)]

    def loss_of(f):  # mean over two batches, as D0 averages its batches
        return sum(((f(x) - y) ** 2).mean() for x, y in zip(xs, ys)) / 2

    H = _explicit_hessian(net, loss_of)
    params = list(net.parameters())
    hvp = loss_hvp([lambda x=x, y=y: ((net(x) - y) ** 2).mean() for x, y in zip(xs, ys)], params)
    g = torch.Generator().manual_seed(1)
    restrict = [torch.rand(p.shape, generator=g) < 0.5 for p in params]
    restrict[1] = None  # a whole tensor kept: a parameter the mask does not cover
    keep = torch.cat([(m if m is not None else torch.ones(p.shape, dtype=torch.bool)).flatten()
                      for m, p in zip(restrict, params)])
    # the loss and its negative: the second has a negative dominant eigenvalue, where power iteration would report
    # the most negative curvature instead of the sharpness (as it did on `small`)
    neg_hvp = loss_hvp([lambda x=x, y=y: -((net(x) - y) ** 2).mean() for x, y in zip(xs, ys)], params)
    for sign, op in ((1.0, hvp), (-1.0, neg_hvp)):
        for sub, r in ((sign * H, None), (sign * H[keep][:, keep], restrict)):
            ev = torch.linalg.eigvalsh(sub)
            got = top_eigenvalue(op, params, r, iters=3000, tol=1e-13, seed=0)
            assert got["converged"] and got["dimension"] == sub.shape[0]
            assert got["largest_magnitude"] == pytest.approx(float(ev[ev.abs().argmax()]), rel=1e-6)
            assert got["eigenvalue"] == pytest.approx(float(ev.max()), rel=1e-6, abs=1e-9)
            assert got["smallest"] == pytest.approx(float(ev.min()), rel=1e-6, abs=1e-9)
            assert (got["largest_magnitude"] < 0) == (sign < 0)  # both cases are exercised
    # fewer steps than dimensions (what D0 does on a real model): the largest Ritz value approaches from below
    few = top_eigenvalue(hvp, params, None, iters=8, seed=0)
    ev = torch.linalg.eigvalsh(H)
    assert few["iterations"] == 8 and float(ev.min()) - 1e-9 <= few["eigenvalue"] <= float(ev.max()) + 1e-9
    assert few["eigenvalue"] == pytest.approx(float(ev.max()), rel=0.05)


@pytest.mark.parametrize("ratio, cause", [(132.0, "132x sharper off the mask -- a curvature barrier"),
                                          (1.5, "without a curvature cause -- a learning-rate effect")])
def test_d0_verdict_sees_an_owner_held_back_at_the_same_rate_but_ahead_at_its_own(ratio, cause):
    """Level at the attacker's best rate (Delta_c <= 0) is not the whole story: when the owner's own best rate ends
    lower, the attacker is held to a lower rate, and the sharpness ratio says whether curvature is why."""
    s = {"steps": 20, "attacker_lr": 3e-4, "delta_c_at_attacker_lr": -0.009, "delta_c_each_best": 0.2,
         "best_lr": {"dense": 3e-4, "owner": 1e-3}, "sharpness_ratio": ratio, "owner": "mask"}
    v = verdict(s)
    assert "the owner's best learning rate (0.001) still ends 0.2000 lower than the attacker's best (0.0003)" in v
    assert cause in v and "no mechanism" not in v
    assert "no mechanism" in verdict({**s, "delta_c_each_best": -0.01, "sharpness_ratio": 1.5})


def test_d0_record_names_the_cause(durable_run):
    out, _, _ = durable_run
    rec = json.loads((out / "diagnostics" / "d0__pmp__heldout.json").read_text())
    assert rec["mask_from"] == "pmp" and rec["owner_density"] == pytest.approx(0.5, abs=0.01)
    assert [u["lr"] for u in rec["updates"]] == [1e-3, 1e-2]
    assert all(set(u[v]) == {"1", "2"} for u in rec["updates"] for v in ("dense", "owner", "random"))
    cur = rec["curvature"]
    assert cur["dense"]["dimension"] > cur["owner"]["dimension"] > cur["complement"]["dimension"] > 0
    assert cur["owner"]["dimension"] + cur["complement"]["dimension"] == cur["dense"]["dimension"]
    s = rec["summary"]
    assert s["sharpness_ratio"] == pytest.approx(cur["dense"]["eigenvalue"] / cur["owner"]["eigenvalue"])
    assert s["delta_c_at_attacker_lr"] == pytest.approx(
        next(u for u in rec["updates"] if u["lr"] == s["attacker_lr"])["dense"]["2"] -
        next(u for u in rec["updates"] if u["lr"] == s["attacker_lr"])["owner"]["2"])
    assert "Cause:" in rec["verdict"]
    dense = json.loads((out / "diagnostics" / "d0__dense__heldout.json").read_text())
    assert dense["mask_from"] == "pmp"  # the baseline with the protected model's mask: the control


def test_d0_records_of_the_largest_magnitude_estimator_are_recomputed():
    """The literals are the digests D0 records carried before the curvature estimator became the largest algebraic
    eigenvalue (they held the largest-magnitude one): such records must be recomputed, not read as done; records
    of the current estimator are keyed by every input."""
    task = SimpleNamespace(name="heldout", train=list(range(10)), test=list(range(4)))
    for spec, old in ((DurableSpec(), "ed1cea0d6d56781f"), (TINY_SPEC, "42124e8c5a2d4ff8")):
        new = d0_inputs_sha("a" * 16, "b" * 64, task, TINY_LM, 0, D0Settings.of(spec))
        assert new != old
        assert new == d0_inputs_sha("a" * 16, "b" * 64, task, TINY_LM, 0, D0Settings.of(spec))
        assert new != d0_inputs_sha("a" * 16, "c" * 64, task, TINY_LM, 0, D0Settings.of(spec))  # another mask


# ------------------------------------------------------------------------------------ bad input
def _durable_file(tmp_path, **durable) -> Path:
    f = tmp_path / "d.yaml"
    spec = {"trials": 2, "d0": False, "budget_factors": [1], "data_sizes_lm": [6, 12], **durable}
    f.write_text(f"name: d\nseeds: 1\nattacks: [probe]\nlm: {json.dumps(dataclasses.asdict(TINY_LM))}\n"
                 f"durable: {json.dumps(spec)}\n")
    return f


def _attack_cfg(env, tmp_path, **kw) -> AttackConfig:
    return AttackConfig(**{**dict(tasks="none", lm_file=str(env.lm), scratch=False, out=str(tmp_path / "res"),
                                  models={"pmp": str(env.pmp / "final")}), **kw})


@pytest.mark.parametrize("bad, match", [
    (dict(trials=0), "trials must be >= 1"),
    (dict(budget_factors=[0.0, 3.0]), "budget_factors must be > 0"),
    (dict(data_sizes=[0]), "data_sizes must be >= 1"),
    (dict(data_sizes=[100_000]), "data size 100000 is larger than task heldout holds: \\d+ training blocks"),
    (dict(suite="quick", trials=24), "suite 'quick' has none"),
    (dict(suite="quick", general_file="/x.txt"), "suite 'quick' has none"),
    (dict(general_file="/nonexistent/general.txt"), "--general-file /nonexistent/general.txt does not exist"),
])
def test_bad_budgets_are_value_errors_and_nothing_is_written(env, tmp_path, bad, match):
    bad = {"suite": str(_durable_file(tmp_path)), **bad}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_attack(_attack_cfg(env, tmp_path, **bad).validate())
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("durable, match", [
    ({"trials": 0}, "a tuning budget of 0"),
    ({"optimizers": ["adamw", "lion"]}, "unknown optimizer 'lion'; valid: adamw, adam, sgd, adagrad, soap"),
    ({"budget_factors": [1, 0]}, "budget_factors must be > 0"),
    ({"data_sizes_lm": [0]}, "data_sizes_lm must be whole numbers >= 1"),
    ({"lr_min": 1e-2, "lr_max": 1e-6}, "lr_min <= lr_max"),
    ({"wings": 2}, "unknown fields.*wings"),
])
def test_bad_durable_suite_files_name_the_field(tmp_path, durable, match):
    with pytest.raises(ValueError, match=match):
        load_suite_file(_durable_file(tmp_path, **durable))


def test_a_classification_data_size_larger_than_the_task_is_refused(env, tmp_path):
    tasks = resolve_tasks("none", task_file=str(env.cls))
    with pytest.raises(ValueError, match="data size 100 is larger than task cls holds: 26 training examples after"):
        DurableSweep(models_of(env), tasks, tiny_durable_suite(), tmp_path / "res", data_sizes=[8, 100], **QUIET)
    assert not (tmp_path / "res").exists()


def test_unknown_optimizer_and_heal_without_text_are_refused(env, tmp_path):
    with pytest.raises(ValueError, match="optimizer must be one of adamw, adam, sgd, adagrad, soap"):
        Attack("x", "full", optimizer="lion").validate()
    suite = Suite("h", (get_attack("probe"), get_attack("heal_then_ft_3e-4_cos")), lm=TINY_LM, seeds=1).validate()
    with pytest.raises(ValueError, match="need generic text: pass --heal-file"):
        Sweep(models_of(env), lm_tasks(env), suite, tmp_path / "res", cache_dir=str(tmp_path / "nocache"), **QUIET)
    with pytest.raises(FileNotFoundError, match="--heal-file"):
        Sweep(models_of(env), lm_tasks(env), suite, tmp_path / "res", heal_file=str(tmp_path / "none.txt"), **QUIET)
    assert not (tmp_path / "res").exists()


def test_cli_durable_flags(env, tmp_path, capsys):
    suite = _durable_file(tmp_path)
    base = ["attack", "--models", f"pmp={env.pmp / 'final'}", "--tasks", "none", "--lm-file", str(env.lm),
            "--suite", str(suite), "--no-scratch", "--out", str(tmp_path / "res")]
    assert main([*base, "--trials", "0"]) == 2
    assert "trials must be >= 1" in capsys.readouterr().err and not (tmp_path / "res").exists()
    assert main([*base, "--trials", "1", "--budget-factors", "1", "2", "--data-sizes", "6", "--general-file",
                 str(env.heal)]) == 0
    cells = cells_of(tmp_path / "res")
    assert sorted(c["attack"] for c in cells.values() if c.get("stage")) == [
        "curve_full_x2_c0", "curve_full_x2_lr", "data_full_n6", "general_full", "search_full_t00", "tuned_full"]
    assert json.loads((tmp_path / "res" / "sweep.json").read_text())["suite"]["durable"]["trials"] == 1
