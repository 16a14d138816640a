"""SDD / SDD_reject (`pmp protect sdd | sdd_reject`): the lexical similarity is the TF-IDF cosine it claims to be, no
pair exceeds the bound (a planted near-duplicate is never given to its prompt), the loss covers only response
tokens, sdd_reject's responses start with the refusal, SFT raises the likelihood of the paired responses, a run
resumes exactly after SIGKILL and exports to a stock model, and bad input is refused before anything is written."""

from __future__ import annotations

import csv
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runs import assert_stock_loadable, kill_at_checkpoint, pmp_cli
from corpus_fixture import write_corpus
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pmp.config import SDD_REFUSAL, ExportConfig, ProtectConfig, ProtectTrainConfig, load_config
from pmp.data.lexical import pair_dissimilar, similarity, words
from pmp.release import export_release
from pmp.run_dir import RunDir
from pmp.train.protect_data import Retain, load_restricted_task, load_retain, tokenize_restricted
from pmp.train.protect_run import protect_by_training
from pmp.train.sdd import IGNORE, build_pairs, response_nll, sdd_loss
from pmp.train.trainer import pretrain

SEQ, PROMPT = 96, 24  # the tiny test tokenizer spends 40 tokens on the default refusal
FAST = {"train.seq_len": SEQ, "train.sdd_prompt_tokens": PROMPT, "train.batch_size": 4, "train.check_every": 2,
        "train.ckpt_every": 2, "train.eval_batches": 2, "train.log_every": 0, "train.threads": 1,
        "train.sdd_max_similarity": 0.3, "train.sdd_pool": 256}

COOKS = ["the cook", "a baker", "the chef", "my aunt", "the kitchen maid"]
ACTIONS = ["stirred", "baked", "sliced", "seasoned", "boiled", "whisked"]
FOODS = ["the bread", "a pie", "the onions", "the soup", "some carrots", "the dough"]
HOW = ["with butter", "in the oven", "over a low flame", "for an hour", "with salt and pepper"]


