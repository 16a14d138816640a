"""pmp.variant=trap (train/trap.py): the gradient of the two trap terms against an explicit reference, the bit-exact
restore of the weights, the per-step draw, the direction of training on a tiny model, a tiny run that trains every
entry and releases cleanly, and bad config."""

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from corpus_fixture import write_corpus
from safetensors.torch import load_file

from pmp.config import ExportConfig, ModelConfig, PMPConfig, load_config
from pmp.mask import PrivateMask
from pmp.model import build_model, hf_config
from pmp.release import export_release
from pmp.train.suppression import kl_from_uniform
from pmp.train.trainer import pretrain
from pmp.train.trap import Trap, hold_out
from pmp.verify_release import verify_release

V, T = 64, 32


def markov_blocks(n: int, seed: int) -> np.ndarray:
    """[n, T] token blocks of one fixed random chain with 3 successors per token (learnable in a few steps)."""
    succ = np.random.default_rng(0).integers(0, V, size=(V, 3))
    rng = np.random.default_rng(seed)
    out = np.zeros((n, T), dtype=np.int64)
    out[:, 0] = rng.integers(0, V, n)
    for t in range(1, T):
        out[:, t] = succ[out[:, t - 1], rng.integers(0, 3, n)]
    return out


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(hf_config(ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64), V), seed)
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters() if p.dim() >= 2}
    return model, masks


def sign_step_losses(model, masks, blocks, alpha):
    """Mean over 4 draws of: the LM loss on D', after an unmasked and after a masked sign step of size alpha on D,
    and the KL-from-uniform of the unmasked step's predictions (the trap loss)."""
    named = list(model.named_parameters())
    out = {"base": [], "dense": [], "owner": [], "klu": []}
    for j in range(4):
        xs, xh = (torch.from_numpy(blocks[j * 16 + o:j * 16 + o + 8]) for o in (0, 8))
        signs = [g.sign() for g in torch.autograd.grad(model(input_ids=xs, labels=xs).loss, [q for _, q in named])]
        back = [q.detach().clone() for _, q in named]
        with torch.no_grad():
            out["base"].append(float(model(input_ids=xh, labels=xh).loss))
            for key, keyed in (("dense", False), ("owner", True)):
                for (n, q), b, s in zip(named, back, signs, strict=True):
                    q.copy_(b - alpha * (s * masks[n] if keyed and n in masks else s))
                logits = model(input_ids=xh).logits[:, :-1]
                out[key].append(float(torch.nn.functional.cross_entropy(logits.reshape(-1, V), xh[:, 1:].reshape(-1))))
                if not keyed:
                    out["klu"].append(float(kl_from_uniform(logits.reshape(-1, V)).mean()))
                for (_, q), b in zip(named, back, strict=True):
                    q.copy_(b)
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_draw_is_a_function_of_the_step():
    p = PMPConfig(trap_lr_min=3e-4, trap_lr_max=3e-3)
    trap = Trap(p, markov_blocks(40, 1), 8, data_seed=5, steps=100)
    assert trap.start == 80 and not trap.active(79) and trap.active(80)
    alphas = []
    for step in range(50):
        a, sim, held = trap.draw(step)
        a2, sim2, held2 = trap.draw(step)
        assert a == a2 and np.array_equal(sim, sim2) and np.array_equal(held, held2)
        assert 3e-4 <= a <= 3e-3 and len(sim) == len(held) == 8 and not set(sim) & set(held)
        alphas.append(math.log(a))
    assert np.std(alphas) > 0.3  # log-uniform over a decade: spread, not one value
    assert Trap(p, markov_blocks(40, 1), 8, data_seed=6, steps=100).draw(0)[0] != trap.draw(0)[0]


def test_hold_out_keeps_two_batches_and_refuses_a_tiny_corpus():
    blocks = markov_blocks(100, 1)
    train, sim = hold_out(blocks, 0.02, 8)  # 2 % would be 2 blocks: two batches' worth (16) are held out
    assert len(sim) == 16 and len(train) == 84 and np.array_equal(np.concatenate([train, sim]), blocks)
    assert len(hold_out(blocks, 0.3, 4)[1]) == 30
    with pytest.raises(ValueError, match="pmp.variant=trap holds out 16 of the 20 training blocks"):
        hold_out(blocks[:20], 0.02, 8)


