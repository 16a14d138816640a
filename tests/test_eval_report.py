"""The report's arithmetic on hand-written results JSONs with known answers (no training)."""

import json
import math

import pytest

from pmp.eval import metrics as M
from pmp.eval.config import ReportConfig
from pmp.eval.report import write_report

BUDGET = {"steps": 100, "batch_size": 16, "max_train": 1000, "max_len": 64}


def cell(model, role, task, attack, kind, seed, before, after, final=None, lm=False, val=None):
    metric, direction = ("perplexity", "lower") if lm else ("accuracy", "higher")
    final = after if final is None else final
    val = after if val is None else val
    return {"status": "done", "cell": f"{model}__{task}__{attack}__s{seed}", "model": model, "model_role": role,
            "task": task, "task_kind": "lm" if lm else "classification", "metric": metric, "direction": direction,
            "attack": attack, "attack_kind": kind, "seed": seed, "before": before, "after_val_selected": after,
            "selected_val": val,
            "after_final": final, "budget": BUDGET, "suite": "handmade", "versions": {}, "git_commit": "unknown",
            "curve": [{"step": 50, "val": {metric: after}, "test": {metric: final}},
                      {"step": 100, "val": {metric: after}, "test": {metric: final}}]}


def write(tmp_path, cells):
    d = tmp_path / "res" / "cells"
    d.mkdir(parents=True)
    for c in cells:
        (d / f"{c['cell']}.json").write_text(json.dumps(c))
    return tmp_path / "res"


def classification_cells(task="sent", scratch_after=(0.60, 0.62)):
    cs = []
    for s, (pb, db) in enumerate([(0.50, 0.55), (0.52, 0.57)]):
        cs += [cell("pmp", "protected", task, "probe", "probe", s, pb, pb),
               cell("dense", "baseline", task, "probe", "probe", s, db, db),
               cell("from_scratch", "scratch", task, "probe", "probe", s, 0.5, 0.5)]
    # full: pmp gains 0.05 / 0.07, dense gains 0.20 / 0.10 -> mean 0.06 / 0.15 = 0.4; paired 0.25 .. 0.7
    cs += [cell("pmp", "protected", task, "full", "full", 0, 0.50, 0.55, final=0.53),
           cell("pmp", "protected", task, "full", "full", 1, 0.52, 0.59),
           cell("dense", "baseline", task, "full", "full", 0, 0.55, 0.75),
           cell("dense", "baseline", task, "full", "full", 1, 0.57, 0.67),
           cell("pmp", "protected", task, "lora", "lora", 0, 0.50, 0.51),
           cell("pmp", "protected", task, "lora", "lora", 1, 0.52, 0.53),
           cell("dense", "baseline", task, "lora", "lora", 0, 0.55, 0.54),  # dense gain -0.01 / -0.01: ratio n/a
           cell("dense", "baseline", task, "lora", "lora", 1, 0.57, 0.56),
           cell("pmp", "protected", task, "authorized", "authorized", 0, 0.50, 0.62),
           cell("pmp", "protected", task, "authorized", "authorized", 1, 0.52, 0.66),
           cell("from_scratch", "scratch", task, "full", "full", 0, 0.5, scratch_after[0]),
           cell("from_scratch", "scratch", task, "full", "full", 1, 0.5, scratch_after[1])]
    return cs


def test_gain_ratio_spread_and_authorized_recovery(tmp_path):
    agg = M.aggregate(M.load_cells(write(tmp_path, classification_cells())))
    full_p, full_d = agg[("pmp", "sent", "full")], agg[("dense", "sent", "full")]
    assert full_p["gain"]["mean"] == pytest.approx(0.06)
    assert full_p["gain"]["std"] == pytest.approx(math.sqrt(2 * 0.01 ** 2))  # sample std of 0.05, 0.07
    assert (full_p["gain"]["min"], full_p["gain"]["max"]) == (pytest.approx(0.05), pytest.approx(0.07))
    assert full_p["gain_final"]["mean"] == pytest.approx((0.03 + 0.07) / 2)  # final-step metric beside it
    assert full_d["gain"]["mean"] == pytest.approx(0.15)
    gr = M.gain_ratio(agg, "pmp", "dense", "sent", "full")
    assert gr["ratio"] == pytest.approx(0.4)
    assert gr["paired_min"] == pytest.approx(0.25) and gr["paired_max"] == pytest.approx(0.7)
    assert M.gain_ratio(agg, "pmp", "dense", "sent", "lora")["ratio"] is None  # baseline gain <= 0
    ar = M.authorized_recovery(agg, "pmp", "dense", "sent")
    assert ar["recovery"] == pytest.approx(0.13 / 0.15) and ar["baseline_attack"] == "full"
    # the attacker's best attack never includes authorized fine-tuning (the attacker has no mask)
    assert M.best_attack(agg, "pmp", "sent")["attack"] == "full"


