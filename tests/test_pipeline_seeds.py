"""`pmp pipeline --pretrain-seeds 0,1`: the whole chain at each pre-training seed, the first seed in the one-seed
layout (a one-seed pipeline directory grows a second seed without recomputing the first), then the report pooled
over the seeds; bad seed lists refused before anything is written."""

import json
from pathlib import Path

import pytest
import yaml
from corpus_fixture import generate_text, write_corpus

from pmp.cli import main
from pmp.pipeline import PipelineConfig, seed_dir, seeded_config, share_scratch_cells
from pmp.run_dir import RunDir
from pmp.typed_config import load_typed


def pipeline_args(tmp_path: Path) -> list[str]:
    files = write_corpus(tmp_path, chars_per_file=4000)
    lm = tmp_path / "heldout.txt"
    lm.write_text(generate_text(8000, seed=99))
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: tiny\nseeds: 2\nattacks: [probe, full_adamw_3e-4_cos]\n"
                     "lm: {steps: 2, batch_size: 2, max_len: 16, max_train: 8, max_val: 3, max_test: 3, "
                     "eval_every: 2}\n")
    sets = {"data.corpus": files, "data.cache_dir": str(tmp_path / "cache"), "data.seq_len": 32,
            "data.val_fraction": 0.1, "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32,
            "model.intermediate_size": 64, "train.steps": 12, "train.batch_size": 4, "train.warmup_steps": 2,
            "train.eval_every": 0, "train.eval_batches": 1, "train.ckpt_every": 0, "train.progress": False,
            "train.threads": 1, "pmp.min_warmup_steps": 4, "pmp.max_warmup_steps": 4}
    args = ["pipeline", "--out", str(tmp_path / "exp"), "--suite", str(suite), "--tasks", "none", "--lm-file",
            str(lm), "--no-audit"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of the runs, releases and attack cells under `root` (not its seeds/): mtime and content."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for sub in ("runs", "releases", "attack/cells") for p in (root / sub).rglob("*")
            if p.is_file() and p.name != ".pmp.lock"}


