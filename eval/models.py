"""Releases as attack inputs: check that a directory is a loadable causal LM with a tokenizer, and load it
adapted to a task (a causal LM for the LM probe, a sequence classifier with a new seeded head otherwise), or the
same architecture randomly initialised (the from-scratch reference).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


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


def load_tokenizer(path: Path):
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
    cls = AutoModelForCausalLM if task_kind == "lm" else AutoModelForSequenceClassification
    kw = {} if task_kind == "lm" else {"num_labels": num_labels}
    torch.manual_seed(seed)
    src = path if path is not None else config_from
    try:
        if path is not None:
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