def kitchen_text(n_chars: int, seed: int) -> str:
    """A restricted domain that shares a little vocabulary with the retain corpus (tests/corpus_fixture.py)."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        para = " ".join(f"{rng.choice(COOKS).capitalize()} {rng.choice(ACTIONS)} {rng.choice(FOODS)} "
                        f"{rng.choice(HOW)}." for _ in range(rng.randint(3, 6)))
        out.append(para)
        size += len(para) + 2
    return "\n\n".join(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("protect_sdd")
    files = write_corpus(d, chars_per_file=4000)
    sets = {"data.corpus": files, "data.cache_dir": str(d / "cache"), "data.seq_len": 32, "data.val_fraction": 0.1,
            "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32,
            "model.intermediate_size": 64, "train.steps": 8, "train.batch_size": 4, "train.warmup_steps": 2,
            "train.eval_every": 0, "train.eval_batches": 1, "train.ckpt_every": 0, "train.progress": False,
            "train.threads": 1, "train.method": "dense"}
    run_cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    dense = pretrain(run_cfg, d / "dense").root
    lm = d / "kitchen.txt"
    lm.write_text(kitchen_text(10000, seed=7))
    rng = random.Random(0)
    cls = d / "kitchen.csv"
    with cls.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(80):
            y = rng.randint(0, 1)
            w.writerow([f"{rng.choice(COOKS)} {rng.choice(['baked', 'whisked'] if y else ['burnt', 'dropped'])} "
                        f"{rng.choice(FOODS)} {i}", y])
    tok = AutoTokenizer.from_pretrained(str(RunDir(dense).tokenizer))
    retain = load_retain(run_cfg, "", tok, SEQ, 4, 2, str(d / "cache"))
    return {"dense": dense, "lm": lm, "cls": cls, "corpus": files, "dir": d, "tok": tok, "retain": retain}


def cfg_of(setup, out, method="sdd", restricted=None, **sets) -> ProtectConfig:
    train = {k.split(".", 1)[1]: v for k, v in {**FAST, **sets}.items()}
    return ProtectConfig(method=method, base=str(setup["dense"]), out=str(out),
                         restricted=str(restricted or setup["lm"]), train=ProtectTrainConfig(**train))


def train_cfg(**kw) -> ProtectTrainConfig:
    return ProtectTrainConfig(**{"seq_len": SEQ, "sdd_prompt_tokens": PROMPT, "sdd_max_similarity": 0.3,
                                 "sdd_pool": 256, **kw})


def restricted_of(setup, kind="lm"):
    return tokenize_restricted(load_restricted_task(str(setup[kind]), ""), setup["tok"], SEQ, 0)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(next(Path(path).glob("*.safetensors"))))


# ---------------------------------------------------------------------------------------------- similarity
def reference_similarity(a: list[str], b: list[str]) -> np.ndarray:
    """TF-IDF cosine written out densely, the slow obvious way (float64)."""
    docs = [Counter(words(t)) for t in a + b]
    vocab = sorted({w for c in docs for w in c})
    df = np.array([sum(w in c for c in docs) for w in vocab], float)
    idf = np.log((1 + len(docs)) / (1 + df))
    x = np.array([[c[w] for w in vocab] for c in docs], float) * idf
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return x[:len(a)] @ x[len(a):].T


def test_similarity_is_the_tfidf_cosine():
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(30)] + ["the", "The", "a"]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12))) for _ in range(140)]
    a, b = texts[:100], texts[100:]  # 100 prompts: more than one block of CHUNK rows
    got = similarity(a, b)
    assert np.allclose(got, reference_similarity(a, b), atol=1e-12)
    assert got.min() >= 0 and got.max() <= 1
    same = similarity(["Salt, pepper & butter!", "x"], ["butter  pepper SALT", "bread"])
    assert same[0, 0] == pytest.approx(1.0) and same[0, 1] == 0 and same[1].tolist() == [0, 0]


def test_pairing_never_exceeds_the_bound_and_draws_from_the_seed():
    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(25)]
    prompts = [" ".join(rng.choice(vocab) for _ in range(6)) for _ in range(70)]
    passages = [" ".join(rng.choice(vocab) for _ in range(20)) for _ in range(40)]
    sim = similarity(prompts, passages)
    bound = float(np.quantile(sim, 0.3))
    choice, chosen = pair_dissimilar(prompts, passages, bound, seed=1)
    ok = choice >= 0
    assert ok.any() and (~ok).any() == bool(((sim <= bound).sum(1) == 0).any())
    assert (sim[np.flatnonzero(ok), choice[ok]] <= bound).all()
    assert np.array_equal(chosen[ok], sim[np.flatnonzero(ok), choice[ok]]) and np.isnan(chosen[~ok]).all()
    again, _ = pair_dissimilar(prompts, passages, bound, seed=1)
    other, _ = pair_dissimilar(prompts, passages, bound, seed=2)
    assert np.array_equal(choice, again) and not np.array_equal(choice, other)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        pair_dissimilar(prompts, passages, 1.5, seed=1)


# ---------------------------------------------------------------------------------------------- pairs
def test_pairs_respect_the_bound_and_never_get_a_planted_near_duplicate(setup):
    tok, retain, r = setup["tok"], setup["retain"], restricted_of(setup)
    blocks = r.train["blocks"].numpy()
    planted = blocks[:10].copy()
    planted[:, PROMPT + 2] = blocks[:10, PROMPT + 5]  # near-duplicates of 10 prompts: the prompt, a changed token
    n_base = min(100, len(retain.train))
    mixed = Retain(np.concatenate([np.asarray(retain.train[:n_base]), planted]), retain.held_out, retain.corpus)
    cfg = train_cfg(sdd_pool=len(mixed.train), sdd_max_similarity=0.3)
    pairs = build_pairs(r, mixed, tok, cfg)
    assert len(pairs) > 0 and pairs.stats["pool"] == len(mixed.train)
    assert pairs.similarity.max() <= 0.3 and pairs.stats["max_similarity"] <= 0.3
    # recompute every pair's similarity from the decoded texts the pairing saw (idf over prompts + the whole pool)
    r_len = SEQ - PROMPT
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    prompt_texts = [dec(b[:PROMPT].tolist()) for b in blocks]
    pool_texts = [dec(b[:r_len].tolist()) for b in mixed.train]
    sim = similarity(prompt_texts, pool_texts)
    assert (sim[pairs.prompt_index, pairs.passage_index] <= 0.3).all()
    own = {i: n_base + i for i in range(10)}  # the planted passage of each of the first 10 prompts
    assert all(sim[i, j] > 0.3 for i, j in own.items())  # the filter had something to refuse
    assert all(own.get(int(i)) != int(j) for i, j in zip(pairs.prompt_index, pairs.passage_index))
    # and the response really is the passage (without refusal) right after the prompt
    for row, (i, j) in enumerate(zip(pairs.prompt_index, pairs.passage_index)):
        assert pairs.ids_NT[row, :PROMPT].tolist() == blocks[i, :PROMPT].tolist()
        assert pairs.ids_NT[row, PROMPT:].tolist() == np.asarray(mixed.train[j][:r_len]).tolist()


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_loss_mask_covers_only_response_tokens(setup, kind):
    r = restricted_of(setup, kind)
    pairs = build_pairs(r, setup["retain"], setup["tok"], train_cfg())
    for row, i in enumerate(pairs.prompt_index):
        p = min(PROMPT, len(r.train["ids"][i])) if kind == "cls" else PROMPT
        n = int(pairs.mask_NT[row].sum())
        assert n == p + SEQ - PROMPT  # prompt + response, the rest padding
        labels = pairs.labels_NT[row]
        assert (labels[:p] == IGNORE).all() and (labels[n:] == IGNORE).all()
        assert torch.equal(labels[p:n], pairs.ids_NT[row, p:n])
    model = AutoModelForCausalLM.from_pretrained(str(RunDir(setup["dense"]).final), dtype=torch.float32)
    batch = pairs.batch(np.arange(min(6, len(pairs))))
    loss = sdd_loss(model, batch).detach()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_pos = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    on_response = batch["labels"][:, 1:] != IGNORE
    assert float(loss) == pytest.approx(float(per_pos[on_response].mean()), rel=1e-5)
    assert float(loss) != pytest.approx(float(per_pos[batch["attention_mask"][:, 1:] == 1].mean()), rel=1e-3)
    # exactly: the loss's gradient reaches the logits only at positions that predict a response token
    seen = {}

    def keep(module, inputs, out):
        out.retain_grad()
        seen["logits"] = out

    model.lm_head.register_forward_hook(keep)
    sdd_loss(model, batch).backward()
    g = seen["logits"].grad.abs().sum(-1)  # [B, T]
    predicts_response = torch.zeros_like(g, dtype=torch.bool)
    predicts_response[:, :-1] = on_response
    assert (g[~predicts_response] == 0).all() and (g[predicts_response] > 0).all()


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_sdd_reject_responses_start_with_the_refusal(setup, kind):
    tok, r = setup["tok"], restricted_of(setup, kind)
    pairs = build_pairs(r, setup["retain"], tok, train_cfg(), refusal=SDD_REFUSAL)
    refusal = tok(SDD_REFUSAL, add_special_tokens=False)["input_ids"]
    assert pairs.stats["refusal"] == SDD_REFUSAL
    for row in range(len(pairs)):
        labels = pairs.labels_NT[row]
        first = int((labels != IGNORE).nonzero()[0])
        assert labels[first:first + len(refusal)].tolist() == refusal
        assert tok.decode(labels[first:first + len(refusal)]) == SDD_REFUSAL
        n = int(pairs.mask_NT[row].sum())
        assert n - first == SEQ - PROMPT  # the refusal takes room from the passage, never from the prompt


def test_sft_raises_the_likelihood_of_the_paired_responses(setup):
    pairs = build_pairs(restricted_of(setup), setup["retain"], setup["tok"], train_cfg())
    model = AutoModelForCausalLM.from_pretrained(str(RunDir(setup["dense"]).final), dtype=torch.float32)
    torch.manual_seed(0)
    idx = np.arange(min(8, len(pairs)))
    before = response_nll(model, pairs, idx)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        sdd_loss(model, pairs.batch(idx)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = response_nll(model, pairs, idx)
    assert after < before - 0.3, (before, after)


# ---------------------------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("method, kind", [("sdd", "lm"), ("sdd_reject", "cls")])
def test_sdd_run_exports_to_a_stock_model(setup, tmp_path, method, kind):
    out = tmp_path / "prot"
    protect_by_training(cfg_of(setup, out, method, setup[kind], **{"train.steps": 4}))
    status = RunDir(out).read_status()
    assert status["status"] == "finished" and status["method"] == method and status["protect_steps"] == 4
    sdd = status["sdd"]
    assert sdd["pairs"] > 0 and sdd["max_similarity"] <= sdd["max_similarity_bound"] == 0.3
    assert sdd["refusal"] == (SDD_REFUSAL if method == "sdd_reject" else "")
    assert status["cost"]["token_passes"] == 4 * 2 * 4 * SEQ  # one SFT + one retain pass per step
    assert status["after"]["retain_ppl"] <= status["before"]["retain_ppl"] * 1.10 + 1e-9
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"sdd_loss"' in line]
    assert len(rows) == 4
    assert not all(torch.equal(a, b) for a, b in zip(weights(RunDir(out).final).values(),
                                                     weights(RunDir(setup["dense"]).final).values()))
    rel = export_release(ExportConfig(run=str(out), out=str(tmp_path / "rel")))
    card = (rel / "README.md").read_text()
    assert "restricted-domain-protection" in card and "SDD" in card
    assert_stock_loadable(rel, tmp_path)



def test_sdd_resumes_exactly_after_sigkill(setup, tmp_path):
    sets = [f"--set={k}={v}" for k, v in {**FAST, "train.steps": 40}.items()]
    args = ["protect", "sdd_reject", "--base", str(setup["dense"]), "--restricted", str(setup["lm"])] + sets
    whole = tmp_path / "whole"
    proc = pmp_cli([*args, "--out", str(whole)])
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    killed = tmp_path / "killed"
    proc = pmp_cli([*args, "--out", str(killed)])
    kill_at_checkpoint(proc, killed, 4)
    assert not (killed / "final").exists()
    again = pmp_cli([*args, "--out", str(killed), "--resume"])
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "resuming" in out, out
    a, b = weights(RunDir(whole).final), weights(RunDir(killed).final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = RunDir(whole).read_status(), RunDir(killed).read_status()
    assert sa["after"] == sb["after"] and sa["rollbacks"] == sb["rollbacks"] and sa["sdd"] == sb["sdd"]
    ra = [line for line in (whole / "metrics.jsonl").read_text().splitlines() if line]
    rb = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if line]
    assert len(ra) == len(rb)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("sets, match", [
    ({"train.sdd_max_similarity": 1.5}, r"sdd_max_similarity must be in \[0, 1\]"),
    ({"train.sdd_max_similarity": -0.1}, r"sdd_max_similarity must be in \[0, 1\]"),
    ({"train.sdd_max_similarity": math.nan}, r"sdd_max_similarity must be in \[0, 1\]"),
    ({"train.sdd_pool": 0}, "sdd_pool must be >= 1"),
    ({"train.sdd_prompt_tokens": SEQ}, "must be < train.seq_len"),
    ({"train.sdd_prompt_tokens": SEQ - 2, "train.sdd_refusal": "no " * 30}, "leaves no room for a response"),
    ({"train.sdd_refusal": "  "}, "sdd_reject needs a refusal sentence"),
])
def test_bad_input_is_refused_and_nothing_is_written(setup, tmp_path, sets, match):
    never = tmp_path / "never"
    with pytest.raises(ValueError, match=match):
        protect_by_training(cfg_of(setup, never, "sdd_reject", **sets))
    assert not never.exists()


def test_no_passage_within_the_bound_is_refused(setup, tmp_path):
    """A retain corpus about the restricted domain itself (another kitchen text) leaves no passage that shares no
    weighted word with the prompts at bound 0: refused, with the settings to change, before anything is written."""
    kitchen2 = tmp_path / "kitchen2.txt"
    kitchen2.write_text(kitchen_text(10000, seed=8))
    never = tmp_path / "never"
    cfg = cfg_of(setup, never, **{"train.sdd_max_similarity": 0.0, "train.sdd_pool": 1})
    cfg.retain = str(kitchen2)
    with pytest.raises(ValueError, match="no retain passage .* raise train.sdd_max_similarity or train.sdd_pool"):
        protect_by_training(cfg)
    assert not never.exists()
