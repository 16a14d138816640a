"""End-to-end trainer on a tiny generated corpus: dense and PMP runs, artifacts, exact resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from corpus_fixture import write_corpus
from safetensors.torch import load_file

from pmp.cli import main
from pmp.config import load_config
from pmp.mask import PrivateMask
from pmp.train.trainer import Trainer, pretrain

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d), str(d / "cache")


def tiny_overrides(corpus, **extra):
    files, cache = corpus
    base = {
        "data.corpus": files, "data.cache_dir": cache, "data.seq_len": 32, "data.val_fraction": 0.1,
        "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32, "model.intermediate_size": 64,
        "train.steps": 40, "train.batch_size": 4, "train.lr": 3e-3, "train.warmup_steps": 3, "train.eval_every": 20,
        "train.eval_batches": 2, "train.log_every": 5, "train.ckpt_every": 10, "train.progress": False,
        "train.threads": 1, "pmp.min_warmup_steps": 15, "pmp.max_warmup_steps": 15, "model.init_seed": None,
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def read_metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_dense_run_learns_and_writes_artifacts(corpus, tmp_path):
    cfg = load_config(None, tiny_overrides(corpus, **{"train.method": "dense"}))
    run = pretrain(cfg, tmp_path / "run")
    rows = read_metrics(run.root)
    train_rows = [r for r in rows if "loss" in r]
    assert all({"step", "loss", "lr", "tokens_per_s", "mem_mb"} <= set(r) for r in train_rows)
    evals = [r for r in rows if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["val_ppl"] < 0.5 * evals[0]["val_ppl"], evals
    status = json.loads((run.root / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 40
    assert (run.root / "checkpoints" / "step_00000040" / "manifest.json").is_file()
    assert len(list((run.root / "checkpoints").iterdir())) == 2  # keep_last
    assert (run.root / "final" / "config.json").is_file()
    init = json.loads((run.root / "private" / "init.json").read_text())
    assert init["pinned"] is False and init["seed"] > 0


def test_pmp_run_freezes_complement_exactly(corpus, tmp_path):
    cfg = load_config(None, tiny_overrides(corpus, **{"pmp.density": 0.3, "pmp.selection": "global",
                                                      "pmp.iou_lag_steps": 5}))
    run = pretrain(cfg, tmp_path / "run")
    mask = PrivateMask.load(run.root / "private")
    init = load_file(str(run.root / "private" / "init.safetensors"))
    final = load_file(str(run.root / "final" / "model.safetensors"))
    assert abs(mask.nnz - round(0.3 * mask.total)) <= 1  # global selection: within one entry overall
    changed = 0
    for name, m in mask.to_bool().items():
        assert torch.equal(final[name][~m], init[name][~m]), f"complement of {name} moved"
        changed += int((final[name] != init[name]).sum())
    assert 0 < changed <= mask.nnz
    # default scope "matrices": norms are outside the mask and train densely, so none stays exactly at 1.0
    norms = [n for n in final if "norm" in n]
    assert norms and not any(n in mask.layouts for n in norms)
    assert all(not (final[n] == 1.0).any() for n in norms)
    rows = read_metrics(run.root)
    ious = [r["iou"] for r in rows if "iou" in r]
    assert len(ious) == 3  # one check every iou_lag_steps=5 of the 15 identification steps
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert mask.meta["identification_step"] == 15


def test_per_tensor_selection_density(corpus, tmp_path):
    cfg = load_config(None, tiny_overrides(corpus, **{"pmp.selection": "per_tensor", "pmp.density": 0.25,
                                                      "pmp.scope": "linear", "train.steps": 17}))
    run = pretrain(cfg, tmp_path / "run")
    mask = PrivateMask.load(run.root / "private")
    for name, lay in mask.layouts.items():
        assert abs(lay.nnz - round(0.25 * lay.rows * lay.cols)) <= 1, name
    assert all("proj" in n or "lm_head" in n for n in mask.layouts)


def test_same_data_seed_same_batches(corpus, tmp_path):
    a = Trainer(load_config(None, tiny_overrides(corpus, **{"train.method": "dense"})), tmp_path / "a", False)
    b = Trainer(load_config(None, tiny_overrides(corpus)), tmp_path / "b", False)
    for _ in range(3):
        assert torch.equal(a.stream.next_batch(), b.stream.next_batch())
    assert not torch.equal(a.init_state["model.embed_tokens.weight"], b.init_state["model.embed_tokens.weight"])


def _cli(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "pmp", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc, run: Path, step: int):
    """SIGKILL the run once a checkpoint at or after `step` exists."""
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = run / "checkpoints"
        if ck.is_dir() and any(int(p.name[5:]) >= step for p in ck.glob("step_*") if (p / "manifest.json").is_file()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}: {proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out waiting for a checkpoint")


VARIANT_SETTINGS = {"none": {}, "trap": {"pmp.trap_fraction": 0.5},  # trap steps 21..40: resumed inside at 30
                    "illcond": {"pmp.scope": "linear"}}


@pytest.mark.parametrize("complement, variant", [("frozen", "none"), ("project", "none"), ("frozen", "trap"),
                                                 ("frozen", "illcond")])
def test_sigkill_and_resume_is_exact(corpus, tmp_path, complement, variant):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}"}
    # a pinned init seed makes the two runs comparable (it warns, as it should)
    ov = tiny_overrides(corpus, **{"model.init_seed": 1234, "pmp.complement": complement, "pmp.variant": variant,
                                   **VARIANT_SETTINGS[variant]})
    args = ["pretrain", *sum([["--set", o] for o in ov], [])]
    full = tmp_path / "full"
    p = _cli([*args, "--out", str(full)], env)
    out = p.communicate()[0]
    assert p.returncode == 0, out

    cut = tmp_path / "cut"
    p = _cli([*args, "--out", str(cut)], env)
    _kill_when(p, cut, 10)  # killed during identification (illcond: its dense phase, keyed from step 0)
    p = _cli([*args, "--out", str(cut), "--resume"], env)
    _kill_when(p, cut, 30)  # killed during masked training (trap: inside the trap window)
    p = _cli(["pretrain", "--out", str(cut), "--resume"], env)
    out = p.communicate()[0]
    assert p.returncode == 0, out
    assert "resumed" in out

    def final(run):
        rows = read_metrics(run)
        return [r["loss"] for r in rows if "loss" in r][-1], [r["val_loss"] for r in rows if "val_loss" in r][-1]

    (a_loss, a_val), (b_loss, b_val) = final(full), final(cut)
    assert abs(a_loss - b_loss) <= 1e-6 and abs(a_val - b_val) <= 1e-6
    fa = load_file(str(full / "final" / "model.safetensors"))
    fb = load_file(str(cut / "final" / "model.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    if complement == "project":  # the resumed run projected (at identification, after its first kill) the same way
        rec = [json.loads((r / "private" / "complement.json").read_text()) for r in (full, cut)]
        assert rec[0] == rec[1] and rec[0]["mode"] == "project" and rec[0]["scale"] < 1
    if variant != "none":  # the mask drawn (illcond) or identified (trap) before the kills is the one kept
        assert PrivateMask.load(full / "private").fingerprint() == PrivateMask.load(cut / "private").fingerprint()
        extra = "trap_loss" if variant == "trap" else "kappa_ratio"
        assert [r[extra] for r in read_metrics(full) if extra in r] == [r[extra] for r in read_metrics(cut)
                                                                        if extra in r]
    steps = [r["step"] for r in read_metrics(cut) if "loss" in r]
    assert steps == sorted(set(steps)), "metrics rows after the resumed checkpoint were duplicated"


# ---------------------------------------------------------------------------------------------- bad input


def test_cli_bad_inputs(corpus, tmp_path, capsys):
    ov = sum([["--set", o] for o in tiny_overrides(corpus, **{"train.steps": 16})], [])

    def run(*args):
        code = main(list(args))
        err = capsys.readouterr().err.strip().splitlines()
        return code, err

    code, err = run("pretrain", "--out", str(tmp_path / "r"), "--set", "train.stepz=3")
    assert code == 2 and len(err) == 1 and "did you mean 'train.steps'" in err[0]
    code, err = run("pretrain", "--out", str(tmp_path / "r"), "--set", "train.steps=many")
    assert code == 2 and "expected an integer" in err[0]
    code, err = run("pretrain", *ov, "--set", f"data.corpus={tmp_path / 'missing.txt'}", "--out", str(tmp_path / "r"))
    assert code == 2 and "missing.txt" in err[-1]
    assert not (tmp_path / "r").exists() or not (tmp_path / "r" / "checkpoints").exists()

    # a directory with unrelated files is refused and left untouched
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, err = run("pretrain", *ov, "--out", str(other))
    assert code == 2 and "not empty" in err[-1]
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    # a finished run is refused without --resume
    good = tmp_path / "good"
    assert main(["pretrain", *ov, "--out", str(good)]) == 0
    before = (good / "metrics.jsonl").read_text()
    code, err = run("pretrain", *ov, "--out", str(good))
    assert code == 2 and "already holds a pmp run" in err[-1]
    assert (good / "metrics.jsonl").read_text() == before

    # resuming with a different config is refused
    code, err = run("pretrain", *ov, "--set", "train.lr=0.1", "--out", str(good), "--resume")
    assert code == 2 and "config differs" in err[-1]

    # a corrupt (truncated) checkpoint is a clear error, and nothing is overwritten
    ck = sorted((good / "checkpoints").iterdir())[-1]
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = run("pretrain", "--out", str(good), "--resume")
    assert code == 2 and "corrupt or truncated" in err[-1]
    assert (good / "metrics.jsonl").read_text() == before

    # resuming with a different mask is refused
    (ck / "model.safetensors").write_bytes(data)
    mask = PrivateMask.load(good / "private")
    name = next(iter(mask.layouts))
    flipped = mask.to_bool()
    flipped[name] = ~flipped[name]
    PrivateMask.from_bool(flipped, mask.meta).save(good / "private")
    code, err = run("pretrain", "--out", str(good), "--resume")
    assert code == 2 and "different mask" in err[-1]


def test_block_mask_run(corpus, tmp_path):
    cfg = load_config(None, tiny_overrides(corpus, **{"pmp.block_size": 64, "pmp.density": 0.5, "train.steps": 20,
                                                      "model.hidden_size": 128, "model.intermediate_size": 192}))
    run = pretrain(cfg, tmp_path / "run")
    mask = PrivateMask.load(run.root / "private")
    blocked = {n for n, lay in mask.layouts.items() if lay.block_size == 64}
    assert blocked and all("proj" in n or "lm_head" in n for n in blocked)
    assert "model.embed_tokens.weight" in mask.layouts and "model.embed_tokens.weight" not in blocked
    init = load_file(str(run.root / "private" / "init.safetensors"))
    final = load_file(str(run.root / "final" / "model.safetensors"))
    for name, m in mask.to_bool().items():
        assert torch.equal(final[name][~m], init[name][~m])
