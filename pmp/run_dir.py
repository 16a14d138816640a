"""The private run directory: the one place that knows its layout, and the rules for starting, resuming and
refusing. Every reader (export, verify-release, attack, audit, pipeline) and the trainer go through `RunDir`.

RUN/
  run.json            status (running | finished), method, step, versions
  config.yaml         the resolved config of the run
  metrics.jsonl       one JSON object per log step / eval / identification step
  tokenizer/          the tokenizer the run used (HF fast tokenizer files)
  checkpoints/        resumable checkpoints (format: pmp/step_dir.py; written by pmp.train.checkpoint)
  snapshots/          weight snapshots of earlier steps (train.snapshot_every), never deleted
  private/            NEVER published: mask.{safetensors,json}, init.{safetensors,json} (initial weights + seed),
                      complement.json (what the masked phase holds the complement at: init x scale,
                      pmp/complement.py), identification.jsonl, commitment.json (ownership salt),
                      rescale.{safetensors,json} (the secret scales of a `pmp protect rescale` run)
  final/              the final private model (stock HF directory; `pmp export` makes the public release)
  audit/              default output of `pmp audit` (describes the mask: private too)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save

from pmp.atomic import atomic_file, sha256_bytes, sha256_file, write_json, write_text
from pmp.complement import RECORD_FILE, ComplementPlan, scaled
from pmp.config import RunConfig, config_from_dict
from pmp.mask import META_FILE, PrivateMask
from pmp.provenance import provenance
from pmp.rescale import RescaleKey
from pmp.step_dir import list_step_dirs, step_dir_name, step_of, verified_weights
from pmp.typed_config import dump_yaml, to_dict

COMPLEMENT_MIN_SHARE = 0.999  # a PMP release keeps 100 % of its complement reference; below this it is another run's


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

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def init_weights(self) -> Path:
        return self.private / "init.safetensors"

    @property
    def init_record(self) -> Path:
        return self.private / "init.json"

    @property
    def complement_record(self) -> Path:
        return self.private / RECORD_FILE

    @property
    def complement_weights(self) -> Path:
        """The masked tensors as the masked phase began, when that is not a function of the init (pmp.rewind=false:
        the complement stays at its values at identification). Private: it is the complement's reference."""
        return self.private / "complement.safetensors"

    def save_complement_weights(self, state: Mapping[str, torch.Tensor], mask: PrivateMask) -> None:
        with atomic_file(self.complement_weights) as f:
            f.write(save({n: state[n].detach().contiguous().cpu() for n in sorted(mask.layouts)}))

    @property
    def identification(self) -> Path:
        return self.private / "identification.jsonl"

    @property
    def commitment(self) -> Path:
        return self.private / "commitment.json"

    @property
    def rescale_key(self) -> Path:
        return self.private / "rescale.safetensors"

    @property
    def rescale_record(self) -> Path:
        return self.private / "rescale.json"

    def has_rescale_key(self) -> bool:
        return self.rescale_key.is_file()

    def load_rescale_key(self) -> RescaleKey:
        """The secret scales of a `pmp protect rescale` run, verified against the sha256 recorded beside them."""
        rec = json.loads(self.rescale_record.read_text())
        if sha256_file(self.rescale_key) != rec["sha256"]:
            raise ValueError(f"{self.rescale_key} fails its sha256: the private rescale key is corrupt")
        return RescaleKey.from_tensors(load_file(str(self.rescale_key)), float(rec["strength"]))

    def has_mask(self) -> bool:
        return (self.private / META_FILE).is_file()

    def load_mask(self) -> PrivateMask:
        return PrivateMask.load(self.private)

    # ------------------------------------------------------------------ initial weights (owner secret)
    def save_init(self, state: Mapping[str, torch.Tensor], seed: int, pinned: bool, parameters: int) -> None:
        """Record the seed (with the sha256 of the weights it gives) FIRST, then write the weights: a crash in
        between leaves the seed on record, from which `restore_init` rebuilds the weights exactly."""
        blob = _init_bytes(state)
        self.private.mkdir(parents=True, exist_ok=True)
        write_json(self.init_record, {"seed": seed, "pinned": pinned, "sha256": sha256_bytes(blob),
                                      "parameters": parameters})
        with atomic_file(self.init_weights) as f:
            f.write(blob)

    def restore_init(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write initial weights rebuilt from the recorded seed, only if they are exactly the recorded ones."""
        blob = _init_bytes(state)
        if sha256_bytes(blob) != json.loads(self.init_record.read_text())["sha256"]:
            raise ValueError(f"{self.init_weights} is missing and the weights rebuilt from the seed in "
                             f"{self.init_record} differ from the recorded ones (another pmp, torch or transformers "
                             "version?); restore the run's own init.safetensors to resume")
        with atomic_file(self.init_weights) as f:
            f.write(blob)

    def load_init(self) -> dict[str, torch.Tensor]:
        """The initial weights, verified against the sha256 recorded beside them."""
        meta = json.loads(self.init_record.read_text())
        if sha256_file(self.init_weights) != meta["sha256"]:
            raise ValueError(f"{self.init_weights} fails its sha256: the private initial weights are corrupt")
        return load_file(str(self.init_weights))

    def has_trained(self) -> bool:
        """Whether anything derived from the initial weights exists (a checkpoint, snapshot or final model)."""
        return bool(list_step_dirs(self.checkpoints) or list_step_dirs(self.snapshots)) or self.final.is_dir()

    def complement_plan(self) -> ComplementPlan:
        """What the masked phase held the complement at (init x scale); frozen when the run recorded nothing."""
        return ComplementPlan.load(self.private)

    def init_seed(self) -> int | None:
        return int(json.loads(self.init_record.read_text())["seed"]) if self.init_record.is_file() else None

    # ------------------------------------------------------------------ kept weights of earlier steps
    def kept_weight_steps(self) -> list[int]:
        """Steps whose weights the run kept (snapshots and checkpoints), ascending."""
        return sorted({step_of(p) for where in (self.snapshots, self.checkpoints) for p in list_step_dirs(where)})

    def weights_at_step(self, step: int) -> Path:
        """The verified model.safetensors of `step`, from snapshots or checkpoints; a clear error otherwise."""
        for where in (self.snapshots, self.checkpoints):
            d = where / step_dir_name(step)
            if (d / "manifest.json").is_file():
                return verified_weights(d)
        raise ValueError(f"{self.root} kept no weights of step {step}; steps with weights: "
                         f"{self.kept_weight_steps() or 'none'} "
                         "(train with train.snapshot_every to keep earlier states)")

    def is_run(self) -> bool:
        return self.status.is_file()

    def read_status(self) -> dict:
        if not self.status.is_file():
            raise FileNotFoundError(f"{self.root} is not a pmp run directory (no run.json)")
        return json.loads(self.status.read_text())

    def val_ppl_by_step(self) -> dict[int, float]:
        """Held-out perplexity of every evaluation in metrics.jsonl, by step (empty when there is none)."""
        return self._eval_by_step("val_ppl")

    def val_loss_by_step(self) -> dict[int, float]:
        return self._eval_by_step("val_loss")

    def _eval_by_step(self, key: str) -> dict[int, float]:
        if not self.metrics.is_file():
            return {}
        rows = (json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip())
        return {r["step"]: r[key] for r in rows if key in r}

    def write_status(self, **fields) -> None:
        cur = self.read_status() if self.status.is_file() else {}
        cur.update(fields)
        write_json(self.status, cur)

    def load_config(self) -> RunConfig:
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.root} has no config.yaml: not a pmp run directory")
        return config_from_dict(yaml.safe_load(self.config.read_text())).validate()


# What a run writes before run.json exists (initialize_run writes config.yaml, then run.json): a directory holding
# only these was interrupted before it started.
_BEFORE_START = {".pmp.lock", "config.yaml"}


def open_run(out: str | Path, cfg: RunConfig, resume: bool) -> RunDir:
    """Check that `out` may take a fresh run (or is the same run, when resuming); writes nothing.

    Refuses a directory that holds anything else -- another run or unrelated files -- so nothing the user has is
    ever overwritten. Call `initialize_run` once the inputs have loaded, so bad input leaves no half-made run. A run
    interrupted before run.json was written (only its config.yaml exists) is resumed with --resume."""
    run = RunDir(Path(out))
    if run.root.exists() and not run.root.is_dir():
        raise FileExistsError(f"--out {run.root} exists and is not a directory")
    entries = {p.name for p in run.root.iterdir()} if run.root.is_dir() else set()
    entries = {e for e in entries if not (e.startswith(".") and e.endswith((".tmp", ".old")))}
    started = run.is_run() or (run.config.is_file() and entries <= _BEFORE_START)
    if resume:
        if not started:
            raise FileNotFoundError(f"--resume: {run.root} holds no pmp run to resume (no run.json)")
        diff = config_difference(run, cfg)
        if diff:
            raise ValueError(f"--resume: the config differs from the one {run.root} was started with ({diff}); "
                             "resume without a config (or with the same one) or start a new --out directory")
        return run
    if started and not run.is_run():
        raise FileExistsError(f"--out {run.root} holds a run interrupted before it started (config.yaml, no run.json);"
                              f" continue it with `pmp pretrain --out {run.root} --resume`")
    if run.is_run():
        raise FileExistsError(f"--out {run.root} already holds a pmp run; pass --resume to continue it, or "
                              "choose a new directory")
    if entries - {".pmp.lock"}:
        raise FileExistsError(f"--out {run.root} is not empty; choose a new or empty directory")
    return run


# Settings that say how a run is watched and kept, not what it trains: they may differ between a run and a config
# that would reproduce it.
BOOKKEEPING = {"train": ("progress", "tensorboard", "log_every", "eval_every", "eval_batches", "ckpt_every",
                         "keep_last", "snapshot_every", "threads", "skip_nonfinite_batches",
                         "parallel")}


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
    """Create the run directory with its config, then its status (fresh runs and runs interrupted before run.json)."""
    run.root.mkdir(parents=True, exist_ok=True)
    write_text(run.config, dump_yaml(cfg))
    run.write_status(status="running", method=cfg.train.method, step=0, started_with=provenance())


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


def open_private_run(path: str | Path, flag: str = "--private", need_mask: bool = True) -> RunDir:
    """The owner's private run directory named by `flag` (with private/mask.* when `need_mask`), or a clear error
    that says what was passed instead -- a release is the common mix-up."""
    run = RunDir(Path(path))
    p = run.root
    if not p.is_dir():
        raise FileNotFoundError(f"{flag} {p}: private run directory does not exist (pass the --out of `pmp pretrain`)")
    if not run.is_run() and (p / "config.json").is_file():
        raise ValueError(f"{flag} {p} is a release, not a private run directory: pass the owner's run dir with "
                         "private/mask.* (the parent of final/)")
    if not run.is_run() and not (need_mask and run.has_mask()):
        raise FileNotFoundError(f"{flag} {p} is not a pmp run directory (no run.json): pass the --out of "
                                "`pmp pretrain`")
    if need_mask and not run.has_mask():
        raise ValueError(f"{flag} {p} is not a private PMP run directory: private/mask.json is missing (dense runs "
                         "have no mask; this needs a method=pmp run)")
    return run


def complement_share(weights: Mapping[str, torch.Tensor], mask: PrivateMask, run: RunDir,
                     storage_dtype: torch.dtype = torch.float32) -> float | None:
    """Share of the mask's complement entries of `weights` that equal the run's complement reference -- its
    initial weights times the recorded scale (pmp/complement.py: 1 for pmp.complement=frozen), or under
    pmp.rewind=false the weights at identification (RunDir.complement_weights) -- rounded to the
    release's `storage_dtype`, so bf16 releases compare exactly; None when the run kept no initial weights, or
    trained every entry (pmp.variant trap / illcond: there is no complement reference to compare)."""
    if trains_every_entry(run):
        return None
    if run.complement_weights.is_file():  # pmp.rewind=false: the weights at identification, as stored
        reference, scale = run.complement_weights, 1.0
    elif run.init_weights.is_file():
        reference, scale = run.init_weights, run.complement_plan().scale
    else:
        return None
    same = total = 0
    with safe_open(str(reference), "pt") as f:
        keys = set(f.keys())
        for n, lay in mask.layouts.items():
            if n not in weights or n not in keys:
                continue
            w0 = f.get_tensor(n)
            if w0.shape != weights[n].shape:
                raise ValueError(f"{run.root}: reference weight {n} has shape {tuple(w0.shape)}, the release's "
                                 f"{tuple(weights[n].shape)}: the run does not belong to this release")
            keep = ~lay.to_bool()
            w0 = scaled(w0, ~keep, scale)
            if storage_dtype != torch.float32:
                w0 = w0.to(storage_dtype).float()
            same += int((weights[n].detach()[keep] == w0[keep]).sum())
            total += int(keep.sum())
    return same / total if total else None


def trains_every_entry(run: RunDir) -> bool:
    """Did this PMP run train its complement too (pmp.variant trap or illcond)?"""
    if not run.config.is_file():
        return False
    cfg = run.load_config()
    return cfg.train.method == "pmp" and cfg.pmp.variant != "none"


def check_complement(weights: Mapping[str, torch.Tensor], mask: PrivateMask, run: RunDir, release: str | Path,
                     storage_dtype: torch.dtype = torch.float32) -> None:
    """Refuse a release that is not the one `run` trained: its complement must still equal the run's reference
    (the init, or under pmp.complement=project the init times the recorded scale)."""
    share = complement_share(weights, mask, run, storage_dtype)
    if share is not None and share < COMPLEMENT_MIN_SHARE:
        what = ("weights at identification (pmp.rewind=false)" if run.complement_weights.is_file() else
                "initial weights" if run.complement_plan().scale == 1.0 else "projected initial weights")
        raise ValueError(f"the release {release} does not belong to the private run {run.root}: only {share:.1%} of "
                         f"the mask's complement equals the run's {what} (a PMP release keeps 100%)")


def _init_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of the initial weights (deterministic for equal tensors)."""
    return save({k: v.detach().contiguous().cpu() for k, v in state.items()})
