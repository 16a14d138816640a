"""Data-parallel pre-training on CPU with gloo: 2 ranks train what 1 process trains (same tokens, same mask, same
weights), the complement stays at init on every rank, ranks that disagree on the mask stop, and a 2-rank run
killed with SIGKILL resumes on 1 rank and ends where an uninterrupted run ends.

Ranks are spawned by the tests (torch.multiprocessing) or by torchrun itself (the CLI path users take); the runs
are tiny so the whole file takes well under a minute on 2 cores.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from corpus_fixture import write_corpus
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from pmp.config import ExportConfig, load_config
from pmp.data.blocks import BatchStream, RankBatches, blocks_path, load_blocks, mapped_token_blocks, token_blocks
from pmp.mask import PrivateMask
from pmp.release import export_release
from pmp.run_dir import RunDir
from pmp.step_dir import read_manifest
from pmp.tokenizer import train_bpe, wrap
from pmp.train.trainer import pretrain

REPO = Path(__file__).resolve().parents[1]


def overrides(corpus, **extra) -> list[str]:
    """The tiny recipe of test_train.py with a global batch of 2 x 4 sequences, the init seed pinned so that runs
    can be compared, and a loss row every step."""
    files, cache = corpus
    base = {
        "data.corpus": files, "data.cache_dir": cache, "data.seq_len": 32, "data.val_fraction": 0.1,
        "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32, "model.intermediate_size": 64,
        "train.steps": 40, "train.batch_size": 4, "train.grad_accum": 2, "train.lr": 3e-3, "train.warmup_steps": 3,
        "train.eval_every": 20, "train.eval_batches": 3, "train.log_every": 1, "train.ckpt_every": 10,
        "train.progress": False, "train.threads": 1, "pmp.min_warmup_steps": 15, "pmp.max_warmup_steps": 15,
        "pmp.iou_lag_steps": 5, "model.init_seed": 1234,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d), str(d / "cache")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted one-process run every distributed run is compared with."""
    return pretrain(load_config(None, overrides(corpus)), tmp_path_factory.mktemp("ref") / "run").root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, store: str, sets: list[str] | None, out: str, results: str,
               fault: str) -> None:
    """One rank, as torchrun would start it; records its outcome (and what it holds at the end) in `results`.

    The process group is joined here through a file store (no TCP port to collide with other jobs on the machine)
    with a short timeout, and pretrain() uses the group it finds; a rank stuck for minutes dumps its stack.
    `sets` None: resume the run in `out` with its own config."""
    import datetime  # noqa: PLC0415 - only in the spawned ranks
    import faulthandler  # noqa: PLC0415 - idem

    import torch.distributed as dist  # noqa: PLC0415 - idem

    from pmp.identify import MaskIdentifier  # noqa: PLC0415 - in the spawned rank, where the fault is planted
    from pmp.train.trainer import Trainer  # noqa: PLC0415 - idem

    faulthandler.dump_traceback_later(240, exit=True)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    if fault == "mask" and rank == 1:  # this rank selects a different mask of the same size
        real_mask = MaskIdentifier.current_mask

        def other_mask(self):
            masks = real_mask(self)
            name = next(iter(masks))
            flat = masks[name].flatten()
            on, off = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
            flat[on], flat[off] = False, True
            return masks

        MaskIdentifier.current_mask = other_mask
    real_finish = Trainer._finish

    def finish(self):  # what this rank holds at the end: the whole model (DDP) or its shards (FSDP)
        real_finish(self)
        save_file({k: (v.to_local() if isinstance(v, DTensor) else v).contiguous()
                   for k, v in self.model.state_dict().items()}, str(Path(results) / f"rank{rank}.safetensors"))

    Trainer._finish = finish
    outcome = {"ok": True}
    try:
        if sets is None:
            pretrain(RunDir(Path(out)).load_config(), out, resume=True)
        else:
            pretrain(load_config(None, sets), out)
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported to the test, which checks the message
        outcome = {"ok": False, "type": type(e).__name__, "error": str(e)}
    (Path(results) / f"rank{rank}.json").write_text(json.dumps(outcome))