def test_second_seed_joins_a_one_seed_pipeline_and_is_pooled(tmp_path, capsys):
    args = pipeline_args(tmp_path)
    exp = tmp_path / "exp"
    assert main(args) == 0  # today's one-seed pipeline
    one_seed = _files(exp)
    assert not (exp / "seeds").exists() and not (exp / "report_pooled").exists()
    capsys.readouterr()

    # seed 0 of [0, 1] is exactly the one-seed pipeline: its finished runs, releases and cells are taken as they are
    assert main(args + ["--pretrain-seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert out.count("already finished with the same config; skipping") == 2
    assert _files(exp) == one_seed
    s1 = exp / "seeds" / "s1"
    for path in ("runs/pmp/private/mask.json", "releases/dense/config.json", "report/report.md"):
        assert (s1 / path).is_file(), path
    # the second seed: other batches (train.data_seed 1) and its own init, so another mask
    for m in ("dense", "pmp"):
        c0, c1 = (yaml.safe_load((r / "runs" / m / "config.yaml").read_text()) for r in (exp, s1))
        assert (c0["train"]["data_seed"], c1["train"]["data_seed"]) == (0, 1)
        c1["train"]["data_seed"] = 0
        assert c0 == c1  # nothing else differs
    r0, r1 = RunDir(exp / "runs" / "pmp"), RunDir(s1 / "runs" / "pmp")
    assert r0.init_seed() != r1.init_seed()
    m0, m1 = r0.load_mask().to_bool(), r1.load_mask().to_bool()
    assert m0.keys() == m1.keys() and any(not (m0[n] == m1[n]).all() for n in m0)
    assert json.loads((s1 / "runs" / "pmp" / "run.json").read_text())["status"] == "finished"
    # the from-scratch reference does not depend on the pre-training seed: seed 1 takes seed 0's cells as they are
    # (same config and tokenizer), and its sweep accepts them instead of fine-tuning the same model again
    scratch0 = {p.name: p.read_bytes() for p in (exp / "attack" / "cells").glob("from_scratch__*.json")}
    assert scratch0 and {p.name: p.read_bytes() for p in (s1 / "attack" / "cells").glob("from_scratch__*.json")} \
        == scratch0
    assert f"{len(scratch0)} from-scratch cells taken from {exp / 'attack'}" in out

    md = (exp / "report_pooled" / "report.md").read_text()
    assert md.startswith("# Unauthorized fine-tuning evaluation, pooled over pre-training seeds")
    assert f"`s0` = `{exp / 'attack'}`" in md and f"`s1` = `{s1 / 'attack'}`" in md
    assert "| ratio pmp pooled [95% CI] | ratio pmp at `s0` | ratio pmp at `s1` |" in md
    summary = (exp / "summary.md").read_text()
    assert f"report pooled over pre-training seeds [0, 1]: {exp / 'report_pooled' / 'report.md'}" in summary
    assert "## pre-training seed 1 (train.data_seed 1," in summary

    # a second call recomputes nothing, at either seed
    before = {**_files(exp), **{f"s1/{k}": v for k, v in _files(s1).items()}}
    assert main(args + ["--pretrain-seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert out.count("already finished with the same config; skipping") == 4 and "0 cells run" in out
    assert {**_files(exp), **{f"s1/{k}": v for k, v in _files(s1).items()}} == before


def test_seed_zero_is_the_recipe_and_later_seeds_shift_batches_and_a_pinned_init():
    cfg = load_typed(PipelineConfig, None, ["train.data_seed=5", "model.init_seed=7", "pipeline.seeds=[0,2]"])
    rc = cfg.run_config()
    assert seeded_config(rc, 0) == rc
    two = seeded_config(rc, 2)
    assert (two.train.data_seed, two.model.init_seed) == (7, 9)
    assert seeded_config(load_typed(PipelineConfig).run_config(), 1).model.init_seed is None  # entropy per run
    out = Path("exp")
    assert seed_dir(out, [0, 2], 0) == out and seed_dir(out, [0, 2], 2) == out / "seeds" / "s2"


@pytest.mark.parametrize("seeds, expected", [
    ("[]", "pipeline.seeds must list at least one pre-training seed"),
    ("[0,0]", "pipeline.seeds lists a seed twice: [0, 0]"),
    ("[0,-1]", "pipeline.seeds must be integers >= 0"),
    ("3", "pipeline.seeds: expected a list"),
])
def test_bad_seed_lists_are_refused_before_anything_is_written(tmp_path, capsys, seeds, expected):
    out = tmp_path / "exp"
    assert main(["pipeline", "--out", str(out), "--set", f"pipeline.seeds={seeds}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert not out.exists()


def test_scratch_cells_are_shared_only_between_seeds_with_the_same_config_and_tokenizer(tmp_path):
    first, later = tmp_path / "s0", tmp_path / "s1"
    for d in (first, later):
        rel = d / "releases" / "dense"
        rel.mkdir(parents=True)
        (rel / "config.json").write_text('{"hidden_size": 32}')
        (rel / "tokenizer.json").write_text('{"vocab": 1}')
        (rel / "model.safetensors").write_bytes(d.name.encode())  # the weights differ per seed: irrelevant here
    cells = first / "attack" / "cells"
    cells.mkdir(parents=True)
    for name in ("from_scratch__t__probe__s0.json", "from_scratch__t__full__s0.json", "dense__t__probe__s0.json"):
        (cells / name).write_text(name)
    (later / "releases" / "dense" / "tokenizer.json").write_text('{"vocab": 2}')

    def share():
        return share_scratch_cells(first / "attack", first / "releases" / "dense", later / "attack",
                                   later / "releases" / "dense")
    assert share() == 0 and not (later / "attack").exists()  # another tokenizer
    (later / "releases" / "dense" / "tokenizer.json").write_text('{"vocab": 1}')
    dst = later / "attack" / "cells"
    dst.mkdir(parents=True)
    (dst / "from_scratch__t__probe__s0.json").write_text("its own")
    assert share() == 1  # only the missing from-scratch cell; never dense's
    assert sorted(p.name for p in dst.iterdir()) == ["from_scratch__t__full__s0.json",
                                                     "from_scratch__t__probe__s0.json"]
    assert (dst / "from_scratch__t__probe__s0.json").read_text() == "its own"
    (later / "releases" / "dense" / "config.json").write_text('{"hidden_size": 64}')
    (dst / "from_scratch__t__full__s0.json").unlink()
    assert share() == 0  # another architecture
