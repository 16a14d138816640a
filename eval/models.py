"""Releases as attack inputs: check that a directory is a loadable causal LM with a tokenizer, and load it
adapted to a task (a causal LM for the LM probe and for classification as language modelling, a sequence
classifier with a new seeded head otherwise), or the same architecture randomly initialised (the from-scratch
reference).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pmp.eval.task_data import CAUSAL_LM_KINDS


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
    _check_weight_files(p)
    return p


def _check_weight_files(p: Path) -> None:
    """Every weight file is complete: a safetensors header that parses and covers the file (its length is in the
    header, so a cut or empty file is caught without reading the tensors), every shard of the index present."""
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as s:
                s.keys()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"release {p}: {f.name} is truncated or not a safetensors file ({e}); copy or export "
                             "the release again") from None
    for f in sorted(p.glob("*.bin")):
        if f.stat().st_size == 0:
            raise ValueError(f"release {p}: {f.name} is empty; copy or export the release again")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"release {p}: {index.name} is not a valid shard index ({type(e).__name__}: {e}); copy "
                             "or export the release again") from None
        absent = sorted(str(s) for s in shards if not (p / str(s)).is_file())
        if absent:
            raise ValueError(f"release {p}: {index.name} names weight files that are missing ({', '.join(absent[:3])})"
                             "; copy the whole release")


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
    LM and lm_classification tasks (CAUSAL_LM_KINDS) use the causal LM as it is, its own head included.

    The classification head (and, from scratch, everything) is initialised from `seed`."""
    causal = task_kind in CAUSAL_LM_KINDS
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    kw = {} if causal else {"num_labels": num_labels}
    torch.manual_seed(seed)
    src = path if path is not None else config_from
    what = "causal LM" if causal else "classifier"
    if path is not None:
        # a classifier replaces the LM head with a new, seeded `score` head: those keys may differ, nothing else
        allowed = ((), ()) if causal else (("score.",), ("lm_head.",))
        model = load_pretrained(cls, path, what, *allowed, pad_token_id=pad_id, **kw)
    else:
        try:
            cfg = AutoConfig.from_pretrained(str(config_from), pad_token_id=pad_id, **kw)
            model = cls.from_config(cfg, dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"model {src} cannot be loaded as a {what} ({type(e).__name__}: {str(e)[:300]})") from None
    if not causal and not hasattr(model, "score"):
        raise ValueError(f"model {src}: its sequence-classification class has no `score` head; unsupported "
                         "architecture")
    model.config.pad_token_id = pad_id
    return model.train()


def load_pretrained(cls, path: Path, what: str, new_keys: tuple[str, ...] = (), dropped_keys: tuple[str, ...] = (),
                    **kw) -> torch.nn.Module:
    """`cls.from_pretrained(path)` in fp32 on CPU, refusing weights that do not fit the release's config.json:
    from_pretrained would randomly initialise every parameter the weights lack and ignore every tensor the model
    lacks -- a GPT-2 config beside Llama weights loads as a random GPT-2. Only keys starting with `new_keys` may be
    missing (a new task head) and only those starting with `dropped_keys` unexpected (the LM head it replaces)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report is judged below, not printed
    try:
        model, info = cls.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True,
                                          ignore_mismatched_sizes=True, **kw)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"model {path} cannot be loaded as a {what} ({type(e).__name__}: {str(e)[:300]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(new_keys))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(dropped_keys))
    mismatched = sorted((str(m[0]), *map(list, m[1:3])) if isinstance(m, tuple | list) else (str(m), "?", "?")
                        for m in info.get("mismatched_keys", ()))
    problems = ([f"{len(missing)} parameters missing from the weights (e.g. {', '.join(missing[:3])})"] if missing
                else [])
    problems += ([f"{len(unexpected)} tensors the model does not have (e.g. {', '.join(unexpected[:3])})"]
                 if unexpected else [])
    problems += ([f"{len(mismatched)} tensors of another shape (e.g. {mismatched[0][0]}: weights "
                  f"{mismatched[0][1]}, config {mismatched[0][2]})"] if mismatched else [])
    if problems:
        arch = getattr(model.config, "model_type", "?")
        raise ValueError(f"release {path}: its weights do not fit its config.json (model_type {arch!r}): "
                         f"{'; '.join(problems)}; the config and the weights belong to different models")
    return model


def head_names(model: torch.nn.Module, task_kind: str) -> set[str]:
    """Parameters of the new task head (always trainable): `score.*` for classification, none for the causal-LM
    kinds (lm, lm_classification: the LM head is the model's own)."""
    if task_kind in CAUSAL_LM_KINDS:
        return set()
    return {n for n, _ in model.named_parameters() if n.startswith("score.")}
