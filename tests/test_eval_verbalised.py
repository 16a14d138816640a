"""Classification as language modelling (`TASK:lm`) and task texts as an LM domain (`TASK:text`): the label-token
loss mask, likelihood scoring and its length normalisation, a tiny end-to-end attack cell + report, bad input."""

import json
import random
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from corpus_fixture import generate_text
from tiny_runs import tiny_pmp_and_dense

from pmp.data.task_formulations import formulate, split_formulation
from pmp.data.tasks import TaskData
from pmp.eval.attack import run_attack
from pmp.eval.attack_inputs import SCRATCH, resolve_models, resolve_tasks
from pmp.eval.attacks import Budget, Suite, get_attack
from pmp.eval.config import AttackConfig, ReportConfig
from pmp.eval.evaluate import evaluate
from pmp.eval.models import load_model, load_tokenizer
from pmp.eval.report import write_report
from pmp.eval.sweep import Sweep
from pmp.eval.task_batches import TrainBatches
from pmp.eval.task_data import prepare_task
from pmp.eval.verbalised import PROMPT_SUFFIX, label_scores, verbaliser_ids

TINY_CLS = Budget(steps=4, batch_size=4, max_len=12, max_train=24, max_val=8, max_test=12, eval_every=2)
TINY_LM = Budget(steps=4, batch_size=2, max_len=16, max_train=12, max_val=3, max_test=3, eval_every=2)
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("verbalised")
    runs = tiny_pmp_and_dense(d)
    rows = []
    for i in range(80):
        s = generate_text(60, seed=300 + i).split(".")[0]
        rows.append({"sentence": f"{s} {i}", "tag": "storm" if "storm" in s or "ship" in s else "calm"})
    random.Random(1).shuffle(rows)
    task = d / "weather.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(runs=runs, task=task, dense=runs["dense"] / "final", pmp=runs["pmp"] / "final")


def weather(env, names="weather:lm", **kw):
    return resolve_tasks(names, task_file=str(env.task), text_column="sentence", label_column="tag", **kw)


# ------------------------------------------------------------------------------------------------ loss mask
def test_loss_covers_only_the_gold_label_tokens(env):
    tok = load_tokenizer(env.dense)
    task = weather(env)[1]
    assert (task.name, task.kind, task.verbaliser) == ("weather:lm", "lm_classification", ["calm", "storm"])
    pt = prepare_task(task, tok, TINY_CLS, seed=0)
    cue = tok(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
    assert pt.targets == [tok(" calm", add_special_tokens=False)["input_ids"],
                          tok(" storm", add_special_tokens=False)["input_ids"]]
    for p in pt.train["ids"]:  # every prompt: the text (at most max_len tokens) then the cue, never cut
        assert p[-len(cue):] == cue and len(p) - len(cue) <= TINY_CLS.max_len
    batches = TrainBatches(pt, 4, seed=0)
    for _ in range(3):
        b = batches.next()
        idx = batches.perm[batches.pos - 4:batches.pos]
        for row, i in enumerate(idx):
            prompt, gold = pt.train["ids"][i], pt.targets[pt.train["labels"][i]]
            lab = b["labels"][row]
            where = (lab != -100).nonzero()[:, 0].tolist()
            assert where == list(range(len(prompt), len(prompt) + len(gold)))  # the label's tokens, nothing else
            assert lab[where].tolist() == gold
            assert b["input_ids"][row, :len(prompt) + len(gold)].tolist() == prompt + gold
            assert b["attention_mask"][row].sum() == len(prompt) + len(gold)
    # the model's loss is exactly the mean next-token cross-entropy over those label tokens
    model = load_model(env.dense, task.kind, pt.num_labels, seed=0, pad_id=pt.pad_id)
    assert not hasattr(model, "score") and model.lm_head.weight.shape[0] == len(tok)  # its own head, no new one
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    lab = b["labels"]
    keep = lab[:, 1:] != -100
    manual = F.cross_entropy(logits[:, :-1][keep].float(), lab[:, 1:][keep])
    assert torch.allclose(model(**b).loss, manual, atol=1e-5)


# ------------------------------------------------------------------------------------------------ scoring
class SuccessorLM(torch.nn.Module):
    """A hand-made causal LM over 10 tokens: after token t it puts `peak` logits on t + 1 (mod 10), 0 elsewhere."""

    def __init__(self, peak: float = 4.0):
        super().__init__()
        self.peak = peak

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, 10)
        logits.scatter_(2, ((input_ids + 1) % 10)[..., None], self.peak)
        return SimpleNamespace(logits=logits)