def test_validity_flag_and_invalid_tasks_are_not_averaged(tmp_path):
    cells = classification_cells("ok", scratch_after=(0.60, 0.62)) + classification_cells("bad", (0.80, 0.80))
    agg = M.aggregate(M.load_cells(write(tmp_path, cells)))
    roles = M.roles(agg)
    v_ok, v_bad = M.validity(agg, roles, "ok"), M.validity(agg, roles, "bad")
    assert v_ok["valid"] is True and v_ok["baseline_best"] == pytest.approx(0.71)
    assert v_bad["valid"] is False and v_bad["scratch_best"] == pytest.approx(0.80)
    md = write_report(ReportConfig(results=str(tmp_path / "res"))).read_text()
    main = md.split("## Main table")[1].split("\n## ")[0]
    ok_row = next(r for r in main.splitlines() if r.startswith("| ok "))
    bad_row = next(r for r in main.splitlines() if r.startswith("| bad "))
    assert "| valid |" in ok_row and "0.40" in ok_row
    assert "INVALID" in bad_row and "0.40 (invalid)" in bad_row
    assert "mean 0.40 over 1 task(s)" in md  # the invalid task is not averaged in
    assert (tmp_path / "res" / "report" / "gains.png").stat().st_size > 1000
    assert (tmp_path / "res" / "report" / "curves_ok.png").is_file()


def test_perplexity_gain_is_sign_adjusted(tmp_path):
    cs = []
    for s in (0, 1):
        cs += [cell("pmp", "protected", "dialog", "probe", "probe", s, 200.0, 200.0, lm=True),
               cell("dense", "baseline", "dialog", "probe", "probe", s, 100.0, 100.0, lm=True),
               cell("from_scratch", "scratch", "dialog", "probe", "probe", s, 900.0, 900.0, lm=True),
               cell("pmp", "protected", "dialog", "full", "full", s, 200.0, 180.0, lm=True),
               cell("dense", "baseline", "dialog", "full", "full", s, 100.0, 60.0, lm=True),
               cell("from_scratch", "scratch", "dialog", "full", "full", s, 900.0, 80.0, lm=True)]
    agg = M.aggregate(M.load_cells(write(tmp_path, cs)))
    # perplexity gains are loss reductions in nats: 200 -> 180 is ln(200/180), 100 -> 60 is ln(100/60)
    assert agg[("pmp", "dialog", "full")]["gain"]["mean"] == pytest.approx(math.log(200 / 180))
    assert agg[("dense", "dialog", "full")]["gain"]["mean"] == pytest.approx(math.log(100 / 60))
    assert M.gain_ratio(agg, "pmp", "dense", "dialog", "full")["ratio"] == pytest.approx(
        math.log(200 / 180) / math.log(100 / 60))
    # the same relative improvement is the same gain whatever the starting perplexity (raw units: 40 vs 20)
    assert M.signed_gain(200.0, 100.0, "lower", "perplexity") == pytest.approx(
        M.signed_gain(100.0, 50.0, "lower", "perplexity"))
    # lower perplexity is better: dense 60 beats scratch 80 -> valid (a naive '>' would say invalid)
    assert M.validity(agg, M.roles(agg), "dialog")["valid"] is True
    assert M.best_attack(agg, "from_scratch", "dialog")["after"]["mean"] == 80.0
    assert M.signed_gain(10.0, 12.0, "lower") == -2.0 and M.signed_gain(10.0, 12.0, "higher") == 2.0
    with pytest.raises(ValueError, match="direction"):
        M.signed_gain(1, 2, "up")


