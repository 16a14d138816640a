"""pmp.variant=illcond (train/illcond.py): R_ill / R_well by hand, the channel key and its groups, the regulariser
raising kappa(K_c) / kappa(K_m) on a tiny model, a tiny run that releases cleanly with kappa in its metrics, and
bad config."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from corpus_fixture import write_corpus
from safetensors.torch import load_file

from pmp.config import ExportConfig, ModelConfig, load_config
from pmp.mask import PrivateMask
from pmp.model import build_model, hf_config
from pmp.release import export_release
from pmp.train.illcond import (
    IllCond,
    channel_mask,
    condition_number,
    draw_key,
    key_of,
    linear_input_groups,
    normalised,
    r_ill,
    r_well,
)
from pmp.train.trainer import masked_scope, pretrain
from pmp.verify_release import verify_release

V, T = 64, 32


def test_r_ill_and_r_well_by_hand():
    # eigenvalues 3, 1, 1: ||S||_F^2 = 11, sigma_min = 1, k = 3
    S = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert float(r_ill(S)) == pytest.approx(1 / (11 / 6 - 1 / 2), rel=1e-12)  # = 3/4
    assert float(r_well(S)) == pytest.approx((11 - 25 / 3) / 6, rel=1e-12)  # = 4/9 = var(3, 1, 1) / 2
    assert condition_number(S) == pytest.approx(3.0, rel=1e-12)
    N = normalised(S)
    assert float(torch.trace(N)) == pytest.approx(3.0) and float(r_ill(normalised(7 * S))) == pytest.approx(
        float(r_ill(N)), rel=1e-12)  # scale-free once normalised
    eye = torch.eye(3, dtype=torch.float64)
    assert float(r_well(eye)) == 0.0 and float(r_ill(normalised(torch.diag(torch.tensor([9.0, 1, 1]).double())))) < \
        float(r_ill(N))  # a worse-conditioned matrix scores lower


def tiny():
    return build_model(hf_config(ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64), V), 0)


def test_channel_key_groups_layers_that_read_one_input():
    model = tiny()
    names = masked_scope(model, "linear")
    groups = linear_input_groups(model, names)
    assert sorted(n for g in groups for n in g) == sorted(names)
    first = [g for g in groups if "layers.0." in g[0]]
    assert [sorted(n.split(".")[-2] for n in g) for g in first] == [
        ["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    key = draw_key(model, names, 0.5, seed=7)
    for g in groups:
        assert all(torch.equal(key[n], key[g[0]]) for n in g) and int(key[g[0]].sum()) == key[g[0]].numel() // 2
    assert not torch.equal(key[groups[0][0]], key[groups[2][0]][:32])  # independent between groups
    mask = channel_mask(model, key, {})
    assert all(torch.equal(v, key[n]) for n, v in key_of(mask).items())
    bad = mask.to_bool()
    bad[names[0]][0, 0] = ~bad[names[0]][0, 0]
    with pytest.raises(ValueError, match="is not a set of input channels"):
        key_of(PrivateMask.from_bool(bad))
    assert not torch.equal(draw_key(model, names, 0.5, seed=8)[names[0]], key[names[0]])


def markov_blocks(n: int, seed: int) -> np.ndarray:
    succ = np.random.default_rng(0).integers(0, V, size=(V, 3))
    rng = np.random.default_rng(seed)
    out = np.zeros((n, T), dtype=np.int64)
    out[:, 0] = rng.integers(0, V, n)
    for t in range(1, T):
        out[:, t] = succ[out[:, t - 1], rng.integers(0, 3, n)]
    return out


def test_regulariser_raises_kappa_ratio():
    """Same init, key and batches, 30 steps with and without the regulariser: kappa(K_c) / kappa(K_m) on unseen
    text rises by far with it; without it the ratio stays near 1 (the key is random)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = tiny()
    key = draw_key(base, masked_scope(base, "linear"), 0.5, seed=3)
    train, test = markov_blocks(256, 1), torch.from_numpy(markov_blocks(32, 2))
    ratios = {}
    for name, weight in (("off", 0.0), ("on", 1.0)):
        model = copy.deepcopy(base)
        reg = IllCond(model, key, weight, weight)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for i in range(30):
            x = torch.from_numpy(train[i * 8:(i + 1) * 8])
            loss = model(input_ids=x, labels=x).loss
            (loss + reg.penalty()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), reg.measure():
            model(input_ids=test)
        ratios[name] = reg.kappa_metrics()["kappa_ratio"]
    assert ratios["on"] > 5 * ratios["off"] and 0.2 < ratios["off"] < 5, ratios


