"""What a run starts from: the data (memory-mapped token blocks), the tokenizer, the run directory and the secret
initial weights. Rank 0 (or the only process) prepares them and writes the run directory; the other ranks of a
data-parallel job follow: they read the tokenizer and initial weights rank 0 wrote, and map the token blocks
rank 0 mapped (or build them from the run's tokenizer when their node does not see rank 0's data cache).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PretrainedConfig

from pmp.atomic import atomic_dir
from pmp.config import RunConfig
from pmp.data.blocks import blocks_digest, blocks_path, load_blocks, mapped_token_blocks
from pmp.data.corpus import load_documents, split_documents
from pmp.model import build_model, count_parameters, draw_init_seed, hf_config
from pmp.run_dir import RunDir, initialize_run
from pmp.tokenizer import get_tokenizer


@dataclass
class RunInputs:
    tokenizer: object
    train_blocks: np.ndarray
    val_blocks: np.ndarray
    hf_cfg: PretrainedConfig
    init_state: dict[str, torch.Tensor]


def prepare_run(cfg: RunConfig, run: RunDir, resume: bool) -> tuple[RunInputs, dict]:
    """Rank 0: load the data, create or reopen the run directory, settle the initial weights. Returns the inputs
    and what the other ranks need to follow (small, picklable)."""
    tok, train_blocks, val_blocks = _load_data(cfg, run, resume)
    if not run.is_run():  # fresh, or interrupted before run.json was written
        initialize_run(run, cfg)
    if not run.tokenizer.is_dir():
        with atomic_dir(run.tokenizer, overwrite=True) as tmp:
            tok.save_pretrained(str(tmp))
    hf_cfg = _hf_config(cfg, tok)
    inputs = RunInputs(tok, train_blocks, val_blocks, hf_cfg, initial_weights(cfg, run, hf_cfg, resume))
    shared = {"train": str(blocks_path(train_blocks) or ""), "val": str(blocks_path(val_blocks) or ""),
              "digest": blocks_digest(train_blocks) + blocks_digest(val_blocks)}
    return inputs, shared


def follow_run(cfg: RunConfig, run: RunDir, shared: dict, rank: int) -> RunInputs:
    """The other ranks, once rank 0 has prepared the run."""
    if not run.tokenizer.is_dir():
        raise FileNotFoundError(f"{run.tokenizer} is missing on rank {rank}: the run directory must be on a file "
                                "system every rank sees")
    tok = AutoTokenizer.from_pretrained(str(run.tokenizer))
    seq_len = cfg.data.seq_len
    if all(shared[k] and Path(shared[k]).is_file() for k in ("train", "val")):
        train_blocks, val_blocks = load_blocks(Path(shared["train"]), seq_len), load_blocks(Path(shared["val"]),
                                                                                           seq_len)
    else:
        train_blocks, val_blocks = _tokenize(cfg, tok, log=lambda s: None)
    return RunInputs(tok, train_blocks, val_blocks, _hf_config(cfg, tok), run.load_init())  # sha256-verified


def _load_data(cfg: RunConfig, run: RunDir, resume: bool):
    if resume and run.tokenizer.is_dir():
        tok = AutoTokenizer.from_pretrained(str(run.tokenizer))
        return (tok, *_tokenize(cfg, tok))
    docs = load_documents(cfg.data)
    train_docs, _ = split_documents(docs, cfg.data.val_fraction)
    tok = get_tokenizer(cfg.tokenizer, train_docs, cfg.data.cache_dir)
    return (tok, *_tokenize(cfg, tok, docs))


def _tokenize(cfg: RunConfig, tok, docs: list[str] | None = None, log=print):
    d = cfg.data
    train_docs, val_docs = split_documents(docs if docs is not None else load_documents(d), d.val_fraction)
    return (mapped_token_blocks(tok, train_docs, d.seq_len, d.cache_dir, tag="train", log=log),
            mapped_token_blocks(tok, val_docs, d.seq_len, d.cache_dir, tag="val", log=log))


def _hf_config(cfg: RunConfig, tok) -> PretrainedConfig:
    return hf_config(cfg.model, len(tok), tok.bos_token_id, tok.eos_token_id, cfg.data.seq_len)


def initial_weights(cfg: RunConfig, run: RunDir, hf_cfg: PretrainedConfig, resume: bool) -> dict[str, torch.Tensor]:
    """The secret initial weights: re-read and verified, rebuilt from the recorded seed, or drawn fresh -- never
    redrawn for a run that already trained from them (its complement would stop matching)."""
    if run.init_record.is_file():
        if run.init_weights.is_file():
            return run.load_init()
        seed = int(json.loads(run.init_record.read_text())["seed"])
        state = {k: v.detach().clone() for k, v in build_model(hf_cfg, seed).state_dict().items()}
        run.restore_init(state)
        print(f"[pmp] rebuilt {run.init_weights} from the recorded seed (sha256 verified)")
        return state
    if run.init_weights.is_file() or (resume and run.has_trained()):
        raise ValueError(f"{run.root}: the record of the initial weights' seed ({run.init_record}) is missing but "
                         "the run already trained from them; restore private/init.json (and init.safetensors) "
                         "from a backup -- a new init would not match the frozen complement")
    seed = draw_init_seed(cfg.model.init_seed)
    model = build_model(hf_cfg, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run.save_init(state, seed, pinned=cfg.model.init_seed is not None, parameters=count_parameters(model))
    return state
