"""The report pooled over pre-training seeds (`pmp report RES1 RES2 ...`) on hand-written results JSONs with known
answers: the two-stage bootstrap, the pooled and per-seed ratios, and directories that must not be pooled."""

import json

import pytest

from pmp.cli import main
from pmp.eval import metrics as M
from pmp.eval.config import ReportConfig
from pmp.eval.report import write_report

BUDGET = {"steps": 100, "batch_size": 16, "max_train": 1000, "max_len": 64}


def cell(model, role, attack, kind, seed, before, after, suite="handmade", task="sent"):
    return {"status": "done", "cell": f"{model}__{task}__{attack}__s{seed}", "model": model, "model_role": role,
            "task": task, "task_kind": "classification", "metric": "accuracy", "direction": "higher",
            "attack": attack, "attack_kind": kind, "seed": seed, "before": before, "after_val_selected": after,
            "selected_val": after, "after_final": after, "budget": BUDGET, "suite": suite, "versions": {},
            "git_commit": "unknown", "curve": [{"step": 100, "val": {"accuracy": after}, "test": {"accuracy": after}}]}


def seed_cells(pmp_gains, dense_gains, **kw) -> list[dict]:
    """One pre-training seed's sweep: probe and `full` for pmp / dense (gains as given, per fine-tuning seed) and
    from scratch (always below dense: the task is valid)."""
    cs = []
    for s, (gp, gd) in enumerate(zip(pmp_gains, dense_gains)):
        cs += [cell("pmp", "protected", "probe", "probe", s, 0.5, 0.5, **kw),
               cell("dense", "baseline", "probe", "probe", s, 0.5, 0.5, **kw),
               cell("from_scratch", "scratch", "probe", "probe", s, 0.5, 0.5, **kw),
               cell("pmp", "protected", "full", "full", s, 0.5, 0.5 + gp, **kw),
               cell("dense", "baseline", "full", "full", s, 0.5, 0.5 + gd, **kw),
               cell("from_scratch", "scratch", "full", "full", s, 0.5, 0.55, **kw)]
    return cs


def write(root, cells):
    d = root / "cells"
    d.mkdir(parents=True)
    for c in cells:
        (d / f"{c['cell']}.json").write_text(json.dumps(c))
    return root


# pre-training seed A: pmp gains half of dense's; seed B: 0.8 of it -- each seed alone is sure of its own ratio
A = ((0.11, 0.08, 0.11), (0.20, 0.18, 0.22))
B = ((0.17, 0.15, 0.16), (0.20, 0.19, 0.21))


def test_two_stage_bootstrap_carries_the_spread_between_pre_training_seeds():
    num = {"a": dict(enumerate(A[0])), "b": dict(enumerate(B[0]))}
    den = {"a": dict(enumerate(A[1])), "b": dict(enumerate(B[1]))}
    pooled = M.cluster_bootstrap_ratio(num, den, n_boot=2000, seed=0)
    assert pooled == M.cluster_bootstrap_ratio(num, den, n_boot=2000, seed=0)  # seeded
    assert pooled["ratio"] == pytest.approx((0.30 + 0.48) / (0.60 + 0.60))  # mean over all 6 pairs
    assert (pooled["n"], pooled["n_pools"], pooled["undefined"]) == (6, 2, 0.0)
    alone = {k: M.bootstrap_ratio(num[k], den[k], n_boot=2000) for k in "ab"}
    assert alone["a"]["hi"] < 0.56 and alone["b"]["lo"] > 0.74  # each seed alone: a narrow interval
    # the pooled interval covers both seeds' ratios (0.5, 0.8): a resample may draw seed a twice, or seed b twice
    assert pooled["lo"] < 0.5 and pooled["hi"] > 0.8
    # resampling the six pairs as if they were independent would not
    flat = M.bootstrap_ratio({(k, s): g for k in "ab" for s, g in num[k].items()},
                             {(k, s): g for k in "ab" for s, g in den[k].items()}, n_boot=2000)
    assert flat["ratio"] == pytest.approx(pooled["ratio"]) and 0.5 < flat["lo"] < flat["hi"] < 0.8
    # one pre-training seed: no pooled interval; a negative baseline gain: some resamples undefined
    one = M.cluster_bootstrap_ratio({"a": num["a"]}, {"a": den["a"], "b": den["b"]})
    assert one["ratio"] == pytest.approx(0.5) and one["lo"] is None and one["n_pools"] == 1
    neg = M.cluster_bootstrap_ratio(num, {"a": {0: -1.0, 1: -1.0, 2: -1.0}, "b": den["b"]}, n_boot=400)
    assert 0 < neg["undefined"] < 1


