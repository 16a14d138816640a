"""`pmp study`: variants x pre-training seeds on the same data and budget, audited and attacked, and the protection
frontier they draw -- its arithmetic on hand-written cells, the whole study end to end on tiny runs (and that a
second call redoes nothing), and study files that are refused before anything is written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from corpus_fixture import generate_text, write_corpus

from pmp.cli import main
from pmp.eval import metrics as M
from pmp.eval.config import AttackSettings
from pmp.eval.d0 import summarize, verdict
from pmp.eval.d0_run import D0Settings
from pmp.eval.durable_spec import DurableSpec
from pmp.eval.frontier import CONFIRM, counted, d0_control, frontier, pareto, ppl_cost, seed_points, survivors
from pmp.eval.frontier_report import markdown
from pmp.study import ConfirmSettings, StudyConfig, confirm_attack
from pmp.typed_config import load_typed

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- arithmetic
def cell(model, task, attack, kind, seed, before, after, val, metric="accuracy", direction="higher"):
    return {"model": model, "task": task, "attack": attack, "attack_kind": kind, "seed": seed, "metric": metric,
            "direction": direction, "before": before, "after_val_selected": after, "after_final": after,
            "selected_val": val, "model_role": "scratch" if model == "from_scratch" else "other",
            "task_kind": "classification", "suite": "hand",
            "budget": {"steps": 60, "batch_size": 16, "max_len": 48, "max_train": 960, "data": {"train": 960}}}


def hand_cells() -> list[dict]:
    """Task `t` (valid): dense gains 0.3 / 0.2 (seeds 0 / 1) with `full`; `v1` gains 0.1 / 0.1 with `full`, which
    the attacker's validation metric picks over `lora` (better on test, worse on validation); the owner's authorized
    fine-tune gains 0.25 / 0.25. `v2` gains 0.15 / 0.1. Task `bad`: from scratch beats dense (invalid)."""
    cs = []
    for s, (d_after, v2_after) in enumerate([(0.8, 0.65), (0.7, 0.6)]):
        for m in ("dense", "v1", "v2", "from_scratch"):
            cs.append(cell(m, "t", "probe", "probe", s, 0.5, 0.5, 0.5))
        cs.append(cell("dense", "t", "full", "full", s, 0.5, d_after, d_after))
        cs.append(cell("v1", "t", "full", "full", s, 0.5, 0.6, 0.6))
        cs.append(cell("v1", "t", "lora", "lora", s, 0.5, 0.9, 0.55))  # the oracle's pick, not the attacker's
        cs.append(cell("v1", "t", "authorized", "authorized", s, 0.5, 0.75, 0.75))
        cs.append(cell("v2", "t", "full", "full", s, 0.5, v2_after, v2_after))
        cs.append(cell("from_scratch", "t", "full", "full", s, 0.5, 0.55, 0.55))
        for m, after in (("dense", 0.6), ("v1", 0.6), ("v2", 0.6), ("from_scratch", 0.7)):
            cs.append(cell(m, "bad", "probe", "probe", s, 0.5, 0.5, 0.5))
            cs.append(cell(m, "bad", "full", "full", s, 0.5, after, after))
    return cs


def test_frontier_arithmetic_on_hand_written_cells():
    assert ppl_cost(110.0, 100.0) == pytest.approx(0.10)
    assert ppl_cost(90.0, 100.0) == pytest.approx(-0.10)
    with pytest.raises(ValueError, match="finite and > 0"):
        ppl_cost(float("nan"), 100.0)
    audits = {"v1": {"best_attack": "abs_weight", "best_global": {"auroc": 0.93, "precision_at_rho": 0.8}},
              "v2": None}
    pts = seed_points(hand_cells(), ["v1", "v2"], {"dense": 100.0, "v1": 110.0, "v2": 120.0}, audits, 0, 0.8)
    v1, v2 = pts
    assert (v1["variant"], v1["seed"], v2["variant"]) == ("v1", 0, "v2")
    assert v1["x"] == pytest.approx(0.10) and v2["x"] == pytest.approx(0.20)
    assert v1["audit"] == {"best_attack": "abs_weight", "auroc": 0.93, "precision_at_rho": 0.8}
    assert v2["audit"] is None
    t = v1["tasks"]["t"]
    assert t["valid"] is True and t["best_attack"] == "full" and t["dense_best_attack"] == "full"
    assert t["ratio"] == pytest.approx(0.1 / 0.25)  # validation-chosen; the oracle (lora, gain 0.4) would give 1.6
    # paired bootstrap over the 2 fine-tuning seeds: resampled ratios are 0.1/0.3, 0.1/0.25 or 0.1/0.2
    assert 0.1 / 0.3 - 1e-9 <= t["lo"] <= t["ratio"] <= t["hi"] <= 0.5 + 1e-9 and t["n_ft_seeds"] == 2
    assert t["authorized_recovery"] == pytest.approx(1.0)
    assert t["killed"] is False and t["kill_basis"] == "CI lower end"
    assert t["budget"]["steps"] == 60 and t["budget"]["suite"] == "hand"
    assert v2["tasks"]["t"]["ratio"] == pytest.approx(0.125 / 0.25)
    bad = v1["tasks"]["bad"]
    assert bad["valid"] is False and bad["ratio"] == pytest.approx(1.0)

    fr = frontier(pts, ["v1", "v2"], [0], 0.8)
    assert fr["verdicts"]["v1"]["verdict"] == "alive" and fr["verdicts"]["v1"]["valid_tasks"] == ["t"]
    assert fr["verdicts"]["v1"]["highest_lower_end"] == pytest.approx(t["lo"])
    assert "bad" not in fr["frontiers"]  # invalid everywhere: no frontier
    means = {m["name"]: (m["x"], m["y"]) for m in fr["frontiers"]["t"]["means"]}
    assert means["dense"] == (0.0, 1.0) and means["v1"] == pytest.approx((0.1, 0.4))
    assert fr["frontiers"]["t"]["frontier"] == ["dense", "v1"]  # v2 costs more and protects less than v1

    # kill_above 0.3: v1's interval (lower end >= 1/3) lies above it -> killed on the valid task only
    killed = frontier(seed_points(hand_cells(), ["v1"], {"dense": 100.0, "v1": 110.0}, {}, 0, 0.3), ["v1"], [0], 0.3)
    assert killed["verdicts"]["v1"]["verdict"] == "killed" and killed["verdicts"]["v1"]["killed_on"] == ["t"]
    # one fine-tuning seed: no interval, the ratio itself is compared (and said to be)
    one = [c for c in hand_cells() if c["seed"] == 0]
    p1 = seed_points(one, ["v1"], {"dense": 100.0, "v1": 100.0}, {}, 0, 0.3)[0]["tasks"]["t"]
    assert p1["lo"] is None and p1["ratio"] == pytest.approx(1 / 3) and p1["killed"] is True
    assert p1["kill_basis"].startswith("ratio (no CI")


def test_verdict_over_seeds_and_pareto():
    def pt(v, s, x, ratio, lo, valid=True):
        return {"variant": v, "seed": s, "x": x,
                "tasks": {"t": {"valid": valid, "ratio": ratio, "lo": lo, "killed": lo > 0.8, "budget": {}}}}
    pts = [pt("a", 0, 0.1, 0.95, 0.9), pt("a", 1, 0.1, 0.9, 0.85),    # killed at both seeds
           pt("b", 0, 0.0, 0.95, 0.9), pt("b", 1, 0.0, 0.5, 0.3),     # killed at one seed only
           pt("c", 0, 0.3, 0.2, 0.1), pt("c", 1, 0.3, 0.95, 0.9, valid=False)]  # the killed seed is invalid
    v = frontier(pts, ["a", "b", "c"], [0, 1], 0.8)["verdicts"]
    assert [v[k]["verdict"] for k in "abc"] == ["killed", "mixed", "alive"]
    items = [{"name": n, "x": x, "y": y} for n, x, y in
             [("dense", 0, 1), ("p", 0.1, 0.5), ("q", 0.1, 0.6), ("r", 0.3, 0.5), ("s", -0.1, 1.2), ("u", 0.4, 0.1)]]
    assert [i["name"] for i in pareto(items)] == ["s", "dense", "p", "u"]


def test_survivors_are_confirmed_and_the_confirmation_decides():
    ppl = {"dense": 100.0, "v1": 110.0, "v2": 120.0}
    screen = seed_points(hand_cells(), ["v1", "v2"], ppl, {}, 0, 0.45)
    # kill_above 0.45: v1's interval (lower end 1/3, ratio 0.4) reaches below it -> v1 survives on its only valid
    # task `t`; v2 gains half of dense's at both seeds (interval [0.5, 0.5]) -> killed, not confirmed
    assert survivors(screen) == {"v1": ["t"]}
    assert survivors(seed_points(hand_cells(), ["v1", "v2"], ppl, {}, 0, 0.3)) == {}  # both killed on `t`
    # the stronger attacker: v1's full fine-tune now gains as much as dense's (ratio 1) -> killed by the confirmation
    strong = [dict(c, after_val_selected=c["after_val_selected"] + (0.2 if c["model"] == "v1" and c["attack"] == "full"
                                                                    else 0.0), suite="strong")
              for c in hand_cells()]
    strong = [dict(c, selected_val=c["after_val_selected"]) if c["model"] == "v1" and c["attack"] == "full" else c
              for c in strong]
    confirm = seed_points(strong, ["v1"], ppl, {}, 0, 0.45, stage=CONFIRM)
    assert confirm[0]["stage"] == CONFIRM and confirm[0]["tasks"]["t"]["ratio"] > 0.45
    pts = screen + confirm
    assert [(p["variant"], p["stage"]) for p in counted(pts)] == [("v2", "screen"), ("v1", "confirm")]
    fr = frontier(pts, ["v1", "v2"], [0], 0.45, confirm_suite="strong")
    assert fr["verdicts"]["v1"]["verdict"] == "killed" and fr["verdicts"]["v1"]["decided_by"] == ["strong (confirm)"]
    assert fr["verdicts"]["v2"]["verdict"] == "killed" and fr["verdicts"]["v2"]["decided_by"] == ["hand (screen)"]
    assert fr["budgets"]["t"]["suite"] == "hand" and fr["confirm_budgets"]["t"]["suite"] == "strong"
    means = {m["name"]: m["y"] for m in fr["frontiers"]["t"]["means"]}
    assert means["v1"] == pytest.approx(confirm[0]["tasks"]["t"]["ratio"])  # the confirmation's, not the screen's
    md = markdown(fr)
    assert "confirmation by suite `strong`" in md and "| `v1` | **killed** | strong (confirm) |" in md
    assert "| `v1` | 0 | screen (hand) |" in md and "| `v1` | 0 | confirm (strong) |" in md  # both rows shown
    assert "no confirmation suite" in markdown(frontier(screen, ["v1", "v2"], [0], 0.45))


def test_confirmation_attacks_only_the_tasks_it_is_given():
    a = AttackSettings(suite="quick", tasks="default,trec:lm,mine:lm", lm_file="/d/heldout.txt",
                       task_file="/d/mine.csv", verbalisers={"trec": "a,b", "mine": "x,y"})
    c = ConfirmSettings(suite="durable", trials=5, data_sizes=[16])
    got = confirm_attack(a, c, ["movie_dialog", "heldout", "trec:lm"])
    assert (got.suite, got.tasks, got.lm_file, got.task_file) == ("durable", "movie_dialog,trec:lm", "/d/heldout.txt",
                                                                   "")
    assert got.verbalisers == {"trec": "a,b"} and (got.trials, got.data_sizes) == (5, [16])
    only_file = confirm_attack(a, c, ["mine:lm"])
    assert (only_file.tasks, only_file.lm_file, only_file.task_file) == ("mine:lm", "", "/d/mine.csv")
    assert only_file.verbalisers == {"mine": "x,y"}
    assert a.suite == "quick" and a.tasks == "default,trec:lm,mine:lm"  # the screen's settings are untouched


def fake_d0(model: str, mask_from: str, unmasked: float, owner: float, lam_dense: float, lam_owner: float) -> dict:
    """A D0 record (eval/d0_run.py's format) whose attacker's best lr is 1e-3: after 2 steps the unmasked update
    reaches `unmasked`, the owner's `owner`; top Hessian eigenvalues `lam_dense` / `lam_owner`."""
    rec = {"status": "done", "model": model, "mask_from": mask_from, "task": "t", "steps": [1, 2],
           "updates": [{"lr": 1e-3, "dense": {"1": 3.2, "2": unmasked}, "owner": {"1": 3.2, "2": owner},
                        "random": {"1": 3.3, "2": 3.25}},
                       {"lr": 1e-2, "dense": {"1": 3.6, "2": 3.5}, "owner": {"1": 2.0, "2": 1.0},
                        "random": {"1": 3.6, "2": 3.6}}],
           "curvature": {"dense": {"eigenvalue": lam_dense, "converged": True},
                         "owner": {"eigenvalue": lam_owner, "converged": True}, "batches": 1}}
    rec["summary"] = summarize(rec)
    rec["verdict"] = verdict(rec["summary"])
    return rec


def test_frontier_shows_d0_per_variant_and_the_dense_control():
    d0 = {"v1": fake_d0("v1", "v1", 3.0, 2.9, 12.0, 3.0), "dense": fake_d0("dense", "v1", 3.0, 3.0, 5.0, 5.0),
          "v2": {"model": "v2", "skipped": "its run keeps no mask"}}
    pts = seed_points(hand_cells(), ["v1", "v2"], {"dense": 100.0, "v1": 110.0, "v2": 120.0}, {}, 0, 0.8, d0)
    v1, v2 = pts[0]["d0"], pts[1]["d0"]
    # read at the lr where the UNMASKED update is best (1e-3), not where the owner's is (1e-2)
    assert (v1["attacker_lr"], v1["steps"], v1["unmasked_loss"], v1["owner_loss"]) == (1e-3, 2, 3.0, 2.9)
    assert v1["delta_c"] == pytest.approx(0.1) and v1["sharpness_ratio"] == pytest.approx(4.0)
    assert v1["verdict"] == d0["v1"]["verdict"] and "a curvature barrier" in v1["verdict"]
    assert v2 == {"model": "v2", "skipped": "its run keeps no mask"}
    control = d0_control(d0, 0)
    assert control["seed"] == 0 and control["mask_from"] == "v1" and control["sharpness_ratio"] == pytest.approx(1)
    fr = frontier(pts, ["v1", "v2"], [0], 0.8, d0_controls=[control])
    assert fr["d0_controls"] == [control]
    md = markdown(fr)
    assert "| D0 Delta_c | D0 curvature ratio |" in md and "| 0.1000 | 4.00 |" in md and "| not run | not run |" in md
    assert "Protection is only possible where Delta_c > 0" in md and "near 1 means no curvature barrier" in md
    assert "`v1` (its own private mask) | t | 0.001 | 3.0000 | 2.9000 | 0.1000 | 4.00 |" in md
    assert "`dense` (the mask of `v1` (control)) | t |" in md and "not run: its run keeps no mask" in md
    assert md.index("`v1` (its own") < md.index("`dense` (the mask")  # variants first, the control last
    off = markdown(frontier(seed_points(hand_cells(), ["v1"], {"dense": 100.0, "v1": 110.0}, {}, 0, 0.8), ["v1"],
                            [0], 0.8))
    assert "| off | off |" in off and "Not run (`d0: false` in the study file)" in off


# ---------------------------------------------------------------------------------------------- end to end
def study_args(tmp_path: Path, out: Path) -> list[str]:
    files = write_corpus(tmp_path)
    lm = tmp_path / "heldout.txt"
    lm.write_text(generate_text(15000, seed=99))
    sets = {"data.corpus": files, "data.cache_dir": str(tmp_path / "cache"), "data.max_chars": 0,
            "data.seq_len": 32, "data.val_fraction": 0.1, "tokenizer.vocab_size": 320, "model.hidden_size": 32,
            "model.intermediate_size": 64, "train.steps": 20, "train.batch_size": 4, "train.warmup_steps": 2,
            "train.eval_every": 0, "train.eval_batches": 2, "train.ckpt_every": 0, "train.progress": False,
            "train.threads": 1, "pmp.min_warmup_steps": 5, "pmp.max_warmup_steps": 5, "audit.max_seconds": 20,
            "audit.max_seed": 5, "audit.grad_batches": 1, "audit.activation_batches": 1,
            "d0_lrs": "[0.001,0.01]", "d0_steps": "[1,2]", "d0_hessian_iters": 3, "d0_hessian_batches": 1}
    args = ["study", str(ROOT / "configs" / "study_debug.yaml"), "--out", str(out), "--set", "seeds=[0,1]",
            "--tasks", "none", "--lm-file", str(lm), "--suite", str(ROOT / "configs" / "attack_debug.yaml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for sub in ("runs", "releases", "audit", "attack", "d0")
            for p in (root / sub).rglob("*") if p.is_file() and p.name not in ("sweep.json", ".pmp.lock")}


def test_study_end_to_end_then_skips_every_finished_stage(tmp_path, capsys):
    out = tmp_path / "study"
    args = study_args(tmp_path, out)
    assert main(args) == 0
    fr = json.loads((out / "frontier.json").read_text())
    assert sorted((p["variant"], p["seed"]) for p in fr["points"]) == [(v, s) for v in ("frozen_r05", "trap")
                                                                       for s in (0, 1)]
    assert fr["kill_above"] == 0.8 and fr["budgets"]["heldout"]["steps"] == 10  # the debug suite's LM budget
    for p in fr["points"]:
        st = {n: json.loads((out / "runs" / f"s{p['seed']}" / n / "run.json").read_text())["final_val_ppl"]
              for n in ("dense", p["variant"])}
        assert p["x"] == pytest.approx(st[p["variant"]] / st["dense"] - 1)
        t = p["tasks"]["heldout"]
        assert t["n_ft_seeds"] == 2 and t["best_attack"] == "full_adamw_3e-4_cos"
        assert t["valid"] in (True, False)  # tiny runs: pre-training may or may not beat from scratch
        assert t["authorized_recovery"] is None or math.isfinite(t["authorized_recovery"])
        assert 0 <= p["audit"]["auroc"] <= 1
        assert (out / "audit" / f"s{p['seed']}" / p["variant"] / "recovered_mask").is_dir()
    assert set(fr["verdicts"]) == {"frozen_r05", "trap"}
    md = (out / "frontier.md").read_text()
    assert "kill_above = 0.8" in md and "`trap`" in md and "10 steps x batch 4" in md
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = json.loads((out / "stages.json").read_text())
    assert {"pretrain s0/dense", "pretrain s1/trap", "export s0/frozen_r05", "audit s1/trap"} <= set(stages)
    assert all(r["seconds"] > 0 for r in stages.values())
    for s in (0, 1):
        cells = list((out / "attack" / f"s{s}" / "cells").glob("*.json"))
        assert {c.name.split("__")[0] for c in cells} == {"dense", "frozen_r05", "trap", "from_scratch"}
    scratch = [{p.name: p.read_bytes() for p in (out / "attack" / f"s{s}" / "cells").glob("from_scratch__*")}
               for s in (0, 1)]
    assert scratch[0] and scratch[1] == scratch[0]  # seed 1 took seed 0's from-scratch cells (same config, tokenizer)
    # seed s is the batch order of every run of the seed; the variant's overrides reach its run only
    for s, name in [(s, n) for s in (0, 1) for n in ("dense", "frozen_r05", "trap")]:
        rc = yaml.safe_load((out / "runs" / f"s{s}" / name / "config.yaml").read_text())
        assert rc["train"]["data_seed"] == s and rc["train"]["method"] == ("dense" if name == "dense" else "pmp")
        assert rc["pmp"]["variant"] == ("trap" if name == "trap" else "none")

    # D0 of each variant's release with its own mask and of dense with the first variant's mask (the control)
    for s in (0, 1):
        files = sorted(f.name for f in (out / "d0" / f"s{s}").iterdir())
        assert files == [f"d0__{n}__heldout.json" for n in ("dense", "frozen_r05", "trap")]
        recs = {n: json.loads((out / "d0" / f"s{s}" / f"d0__{n}__heldout.json").read_text())
                for n in ("dense", "frozen_r05", "trap")}
        assert {n: r["mask_from"] for n, r in recs.items()} == {"dense": "frozen_r05", "frozen_r05": "frozen_r05",
                                                                "trap": "trap"}
        assert all([u["lr"] for u in r["updates"]] == [1e-3, 1e-2] and r["steps"] == [1, 2] for r in recs.values())
        assert recs["dense"]["batch_size"] == 4 and recs["dense"]["data"]["train_blocks"] <= 40  # the suite's LM budget
        for p in (p for p in fr["points"] if p["seed"] == s):
            d, r = p["d0"], recs[p["variant"]]
            assert d["verdict"] == r["verdict"] and d["task"] == "heldout" and d["attacker_lr"] in (1e-3, 1e-2)
            assert d["delta_c"] == pytest.approx(r["summary"]["delta_c_at_attacker_lr"])
            assert d["sharpness_ratio"] == pytest.approx(r["summary"]["sharpness_ratio"])
            assert d["unmasked_loss"] - d["owner_loss"] == pytest.approx(d["delta_c"])
    assert [(c["seed"], c["model"], c["mask_from"]) for c in fr["d0_controls"]] == [(0, "dense", "frozen_r05"),
                                                                                   (1, "dense", "frozen_r05")]
    assert "## D0 diagnostic" in md and "| D0 Delta_c | D0 curvature ratio |" in md
    assert "`dense` (the mask of `frozen_r05` (control)) | heldout |" in md
    assert {"d0 s0", "d0 s1"} <= set(stages)

    # a second call redoes nothing: every run, release, audit and cell file is untouched, the ledger too
    before, ledger = _mtimes(out), (out / "stages.json").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert _mtimes(out) == before and (out / "stages.json").read_text() == ledger
    again = json.loads((out / "frontier.json").read_text())
    assert {s["this_call"] for s in again["stages"]} == {"skipped"}
    assert [s["seconds"] for s in again["stages"]] == [stages[s["stage"]]["seconds"] for s in again["stages"]]
    assert "0 cells run" in capsys.readouterr().out

    # another base recipe: refused whole before anything is written (not after retraining the runs that match)
    study_yaml = (out / "study.yaml").read_text()
    assert main(args + ["--set", "train.lr=0.001"]) == 2
    assert "runs/s0/dense was trained with another config (train.lr: 0.003 -> 0.001)" in capsys.readouterr().err
    assert _mtimes(out) == before and (out / "study.yaml").read_text() == study_yaml

    # d0: false runs no D0 (and writes none); the frontier says so
    shutil.rmtree(out / "d0")
    assert main(args + ["--set", "d0=false"]) == 0
    assert not (out / "d0").exists() and (out / "stages.json").read_text() == ledger
    off = json.loads((out / "frontier.json").read_text())
    assert all(p["d0"] is None for p in off["points"]) and off["d0_controls"] == []
    assert not any(s["stage"].startswith("d0") for s in off["stages"])
    assert "Not run (`d0: false` in the study file)" in (out / "frontier.md").read_text()


TINY_CONFIRM_SUITE = """name: tinyconfirm
seeds: 2
attacks: [probe]
lm: {steps: 4, batch_size: 2, max_len: 16, max_train: 12, max_val: 3, max_test: 3, eval_every: 2}
durable: {trials: 2, sampler: random, budget_factors: [1], curve_lr_scaled: false, data_sizes_lm: [], d0: false,
          general: false, optimizers: [adamw], bootstrap: 100}
"""


def test_study_confirms_its_survivors_with_the_stronger_suite(tmp_path, monkeypatch, capsys):
    """A variant nothing kills at the screen (kill_above 1000) is re-attacked with the confirmation suite next to
    dense and from scratch, and its verdict is read from that. Tiny runs may or may not beat from scratch, so
    validity is pinned here: this checks the plumbing, the rule itself is checked on hand-written cells above."""
    monkeypatch.setattr(M, "validity", lambda *a, **k: {"valid": True, "why": ""})
    suite = tmp_path / "tinyconfirm.yaml"
    suite.write_text(TINY_CONFIRM_SUITE)
    out = tmp_path / "study"
    args = study_args(tmp_path, out) + ["--set", "seeds=[0]", "--set", "variants={frozen_r05: {}}", "--set", "d0=false",
                                        "--set", "audit_variants=false", "--set", "kill_above=1000",
                                        "--set", f"confirm.suite={suite}", "--set", "confirm.trials=2"]
    assert main(args) == 0
    assert "frozen_r05 survive the screen" in capsys.readouterr().out
    cells = [json.loads(f.read_text()) for f in (out / "confirm" / "s0" / "cells").glob("*.json")]
    assert {c["model"] for c in cells} == {"dense", "frozen_r05", "from_scratch"}
    assert {c["suite"] for c in cells} == {"tinyconfirm"} and {c["task"] for c in cells} == {"heldout"}
    assert any(c.get("stage") == "search" and c["model"] == "frozen_r05" and c["durable"]["arm"] == "authorized"
               for c in cells)  # the owner's arm: the survivor's private run reached the confirmation
    fr = json.loads((out / "frontier.json").read_text())
    assert [(p["variant"], p["stage"]) for p in fr["points"]] == [("frozen_r05", "screen"), ("frozen_r05", "confirm")]
    assert fr["verdicts"]["frozen_r05"]["decided_by"] == ["tinyconfirm (confirm)"]
    assert fr["confirm_budgets"]["heldout"]["suite"] == "tinyconfirm" and fr["budgets"]["heldout"]["suite"] == "debug"
    assert "confirm s0" in json.loads((out / "stages.json").read_text())
    # resumed: nothing is redone
    before = {str(f): f.stat().st_mtime_ns for f in (out / "confirm").rglob("*.json") if f.name != "sweep.json"}
    assert main(args) == 0
    assert {str(f): f.stat().st_mtime_ns for f in (out / "confirm").rglob("*.json") if f.name != "sweep.json"} == before


def test_example_study_files_resolve_to_the_runs_they_promise():
    cfg = load_typed(StudyConfig, ROOT / "configs" / "study_frontier.yaml")
    assert cfg.seeds == [0, 1] and cfg.kill_above == 0.8 and cfg.model.preset == "small"
    assert cfg.d0 is True and cfg.d0_settings() == D0Settings.of(DurableSpec())  # the durable suite's D0 grid
    assert (cfg.attack.suite, cfg.confirm.suite, cfg.confirm.data_sizes) == ("quick", "durable", [160, 640, 1400])
    want = {"frozen_r05": ("none", "frozen", 0.5), "frozen_r01": ("none", "frozen", 0.1),
            "project": ("none", "project", 0.5), "trap": ("trap", "frozen", 0.5), "illcond": ("illcond", "frozen", 0.5)}
    assert set(cfg.variants) == set(want)
    for s in cfg.seeds:
        dense = cfg.dense_config(s)
        assert (dense.train.method, dense.train.data_seed, dense.model.init_seed) == ("dense", s, None)
        for name, (variant, complement, density) in want.items():
            rc = cfg.variant_config(name, s)
            assert (rc.pmp.variant, rc.pmp.complement, rc.pmp.density) == (variant, complement, density), name
            assert (rc.train.method, rc.train.data_seed, rc.train.steps, rc.data, rc.model) == \
                ("pmp", s, dense.train.steps, dense.data, dense.model)
    debug = load_typed(StudyConfig, ROOT / "configs" / "study_debug.yaml")
    assert debug.model.preset == "tiny" and list(debug.variants) == ["frozen_r05", "trap"]
    # a pinned init seed k becomes k + s: the seeds differ in init too, dense and variants of a seed share it
    pinned = load_typed(StudyConfig, ROOT / "configs" / "study_debug.yaml", ["model.init_seed=7", "seeds=[0,2]"])
    assert [pinned.variant_config("trap", s).model.init_seed for s in (0, 2)] == [7, 9]
    assert pinned.dense_config(2).model.init_seed == 9


# ---------------------------------------------------------------------------------------------- bad study files
BAD = [
    ("variants: {}\n", "variants is empty"),
    ("seeds: [0]\n", "variants is empty"),  # no variants at all
    ("variants: {a: {pmp.densty: 0.3}}\n", "variant 'a': unknown config key 'pmp.densty'; did you mean 'pmp.density'"),
    ("variants: {a: {pmp: {scorer: magic}}}\n", "variant 'a': pmp.scorer must be one of"),
    ("variants: {a: {train.steps: 10}}\n", "variant 'a': train.steps is fixed by the study"),
    ("variants: {a: {train.data_seed: 3}}\n", "variant 'a': train.data_seed is fixed by the study"),
    ("variants: {a: {model.preset: small}}\n", "variant 'a': model.preset is not a variant setting"),
    ("variants: {a: {pmp.variant: illcond}}\n", "variant 'a': pmp.variant=illcond masks input channels"),
    ("variants: {dense: {}}\n", "variant name 'dense'"),
    ("variants: {a: 3}\n", "variants.a: expected a mapping"),
    ("variants: {a: {}, b: {pmp.density: 0.5}}\n", "variants 'a' and 'b' train the same model"),
    ("variants: {a: {}}\nseeds: []\n", "seeds must list at least one"),
    ("variants: {a: {}}\nseeds: [0, 0]\n", "seeds lists a seed twice"),
    ("variants: {a: {}}\nseeds: [-1]\n", "seeds must be integers >= 0"),
    ("variants: {a: {}}\nseeds: 3\n", "seeds: expected a list"),
    ("variants: {a: {}}\nkill_above: 0\n", "kill_above must be > 0"),
    ("variants: {a: {}}\nd0_steps: [0]\n", "d0_steps must be step counts >= 1"),
    ("variants: {a: {}}\nd0_lrs: []\n", "d0_lrs must be learning rates > 0"),
    ("variants: {a: {}}\nvariantz: {}\n", "did you mean 'variants'"),
    ("variants: {a: {}}\nattack: {lm_file: /nonexistent/heldout.txt}\n", "attack.lm_file /nonexistent/heldout.txt "
     "does not exist"),
    ("variants: {a: {}}\nconfirm: {suite: nosuch}\n", "unknown suite 'nosuch'"),
    ("variants: {a: {}}\nconfirm: {trials: 3}\n", "confirm.suite is empty"),
    ("variants: {a: {}}\nconfirm: {suite: quick, trials: 3}\n", "suite 'quick' has none"),
    ("variants: {a: {}}\nconfirm: {suite: durable, trials: 0}\n", "trials must be >= 1"),
]


@pytest.mark.parametrize("text, expected", BAD)
def test_bad_study_files_give_clear_errors_and_write_nothing(tmp_path, capsys, text, expected):
    study = tmp_path / "study.yaml"
    base = "model: {preset: tiny}\ntrain: {steps: 30}\npmp: {min_warmup_steps: 5, max_warmup_steps: 10}\n"
    study.write_text(base + text)
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert not out.exists()
