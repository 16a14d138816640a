"""The trainer, top to bottom: data -> model with a secret init -> [dense warm-up + mask identification ->
rewind] -> (masked) training -> final private model.

method=dense trains every parameter for `train.steps` steps. method=pmp spends the first steps as a dense
warm-up that identifies the private mask (pmp/identify.py), rewinds every weight to its initial value, and
trains only the masked entries for the remaining steps (pmp/masked_state.py). Both see the same batch at the
same step when they share `train.data_seed`, so they can be compared at equal budget.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pmp.atomic import atomic_dir, atomic_file, owner_only, remove_leftovers
from pmp.config import RunConfig
from pmp.data.blocks import BatchStream, eval_batches, token_blocks
from pmp.data.corpus import load_documents, split_documents
from pmp.dir_lock import LOCK_FILE, exclusive
from pmp.identify import MaskIdentifier
from pmp.mask import PrivateMask
from pmp.masked_optim import MaskedAdamW
from pmp.masked_state import MaskedModel
from pmp.model import build_model, count_parameters, draw_init_seed, hf_config
from pmp.run_dir import RunDir, initialize_run, open_run
from pmp.schedule import lr_at
from pmp.step_dir import list_step_dirs
from pmp.tokenizer import get_tokenizer
from pmp.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_snapshot,
    set_rng_state,
)
from pmp.train.logger import RunLogger, memory_mb
from pmp.weight_decay import param_groups

MAX_SKIPS_IN_A_ROW = 10  # with train.skip_nonfinite_batches: more non-finite batches in a row stop the run


class NonFiniteLoss(ValueError):
    """The training loss or gradient norm became NaN / inf."""


def pretrain(cfg: RunConfig, out: str | Path, resume: bool = False) -> RunDir:
    """Library entry point of `pmp pretrain`: train (or resume) the run in `out`; returns its RunDir.

    The config and the directory are checked before anything is written; the run directory is then held by one
    writer (pmp/dir_lock.py) and everything in it is created owner-only."""
    cfg.validate()
    out = Path(out)
    open_run(out, cfg, resume)  # refuse early, before the lock creates the directory
    created = not out.exists()
    try:
        with owner_only(), exclusive(out, "run directory"):
            remove_leftovers(out)
            trainer = Trainer(cfg, out, resume)
            try:
                trainer.train()
            finally:
                trainer.log.close()  # also when training stops with an error
            return trainer.run
    except BaseException:
        if created and {p.name for p in out.iterdir()} <= {LOCK_FILE}:  # failed before writing anything
            shutil.rmtree(out, ignore_errors=True)
        raise


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available; use cpu or auto")
    return dev


def masked_scope(model: torch.nn.Module, scope: str) -> list[str]:
    """Names of the parameters that get a mask: all of them, every >= 2-D tensor, or only 2-D nn.Linear weights.
    Parameters outside the scope train densely in the masked phase."""
    if scope == "all":
        return [n for n, _ in model.named_parameters()]
    if scope == "matrices":
        return [n for n, p in model.named_parameters() if p.dim() >= 2]
    linear = {f"{mn}.weight" for mn, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [n for n, p in model.named_parameters() if n in linear and p.dim() == 2]


class Trainer:
    def __init__(self, cfg: RunConfig, out: Path, resume: bool):
        self.cfg, t = cfg, cfg.train
        self.device = resolve_device(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        self.run = open_run(out, cfg, resume)  # again, under the lock
        self.tokenizer, self.train_blocks, self.val_blocks = self._load_data(resume)
        if not self.run.is_run():  # fresh, or interrupted before run.json was written
            initialize_run(self.run, cfg)
        if not self.run.tokenizer.is_dir():
            with atomic_dir(self.run.tokenizer, overwrite=True) as tmp:
                self.tokenizer.save_pretrained(str(tmp))

        self.stream = BatchStream(self.train_blocks, t.batch_size, t.data_seed)
        self.hf_cfg = hf_config(cfg.model, len(self.tokenizer), self.tokenizer.bos_token_id,
                                self.tokenizer.eos_token_id, cfg.data.seq_len)
        self.init_state = self._initial_weights(resume)
        self.model = build_model(self.hf_cfg, 0)
        self.model.load_state_dict(self.init_state)
        self.model.to(self.device)

        self.step = 0
        self.phase = "dense" if t.method == "dense" else "identify"
        self.identifier: MaskIdentifier | None = None
        self.masked: MaskedModel | None = None
        self.mask: PrivateMask | None = None
        self.phase_start = 0  # first step of the current lr schedule
        self.optimizer = self._dense_optimizer()
        if self.phase == "identify":
            self.identifier = self._new_identifier()
        ckpts = list_step_dirs(self.run.checkpoints)
        if resume and ckpts:
            self._restore(ckpts[-1])
        elif resume:
            print(f"[pmp] --resume: no checkpoint in {self.run.checkpoints} yet; starting from step 0")
            _truncate_metrics(self.run.metrics, -1)  # all of it will be produced again
        self.log = RunLogger(self.run.metrics, t.steps, self.step, t.progress,
                             self.run.root / "tb" if t.tensorboard else None)

    # ------------------------------------------------------------------------------------------ set-up
    def _load_data(self, resume: bool):
        d = self.cfg.data
        docs = load_documents(d)
        train_docs, val_docs = split_documents(docs, d.val_fraction)
        if resume and self.run.tokenizer.is_dir():
            tok = AutoTokenizer.from_pretrained(str(self.run.tokenizer))
        else:
            tok = get_tokenizer(self.cfg.tokenizer, train_docs, d.cache_dir)
        train_blocks = token_blocks(tok, train_docs, d.seq_len, d.cache_dir, tag="train")
        val_blocks = token_blocks(tok, val_docs, d.seq_len, d.cache_dir, tag="val")
        return tok, train_blocks, val_blocks

    def _initial_weights(self, resume: bool) -> dict[str, torch.Tensor]:
        """The secret initial weights: re-read and verified, rebuilt from the recorded seed, or drawn fresh -- never
        redrawn for a run that already trained from them (its complement would stop matching)."""
        run = self.run
        if run.init_record.is_file():
            if run.init_weights.is_file():
                return run.load_init()
            seed = int(json.loads(run.init_record.read_text())["seed"])
            state = {k: v.detach().clone() for k, v in build_model(self.hf_cfg, seed).state_dict().items()}
            run.restore_init(state)
            print(f"[pmp] rebuilt {run.init_weights} from the recorded seed (sha256 verified)")
            return state
        if run.init_weights.is_file() or (resume and run.has_trained()):
            raise ValueError(f"{run.root}: the record of the initial weights' seed ({run.init_record}) is missing but "
                             "the run already trained from them; restore private/init.json (and init.safetensors) "
                             "from a backup -- a new init would not match the frozen complement")
        seed = draw_init_seed(self.cfg.model.init_seed)
        model = build_model(self.hf_cfg, seed)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.run.save_init(state, seed, pinned=self.cfg.model.init_seed is not None,
                           parameters=count_parameters(model))
        return state

    def _dense_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        groups = param_groups([p for p in self.model.parameters() if p.requires_grad], t.weight_decay)
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)

    def _masked_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        return MaskedAdamW(self.masked, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)

    def _new_identifier(self) -> MaskIdentifier:
        named = dict(self.model.named_parameters())
        scope = masked_scope(self.model, self.cfg.pmp.scope)
        return MaskIdentifier({n: named[n] for n in scope}, self.cfg.pmp,
                              block_names=set(masked_scope(self.model, "linear")) & set(scope))

    # ------------------------------------------------------------------------------------------ phases
    def _finish_identification(self, rec: dict) -> None:
        """Freeze the mask, save it privately, rewind, and switch to masked training."""
        p = self.cfg.pmp
        meta = {"density": p.density, "scope": p.scope, "selection": p.selection, "scorer": p.scorer,
                "block_size": p.block_size,
                "ema_beta": p.ema_beta, "identification_step": self.step, "reason": rec["reason"]}
        blocks = {n: p.block_size for n in self.identifier.block_names}
        self.mask = PrivateMask.from_bool(self.identifier.current_mask(), meta, block_sizes=blocks)
        self.mask.save(self.run.private)
        with atomic_file(self.run.identification, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.identifier.history)
        checks = sum(1 for r in self.identifier.history if r.get("checked"))
        iou = f"last IoU {rec['iou']:.4f}" if checks >= 2 else f"{checks} mask check(s): no IoU to compare yet"
        self.log.echo(f"[pmp] mask identified at step {self.step} ({rec['reason']}, {iou}): "
                      f"{self.mask.nnz:,} of {self.mask.total:,} entries ({self.mask.density():.4f})")
        by_kind = self.mask.density_by_kind()
        self.log.echo("[pmp] mask density by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in by_kind.items()))
        self.log.log({"step": self.step, "phase": "identify", "mask_density_by_kind": by_kind})
        if p.rewind:
            self.model.load_state_dict(self.init_state)
        self.identifier = None
        self._enter_masked_phase(self.step)

    def _enter_masked_phase(self, start: int) -> None:
        # fp32 weights are their own master: no compact copy of the masked values (pmp/masked_state.py)
        self.masked = MaskedModel(self.model, self.mask.layouts, master=False)
        self.optimizer = self._masked_optimizer()
        self.phase, self.phase_start = "masked", start

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> None:
        t = self.cfg.train
        self.log.echo(f"[pmp] {t.method} run in {self.run.root}: {count_parameters(self.model):,} parameters, "
                      f"{len(self.train_blocks):,} train / {len(self.val_blocks):,} val blocks of "
                      f"{self.cfg.data.seq_len} tokens, device {self.device}")
        if self.step == 0:
            self._evaluate()
        window_loss, window_steps, t0, toks = 0.0, 0, time.perf_counter(), 0
        while self.step < t.steps:
            lr = lr_at(self.step, self.phase_start, t.steps, t.lr, t.warmup_steps, t.min_lr_ratio)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            loss = self._forward_backward()
            if not math.isfinite(loss):
                self._non_finite("loss", loss)  # raises, or skips this batch with train.skip_nonfinite_batches
                continue
            self.skipped_in_a_row = 0
            rec = self.identifier.observe(self.step + 1) if self.phase == "identify" else None
            step_phase = self.phase
            grad_norm = self._clip()
            if not math.isfinite(grad_norm):
                self._non_finite("gradient norm", grad_norm, skippable=False)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.masked is not None:
                self.masked.sync_()
            self.step += 1
            self.log.advance()
            window_loss, window_steps = window_loss + loss, window_steps + 1
            toks += t.batch_size * t.grad_accum * self.cfg.data.seq_len
            if rec is not None:
                if rec["checked"]:
                    self.log.log({"step": self.step, "phase": "identify", "iou": rec["iou"],
                                  "stable_steps": rec["stable_steps"]})
                if rec["done"]:
                    self._finish_identification(rec)
            if self.step % t.log_every == 0 or self.step == t.steps:
                dt = time.perf_counter() - t0
                row = {"step": self.step, "phase": step_phase, "loss": window_loss / window_steps, "lr": lr,
                       "grad_norm": grad_norm, "tokens_per_s": toks / dt, "mem_mb": memory_mb(self.device)}
                self.log.log(row, f"step {self.step:6d} | {step_phase:8s} | loss {row['loss']:.4f} | lr {lr:.2e} | "
                                  f"{row['tokens_per_s']:8.0f} tok/s | mem {row['mem_mb']:.0f} MB")
                window_loss, window_steps, t0, toks = 0.0, 0, time.perf_counter(), 0
            if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                self._evaluate()
            if t.snapshot_every and self.step % t.snapshot_every == 0 and self.step < t.steps:
                save_snapshot(self.run.snapshots, self.step, self.model.state_dict())
            if (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.steps:
                self._save_checkpoint()
        self._finish()

    def _non_finite(self, what: str, value: float, skippable: bool = True) -> None:
        """Stop with an error that names the step (the last checkpoint stays valid), or skip the batch."""
        t = self.cfg.train
        self.skipped_in_a_row = getattr(self, "skipped_in_a_row", 0) + 1
        if skippable and t.skip_nonfinite_batches and self.skipped_in_a_row <= MAX_SKIPS_IN_A_ROW:
            self.optimizer.zero_grad(set_to_none=True)
            self.log.log({"step": self.step, "phase": self.phase, "skipped_batch": what, "value": str(value)},
                         f"step {self.step:6d} | skipped a batch: {what} is {value}")
            return
        if self.skipped_in_a_row > MAX_SKIPS_IN_A_ROW:
            what = f"{what} of {self.skipped_in_a_row} batches in a row (the weights themselves may be broken)"
        raise NonFiniteLoss(f"the training {what} is {value} at step {self.step + 1} ({self.phase} phase, lr "
                            f"{self.optimizer.param_groups[0]['lr']:.3g}): lower train.lr or check the data"
                            + ("; train.skip_nonfinite_batches=true skips such batches" if skippable else "")
                            + f"; `pmp pretrain --out {self.run.root} --resume` continues from the last checkpoint")

    def _forward_backward(self) -> float:
        t, total = self.cfg.train, 0.0
        for _ in range(t.grad_accum):
            batch = self.stream.next_batch().to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16()):
                loss = self.model(input_ids=batch, labels=batch).loss
            (loss / t.grad_accum).backward()
            total += loss.item() / t.grad_accum
        return total

    def _bf16(self) -> bool:
        return self.cfg.train.bf16 and self.device.type == "cuda"

    def _clip(self) -> float:
        params = self.masked.trainable_parameters() if self.masked else list(self.model.parameters())
        params = [p for p in params if p.grad is not None]
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        return float(norm)

    @torch.no_grad()
    def _evaluate(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for batch in eval_batches(self.val_blocks, self.cfg.train.batch_size, self.cfg.train.eval_batches):
            batch = batch.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16()):
                loss = float(self.model(input_ids=batch, labels=batch).loss)
            total, count = total + loss * len(batch), count + len(batch)  # the last batch may be smaller
        self.model.train()
        val = total / max(count, 1)
        self.log.log({"step": self.step, "phase": self.phase, "val_loss": val, "val_ppl": math.exp(val)},
                     f"step {self.step:6d} | {self.phase:8s} | held-out loss {val:.4f} | "
                     f"perplexity {math.exp(val):.2f}")
        self.last_val = val
        return val

    # ------------------------------------------------------------------------------------------ persistence
    def _save_checkpoint(self) -> None:
        state = {"step": self.step, "phase": self.phase, "phase_start": self.phase_start,
                 "optimizer": self.optimizer.state_dict(), "stream": self.stream.state_dict(), "rng": rng_state()}
        if self.identifier is not None:
            state["identifier"] = self.identifier.state_dict()
        if self.masked is not None:
            state["mask_sha256"] = self.mask.fingerprint()
            state["mask_words"] = {n: lay.packed_bytes().cpu() for n, lay in self.mask.layouts.items()}
        save_checkpoint(self.run.checkpoints, self.step, self.model.state_dict(), state, self.cfg.train.keep_last)
        self.run.write_status(step=self.step, phase=self.phase)

    def _restore(self, path: Path) -> None:
        step, model_state, state = load_checkpoint(path)
        self.model.load_state_dict(model_state)
        self.step, self.phase_start = step, state["phase_start"]
        if state["phase"] == "identify":
            self.identifier.load_state_dict(state["identifier"])
        elif state["phase"] == "masked":
            self.identifier = None
            self.mask = PrivateMask.load(self.run.private)
            if self.mask.fingerprint() != state["mask_sha256"]:
                raise ValueError(f"checkpoint {path} was trained with a different mask than {self.run.private}: "
                                 "refusing to resume (restore the run's own private/mask.* files)")
            self._enter_masked_phase(self.phase_start)
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        self.phase = state["phase"]
        _truncate_metrics(self.run.metrics, step)
        print(f"[pmp] resumed {self.run.root} at step {step} ({self.phase})")

    def _finish(self) -> None:
        if not hasattr(self, "last_val"):  # resumed a run that had already reached its last step
            logged = self.run.val_loss_by_step().get(self.step)
            self.last_val = logged if logged is not None else self._evaluate()
        model = self.masked.detach() if self.masked is not None else self.model
        with atomic_dir(self.run.final, overwrite=True) as tmp:
            model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
        self.run.write_status(status="finished", step=self.step, phase=self.phase,
                              final_val_loss=self.last_val, final_val_ppl=math.exp(self.last_val))
        self.log.echo(f"[pmp] finished: held-out perplexity {math.exp(self.last_val):.2f}; final private model in "
                      f"{self.run.final}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (they will be produced again)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with atomic_file(path, "w") as f:
        f.write("".join(ln + "\n" for ln in keep))

