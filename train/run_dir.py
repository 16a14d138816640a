"""The private run directory: its layout, and the rules for starting, resuming and refusing.

RUN/
  run.json            status (running | finished), method, step, versions
  config.yaml         the resolved config of the run
  metrics.jsonl       one JSON object per log step / eval / identification step
  tokenizer/          the tokenizer the run used (HF fast tokenizer files)
  checkpoints/        resumable checkpoints (see train/checkpoint.py)
  private/            NEVER published: mask, initial weights + seed, identification history
  final/              the final private model (stock HF directory; `pmp export` makes the public release)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pmp.atomic import write_json, write_text
from pmp.config import RunConfig, config_from_dict, dump_yaml, to_dict


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def status(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def private(self) -> Path:
        return self.root / "private"

    @property
    def final(self) -> Path:
        return self.root / "final"

    def is_run(self) -> bool:
        return self.status.is_file()

    def read_status(self) -> dict:
        if not self.status.is_file():
            raise FileNotFoundError(f"{self.root} is not a pmp run directory (no run.json)")
        return json.loads(self.status.read_text())

    def val_ppl_by_step(self) -> dict[int, float]:
        """Held-out perplexity of every evaluation in metrics.jsonl, by step (empty when there is none)."""
        if not self.metrics.is_file():
            return {}
        rows = (json.loads(line) for line in self.metrics.read_text().splitlines())
        return {r["step"]: r["val_ppl"] for r in rows if "val_ppl" in r}

    def write_status(self, **fields) -> None:
        cur = self.read_status() if self.status.is_file() else {}
        cur.update(fields)
        write_json(self.status, cur)

    def load_config(self) -> RunConfig:
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.root} has no config.yaml: not a pmp run directory")
        return config_from_dict(yaml.safe_load(self.config.read_text())).validate()


def open_run(out: str | Path, cfg: RunConfig, resume: bool) -> RunDir:
    """Check that `out` may take a fresh run (or is the same run, when resuming); writes nothing.

    Refuses a directory that holds anything else -- another run or unrelated files -- so nothing the user has is
    ever overwritten. Call `initialize_run` once the inputs have loaded, so bad input leaves no half-made run.
    """
    run = RunDir(Path(out))
    if resume:
        if not run.is_run():
            raise FileNotFoundError(f"--resume: {run.root} holds no pmp run to resume (no run.json)")
        diff = config_difference(run, cfg)
        if diff:
            raise ValueError(f"--resume: the config differs from the one {run.root} was started with ({diff}); "
                             "resume without a config (or with the same one) or start a new --out directory")
        return run
    if run.root.exists():
        if not run.root.is_dir():
            raise FileExistsError(f"--out {run.root} exists and is not a directory")
        if run.is_run():
            raise FileExistsError(f"--out {run.root} already holds a pmp run; pass --resume to continue it, or "
                                  "choose a new directory")
        if any(run.root.iterdir()):
            raise FileExistsError(f"--out {run.root} is not empty; choose a new or empty directory")
    return run


# Settings that say how a run is watched and kept, not what it trains: they may differ between a run and a config
# that would reproduce it.
BOOKKEEPING = {"train": ("progress", "tensorboard", "log_every", "eval_every", "eval_batches", "ckpt_every",
                         "keep_last", "snapshot_every", "threads")}


def config_difference(run: RunDir, cfg: RunConfig) -> str:
    """'' when `cfg` trains what `run` was started with, else the differing keys. Bookkeeping settings are
    ignored, and a dense run ignores the `pmp` section (it never reads it), so changing PMP settings does not
    invalidate a finished dense baseline."""
    saved, new = to_dict(run.load_config()), to_dict(cfg)
    for d in (saved, new):
        for section, keys in BOOKKEEPING.items():
            for k in keys:
                d[section].pop(k, None)
    if saved["train"]["method"] == "dense" and new["train"]["method"] == "dense":
        saved.pop("pmp"), new.pop("pmp")
    return _diff(saved, new) if saved != new else ""


def initialize_run(run: RunDir, cfg: RunConfig) -> None:
    """Create the run directory with its config and status (fresh runs only)."""
    run.root.mkdir(parents=True, exist_ok=True)
    write_text(run.config, dump_yaml(cfg))
    run.write_status(status="running", method=cfg.train.method, step=0)


def _diff(a: dict, b: dict, prefix: str = "") -> str:
    out = []
    for k in a:
        if isinstance(a[k], dict):
            d = _diff(a[k], b.get(k, {}), f"{prefix}{k}.")
            if d:
                out.append(d)
        elif a[k] != b.get(k):
            out.append(f"{prefix}{k}: {a[k]!r} -> {b.get(k)!r}")
    return ", ".join(out)
