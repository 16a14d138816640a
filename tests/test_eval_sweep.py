"""Unauthorized fine-tuning evaluation on tiny runs: every attack kind, mask semantics, resume, bad input."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from corpus_fixture import generate_text, write_corpus

from pmp.cli import main
from pmp.config import load_config
from pmp.eval.attack import run_attack
from pmp.eval.attack_inputs import SCRATCH, resolve_models, resolve_tasks
from pmp.eval.attacks import ATTACKS, KINDS, Budget, Suite, get_attack, get_suite, load_suite_file
from pmp.eval.config import AttackConfig, ReportConfig
from pmp.eval.finetune import finetune, make_optimizer, random_layouts
from pmp.eval.models import check_release, load_model, load_tokenizer
from pmp.eval.report import write_report
from pmp.eval.sweep import Sweep
from pmp.eval.task_data import prepare_task
from pmp.mask import PrivateMask
from pmp.run_dir import open_private_run
from pmp.train.trainer import pretrain

TINY_CLS = Budget(steps=4, batch_size=4, max_len=16, max_train=24, max_val=8, max_test=12, eval_every=2)
TINY_LM = Budget(steps=4, batch_size=2, max_len=16, max_train=12, max_val=3, max_test=3, eval_every=2)
KINDS_ONE_EACH = ("probe", "full_adamw_3e-4_cos", "lora_r8_1e-3_cos", "norm_bias_1e-3_cos", "random_mask_1e-3_cos",
                  "authorized_1e-3_cos")


def tiny_suite(**kw) -> Suite:
    base = dict(name="tiny", attacks=tuple(get_attack(n) for n in KINDS_ONE_EACH), classification=TINY_CLS,
                lm=TINY_LM, seeds=1)
    base.update(kw)
    return Suite(**base).validate()


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_runs")
    files = write_corpus(d)
    ov = {"data.corpus": files, "data.cache_dir": str(d / "cache"), "data.seq_len": 32, "data.val_fraction": 0.1,
          "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32, "model.intermediate_size": 64,
          "train.steps": 30, "train.batch_size": 4, "train.warmup_steps": 3, "train.eval_every": 0,
          "train.eval_batches": 2, "train.log_every": 5, "train.ckpt_every": 0, "train.progress": False,
          "pmp.min_warmup_steps": 10, "pmp.max_warmup_steps": 10, "pmp.density": 0.5}
    out = {}
    for method in ("pmp", "dense"):
        cfg = load_config(None, [f"{k}={v}" for k, v in {**ov, "train.method": method}.items()])
        out[method] = pretrain(cfg, d / method).root
    # a small labelled task (the label is decidable from the text) and a held-out LM text
    rng = random.Random(0)
    rows = []
    for i in range(80):
        s = generate_text(60, seed=100 + i).split(".")[0]
        rows.append({"sentence": f"{s} {i}", "tag": "storm" if "storm" in s or "ship" in s else "calm"})
    rng.shuffle(rows)
    task = d / "mytask.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = d / "heldout.txt"
    lm.write_text(generate_text(20000, seed=77))
    out["task"], out["lm"] = task, lm
    return out


@pytest.fixture(scope="module")
def sweep_dir(runs, tmp_path_factory):
    """One sweep over every attack kind, both tasks, PMP + dense + from scratch (shared by several tests)."""
    out = tmp_path_factory.mktemp("results")
    models = resolve_models({"pmp": str(runs["pmp"] / "final"), "dense": str(runs["dense"] / "final")},
                            {"pmp": str(runs["pmp"])})
    tasks = resolve_tasks("none", task_file=str(runs["task"]), text_column="sentence", label_column="tag",
                          lm_file=str(runs["lm"]))
    summary = Sweep(models, tasks, tiny_suite(), out, progress=False, log=lambda *_: None).run()
    return out, summary, models, tasks


def test_every_attack_kind_writes_a_valid_results_json(sweep_dir):
    out, summary, models, tasks = sweep_dir
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    # pmp: 6 kinds; dense: no authorized; from scratch: probe + the full attack (scratch=True)
    assert summary["run"] == len(cells) == 2 * (6 + 5 + 2)
    assert {c["attack"] for c in cells.values() if c["model"] == SCRATCH} == {"probe", "full_adamw_3e-4_cos"}
    assert not any(c["attack_kind"] == "authorized" and c["model"] != "pmp" for c in cells.values())
    for cid, c in cells.items():
        assert c["status"] == "done" and c["cell"] == cid
        assert {"before", "after_val_selected", "after_final", "curve", "budget", "hyperparameters", "seed",
                "versions", "git_commit", "wall_seconds", "metric", "direction"} <= set(c)
        assert set(c["versions"]) >= {"torch", "transformers", "peft", "pmp"}
        assert c["git_commit"] == "unknown" or len(c["git_commit"]) == 40
        assert c["direction"] == ("lower" if c["task_kind"] == "lm" else "higher")
        if c["attack_kind"] == "probe" and c["task_kind"] == "lm":
            assert [p["step"] for p in c["curve"]] == [0]  # the LM probe trains nothing
        else:
            assert [p["step"] for p in c["curve"]] == [2, 4]
        sel = max(c["curve"], key=lambda p: p["val"][c["metric"]] * (1 if c["direction"] == "higher" else -1))
        assert c["after_val_selected"] == sel["test"][c["metric"]]
        assert c["after_final"] == c["curve"][-1]["test"][c["metric"]]
        probe = cells[f"{c['model']}__{c['task']}__probe__s0"]
        assert c["before"] == probe["after_val_selected"]
        if c["attack_kind"] in ("random_mask", "authorized"):
            assert c["complement_unchanged"] is True
        assert c["budget"]["steps"] == 4 and "data" in c["budget"]
    assert cells["pmp__mytask__random_mask_1e-3_cos__s0"]["mask"]["density_source"] == "private/mask.json"
    manifest = json.loads((out / "sweep.json").read_text())
    assert {m["name"]: m["role"] for m in manifest["models"]} == {"pmp": "protected", "dense": "baseline",
                                                                   SCRATCH: "scratch"}


def test_sweep_resumes_skips_done_cells_and_redoes_corrupt_or_changed_ones(sweep_dir):
    out, first, models, tasks = sweep_dir
    quiet = dict(progress=False, log=lambda *_: None)
    again = Sweep(models, tasks, tiny_suite(), out, **quiet).run()
    assert again["run"] == 0 and again["skipped"] == first["run"]
    victim = out / "cells" / "dense__mytask__norm_bias_1e-3_cos__s0.json"
    before = victim.read_text()
    victim.write_text(before[: len(before) // 2])  # a torn write from some other tool
    again = Sweep(models, tasks, tiny_suite(), out, **quiet).run()
    assert again["run"] == 1
    assert json.loads(victim.read_text())["status"] == "done"
    # a cell computed from other inputs (another attack definition, budget, model or mask) is recomputed
    other = out / "cells" / "pmp__heldout__lora_r8_1e-3_cos__s0.json"
    rec = json.loads(other.read_text())
    assert rec["inputs_sha"] == Sweep(models, tasks, tiny_suite(), out, **quiet).inputs_sha(
        models[0], tasks[1], get_attack("lora_r8_1e-3_cos"), 0)
    other.write_text(json.dumps({**rec, "inputs_sha": "0" * 16}))
    again = Sweep(models, tasks, tiny_suite(), out, **quiet).run()
    assert again["run"] == 1 and json.loads(other.read_text())["inputs_sha"] == rec["inputs_sha"]
    changed = tiny_suite(lm=dataclasses.replace(TINY_LM, steps=2))
    assert Sweep(models, tasks, changed, out, **quiet).inputs_sha(
        models[0], tasks[1], get_attack("lora_r8_1e-3_cos"), 0) != rec["inputs_sha"]


def _complement_check(model_before: dict, model_after: torch.nn.Module, layouts: dict) -> tuple[int, int]:
    """(masked entries changed, complement entries changed) over the masked tensors."""
    changed_in = changed_out = 0
    after = dict(model_after.named_parameters())
    for n, lay in layouts.items():
        if n not in after:
            continue
        m = lay.to_bool()
        diff = model_before[n] != after[n].detach()
        changed_in += int((diff & m).sum())
        changed_out += int((diff & ~m).sum())
    return changed_in, changed_out


@pytest.mark.parametrize("kind", ["authorized", "random_mask"])
def test_sparse_fine_tuning_changes_only_its_mask(runs, kind):
    rel = runs["pmp"] / "final"
    tok = load_tokenizer(rel)
    task = resolve_tasks("none", lm_file=str(runs["lm"]))[0]
    pt = prepare_task(task, tok, TINY_LM, seed=0)
    model = load_model(rel, "lm", 0, seed=0, pad_id=tok.eos_token_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if kind == "authorized":
        layouts = PrivateMask.load(runs["pmp"] / "private").layouts
    else:
        layouts = random_layouts(model, 0.3, seed=0, exclude=set())
        real = PrivateMask.load(runs["pmp"] / "private").to_bool()
        assert any(not torch.equal(layouts[n].to_bool(), real[n]) for n in real)  # not the real mask
    res = finetune(model, pt, get_attack(f"{kind}_1e-3_cos"), TINY_LM, seed=0, mask_layouts=layouts)
    assert res["complement_unchanged"] is True
    changed_in, changed_out = _complement_check(before, model, layouts)
    assert changed_out == 0 and changed_in > 100
    # parameters the mask does not cover (norms under the default scope=matrices) trained densely in
    # pre-training, so mask-aware fine-tuning trains them too
    uncovered = [n for n in before if n not in layouts]
    after = dict(model.named_parameters())
    if kind == "authorized":
        assert uncovered and all("norm" in n for n in uncovered)
        assert all(not torch.equal(before[n], after[n].detach()) for n in uncovered)
    else:
        assert not uncovered  # the random mask covers every parameter


def test_from_scratch_has_the_release_architecture_but_fresh_weights(runs):
    rel = runs["dense"] / "final"
    a = load_model(rel, "classification", 3, seed=0, pad_id=0)
    b = load_model(None, "classification", 3, seed=0, config_from=rel, pad_id=0)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert {n: p.shape for n, p in pa.items()} == {n: p.shape for n, p in pb.items()}
    assert not torch.equal(pa["model.layers.0.mlp.down_proj.weight"], pb["model.layers.0.mlp.down_proj.weight"])


def test_every_optimizer_builds_and_every_registered_attack_validates():
    p = [torch.nn.Parameter(torch.zeros(3, 3))]
    for name in ("adamw", "adam", "sgd", "adagrad"):
        att = next(a for a in ATTACKS.values() if a.optimizer == name and a.kind == "full")
        opt = make_optimizer(att, [{"params": p, "weight_decay": 0.0}])
        assert type(opt).__name__.lower() == name
    full = get_suite("full")
    lrs = {a.lr for a in full.attacks if a.kind == "full"}
    assert min(lrs) <= 1e-5 and max(lrs) >= 1e-3
    assert {a.schedule for a in full.attacks if a.kind == "full"} == {"constant", "cosine"}
    quick = get_suite("quick")
    assert {a.kind for a in quick.attacks} == set(KINDS)  # at least one attack of every kind
    assert quick.seeds >= 2


def test_yaml_suite_adds_an_attack(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: mine\nattacks: [probe, {name: my_sgd_test, kind: full, optimizer: sgd, lr: 0.05}]\n"
                 "classification: {steps: 10}\n")
    s = load_suite_file(f)
    assert s.names() == ["probe", "my_sgd_test"] and s.classification.steps == 10
    assert get_attack("my_sgd_test").optimizer == "sgd"
    f.write_text("attacks: [probe, {name: x, kind: full, lr: 0.1, wings: 2}]\n")
    with pytest.raises(ValueError, match="unknown fields.*wings"):
        load_suite_file(f)


def test_bad_input_names_what_is_valid(runs, tmp_path):
    with pytest.raises(ValueError, match="unknown attack 'nope'.*full_adamw_3e-4_cos"):
        get_attack("nope")
    with pytest.raises(ValueError, match="unknown suite 'huge'.*quick, full"):
        get_suite("huge")
    with pytest.raises(ValueError, match="unknown task 'imdb'.*movie_sentiment"):
        resolve_tasks("imdb")
    with pytest.raises(ValueError, match="tag2"):
        resolve_tasks("none", task_file=str(runs["task"]), text_column="sentence", label_column="tag2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json is missing"):
        check_release(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (runs["dense"] / "final").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        check_release(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_model(broken, "classification", 2, seed=0, pad_id=0)
    with pytest.raises(ValueError, match="is a release, not a private run directory"):
        open_private_run(runs["pmp"] / "final")
    with pytest.raises(ValueError, match="no mask"):
        open_private_run(runs["dense"])
    rels = {"pmp": str(runs["pmp"] / "final"), "dense": str(runs["dense"] / "final")}
    with pytest.raises(ValueError, match="--matched 'dense_early' is not one of the models"):
        resolve_models(rels, matched="dense_early")
    with pytest.raises(ValueError, match="also the baseline"):
        resolve_models(rels, baseline="dense", matched="dense")
    roles = {m.name: m.role for m in resolve_models({**rels, "dense_early": rels["dense"]}, matched="dense_early")}
    assert roles == {"pmp": "protected", "dense": "baseline", "dense_early": "matched", SCRATCH: "scratch"}


def test_cli_errors_are_one_line_exit_2(runs, tmp_path, capsys):
    rel = str(runs["pmp"] / "final")
    code = main(["attack", "--models", f"pmp={rel}", "--private", f"pmp={rel}", "--tasks", "none",
                 "--lm-file", str(runs["lm"]), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "is a release, not a private run directory" in err and "private/mask." in err
    code = main(["attack", "--models", f"pmp={tmp_path}", "--tasks", "none", "--out", str(tmp_path / "r")])
    assert code == 2 and "config.json is missing" in capsys.readouterr().err
    code = main(["report", str(tmp_path / "nothing")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_attack_then_report(runs, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: clitiny\nseeds: 1\nattacks: [probe, full_adamw_3e-4_cos]\n"
                     f"lm: {json.dumps(dataclasses.asdict(TINY_LM))}\n")
    out = tmp_path / "res"
    code = main(["attack", "--models", f"pmp={runs['pmp'] / 'final'}", f"dense={runs['dense'] / 'final'}",
                 "--suite", str(suite), "--tasks", "none", "--lm-file", str(runs["lm"]), "--no-scratch", "--out",
                 str(out)])
    assert code == 0 and len(list((out / "cells").glob("*.json"))) == 4
    assert main(["report", str(out)]) == 0
    md = (out / "report" / "report.md").read_text()
    assert "## Main table" in md and "heldout" in md and (out / "report" / "gains.png").stat().st_size > 1000
    assert Path(out / "report" / "curves_heldout.png").is_file()


def test_library_entry_points_attack_then_report(runs, tmp_path):
    """run_attack(AttackConfig) / write_report(ReportConfig): what `pmp attack` + `pmp report` do, as a library."""
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: libtiny\nseeds: 1\nattacks: [probe, full_adamw_3e-4_cos]\n"
                     f"lm: {json.dumps(dataclasses.asdict(TINY_LM))}\n")
    out = tmp_path / "res"
    cfg = AttackConfig(suite=str(suite), tasks="none", lm_file=str(runs["lm"]), scratch=False, out=str(out),
                       models={"pmp": str(runs["pmp"] / "final"), "dense": str(runs["dense"] / "final")})
    summary = run_attack(cfg)
    assert summary["run"] == summary["cells"] == 4 and len(list((out / "cells").glob("*.json"))) == 4
    assert run_attack(cfg)["skipped"] == 4  # resumable: a second call runs nothing
    md = write_report(ReportConfig(results=str(out), out=str(tmp_path / "rep"), baseline="dense"))
    assert md == tmp_path / "rep" / "report.md" and "## Main table" in md.read_text()
    with pytest.raises(ValueError, match="attack needs --out"):
        run_attack(AttackConfig(models=cfg.models))


def test_authorized_attack_refuses_the_release_of_another_run(runs, tmp_path):
    """--private must be the run that trained the release: its mask's complement still equals the run's init.
    Checked with the inputs (resolve_models), before any cell runs."""
    with pytest.raises(ValueError, match="does not belong to the private run"):
        resolve_models({"pmp": str(runs["dense"] / "final")}, {"pmp": str(runs["pmp"])}, scratch=False)