# ------------------------------------------------------------------------------------------------ a tiny run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("illcond")
    files = write_corpus(d, chars_per_file=4000)
    ov = {"data.corpus": files, "data.cache_dir": str(d / "cache"), "data.seq_len": 32, "data.val_fraction": 0.1,
          "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32, "model.intermediate_size": 64,
          "train.steps": 12, "train.batch_size": 4, "train.warmup_steps": 2, "train.eval_every": 6,
          "train.eval_batches": 2, "train.log_every": 3, "train.ckpt_every": 6, "train.progress": False,
          "train.threads": 1, "pmp.max_warmup_steps": 4, "pmp.min_warmup_steps": 4, "pmp.variant": "illcond",
          "pmp.scope": "linear"}
    root = pretrain(load_config(None, [f"{k}={v}" for k, v in ov.items()]), d / "run").root
    return SimpleNamespace(root=root, d=d)


def test_illcond_run_reports_kappa_and_releases_cleanly(run, tmp_path):
    mask = PrivateMask.load(run.root / "private")
    assert mask.meta["variant"] == "illcond" and mask.meta["identification_step"] == 0
    key = key_of(mask)  # a channel mask: every row masks the same columns, half of them
    assert all(int(k.sum()) == k.numel() // 2 for k in key.values())
    init = load_file(str(run.root / "private" / "init.safetensors"))
    final = load_file(str(run.root / "final" / "model.safetensors"))
    for name, m in mask.to_bool().items():  # dense training: the complement trained too
        assert (final[name][~m] != init[name][~m]).float().mean() > 0.9, name
    rows = [json.loads(ln) for ln in (run.root / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert all(r["kappa_c"] > 1 and r["kappa_m"] > 1 and r["kappa_ratio"] > 0 for r in evals)
    assert evals[-1]["kappa_ratio"] > evals[0]["kappa_ratio"]
    assert all("ill_penalty" in r and "well_penalty" in r for r in rows if "loss" in r)
    out = export_release(ExportConfig(run=str(run.root), out=str(tmp_path / "rel"), commitment=True))
    report = verify_release(out, run.root, load=False)
    assert report.ok, str(report)
    card = (out / "README.md").read_text()
    assert "input channels" in card and "0.5" not in card


@pytest.mark.parametrize("setting, message", [
    ("pmp.scope=matrices", r"pmp.variant=illcond masks input channels of the nn.Linear weights: set pmp.scope=linear"),
    ("model.arch=gpt2", r"pmp.variant=illcond keys the input channels of nn.Linear layers"),
    ("pmp.block_size=64", r"set pmp.block_size=0, got 64"),
    ("pmp.density=1", r"pmp.density must be < 1"),
    ("pmp.illcond_ill_weight=-0.5", r"pmp.illcond_ill_weight must be a finite weight >= 0, got -0.5"),
    ("pmp.complement=project", r"pmp.complement=project does nothing with pmp.variant=illcond"),
])
def test_bad_illcond_config(setting, message):
    good = ["pmp.variant=illcond", "pmp.scope=linear"]
    with pytest.raises(ValueError, match=message):
        load_config(None, [*good, setting])
    load_config(None, good)
