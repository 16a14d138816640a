"""Task adapters: releases and private runs as inputs, tasks -> token tensors, models per task, metrics.

Classification: `AutoModelForSequenceClassification.from_pretrained(release, num_labels=K)` with pad = eos (the
head is new and random, seeded by the cell seed); metric accuracy, higher is better. Texts are truncated to
`Budget.max_len` tokens and right-padded; the head reads the last real token.
LM probe: `AutoModelForCausalLM`, eos-separated text cut into blocks of `Budget.max_len` tokens; metric
perplexity (exp of the token-weighted mean loss), LOWER is better -- every consumer goes through `DIRECTION`.

Splits, per (task, seed): the attacker's validation split (max_val) is carved from the task's TRAIN split with a
seeded permutation, the training examples (max_train) come after it, and the test split is the task's fixed one
(first max_test of a fixed permutation): the same for every seed and model, never seen in training or selection.
Shapes: B batch, T tokens, H hidden, K labels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIRECTION = {"classification": "higher", "lm": "lower"}  # is a larger metric better?
METRIC = {"classification": "accuracy", "lm": "perplexity"}
EVAL_BATCH = 64


# ---------------------------------------------------------------------------------------------- inputs
def check_release(path: str | Path) -> Path:
    """A loadable HF causal-LM directory with a tokenizer, or a clear error."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"release {p} does not exist or is not a directory")
    cfg = p / "config.json"
    if not cfg.is_file():
        hint = " (it is a private run directory: pass its final/ subdirectory)" if (p / "run.json").is_file() else ""
        raise ValueError(f"{p} is not a Hugging Face model directory: config.json is missing{hint}")
    try:
        json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"release {p}: config.json is not valid JSON ({e}); the release is corrupt") from None
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise ValueError(f"release {p} has no tokenizer files (tokenizer.json): attacks use the release's own "
                         "tokenizer; save it beside the weights")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ValueError(f"release {p} has no weights (*.safetensors)")
    return p


