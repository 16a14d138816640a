"""Hardening of the evaluation verbs (attack, audit, report) and of verify-release: outputs never land in a release
or over a private run, nested release files are scanned, wrong inputs fail before any work, writers hold a lock,
and the audit is owner-only. Tiny runs; every test takes a few seconds."""

import json
import os
import re
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from corpus_fixture import generate_text
from test_eval_report import cell, classification_cells, write
from tiny_runs import tiny_pmp_and_dense
from transformers import AutoConfig

from pmp.config import ExportConfig
from pmp.dir_lock import LOCK_FILE, DirectoryLocked, exclusive
from pmp.eval import metrics as M
from pmp.eval.attack import run_attack
from pmp.eval.attack_inputs import resolve_models
from pmp.eval.attacks import load_suite_file
from pmp.eval.audit import run_audit
from pmp.eval.config import AttackConfig, AuditConfig, ReportConfig
from pmp.eval.models import check_release, load_model
from pmp.eval.release_weights import load_release
from pmp.eval.report import write_report
from pmp.mask import PrivateMask
from pmp.model import build_model
from pmp.paths import overlaps, refuse_output_over
from pmp.release import export_release
from pmp.verify_release import verify_release

TINY_LM = {"steps": 2, "batch_size": 2, "max_len": 16, "max_train": 8, "max_val": 2, "max_test": 2, "eval_every": 2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny PMP run and a dense run, the PMP run's fp32 and bf16 releases, held-out text, tiny suite files."""
    d = tmp_path_factory.mktemp("hardening")
    runs = tiny_pmp_and_dense(d)
    rel = export_release(ExportConfig(run=str(runs["pmp"]), out=str(d / "release")))
    rel16 = export_release(ExportConfig(run=str(runs["pmp"]), out=str(d / "release_bf16"), dtype="bf16"))
    lm = d / "heldout.txt"
    lm.write_text(generate_text(6000, seed=77))
    probe = d / "probe.yaml"
    probe.write_text(f"name: probeonly\nseeds: 1\nattacks: [probe]\nlm: {json.dumps(TINY_LM)}\n")
    authorized = d / "authorized.yaml"
    authorized.write_text(f"name: auth\nseeds: 1\nattacks: [probe, authorized_1e-3_cos]\nlm: {json.dumps(TINY_LM)}\n")
    return SimpleNamespace(root=d, pmp=runs["pmp"], dense=runs["dense"], release=rel, release_bf16=rel16, lm=lm,
                           probe=probe, authorized=authorized)


def tree(path: Path) -> dict:
    """Every file (bytes) and directory under `path`: to show that nothing was written."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else "<dir>") for p in sorted(path.rglob("*"))}


def copy_release(env, name: str) -> Path:
    return Path(shutil.copytree(env.release, env.root / name, dirs_exist_ok=False))


def attack_cfg(env, out, **kw) -> AttackConfig:
    base = dict(suite=str(env.probe), tasks="none", lm_file=str(env.lm), scratch=False, out=str(out),
                models={"pmp": str(env.release)})
    return AttackConfig(**{**base, **kw})


def audit_cfg(env, **kw) -> AuditConfig:
    base = dict(release=str(env.release), private=str(env.pmp), text=str(env.lm), max_seed=2, grad_batches=1,
                max_seconds=5)
    return AuditConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ 1. no secrets in a release
def test_overlap_rule(tmp_path):
    rel, run = tmp_path / "rel", tmp_path / "run"
    (rel / "sub").mkdir(parents=True)
    run.mkdir()
    (tmp_path / "link").symlink_to(rel)
    assert overlaps(rel, rel / "sub") and overlaps(rel / "sub", rel) and not overlaps(rel, run)
    assert overlaps(tmp_path / "link" / "new", rel)  # a symlink does not hide the release
    assert overlaps(tmp_path / "rel" / ".." / "rel", rel)
    for out in (rel, rel / "sub", rel / "new" / "deeper", tmp_path, tmp_path / "link"):
        with pytest.raises(ValueError, match="choose an output directory outside it"):
            refuse_output_over(out, releases=[rel])
    for out in (run, tmp_path):
        with pytest.raises(ValueError, match="private run"):
            refuse_output_over(out, private_runs={"the private run --private": run})
    refuse_output_over(run / "audit", releases=[rel], private_runs=[run])  # inside the private run: private, fine
    refuse_output_over(tmp_path / "elsewhere", releases=[rel], private_runs=[run])


def sandbox(env, tmp_path) -> SimpleNamespace:
    """A copy of the release and of the private run in tmp_path: a verb that wrongly writes there harms no other
    test."""
    box = tmp_path / "box"
    rel = Path(shutil.copytree(env.release, box / "release"))
    run = Path(shutil.copytree(env.pmp, box / "run", ignore=shutil.ignore_patterns("audit")))
    rec = box / "recovered"
    PrivateMask.load(run / "private").save(rec)
    return SimpleNamespace(root=box, release=rel, pmp=run, recovered=rec, lm=env.lm, probe=env.probe)


@pytest.mark.parametrize("where", ["release", "inside_release", "contains_release", "private", "contains_private"])
def test_audit_refuses_an_out_over_its_inputs(env, tmp_path, where):
    box = sandbox(env, tmp_path)
    out = {"release": box.release, "inside_release": box.release / "audit", "contains_release": box.root,
           "private": box.pmp, "contains_private": box.root}[where]
    before = tree(box.root)
    with pytest.raises(ValueError, match="choose (an|another) output directory"):
        run_audit(audit_cfg(box, out=str(out)), log=lambda *_: None)
    assert tree(box.root) == before  # nothing written anywhere


def test_audit_refuses_an_out_inside_the_shadow_run(env, tmp_path):
    box = sandbox(env, tmp_path)
    shadow = box.root / "shadow"
    shutil.copytree(box.pmp / "private", shadow / "private")
    with pytest.raises(ValueError, match="--shadow.*outside it"):
        run_audit(audit_cfg(box, out=str(shadow / "audit"), shadow=str(shadow)), log=lambda *_: None)
    assert not (shadow / "audit").exists()


@pytest.mark.parametrize("where", ["release", "inside_release", "contains_release", "recovered", "private",
                                   "contains_private"])
def test_attack_refuses_an_out_over_its_inputs(env, tmp_path, where):
    box = sandbox(env, tmp_path)
    out = {"release": box.release, "inside_release": box.release / "results", "contains_release": box.root,
           "recovered": box.recovered / "results", "private": box.pmp, "contains_private": box.root}[where]
    before = tree(box.root)
    with pytest.raises(ValueError, match="choose (an|another) output directory"):
        run_attack(attack_cfg(box, out, private={"pmp": str(box.pmp)}, recovered={"pmp": str(box.recovered)}))
    assert tree(box.root) == before


# ---------------------------------------------------------------------------------------------- 2. verify-release
def test_verify_release_scans_nested_files(env):
    rel = copy_release(env, "release_nested")
    assert verify_release(rel, env.pmp, load=False).ok  # control
    fp = PrivateMask.load(env.pmp / "private").fingerprint()
    (rel / "sub").mkdir()
    (rel / "sub" / "audit.json").write_text(json.dumps({"mask": {"sha256": fp}}))
    report = verify_release(rel, env.pmp, load=False)
    checks = {c.name: c for c in report.checks}
    assert checks["no mask fingerprint in any file"].status == "FAIL", str(report)
    assert "sub/audit.json" in checks["no mask fingerprint in any file"].detail
    assert "releases are flat: unexpected directory sub/" in checks["expected files only"].detail


# ---------------------------------------------------------------------------------------------- 3. wrong --private
def test_wrong_private_is_refused_before_any_cell_runs(env, tmp_path):
    dense_rel = env.dense / "final"
    out = tmp_path / "res"
    with pytest.raises(ValueError, match="does not belong to the private run"):
        run_attack(attack_cfg(env, out, suite=str(env.authorized), models={"dense": str(dense_rel),
                                                                             "pmp": str(dense_rel)},
                              private={"pmp": str(env.pmp)}))
    assert not out.exists()  # the dense model's cells did not run first


def test_private_mask_naming_parameters_the_release_lacks_is_refused(env):
    cfg = AutoConfig.from_pretrained(str(env.release))
    cfg.num_hidden_layers = 1
    other = env.root / "one_layer_release"
    build_model(cfg, 5).save_pretrained(str(other))
    for f in TOKENIZER_FILES:
        shutil.copy(env.release / f, other / f)
    with pytest.raises(ValueError, match="names parameters the release .* does not have.*layers.1"):
        resolve_models({"pmp": str(other)}, {"pmp": str(env.pmp)}, scratch=False)


def test_bf16_release_passes_the_private_run_check(env, tmp_path):
    """A bf16 release's complement equals the run's init rounded to bf16: the check compares in the stored dtype."""
    cfg = attack_cfg(env, tmp_path / "res", suite=str(env.authorized), models={"pmp": str(env.release_bf16)},
                     private={"pmp": str(env.pmp)})
    summary = run_attack(cfg)
    assert summary["run"] == 2


# ---------------------------------------------------------------------------------------------- 4. bad weights
def test_weights_that_do_not_fit_the_config_are_refused(env):
    rel = copy_release(env, "gpt2_config")
    AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=320).save_pretrained(str(rel))
    for kind in ("lm", "classification"):
        with pytest.raises(ValueError, match=r"gpt2_config.*do not fit its config.*(transformer\.|model\.)"):
            load_model(rel, kind, 2, seed=0, pad_id=0)
    with pytest.raises(ValueError, match="gpt2_config.*do not fit its config"):
        load_release(rel)
    # the same architecture with another shape
    rel2 = copy_release(env, "shape_config")
    cfg = json.loads((rel2 / "config.json").read_text())
    (rel2 / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ValueError, match="shape_config.*(shape|size)"):
        load_model(rel2, "lm", 0, seed=0, pad_id=0)


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_truncated_weights_give_one_clear_error(env, tmp_path, cut):
    rel = copy_release(env, f"trunc_{cut}")
    data = (rel / "model.safetensors").read_bytes()
    (rel / "model.safetensors").write_bytes(b"" if cut == "empty" else data[: len(data) // 2])
    pattern = "model.safetensors is truncated or not a safetensors file"
    with pytest.raises(ValueError, match=pattern):
        check_release(rel)
    with pytest.raises(ValueError, match=pattern):
        load_release(rel)
    with pytest.raises(ValueError, match=pattern):
        run_attack(attack_cfg(env, tmp_path / "res", models={"pmp": str(rel)}))
    with pytest.raises(ValueError, match=pattern):
        run_audit(audit_cfg(env, release=str(rel), out=str(tmp_path / "aud")), log=lambda *_: None)
    assert not (tmp_path / "res").exists() and not (tmp_path / "aud").exists()


# ---------------------------------------------------------------------------------------------- 5. suites and cells
BAD_SUITES = {
    "lr": 'attacks: [probe, {name: bad_lr, kind: full, lr: "x"}]',
    "seeds": "seeds: x\nattacks: [probe]",
    "steps": "attacks: [probe]\nclassification: {steps: -1}",
    "optimizer": "attacks: [probe, {name: bad_opt, kind: full, optimizer: rmsprop}]",
    "batch_size": 'attacks: [probe]\nlm: {batch_size: "x"}',
    "attacks": "attacks: probe",
    "extends": "extends: nope\nattacks: [probe]",
    "kind": "attacks: [probe, {name: no_kind}]",
    "mask_density": "mask_density: x\nattacks: [probe]",
    "classification": "attacks: [probe]\nclassification: 5",
    "name": "name: [1, 2]\nattacks: [probe]",
}


@pytest.mark.parametrize("field", sorted(BAD_SUITES))
def test_bad_suite_file_names_the_file_and_the_field(tmp_path, field):
    f = tmp_path / "bad_suite.yaml"
    f.write_text(BAD_SUITES[field] + "\n")
    with pytest.raises(ValueError, match=f"suite file {re.escape(str(f))}.*{field}"):
        load_suite_file(f)


def test_yaml_style_exponent_is_a_number(tmp_path):
    """PyYAML reads `lr: 1e-3` as a string; the suite file takes it as the number it means."""
    f = tmp_path / "suite.yaml"
    f.write_text("attacks: [probe, {name: exp_lr_test, kind: full, lr: 1e-3}]\n")
    assert load_suite_file(f).attack("exp_lr_test").lr == 1e-3


@pytest.mark.parametrize("damage", ["no_direction", "no_before", "bad_before", "torn"])
def test_report_refuses_a_corrupt_cell_naming_it(tmp_path, damage):
    cells = classification_cells()
    res = write(tmp_path, cells)
    victim = res / "cells" / f"{cells[3]['cell']}.json"
    rec = json.loads(victim.read_text())
    if damage == "torn":
        victim.write_text(victim.read_text()[:40])
    else:
        rec.pop("direction" if damage == "no_direction" else "before")
        if damage == "bad_before":
            rec["before"] = "x"
        victim.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=f"{victim.name}.*pmp attack"):
        write_report(ReportConfig(results=str(res)))
    assert not (res / "report").exists()


def test_cells_fallback_dir_ignores_other_json(tmp_path):
    """Results given as the cells directory itself: sweep.json and the lock file are not cells."""
    d = tmp_path / "flat"
    d.mkdir()
    for c in classification_cells():
        (d / f"{c['cell']}.json").write_text(json.dumps(c))
    (d / "sweep.json").write_text(json.dumps({"models": []}))
    (d / LOCK_FILE).write_text("{}")
    assert len(M.load_cells(d)) == len(classification_cells())
    (d / "sweep.json").unlink()
    (d / "x__y__z__s0.json").write_text(json.dumps({**cell("x", "other", "y", "z", "full", 0, 0.5, 0.6),
                                                    "direction": None}))
    with pytest.raises(ValueError, match="x__y__z__s0.json.*direction"):
        M.load_cells(d)


# ---------------------------------------------------------------------------------------------- 6. locks
def test_second_attack_on_a_locked_out_is_refused(env, tmp_path):
    out = tmp_path / "res"
    with exclusive(out, "results directory"):
        with pytest.raises(DirectoryLocked, match=f"pid {os.getpid()}"):
            run_attack(attack_cfg(env, out))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    summary = run_attack(attack_cfg(env, out))  # the lock is free again
    assert summary["run"] == 1 and (out / LOCK_FILE).is_file()
    assert len(M.load_cells(out)) == 1  # the lock file does not disturb the reader


def test_second_audit_on_a_locked_out_is_refused(env, tmp_path):
    out = tmp_path / "aud"
    with exclusive(out, "audit directory"):
        with pytest.raises(DirectoryLocked, match=f"pid {os.getpid()}"):
            run_audit(audit_cfg(env, out=str(out)), log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


# ---------------------------------------------------------------------------------------------- 7. owner-only audit
def test_audit_output_is_owner_only(env):
    out = env.pmp / "audit"  # the default: inside the private run, which is allowed
    old = os.umask(0o022)  # a usual umask: new files readable by everyone unless the audit says otherwise
    try:
        run_audit(audit_cfg(env), log=lambda *_: None)
    finally:
        during = os.umask(old)
    assert during == 0o022  # the audit restored the process umask
    assert (out / "audit.json").is_file() and (out / "recovered_mask" / "mask.json").is_file()
    for p in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
