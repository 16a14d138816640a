"""Hostile and careless use of the pre-training and release verbs: a shared run directory is data (nothing in it
executes), one writer per run, owner secrets never redrawn, owner-only files, clear one-line errors, and runs that
stop instead of training to NaN."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from corpus_fixture import write_corpus
from safetensors.torch import load_file, save_file

from pmp.atomic import sha256_file
from pmp.cli import main
from pmp.config import ExportConfig, load_config
from pmp.dir_lock import exclusive
from pmp.release import export_release
from pmp.run_dir import RunDir
from pmp.train.trainer import NonFiniteLoss, Trainer, pretrain
from pmp.typed_config import dump_yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d), str(d / "cache")


def sets(corpus, **extra) -> list[str]:
    files, cache = corpus
    base = {"data.corpus": files, "data.cache_dir": cache, "data.seq_len": 32, "data.val_fraction": 0.1,
            "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32,
            "model.intermediate_size": 64, "train.steps": 20, "train.batch_size": 4, "train.warmup_steps": 2,
            "train.eval_every": 10, "train.eval_batches": 2, "train.log_every": 5, "train.ckpt_every": 10,
            "train.progress": False, "train.threads": 1, "pmp.min_warmup_steps": 5, "pmp.max_warmup_steps": 5,
            "pmp.iou_lag_steps": 5}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cli(corpus, out, *args, **extra) -> list[str]:
    argv = ["pretrain", "--out", str(out), *args]
    for s in sets(corpus, **extra):
        argv += ["--set", s]
    return argv


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A finished PMP run, copied by tests that damage it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    pretrain(load_config(None, sets(corpus)), out)
    return out


def copy_run(src: Path, dst: Path) -> RunDir:
    shutil.copytree(src, dst)
    return RunDir(dst)


# ---------------------------------------------------------------------------------------------- 1. state is data
class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_a_planted_pickle_in_a_checkpoint_never_executes(finished, tmp_path, capsys, monkeypatch):
    run = copy_run(finished, tmp_path / "run")
    ckpt = sorted(run.checkpoints.iterdir())[-1]
    for f in ("state.json", "state.safetensors"):
        (ckpt / f).unlink()
    (ckpt / "state.pt").write_bytes(pickle.dumps({"step": Boom()}))
    manifest = json.loads((ckpt / "manifest.json").read_text())  # whoever writes the file writes the manifest
    manifest["sha256"] = {f.name: sha256_file(f) for f in ckpt.iterdir() if f.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--out", str(run.root), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "pickled state.pt" in err and "no longer loads pickles" in err
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_state_json_holds_no_code(finished):
    ckpt = sorted(RunDir(finished).checkpoints.iterdir())[-1]
    assert {f.name for f in ckpt.iterdir()} == {"model.safetensors", "state.safetensors", "state.json",
                                                 "manifest.json"}
    json.loads((ckpt / "state.json").read_text())  # plain JSON


# ---------------------------------------------------------------------------------------------- 2. one writer
def test_a_second_writer_is_refused_and_names_the_holder(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    with exclusive(out, "run directory"):
        assert main(cli(corpus, out)) == 2
    err = capsys.readouterr().err
    assert "in use by another pmp process" in err and f"pid {os.getpid()}" in err
    assert {p.name for p in out.iterdir()} == {".pmp.lock"}  # nothing else was written


def test_two_concurrent_pretrains_one_wins(corpus, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "pmp", *cli(corpus, out)]
    procs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    assert "in use by another pmp process" in loser or "already holds a pmp run" in loser
    run = RunDir(out)
    assert run.read_status()["status"] == "finished"
    export_release(ExportConfig(run=str(out), out=str(tmp_path / "rel")))  # complement matches the stored init


def test_export_refuses_a_run_whose_complement_is_not_its_init(finished, tmp_path, corpus):
    other = tmp_path / "other"
    pretrain(load_config(None, sets(corpus, **{"train.steps": 10, "train.ckpt_every": 10})), other)
    run = copy_run(finished, tmp_path / "mixed")
    for f in ("init.safetensors", "init.json"):  # init of one run beside the final model of another
        shutil.copy2(other / "private" / f, run.private / f)
    with pytest.raises(ValueError, match="does not belong to the private run"):
        export_release(ExportConfig(run=str(run.root), out=str(tmp_path / "rel")))
    assert not (tmp_path / "rel").exists()


# ---------------------------------------------------------------------------------------------- 3. the init secret
def test_a_missing_init_is_rebuilt_from_the_recorded_seed(finished, tmp_path, corpus):
    run = copy_run(finished, tmp_path / "run")
    before = (run.init_weights.read_bytes(), run.init_record.read_text())
    run.init_weights.unlink()
    ckpts = sorted(run.checkpoints.iterdir())
    shutil.rmtree(ckpts[-1])  # resume from an earlier checkpoint: the init is needed again
    pretrain(load_config(None, sets(corpus)), run.root, resume=True)
    assert (run.init_weights.read_bytes(), run.init_record.read_text()) == before


def test_a_tampered_seed_record_is_refused_not_overwritten(finished, tmp_path, corpus):
    run = copy_run(finished, tmp_path / "run")
    run.init_weights.unlink()
    rec = json.loads(run.init_record.read_text())
    rec["seed"] += 1
    run.init_record.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="differ from the recorded ones"):
        pretrain(load_config(None, sets(corpus)), run.root, resume=True)
    assert json.loads(run.init_record.read_text()) == rec and not run.init_weights.exists()


def test_a_lost_seed_record_is_refused(finished, tmp_path, corpus):
    run = copy_run(finished, tmp_path / "run")
    run.init_weights.unlink()
    run.init_record.unlink()
    with pytest.raises(ValueError, match="seed .* is missing but the run already trained"):
        pretrain(load_config(None, sets(corpus)), run.root, resume=True)
    assert not run.init_record.exists() and not run.init_weights.exists()


# ---------------------------------------------------------------------------------------------- 5. permissions
def test_private_artifacts_are_owner_only(finished):
    run = RunDir(finished)
    for d in (run.root, run.private, run.checkpoints, run.final):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    files = [run.metrics, run.config, run.status, run.init_weights, run.init_record, run.private / "mask.json",
             run.private / "mask.safetensors", *sorted(run.checkpoints.rglob("*.*"))]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


# ---------------------------------------------------------------------------------------------- 7. clear errors
def test_an_out_under_a_file_is_one_error_line(corpus, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(cli(corpus, blocker / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("override, match", [
    ("train.data_seed=-1", "train.data_seed must be >= 0"),
    ("train.lr=1e9", "train.lr must be <= 10"),
    ("train.lr=.inf", "finite"),
    ("train.steps=@", "not a plain YAML value"),
])
def test_bad_values_are_refused_before_anything_is_written(corpus, tmp_path, capsys, override, match):
    out = tmp_path / "run"
    assert main([*cli(corpus, out), "--set", override]) == 2
    assert match in capsys.readouterr().err and not out.exists()


def test_debug_shows_the_traceback(corpus, tmp_path):
    with pytest.raises(ValueError, match="data_seed"):
        main(["--debug", *cli(corpus, tmp_path / "run"), "--set", "train.data_seed=-1"])


# ---------------------------------------------------------------------------------------------- 8. NaN
def _nan_at(monkeypatch, step: int, times: int = 1):
    """The loss of the first `times` batches tried at optimizer step `step` is NaN."""
    real, seen = Trainer._forward_backward, []

    def fb(self):
        loss = real(self)
        if self.step + 1 == step and len(seen) < times:
            seen.append(step)
            return math.nan
        return loss

    monkeypatch.setattr(Trainer, "_forward_backward", fb)


def test_a_non_finite_loss_stops_the_run_naming_the_step(corpus, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 13)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 13"):
        pretrain(load_config(None, sets(corpus)), tmp_path / "run")
    run = RunDir(tmp_path / "run")
    assert run.read_status()["status"] == "running" and run.read_status()["step"] == 10  # last checkpoint intact
    monkeypatch.undo()
    pretrain(load_config(None, sets(corpus)), run.root, resume=True)
    assert run.read_status()["status"] == "finished"


def test_skip_nonfinite_batches_skips_and_says_so(corpus, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 7)
    run = pretrain(load_config(None, sets(corpus, **{"train.skip_nonfinite_batches": "true"})), tmp_path / "run")
    rows = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "skipped_batch" in r] == [6]
    assert run.read_status()["status"] == "finished"


def test_skipping_stops_when_every_batch_is_non_finite(corpus, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 7, times=1000)  # e.g. the weights themselves became NaN: skipping would loop forever
    with pytest.raises(NonFiniteLoss, match="11 batches in a row"):
        pretrain(load_config(None, sets(corpus, **{"train.skip_nonfinite_batches": "true"})), tmp_path / "run")


def test_export_refuses_non_finite_weights(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    f = run.final / "model.safetensors"
    w = load_file(str(f))
    name = next(n for n in w if "layers.0.mlp" in n)
    w[name][0, 0] = math.inf
    save_file(w, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="NaN/inf"):
        export_release(ExportConfig(run=str(run.root), out=str(tmp_path / "rel")))


# ---------------------------------------------------------------------------------------------- interrupted starts
def test_a_run_killed_before_run_json_resumes(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(None, sets(corpus))
    (out / "config.yaml").write_text(dump_yaml(cfg))
    assert main(cli(corpus, out)) == 2
    assert "interrupted before it started" in capsys.readouterr().err
    pretrain(cfg, out, resume=True)
    assert RunDir(out).read_status()["status"] == "finished"


def test_leftovers_are_cleaned_and_metrics_have_no_duplicates(finished, tmp_path, corpus):
    run = copy_run(finished, tmp_path / "run")
    (run.root / ".final.abc.tmp").mkdir()
    (run.root / ".run.json.xyz.tmp").write_text("{")
    before = run.metrics.read_text()
    pretrain(load_config(None, sets(corpus)), run.root, resume=True)  # resuming a finished run
    assert not list(run.root.glob(".*.tmp"))
    assert run.metrics.read_text() == before  # no second evaluation row for the last step


def test_resume_without_checkpoint_writes_each_row_once(corpus, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 3)
    with pytest.raises(NonFiniteLoss):
        pretrain(load_config(None, sets(corpus)), tmp_path / "run")
    monkeypatch.undo()
    run = pretrain(load_config(None, sets(corpus)), tmp_path / "run", resume=True)
    keys = [(r["step"], tuple(sorted(r))) for r in map(json.loads, run.metrics.read_text().splitlines())]
    assert len(keys) == len(set(keys))


def test_an_interrupted_export_leaves_nothing_behind_after_the_next(finished, tmp_path):
    (tmp_path / ".rel.k2j3.tmp").mkdir()  # what a killed export of tmp_path/rel leaves
    (tmp_path / ".rel.k2j3.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.tmp").write_text("not ours")
    export_release(ExportConfig(run=str(finished), out=str(tmp_path / "rel")))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp", "rel"]


def test_disk_full_during_a_checkpoint_is_one_error_line(corpus, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr("pmp.step_dir.save_file", full)
    assert main(cli(corpus, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No space left on device") and "free disk space" in err and err.count("\n") == 1


def test_a_dense_export_does_not_talk_about_a_mask(corpus, tmp_path, capsys):
    run = tmp_path / "dense"
    pretrain(load_config(None, sets(corpus, **{"train.method": "dense", "train.steps": 10})), run)
    assert main(["export", str(run), "--out", str(tmp_path / "rel")]) == 0
    out = capsys.readouterr().out
    assert "release written to" in out and "mask" not in out