def check_private_run(path: str | Path) -> Path:
    """The owner's private run directory (with private/mask.*), or a clear error -- never a release."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"private run directory {p} does not exist")
    if not (p / "private" / "mask.json").is_file():
        if (p / "config.json").is_file():
            raise ValueError(f"{p} is a release, not a private run directory: authorized fine-tuning needs the "
                             "owner's run dir with private/mask.* (the parent of final/)")
        raise ValueError(f"{p} is not a private PMP run directory: private/mask.json is missing (dense runs have no "
                         "mask; authorized fine-tuning needs a method=pmp run)")
    return p


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means the release's tokenizer is unusable
        raise ValueError(f"release {path}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
    if tok.eos_token_id is None:
        raise ValueError(f"release {path}: the tokenizer has no eos token (needed as the pad token)")
    return tok


def load_model(path: Path | None, task_kind: str, num_labels: int, seed: int, config_from: Path | None = None,
               pad_id: int | None = None) -> torch.nn.Module:
    """The release adapted to the task (path), or the same architecture randomly initialised (config_from).

    The classification head (and, from scratch, everything) is initialised from `seed`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if task_kind == "lm" else AutoModelForSequenceClassification
    kw = {} if task_kind == "lm" else {"num_labels": num_labels}
    torch.manual_seed(seed)
    src = path if path is not None else config_from
    try:
        if path is not None:
            import transformers

            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # "score.weight newly initialized" is the point here
            try:
                model = cls.from_pretrained(str(path), dtype=torch.float32, pad_token_id=pad_id, **kw)
            finally:
                transformers.logging.set_verbosity(verbosity)
        else:
            cfg = AutoConfig.from_pretrained(str(config_from), pad_token_id=pad_id, **kw)
            model = cls.from_config(cfg, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"model {src} cannot be loaded as a {'causal LM' if task_kind == 'lm' else 'classifier'} "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    if task_kind != "lm" and not hasattr(model, "score"):
        raise ValueError(f"model {src}: its sequence-classification class has no `score` head; unsupported "
                         "architecture")
    model.config.pad_token_id = pad_id
    return model.train()


def head_names(model: torch.nn.Module, task_kind: str) -> set[str]:
    """Parameters of the new task head (always trainable): `score.*` for classification, none for LM."""
    return set() if task_kind == "lm" else {n for n, _ in model.named_parameters() if n.startswith("score.")}


# ---------------------------------------------------------------------------------------------- tasks
def lm_task_from_text(path: str | Path, test_fraction: float = 0.2):
    """A user's held-out text file as an LM-probe task (chunks of ~2k chars, fixed text-hash split)."""
    import datasets

    from pmp.data.files import chunk_text
    from pmp.data.tasks import LM_CHUNK_CHARS, TaskData, fixed_split

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LM probe text {p} does not exist")
    chunks = chunk_text(p.read_text("utf-8", errors="replace"), LM_CHUNK_CHARS)
    if len(chunks) < 2:
        raise ValueError(f"LM probe text {p} is too short: need at least 2 chunks of ~{LM_CHUNK_CHARS} chars")
    tr, te = fixed_split(chunks, test_fraction)
    mk = lambda idx: datasets.Dataset.from_dict({"text": [chunks[i] for i in idx]})  # noqa: E731
    return TaskData(p.stem, "lm", mk(tr), mk(te), 0, [])


@dataclass
class PreparedTask:
    """One task tokenized for one tokenizer and seed: lists of ids (classification) or [N, T] blocks (lm)."""

    name: str
    kind: str
    num_labels: int
    pad_id: int
    train: dict  # classification: {"ids": list[list[int]], "labels": list[int]}; lm: {"blocks": LongTensor}
    val: dict
    test: dict
    sizes: dict = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return DIRECTION[self.kind]

    @property
    def metric(self) -> str:
        return METRIC[self.kind]


def prepare_task(task, tokenizer, budget, seed: int) -> PreparedTask:
    pad = tokenizer.eos_token_id
    rng = np.random.default_rng([seed, 7])
    if task.kind == "lm":
        return _prepare_lm(task, tokenizer, budget, rng, pad)
    n = len(task.train)
    if n < 2:
        raise ValueError(f"task {task.name}: needs at least 2 training examples to carve a validation split")
    n_val = min(budget.max_val, max(1, n // 5))
    perm = rng.permutation(n)
    val_idx, train_idx = perm[:n_val], perm[n_val:n_val + budget.max_train]
    test_idx = np.sort(np.random.default_rng(0).permutation(len(task.test))[:budget.max_test])

    def encode(ds, idx) -> dict:
        idx = [int(i) for i in idx]
        texts = [str(ds[i]["text"]) for i in idx] if idx else []
        ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=budget.max_len)["input_ids"]
        labels = [int(ds[i]["label"]) for i in idx]
        return {"ids": [x if x else [pad] for x in ids], "labels": labels}

    tr, va, te = encode(task.train, train_idx), encode(task.train, val_idx), encode(task.test, test_idx)
    sizes = {"train": len(tr["labels"]), "val": len(va["labels"]), "test": len(te["labels"]),
             "task_train": n, "task_test": len(task.test), "max_len": budget.max_len}
    return PreparedTask(task.name, "classification", task.num_labels, pad, tr, va, te, sizes)


def _blocks(tokenizer, texts: list[str], seq_len: int, need: int, pad: int) -> torch.Tensor:
    """Encode texts in order, eos after each, until `need` full blocks exist -> [<=need, T] int64."""
    out: list[int] = []
    for i in range(0, len(texts), 32):
        for ids in tokenizer(texts[i:i + 32], add_special_tokens=False)["input_ids"]:
            out.extend(ids)
            out.append(pad)
        if len(out) >= need * seq_len:
            break
    n = min(len(out) // seq_len, need)
    return torch.tensor(out[:n * seq_len], dtype=torch.long).view(n, seq_len)


def _prepare_lm(task, tokenizer, budget, rng, pad) -> PreparedTask:
    texts = [str(t) for t in task.train["text"]]
    order = rng.permutation(len(texts))
    n_val_docs = max(1, len(texts) // 10)
    val_texts = [texts[i] for i in order[:n_val_docs]]  # whole documents: no text spans val and train
    train_texts = [texts[i] for i in order[n_val_docs:]]
    val = _blocks(tokenizer, val_texts, budget.max_len, budget.max_val, pad)
    train = _blocks(tokenizer, train_texts, budget.max_len, budget.max_train, pad)
    test = _blocks(tokenizer, [str(t) for t in task.test["text"]], budget.max_len, budget.max_test, pad)
    for split, b in (("train", train), ("val", val), ("test", test)):
        if len(b) == 0:
            raise ValueError(f"LM task {task.name}: its {split} text is shorter than one block of {budget.max_len} "
                             "tokens; use more text or a smaller lm max_len")
    sizes = {"train_blocks": len(train), "val_blocks": len(val), "test_blocks": len(test), "block_len": budget.max_len,
             "train_tokens": train.numel()}
    return PreparedTask(task.name, "lm", 0, pad, {"blocks": train}, {"blocks": val}, {"blocks": test}, sizes)


# ---------------------------------------------------------------------------------------------- batches
def pad_batch(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids_BT and attention mask_BT."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


class TrainBatches:
    """Shuffled batches without replacement within an epoch; the order depends on the seed only (not the model),
    so every model sees the same examples in the same order for a given seed."""

    def __init__(self, task: PreparedTask, batch_size: int, seed: int):
        self.task, self.bs = task, batch_size
        self.n = len(task.train["blocks"]) if task.kind == "lm" else len(task.train["labels"])
        if self.n < 1:
            raise ValueError(f"task {task.name} has no training examples after the validation split")
        self.rng = np.random.default_rng([seed, 11])
        self.perm, self.pos = self.rng.permutation(self.n), 0

    def next(self) -> dict:
        if self.pos >= self.n:
            self.perm, self.pos = self.rng.permutation(self.n), 0
        idx = self.perm[self.pos:self.pos + self.bs]
        self.pos += self.bs
        if self.task.kind == "lm":
            b = self.task.train["blocks"][torch.from_numpy(idx)]
            return {"input_ids": b, "labels": b}
        ids, mask = pad_batch([self.task.train["ids"][i] for i in idx], self.task.pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([self.task.train["labels"][i] for i in idx])}


def loss_of(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


# ---------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def evaluate(model, task: PreparedTask, split: str) -> dict:
    """{metric, loss} on a split ('val' | 'test')."""
    was_training = model.training
    model.eval()
    data = getattr(task, split)
    if task.kind == "lm":
        total, tokens = 0.0, 0
        for i in range(0, len(data["blocks"]), EVAL_BATCH // 4):
            b = data["blocks"][i:i + EVAL_BATCH // 4]
            n_tok = b[:, 1:].numel()
            total += float(model(input_ids=b, labels=b).loss) * n_tok
            tokens += n_tok
        loss = total / tokens
        out = {"perplexity": math.exp(min(loss, 50.0)), "loss": loss}
    else:
        order = sorted(range(len(data["labels"])), key=lambda i: len(data["ids"][i]))  # less padding
        correct, total = 0, 0.0
        for i in range(0, len(order), EVAL_BATCH):
            idx = order[i:i + EVAL_BATCH]
            ids, mask = pad_batch([data["ids"][j] for j in idx], task.pad_id)
            y = torch.tensor([data["labels"][j] for j in idx])
            logits = model(input_ids=ids, attention_mask=mask).logits
            total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        n = max(len(order), 1)
        out = {"accuracy": correct / n, "loss": total / n}
    model.train(was_training)
    return out


@torch.no_grad()
def features(model, task: PreparedTask, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-base features for the head-only probe: the final hidden state at the last real token (exactly what
    the sequence-classification head reads) -> (feats_NH, labels_N)."""
    model.eval()
    data, base = getattr(task, split), model.base_model
    feats = []
    for i in range(0, len(data["labels"]), EVAL_BATCH):
        ids, mask = pad_batch(data["ids"][i:i + EVAL_BATCH], task.pad_id)
        h_BTH = base(input_ids=ids, attention_mask=mask).last_hidden_state
        last_B = mask.sum(1) - 1
        feats.append(h_BTH[torch.arange(len(ids)), last_B].float())
    model.train()
    return torch.cat(feats), torch.tensor(data["labels"])