def spawn_run(sets: list[str] | None, out: Path, world: int = 2, fault: str = "") -> list[dict]:
    results = out.parent / f"{out.name}-ranks"
    results.mkdir(exist_ok=True)
    mp.spawn(_rank_main, args=(world, str(results / "store"), sets, str(out), str(results), fault), nprocs=world)
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(world)]


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_rank_batches_split_the_same_global_batch():
    """1, 2 and 4 ranks see, together and in order, exactly the blocks one process sees."""
    blocks = np.arange(50 * 3, dtype=np.uint16).reshape(50, 3)
    one = BatchStream(blocks, 4, seed=5)
    expected = [np.concatenate([one.next_indices() for _ in range(2)]) for _ in range(20)]  # 20 steps, accum 2
    for world in (1, 2, 4):
        plans = [RankBatches.plan(4, 2, r, world) for r in range(world)]
        streams = [BatchStream(blocks, 4, seed=5) for _ in range(world)]
        for want in expected:
            got = [np.concatenate(p.step_indices(s, 2)) for p, s in zip(plans, streams)]
            np.testing.assert_array_equal(np.concatenate(got), want)
    assert (RankBatches.plan(4, 2, 0, 2).micro, RankBatches.plan(4, 2, 0, 2).accum) == (4, 1)
    assert (RankBatches.plan(2, 8, 0, 2).micro, RankBatches.plan(2, 8, 0, 2).accum) == (2, 4)  # <= batch_size
    with pytest.raises(ValueError, match="does not split evenly over 4 ranks"):
        RankBatches.plan(6, 1, 0, 4)


def test_training_token_blocks_are_memory_mapped(tmp_path):
    """Training maps the cached blocks read-only (built first when missing): a corpus larger than memory is never
    loaded whole into a rank's RAM, and the ranks of a machine share the page cache."""
    docs = [f"Document {i}: the quick brown fox jumps over the lazy dog. " * 5 for i in range(10)]
    tok = wrap(train_bpe(docs, 300))
    built = mapped_token_blocks(tok, docs, 16, str(tmp_path), tag="train", log=lambda s: None)
    cached = mapped_token_blocks(tok, docs, 16, str(tmp_path), tag="train", log=lambda s: None)
    for blocks in (built, cached):
        assert isinstance(blocks, np.memmap) and blocks.mode == "r" and not blocks.flags.writeable
        assert blocks_path(blocks).parent == tmp_path / "blocks"
    np.testing.assert_array_equal(built, token_blocks(tok, docs, 16, str(tmp_path), tag="train", log=lambda s: None))
    np.testing.assert_array_equal(load_blocks(blocks_path(built), 16), built)
    with pytest.raises(ValueError, match="not \\[n_blocks, 8\\]"):
        load_blocks(blocks_path(built), 8)
    batch = BatchStream(built, 4, seed=0).next_batch()  # only the drawn rows are read
    assert batch.dtype == torch.int64 and batch.shape == (4, 16)


def test_ddp_two_ranks_match_one_process(corpus, reference, tmp_path):
    run = tmp_path / "two"
    outcomes = spawn_run(overrides(corpus), run)
    assert all(o["ok"] for o in outcomes), outcomes
    # same mask, same losses, same weights as one process with the same global batch and seeds
    mask = PrivateMask.load(run / "private")
    assert mask.fingerprint() == PrivateMask.load(reference / "private").fingerprint()
    a, b = losses(reference), losses(run)
    assert len(a) == len(b) == 40
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-5
    ref = load_file(str(reference / "final" / "model.safetensors"))
    init = load_file(str(run / "private" / "init.safetensors"))
    assert init.keys() == load_file(str(reference / "private" / "init.safetensors")).keys()
    for r in range(2):  # every rank: the reference's weights, and the complement bit-identical to the init
        w = load_file(str(tmp_path / "two-ranks" / f"rank{r}.safetensors"))
        for name, v in w.items():
            torch.testing.assert_close(v, ref[name], rtol=1e-5, atol=1e-6)
        for name, m in mask.to_bool().items():
            assert torch.equal(w[name][~m], init[name][~m]), f"rank {r}: complement of {name} moved"
    # the run directory reads like a one-process run's
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["ranks"] == 2 and status["parallel"] == "ddp"
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000030", "step_00000040"]