def test_likelihood_scoring_picks_the_most_likely_label_and_normalises_by_length():
    model = SuccessorLM()
    lp_hit = float(torch.log_softmax(torch.tensor([4.0] + [0.0] * 9), 0)[0])  # log p of the successor
    lp_miss = float(torch.log_softmax(torch.tensor([4.0] + [0.0] * 9), 0)[1])  # log p of any other token
    prompts = [[1, 2], [6, 7, 8, 4]]  # the next token is 3 after the first prompt, 5 after the second
    targets = [[3, 4, 5], [5], [9, 9]]
    scores, sums = label_scores(model, prompts, targets, pad=0)
    want_sums = torch.tensor([[3 * lp_hit, lp_miss, 2 * lp_miss],
                              [lp_miss + 2 * lp_hit, lp_hit, 2 * lp_miss]], dtype=torch.float64)
    assert torch.allclose(sums, want_sums, atol=1e-5)
    assert torch.allclose(scores, want_sums / torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64), atol=1e-5)
    assert scores.argmax(1).tolist() == [0, 1]  # each prompt's continuation wins
    # length normalisation as documented: the mean per token, not the sum. After the second prompt, label [3, 4, 5]
    # is one miss then two hits (sum -4.15 - 2 x 0.15, mean -1.5) and label [0] one miss (-4.15 either way): the
    # mean picks the longer label, the sum would punish it for its length
    p2 = [[6, 7, 8, 4]]
    mean, total = label_scores(model, p2, [[3, 4, 5], [0]], pad=0)
    raw, _ = label_scores(model, p2, [[3, 4, 5], [0]], pad=0, length_norm=False)
    assert torch.equal(raw, total) and torch.allclose(mean, total / torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert mean.argmax(1).item() == 0 and raw.argmax(1).item() == 1


def test_evaluate_scores_every_label_and_reports_accuracy(env):
    tok = load_tokenizer(env.dense)
    pt = prepare_task(weather(env)[1], tok, TINY_CLS, seed=0)
    model = load_model(env.dense, pt.kind, pt.num_labels, seed=0, pad_id=pt.pad_id).eval()
    scores, sums = label_scores(model, pt.test["ids"], pt.targets, pt.pad_id)
    # each score is the model's own mean log-probability of the label's tokens, computed here one row at a time
    i, c = 3, 1
    seq = torch.tensor([pt.test["ids"][i] + pt.targets[c]])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
    n = len(pt.test["ids"][i])
    one = sum(float(lp[n - 1 + j, t]) for j, t in enumerate(pt.targets[c]))
    assert abs(float(sums[i, c]) - one) < 1e-4 and abs(float(scores[i, c]) - one / len(pt.targets[c])) < 1e-5
    out = evaluate(model, pt, "test")
    y = torch.tensor(pt.test["labels"])
    assert out["accuracy"] == pytest.approx(float((scores.argmax(1) == y).double().mean()))
    gold = -sums.gather(1, y[:, None]).sum() / sum(len(pt.targets[k]) for k in pt.test["labels"])
    assert out["loss"] == pytest.approx(float(gold), rel=1e-6)


# ------------------------------------------------------------------------------------------------ end to end
def tiny_suite() -> Suite:
    return Suite("tiny", (get_attack("probe"), get_attack("full_adamw_3e-4_cos")), classification=TINY_CLS,
                 lm=TINY_LM, seeds=1).validate()


def test_attack_cell_with_the_lm_formulation_and_its_report(env, tmp_path):
    models = resolve_models({"dense": str(env.dense)}, {})
    tasks = weather(env, "weather:lm,weather:text")
    out = tmp_path / "res"
    summary = Sweep(models, tasks, tiny_suite(), out, **QUIET).run()
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    # the task file itself (the head formulation) + its two readings x (dense, scratch) x (probe, full)
    assert summary["run"] == len(cells) == 3 * 2 * 2
    assert cells["dense__weather__probe__s0"]["task_kind"] == "classification"
    for model in ("dense", SCRATCH):
        probe, full = cells[f"{model}__weather:lm__probe__s0"], cells[f"{model}__weather:lm__full_adamw_3e-4_cos__s0"]
        assert probe["task_kind"] == full["task_kind"] == "lm_classification"
        assert probe["metric"] == "accuracy" and probe["direction"] == "higher"
        assert [p["step"] for p in probe["curve"]] == [0] and probe["trainable_parameters"] == 0  # zero-shot
        assert [p["step"] for p in full["curve"]] == [2, 4] and full["before"] == probe["after_val_selected"]
        assert 0 <= full["before"] <= 1 and 0 <= full["after_val_selected"] <= 1
        assert full["formulation"]["verbaliser"] == ["calm", "storm"] and "Label:" in full["formulation"]["template"]
        # the LM-domain reading of the same texts: perplexity
        assert cells[f"{model}__weather:text__probe__s0"]["metric"] == "perplexity"
    # every parameter trained, including the causal LM's own head (there is no other)
    n_params = sum(p.numel() for p in load_model(env.dense, "lm_classification", 2, 0).parameters())
    assert cells["dense__weather:lm__full_adamw_3e-4_cos__s0"]["trainable_parameters"] == n_params
    md = write_report(ReportConfig(results=str(out))).read_text()
    assert "## weather:lm (lm_classification, accuracy, higher" in md
    assert "## weather:text (lm, perplexity" in md and md.count("Validity: baseline best") == 3  # per task
    # another verbaliser is another task definition: its cells are recomputed, not reused
    again = weather(env, "weather:lm", verbalisers={"weather": "calm,stormy"})
    assert Sweep(models, again[1:], tiny_suite(), out, **QUIET).run()["run"] == 4


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_formulations_and_verbalisers_are_refused_before_anything_is_written(env, tmp_path, monkeypatch):
    def cfg(**kw):
        base = dict(models={"dense": str(env.dense)}, tasks="weather:lm", task_file=str(env.task),
                    text_column="sentence", label_column="tag", suite="quick", out=str(tmp_path / "r"))
        return AttackConfig(**{**base, **kw})

    with pytest.raises(ValueError, match=r"unknown formulation 'head'.*weather:lm.*weather:text"):
        run_attack(cfg(tasks="weather:head"))
    with pytest.raises(ValueError, match=r"unknown task 'nope:lm'.*TASK:lm"):
        run_attack(cfg(tasks="nope:lm"))
    with pytest.raises(ValueError, match=r"movie_dialog is an lm task; ':lm' reads a classification task"):
        run_attack(cfg(tasks="movie_dialog:lm"))
    with pytest.raises(ValueError, match=r"1 verbalisers from --verbalisers weather= \(\['calm'\]\) for 2 labels"):
        run_attack(cfg(verbalisers={"weather": "calm"}))
    with pytest.raises(ValueError, match=r"label 0 .* is empty"):
        run_attack(cfg(verbalisers={"weather": ",storm"}))
    with pytest.raises(ValueError, match=r"labels share the verbaliser 'sky'"):
        run_attack(cfg(verbalisers={"weather": "sky,sky"}))
    with pytest.raises(ValueError, match=r"verbalisers given for \['trec'\], but no such TASK:lm task"):
        run_attack(cfg(verbalisers={"trec": "a,b,c,d,e,f"}))
    # a word this tokenizer cannot encode (a tokenizer that drops it): refused with the inputs, per tokenizer
    real = load_tokenizer(env.dense)

    class Dropping:
        eos_token_id = real.eos_token_id

        def __call__(self, text, **kw):
            return {"input_ids": [] if "storm" in text else real(text, **kw)["input_ids"]}

    monkeypatch.setattr("pmp.eval.sweep.load_tokenizer", lambda _path: Dropping())
    with pytest.raises(ValueError, match=r"verbaliser 'storm' tokenizes to nothing"):
        run_attack(cfg())
    assert not (tmp_path / "r").exists()  # nothing written by any refused input


def test_formulation_needs_label_names_and_a_classification_task():
    ds = datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [0, 1]})
    unnamed = TaskData("unnamed", "classification", ds, ds, 2, [])
    with pytest.raises(ValueError, match="task unnamed has no label names to verbalise.*--verbalisers unnamed="):
        formulate(unnamed, "lm")
    assert formulate(unnamed, "lm", "yes,no").verbaliser == ["yes", "no"]
    lm = TaskData("prose", "lm", ds, ds, 0, [])
    with pytest.raises(ValueError, match="prose is a lm task"):
        formulate(lm, "text")
    with pytest.raises(ValueError, match="unknown task formulation 'head'"):
        formulate(unnamed, "head")
    assert split_formulation("trec") == ("trec", "") and split_formulation("trec:lm") == ("trec", "lm")
    with pytest.raises(ValueError, match="unknown formulation"):
        split_formulation(":lm")

    class Empty:
        def __call__(self, text, **kw):
            return {"input_ids": []}

    with pytest.raises(ValueError, match="tokenizes to nothing"):
        verbaliser_ids(Empty(), ["yes", "no"], "unnamed:lm")
    with pytest.raises(ValueError, match="no verbalisers"):
        verbaliser_ids(Empty(), [], "unnamed:lm")