def test_roles_override_and_bad_results_dir(tmp_path):
    agg = M.aggregate(M.load_cells(write(tmp_path, classification_cells())))
    r = M.roles(agg, baseline="pmp", protected=["dense"])
    assert r["pmp"] == "baseline" and r["dense"] == "protected"
    with pytest.raises(ValueError, match="not a model in these results"):
        M.roles(agg, baseline="llama")
    with pytest.raises(FileNotFoundError):
        M.load_cells(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no finished result cells"):
        M.load_cells(tmp_path / "empty")
    assert M.spread([3.0])["std"] == 0.0 and M.ratio(1.0, 0.0) is None


def test_best_attack_is_chosen_on_validation_not_test(tmp_path):
    cs = classification_cells()
    # a second full fine-tune that looks worse on the attacker's validation split but is better on test:
    # a real attacker keeps `full` (best on val); only the oracle picks `full_lucky`
    for s, (before, after) in enumerate([(0.50, 0.70), (0.52, 0.72)]):
        cs.append(cell("pmp", "protected", "sent", "full_lucky", "full", s, before, after, val=0.40))
    agg = M.aggregate(M.load_cells(write(tmp_path, cs)))
    assert M.best_attack(agg, "pmp", "sent")["attack"] == "full"
    assert M.best_attack(agg, "pmp", "sent", by="test")["attack"] == "full_lucky"
    md = write_report(ReportConfig(results=str(tmp_path / "res"))).read_text()
    row = next(r for r in md.split("## Main table")[1].splitlines() if r.startswith("| sent "))
    cols = [c.strip() for c in row.strip("|").split("|")]
    # best (val-chosen) ratio 0.06 / 0.15 = 0.40; oracle ratio 0.20 / 0.15 = 1.33
    assert cols[-3:-1] == ["0.40", "1.33"], cols


def test_matched_baseline_gets_its_own_ratio(tmp_path):
    cs = classification_cells()
    for s, (before, after) in enumerate([(0.54, 0.64), (0.56, 0.70)]):  # gains 0.10 / 0.14 -> mean 0.12
        cs += [cell("dense_early", "matched", "sent", "probe", "probe", s, before, before),
               cell("dense_early", "matched", "sent", "full", "full", s, before, after)]
    agg = M.aggregate(M.load_cells(write(tmp_path, cs)))
    assert M.gain_ratio(agg, "pmp", "dense_early", "sent", "full")["ratio"] == pytest.approx(0.5)
    md = write_report(ReportConfig(results=str(tmp_path / "res"))).read_text()
    main = md.split("## Main table")[1].split("\n## ")[0]
    header = next(r for r in main.splitlines() if r.startswith("| task "))
    row = next(r for r in main.splitlines() if r.startswith("| sent "))
    cols = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cols["gain ratio pmp (best)"] == "0.40" and cols["gain ratio pmp vs dense_early (best)"] == "0.50"
    assert "| ratio pmp vs dense_early |" in md


def _protection_run(path, restricted, method="sophon", status="finished"):
    path.mkdir()
    (path / "run.json").write_text(json.dumps({
        "status": status, "method": method, "restricted": restricted, "rollbacks": 1,
        "before": {"retain_ppl": 100.0, "restricted_ppl": 80.0},
        "after": {"retain_ppl": 105.0, "restricted_ppl": 300.0},
        "cost": {"x_pretraining": 0.5, "wall_s": 60.0}}))
    return path


def test_restricted_domain_view_separates_protection_from_collateral(tmp_path):
    """`sophon` gains 0.03 on its restricted task `sent` (dense 0.15 -> ratio 0.2) and as much as dense on `other`
    (ratio 1.0); the view names the restricted task, the retain price (+5.0 %) and both ratios."""
    cs = classification_cells("sent") + classification_cells("other")
    for task, gains in (("sent", (0.03, 0.03)), ("other", (0.20, 0.10))):
        for s, (b, g) in enumerate(zip((0.55, 0.57), gains)):
            cs += [cell("sophon", "other", task, "probe", "probe", s, b, b),
                   cell("sophon", "other", task, "full", "full", s, b, b + g)]
    res = write(tmp_path, cs)
    run = _protection_run(tmp_path / "sophon_run", "sent")
    md = write_report(ReportConfig(results=str(res), protections={"sophon": str(run)})).read_text()
    view = md[md.index("## Restricted-domain view"):]
    assert "100.00 -> 105.00 (+5.0 %)" in view and "80.00 -> 300.00" in view
    sent = next(line for line in view.splitlines() if line.startswith("| sent |"))
    other = next(line for line in view.splitlines() if line.startswith("| other |"))
    assert "(0.20) [0.120] **restricted**" in sent and "(1.00) [0.000]" in other and "restricted**" not in other
    assert "gain ratio sophon (best)" in md  # marked protected in the main table too
    with pytest.raises(ValueError, match="not a model in these results"):
        write_report(ReportConfig(results=str(res), protections={"nobody": str(run)}))
    unfinished = _protection_run(tmp_path / "half", "sent", status="protecting")
    with pytest.raises(ValueError, match="not a finished restricted-domain protection run"):
        write_report(ReportConfig(results=str(res), protections={"sophon": str(unfinished)}))