@pytest.fixture(scope="module")
def fsdp_run(corpus, tmp_path_factory):
    """The tiny recipe under FSDP at 2 ranks (checkpoints kept from step 10 on)."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    outcomes = spawn_run(overrides(corpus, **{"train.parallel": "fsdp", "train.keep_last": 4}), run)
    assert all(o["ok"] for o in outcomes), outcomes
    return run


def cut_back(run: Path, to: Path, step: int) -> Path:
    """A copy of `run` as a kill after checkpoint `step` leaves it (later checkpoints and final/ gone)."""
    shutil.copytree(run, to)
    for ckpt in (to / "checkpoints").iterdir():
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(to / "final")
    return to


def assert_ends_like(run: Path, reference: Path) -> None:
    a, b = losses(reference), losses(run)
    assert len(b) == 40 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-5
    ref = load_file(str(reference / "final" / "model.safetensors"))
    for name, v in load_file(str(run / "final" / "model.safetensors")).items():
        torch.testing.assert_close(v, ref[name], rtol=1e-5, atol=1e-6)


def test_fsdp_two_ranks_match_one_process(fsdp_run, reference, tmp_path):
    run = fsdp_run
    mask = PrivateMask.load(run / "private")
    assert mask.fingerprint() == PrivateMask.load(reference / "private").fingerprint()
    assert_ends_like(run, reference)  # final/: the whole model, gathered by rank 0
    init = load_file(str(run / "private" / "init.safetensors"))
    for r in range(2):  # each rank's shard: the complement of its rows bit-identical to the init's
        shards = load_file(str(run.parent / "run-ranks" / f"rank{r}.safetensors"))
        for name, m in mask.to_bool().items():
            mine, m_r, init_r = shards[name], m.chunk(2)[r], init[name].chunk(2)[r]
            assert mine.shape == init_r.shape and torch.equal(mine[~m_r], init_r[~m_r]), (r, name)
    # the checkpoint: the whole model for every reader, the sharded optimizer state in dcp/ (one file per rank)
    ckpt = run / "checkpoints" / "step_00000030"
    _, files = read_manifest(ckpt)
    assert {"model.safetensors", "state.safetensors", "state.json"} <= set(files)
    assert sorted(f for f in files if f.startswith("dcp/")) == sorted(
        f"dcp/{p.name}" for p in (ckpt / "dcp").iterdir()) and len(list((ckpt / "dcp").iterdir())) == 2
    assert not list(ckpt.rglob("*.metadata")) and not list(ckpt.rglob("*.pt"))  # no pickle anywhere
    # pmp export reads it like a one-process run: the final model and the weights of a checkpoint
    export_release(ExportConfig(run=str(run), out=str(tmp_path / "rel")))
    export_release(ExportConfig(run=str(run), out=str(tmp_path / "rel30"), step=30))


def test_fsdp_checkpoints_reshard_to_one_process_and_four_ranks(fsdp_run, reference, tmp_path):
    """Saved by 2 ranks, resumed by 1 process from the identification phase (scores and dense moments gathered
    whole) and by 4 ranks from the masked phase (the compact moments re-cut into 4 uneven slices): each ends where
    the uninterrupted one-process run ends."""
    one = cut_back(fsdp_run, tmp_path / "one", 10)
    pretrain(RunDir(one).load_config(), one, resume=True)
    assert_ends_like(one, reference)
    four = cut_back(fsdp_run, tmp_path / "four", 30)
    outcomes = spawn_run(None, four, world=4)
    assert all(o["ok"] for o in outcomes), outcomes
    assert json.loads((four / "run.json").read_text())["ranks"] == 4
    assert_ends_like(four, reference)


def test_ranks_with_different_masks_stop_with_a_clear_error(corpus, tmp_path):
    run = tmp_path / "bad"
    outcomes = spawn_run(overrides(corpus, **{"train.steps": 17}), run, fault="mask")
    assert [o["ok"] for o in outcomes] == [False, False]
    for o in outcomes:
        assert o["type"] == "RanksDisagree" and "different masks" in o["error"], o
    assert not (run / "private" / "mask.json").exists()  # nothing was saved for the inconsistent masks
    assert not (run / "final").exists()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.is_file() else []


def test_two_rank_run_killed_resumes_on_one_rank(corpus, reference, tmp_path):
    run = tmp_path / "cut"
    sets = sum([["--set", o] for o in overrides(corpus)], [])
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "pmp", "pretrain", *sets, "--out", str(run)]
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not (run / "checkpoints" / "step_00000020" / "manifest.json").is_file():  # masked phase from step 15
        assert job.poll() is None, f"the run ended before its checkpoint at step 20: {job.stdout.read()}"
        assert time.time() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.05)
    ranks = _children(job.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)  # one rank dies ...
    out = job.communicate(timeout=120)[0]
    assert job.returncode != 0, out  # ... and takes the job down
    assert not any(Path(f"/proc/{r}").exists() for r in ranks)
    assert json.loads((run / "run.json").read_text())["status"] == "running"

    p = subprocess.run([sys.executable, "-m", "pmp", "pretrain", "--out", str(run), "--resume"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed" in p.stdout
    a, b = losses(reference), losses(run)
    assert len(b) == 40 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-5
    fa = load_file(str(reference / "final" / "model.safetensors"))
    fb = load_file(str(run / "final" / "model.safetensors"))
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-5, atol=1e-6)
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 40
