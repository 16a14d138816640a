"""The README's main job, end to end on tiny inputs: pre-train dense + PMP, export, attack, report, audit."""

import json

from corpus_fixture import generate_text, write_corpus

from pmp.cli import main
from pmp.pipeline import matched_dense_step


def fake_run(root, final_ppl, evals, kept, final_step=600):
    """A run directory with just what matched_dense_step reads: run.json, metrics.jsonl, kept weight states."""
    root.mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"status": "finished", "step": final_step, "final_val_ppl": final_ppl}))
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_ppl": p}) + "\n" for s, p in evals))
    for where, step in kept:
        d = root / where / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"step": step}))
    return root


def test_matched_dense_step_picks_the_closest_kept_state(tmp_path):
    evals = [(0, 9000.0), (100, 300.0), (200, 200.0), (300, 160.0), (400, 133.0), (500, 121.0), (600, 114.0)]
    kept = [("snapshots", 100), ("snapshots", 200), ("snapshots", 300), ("checkpoints", 500), ("checkpoints", 600)]
    dense = fake_run(tmp_path / "dense", 114.0, evals, kept)
    m = matched_dense_step(dense, fake_run(tmp_path / "pmp1", 125.0, [], []))
    assert m == {"step": 500, "dense_ppl": 121.0, "pmp_ppl": 125.0}
    m = matched_dense_step(dense, fake_run(tmp_path / "pmp2", 135.0, [], []))
    assert m["step"] == 500  # step 400 (133) is closer but its weights were not kept; 300 (160) is farther
    m = matched_dense_step(dense, fake_run(tmp_path / "pmp3", 150.0, [], []))
    assert m["step"] == 300  # |ln 150 - ln 160| < |ln 150 - ln 121|
    assert matched_dense_step(dense, fake_run(tmp_path / "pmp4", 110.0, [], [])) is None  # PMP ends better
    assert matched_dense_step(dense, fake_run(tmp_path / "pmp5", 114.0, [], [])) is None  # already matched


def test_pipeline_end_to_end_and_resumes(tmp_path, capsys):
    files = write_corpus(tmp_path)
    rows = []
    for i in range(60):
        s = generate_text(60, seed=300 + i).split(".")[0]
        rows.append({"text": s, "label": int("ship" in s or "storm" in s)})
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = tmp_path / "heldout.txt"
    lm.write_text(generate_text(15000, seed=99))
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: tiny\nseeds: 1\n"
                     "attacks: [probe, full_adamw_3e-4_cos, authorized_1e-3_cos, recovered_mask_1e-3_cos]\n"
                     "classification: {steps: 4, batch_size: 4, max_len: 16, max_train: 24, max_val: 8, "
                     "max_test: 12, eval_every: 2}\n"
                     "lm: {steps: 4, batch_size: 2, max_len: 16, max_train: 12, max_val: 3, max_test: 3, "
                     "eval_every: 2}\n")
    sets = {"data.corpus": files, "data.cache_dir": str(tmp_path / "cache"), "data.seq_len": 32,
            "data.val_fraction": 0.1, "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32,
            "model.intermediate_size": 64, "train.steps": 20, "train.batch_size": 4, "train.warmup_steps": 2,
            "train.eval_every": 0, "train.eval_batches": 2, "train.ckpt_every": 0, "train.progress": False,
            "train.snapshot_every": 5, "pmp.min_warmup_steps": 5, "pmp.max_warmup_steps": 5}
    args = ["pipeline", "--out", str(tmp_path / "exp"), "--suite", str(suite), "--tasks", "none",
            "--task-file", str(task), "--lm-file", str(lm), "--matched-baseline"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    exp = tmp_path / "exp"
    for path in ("runs/dense/final/config.json", "runs/pmp/private/mask.json", "releases/pmp/config.json",
                 "releases/dense/README.md", "report/report.md", "audit/audit.md", "summary.md"):
        assert (exp / path).is_file(), path
    cells = list((exp / "attack" / "cells").glob("*.json"))
    assert any("pmp__" in c.name and "authorized" in c.name for c in cells)
    rec = [json.loads(c.read_text()) for c in cells if "recovered_mask" in c.name]
    assert rec and all(r["model"] == "pmp" and r["mask"]["source"] == "recovered" for r in rec)
    assert all(0 <= r["mask"]["precision_vs_true_mask"] <= 1 and r["complement_unchanged"] for r in rec)
    assert not (exp / "releases" / "pmp" / "mask.json").exists()
    summary = (exp / "summary.md").read_text()
    assert "held-out perplexity" in summary and "report.md" in summary
    # the quality-matched baseline, when the dense run ends better than PMP (random inits: usually, not always)
    matched = matched_dense_step(exp / "runs" / "dense", exp / "runs" / "pmp")
    assert (exp / "releases" / "dense_matched").is_dir() == (matched is not None) == ("dense_matched" in summary)
    if matched is not None:
        assert any(c.name.startswith("dense_matched__") for c in cells)
        assert "vs dense_matched" in (exp / "report" / "report.md").read_text()
    capsys.readouterr()
    # a second call skips every finished stage
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("already finished with the same config; skipping") == 2
    assert out.count("exists; skipping") == 3 + (matched is not None)
    assert "attack suite" in (exp / "summary.md").read_text()
    # another PMP setting: the finished dense baseline still counts (it never reads `pmp.*`), the PMP run does
    # not -- a clear error instead of silently reusing a model trained another way; nothing is overwritten
    before = (exp / "runs" / "pmp" / "final" / "model.safetensors").read_bytes()
    assert main(args + ["--set", "pmp.density=0.3"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("already finished with the same config; skipping") == 1
    assert "runs/pmp was trained with another config (pmp.density: 0.5 -> 0.3)" in captured.err
    assert (exp / "runs" / "pmp" / "final" / "model.safetensors").read_bytes() == before