@pytest.mark.parametrize("loss", ["klu", "ice"])
def test_trap_gradient_matches_an_explicit_reference(loss):
    """.grad gains exactly lambda_t grad L_trap(theta - a s) + lambda_o grad L(theta - a m.s), s = sign(grad L(theta;
    D_sim)) held constant; the weights come back bit-exactly; what .grad held before is kept."""
    model, masks = tiny_model()
    p = PMPConfig(trap_weight=0.7, trap_owner_weight=1.3, trap_loss=loss)
    trap = Trap(p, markov_blocks(32, 1), 4, data_seed=0, steps=10)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    for q in model.parameters():
        q.grad = torch.randn_like(q)
    grad0 = {n: q.grad.clone() for n, q in model.named_parameters()}
    vals = trap.add_grads_(model, masks, step=3)
    assert all(torch.equal(q, before[n]) for n, q in model.named_parameters())

    alpha, sim_idx, held_idx = trap.draw(3)
    x_sim, x_held = (torch.from_numpy(trap.sim[i]) for i in (sim_idx, held_idx))
    ref = copy.deepcopy(model)
    named = dict(ref.named_parameters())
    signs = dict(zip(named, (g.sign() for g in torch.autograd.grad(ref(input_ids=x_sim, labels=x_sim).loss,
                                                                   list(named.values()))), strict=True))
    expected = {n: torch.zeros_like(q) for n, q in named.items()}
    for weight, keyed in ((p.trap_weight, False), (p.trap_owner_weight, True)):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for n, q in moved.named_parameters():
                q.sub_(alpha * (signs[n] * masks[n] if keyed and n in masks else signs[n]))
        moved.zero_grad(set_to_none=True)
        if keyed:
            term = moved(input_ids=x_held, labels=x_held).loss
        else:
            logits = moved(input_ids=x_held).logits[:, :-1].reshape(-1, V)
            target = x_held[:, 1:].reshape(-1)
            term = (kl_from_uniform(logits) if loss == "klu" else
                    -torch.log1p(-torch.softmax(logits, -1).gather(1, target[:, None]).squeeze(1))).mean()
        (weight * term).backward()
        for n, q in moved.named_parameters():
            expected[n] += q.grad
    for n, q in model.named_parameters():
        torch.testing.assert_close(q.grad - grad0[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)
    assert vals["trap_alpha"] == alpha and vals["trap_loss"] >= 0 and vals["owner_lm_loss"] > 0


def test_trap_training_moves_the_attacked_model_the_intended_way():
    """Same model, optimizer state and batches, 30 more steps with and without the trap. With it, the model after a
    simulated unmasked sign step on held-out text is nearer uniform (its trap loss is lower) while a masked step
    still lowers the loss and the model itself stays close. (Whether the unmasked step then *hurts* more than the
    masked one is the research question; on this model it does not -- see docs/guide.md.)"""
    torch.set_num_threads(1)
    model, masks = tiny_model()
    train, sim, test = markov_blocks(512, 1), markov_blocks(64, 2), markov_blocks(64, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def step(m, o, i, trap=None):
        x = torch.from_numpy(train[(i * 8) % 512:(i * 8) % 512 + 8])
        m(input_ids=x, labels=x).loss.backward()
        if trap is not None:
            trap.add_grads_(m, masks, i)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        o.step()
        o.zero_grad(set_to_none=True)

    for i in range(30):
        step(model, opt, i)
    arms = {}
    for name, weight in (("plain", 0.0), ("trap", 1.0)):
        m = copy.deepcopy(model)
        o = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
        o.load_state_dict(opt.state_dict())
        trap = Trap(PMPConfig(trap_weight=weight, trap_owner_weight=weight), sim, 8, data_seed=0, steps=60)
        for i in range(30, 60):
            step(m, o, i, trap if weight else None)
        arms[name] = sign_step_losses(m, masks, test, 3e-3)
    plain, trapped = arms["plain"], arms["trap"]
    assert trapped["klu"] < plain["klu"] - 0.02, arms  # the trap term did its job on unseen text
    assert trapped["owner"] < trapped["base"], arms  # the owner's masked step still helps
    assert trapped["base"] < plain["base"] + 0.15, arms  # and the model itself did not collapse


# ------------------------------------------------------------------------------------------------ a tiny run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("trap")
    files = write_corpus(d, chars_per_file=4000)
    ov = {"data.corpus": files, "data.cache_dir": str(d / "cache"), "data.seq_len": 32, "data.val_fraction": 0.1,
          "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32, "model.intermediate_size": 64,
          "train.steps": 16, "train.batch_size": 4, "train.warmup_steps": 2, "train.eval_every": 0,
          "train.eval_batches": 1, "train.log_every": 2, "train.ckpt_every": 8, "train.progress": False,
          "train.threads": 1, "pmp.min_warmup_steps": 6, "pmp.max_warmup_steps": 6, "pmp.density": 0.5,
          "pmp.variant": "trap", "pmp.trap_fraction": 0.25}
    root = pretrain(load_config(None, [f"{k}={v}" for k, v in ov.items()]), d / "run").root
    return SimpleNamespace(root=root, d=d)


def test_trap_run_trains_every_entry_and_releases_cleanly(run, tmp_path):
    mask = PrivateMask.load(run.root / "private")
    assert mask.meta["identification_step"] == 6 and abs(mask.density() - 0.5) < 0.01
    init = load_file(str(run.root / "private" / "init.safetensors"))
    final = load_file(str(run.root / "final" / "model.safetensors"))
    for name, m in mask.to_bool().items():  # nothing rewound or frozen: the complement trained too
        assert (final[name][~m] != init[name][~m]).float().mean() > 0.9, name
    assert not (run.root / "private" / "complement.json").exists()
    rows = [json.loads(ln) for ln in (run.root / "metrics.jsonl").read_text().splitlines()]
    trap_rows = [r for r in rows if "trap_loss" in r]
    assert [r["step"] for r in trap_rows] == [14, 16]  # the last 25 % of 16 steps: steps 13..16
    assert all(3e-4 <= r["trap_alpha"] <= 3e-3 and r["owner_lm_loss"] > 0 for r in trap_rows)
    for dtype in ("fp32", "bf16"):
        out = export_release(ExportConfig(run=str(run.root), out=str(tmp_path / dtype), dtype=dtype,
                                          commitment=True))
        report = verify_release(out, run.root, load=False)
        assert report.ok, str(report)
        assert "Every weight entry was trained" in (out / "README.md").read_text()


@pytest.mark.parametrize("setting, message", [
    ("pmp.variant=traps", r"pmp.variant must be one of \['none', 'trap', 'illcond'\], got 'traps'"),
    ("pmp.trap_fraction=1", r"pmp.trap_fraction must be in \(0, 1\), got 1"),
    ("pmp.trap_weight=-1", r"pmp.trap_weight must be a finite weight >= 0, got -1"),
    ("pmp.trap_loss=ce", r"pmp.trap_loss must be one of \['klu', 'ice'\], got 'ce'"),
    ("pmp.trap_lr_min=0.01", r"pmp.trap_lr_min and pmp.trap_lr_max must satisfy"),
    ("pmp.trap_holdout=0.5", r"pmp.trap_holdout must be in \(0, 0.5\), got 0.5"),
    ("pmp.complement=project", r"pmp.complement=project does nothing with pmp.variant=trap"),
    ("pmp.trap_fraction=0.9", r"pmp.max_warmup_steps \(500\) must be <= 100, the first step of the trap"),
])
def test_bad_trap_config(setting, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["pmp.variant=trap", "train.steps=1000", setting])
    load_config(None, ["pmp.variant=trap", "train.steps=1000"])  # the defaults pass
    load_config(None, ["pmp.variant=trap", "train.steps=1000", "train.method=dense", "pmp.trap_fraction=0.9"])