def test_pooled_report_shows_each_seed_and_the_pooled_ratio(tmp_path, capsys):
    a = write(tmp_path / "s0", seed_cells(*A))
    b = write(tmp_path / "s1", seed_cells(*B))
    single = write_report(ReportConfig(results=str(a))).read_text()
    assert main(["report", str(a), str(b), "--names", "s0", "s1"]) == 0
    md = (a / "report_pooled" / "report.md").read_text()
    assert (a / "report" / "report.md").read_text() == single  # the first seed's own report is left alone
    assert md.startswith("# Unauthorized fine-tuning evaluation, pooled over pre-training seeds")
    assert f"`s0` = `{a}` (18 cells), `s1` = `{b}` (18 cells)" in md
    assert "two-stage (cluster) percentile bootstrap" in md and "**Pooled over 2 pre-training seeds.**" in md
    table = md.split("## sent ")[1]
    assert "Validity by pre-training seed (baseline best vs from scratch best): `s0` valid" in table
    header = next(r for r in table.splitlines() if r.startswith("| attack "))
    assert "| ratio pmp pooled [95% CI] | ratio pmp at `s0` | ratio pmp at `s1` |" in header
    full = next(r for r in table.splitlines() if r.startswith("| `full` "))
    cols = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in full.strip("|").split("|")]))
    assert cols["ratio pmp pooled [95% CI]"].startswith("0.65 [") and cols["ratio pmp pooled [95% CI]"].endswith(
        "(n=6)")
    assert cols["ratio pmp at `s0`"].startswith("0.50 [") and cols["ratio pmp at `s1`"].startswith("0.80 [")
    lo, hi = (float(x) for x in cols["ratio pmp pooled [95% CI]"].split("[")[1].split("]")[0].split(","))
    s0_lo, s0_hi = (float(x) for x in cols["ratio pmp at `s0`"].split("[")[1].split("]")[0].split(","))
    assert lo < s0_hi < hi and (lo, hi) != (s0_lo, s0_hi)  # wider than the seed's own interval
    assert cols["from_scratch: after [final]"].startswith("0.550")  # the from-scratch row beside every ratio
    assert "| **best attack** |" in table and "`full`" in table.split("| **best attack** |")[1]
    # the pooled means: dense gains 0.2 at both seeds, pmp 0.1 / 0.16
    main_row = next(r for r in md.split("## Main table")[1].splitlines() if r.startswith("| sent "))
    assert "0.65" in main_row and "(0.130) `full`" in main_row


def test_pooling_refuses_other_suites_or_models_and_names_the_difference(tmp_path):
    a = write(tmp_path / "a", seed_cells(*A))
    other_suite = write(tmp_path / "b", seed_cells(*B, suite="quick"))
    with pytest.raises(ValueError, match=r"cannot pool `r1` \(.*/a\) and `r2` \(.*/b\): their suites differ "
                                         r"\(suite.name: 'handmade' vs 'quick'\)"):
        write_report(ReportConfig(results=str(a), more_results=[str(other_suite)]))
    # the same suite name run with other settings: the sweeps' records differ
    same_name = write(tmp_path / "b2", seed_cells(*B))
    for root, trials in ((a, 24), (same_name, 3)):
        (root / "sweep.json").write_text(json.dumps({"suite": {"name": "handmade", "durable": {"trials": trials}}}))
    with pytest.raises(ValueError, match=r"their suites differ \(suite.durable.trials: 24 vs 3\)"):
        write_report(ReportConfig(results=str(a), more_results=[str(same_name)]))
    (a / "sweep.json").unlink()
    extra = seed_cells(*B) + [cell("lora_pmp", "protected", "full", "full", 0, 0.5, 0.6)]
    more = write(tmp_path / "c", extra)
    with pytest.raises(ValueError, match=r"their models differ \(only in `s0`: none; only in `s1`: \['lora_pmp'\]\)"):
        write_report(ReportConfig(results=str(a), more_results=[str(more)], names=["s0", "s1"]))
    roles = _with_role(write(tmp_path / "d", seed_cells(*B)), "dense")
    with pytest.raises(ValueError, match="model `dense` is baseline in one and protected in the other"):
        write_report(ReportConfig(results=str(a), more_results=[str(roles)]))
    assert not (a / "report_pooled").exists()
    with pytest.raises(ValueError, match="names must name every results directory"):
        write_report(ReportConfig(results=str(a), more_results=[str(roles)], names=["s0"]))


def _with_role(root, model):
    """Rewrite `model`'s cells in `root` as protected (another role than in the first directory)."""
    for f in (root / "cells").glob(f"{model}__*.json"):
        c = json.loads(f.read_text())
        f.write_text(json.dumps({**c, "model_role": "protected"}))
    return root


def test_a_matched_baseline_at_some_seeds_only_is_pooled_where_it_exists(tmp_path):
    matched = [cell("dense_matched", "matched", att, kind, s, 0.5, 0.5 + g) for s, g in enumerate((0.12, 0.1, 0.14))
               for att, kind, g in (("probe", "probe", 0.0), ("full", "full", g))]
    a = write(tmp_path / "a", seed_cells(*A) + matched)
    b = write(tmp_path / "b", seed_cells(*B))
    md = write_report(ReportConfig(results=str(a), more_results=[str(b)], names=["s0", "s1"])).read_text()
    assert "- `dense_matched` has no cells at `s1`: its pooled numbers are over the other pre-training seeds" in md
    assert "ratio pmp vs dense_matched pooled [95% CI]" in md
