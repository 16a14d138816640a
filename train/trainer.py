"""The trainer, top to bottom: data -> model with a secret init -> [dense warm-up + mask identification ->
rewind] -> (masked) training -> final private model.

(Over 400 lines on purpose: the phases and their checkpointing read top to bottom in one file, the way a user
audits what a run did; the engines, the distributed plumbing and the state formats live in their own modules.)

method=dense trains every parameter for `train.steps` steps. method=pmp spends the first steps as a dense
warm-up that identifies the private mask (pmp/identify.py), rewinds every weight to its initial value (with
pmp.complement=project the complement is then scaled nearly to zero, pmp/complement.py), and trains only the masked
entries for the remaining steps (pmp/masked_state.py). Both see the same batch at the
same step when they share `train.data_seed`, so they can be compared at equal budget.

Under torchrun the same recipe runs data-parallel (`train.parallel`, train/distributed.py, docs/distributed.md):
each rank trains on its slice of the same global batch (pmp/data/blocks.py `RankBatches`); PyTorch's DDP
(train/parallel.py) or FSDP2 (train/fsdp.py) reduces the gradients, so identification scores the global gradient
and every rank selects the same mask (checked by fingerprint at the switch). Rank 0 alone writes the run
directory, whose layout is that of a one-process run; FSDP checkpoints add their sharded state (dcp/).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import secrets
import shutil
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from pmp.atomic import atomic_dir, atomic_file, owner_only, remove_leftovers
from pmp.complement import ComplementPlan, scaled
from pmp.config import RunConfig
from pmp.data.blocks import BatchStream, RankBatches, eval_slices
from pmp.dir_lock import LOCK_FILE, exclusive
from pmp.identify import MaskIdentifier, full_tensor, shaped_like
from pmp.mask import PrivateMask
from pmp.masked_optim import MaskedAdamW
from pmp.masked_state import MaskedModel
from pmp.model import build_model, count_parameters
from pmp.provenance import provenance
from pmp.run_dir import RunDir, open_run
from pmp.schedule import lr_at
from pmp.step_dir import list_step_dirs
from pmp.train.checkpoint import (
    is_sharded,
    load_checkpoint,
    load_sharded,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    save_snapshot,
    set_rng_state,
)
from pmp.train.distributed import DistContext, process_group, resolve_device, resolve_parallel
from pmp.train.fsdp import ShardedMaskedAdamW, copy_full_, gather_state_dict, local, own_part, shard_model
from pmp.train.illcond import IllCond, channel_mask, draw_key, key_of, key_seed
from pmp.train.logger import RunLogger, memory_mb
from pmp.train.optim_state import (
    MOMENTS,
    adamw_named_state,
    load_adamw_named_state,
    load_named_into,
    named_from_indexed,
    optimizer_param_names,
)
from pmp.train.parallel import release, wrap_dense, wrap_masked
from pmp.train.run_setup import follow_run, prepare_run
from pmp.train.trap import Trap, hold_out
from pmp.weight_decay import param_groups

MAX_SKIPS_IN_A_ROW = 10  # with train.skip_nonfinite_batches: more non-finite batches in a row stop the run


class NonFiniteLoss(ValueError):
    """The training loss or gradient norm became NaN / inf."""


def pretrain(cfg: RunConfig, out: str | Path, resume: bool = False) -> RunDir:
    """Library entry point of `pmp pretrain`: train (or resume) the run in `out`; returns its RunDir.

    The config and the directory are checked before anything is written; the run directory is then held by one
    writer (pmp/dir_lock.py; rank 0 of a data-parallel job) and everything in it is created owner-only."""
    cfg.validate()
    out = Path(out)
    with process_group(cfg.train) as ctx, ExitStack() as held:
        created = False

        def claim() -> None:  # rank 0 (or the only process)
            nonlocal created
            open_run(out, cfg, resume)  # refuse early, before the lock creates the directory
            created = not out.exists()
            held.enter_context(exclusive(out, "run directory"))
            remove_leftovers(out)

        held.enter_context(owner_only())
        trainer = None
        try:
            ctx.main_first(claim)  # a refusal on rank 0 stops every rank with its message
            trainer = Trainer(cfg, out, resume, ctx)
            try:
                trainer.train()
            finally:
                trainer.log.close()  # also when training stops with an error
            return trainer.run
        except BaseException:
            if created and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_FILE}:  # failed before writing
                shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            # Free what holds the process group (DDP's reducer) before the group is torn down: a DDP reducer
            # destroyed after destroy_process_group() hung at exit (gloo, about 1 run in 5).
            if trainer is not None:
                release(trainer.net)
                trainer.net = None
            del trainer
            gc.collect()


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
    def __init__(self, cfg: RunConfig, out: Path, resume: bool, ctx: DistContext | None = None):
        self.cfg, t = cfg, cfg.train
        self.ctx = ctx or DistContext(device=resolve_device(t.device))
        self.device = self.ctx.device
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        # bad batch / mode for this number of ranks: refused on every rank before anything is written
        self.batches = RankBatches.plan(t.batch_size, t.grad_accum, self.ctx.rank, self.ctx.world)
        resolve_parallel(t.parallel, self.ctx.world, 0)
        self.variant = cfg.pmp.variant if t.method == "pmp" else "none"  # a dense run never reads the pmp section
        if self.variant != "none" and self.ctx.distributed:
            raise ValueError(f"pmp.variant={self.variant} runs in one process for now (its extra passes are not "
                             "data-parallel): run it without torchrun, or use pmp.variant=none")
        # rank 0 checks the directory again, under the lock; the others only read what rank 0 writes
        self.run = open_run(out, cfg, resume) if self.ctx.is_main else RunDir(Path(out))
        prepared = {}

        def prepare() -> dict:  # rank 0: data, tokenizer, run directory, initial weights
            prepared["inputs"], shared = prepare_run(cfg, self.run, resume)
            return shared

        shared = self.ctx.main_first(prepare)
        inputs = prepared["inputs"] if self.ctx.is_main else follow_run(cfg, self.run, shared, self.ctx.rank)
        self.tokenizer, self.train_blocks, self.val_blocks = inputs.tokenizer, inputs.train_blocks, inputs.val_blocks
        self.hf_cfg, self.init_state = inputs.hf_cfg, inputs.init_state
        self.ctx.agree("token blocks", shared["digest"], "every rank must read the same tokenized corpus")
        self.ctx.agree("initial weights", json.loads(self.run.init_record.read_text())["sha256"],
                       "every rank must read the run directory rank 0 writes")

        blocks, sim_blocks = self.train_blocks, None
        if self.variant == "trap":  # D_sim: the last training blocks, never in the batch stream (train/trap.py)
            blocks, sim_blocks = hold_out(blocks, cfg.pmp.trap_holdout, t.batch_size)
        self.stream = BatchStream(blocks, t.batch_size, t.data_seed)
        self.model = build_model(self.hf_cfg, 0)
        self.model.load_state_dict(self.init_state)
        self.model.to(self.device)
        self.mode = resolve_parallel(t.parallel, self.ctx.world, count_parameters(self.model))
        if self.mode == "fsdp":  # shard in place; keep only this rank's part of the initial weights (for rewind)
            shard_model(self.model, self.device)
            named = dict(self.model.named_parameters())
            self.init_state = {n: own_part(v, named[n]) if n in named else v for n, v in self.init_state.items()}
        self.net: torch.nn.Module | None = None  # what the training forward calls: the model or its DDP wrapper

        self.step = 0
        self.phase = "dense" if t.method == "dense" or self.variant == "illcond" else "identify"
        self.identifier: MaskIdentifier | None = None
        self.masked: MaskedModel | None = None
        self.mask: PrivateMask | None = None
        self.phase_start = 0  # first step of the current lr schedule
        self.optimizer = self._dense_optimizer()
        if self.phase == "identify":
            self.identifier = self._new_identifier()
        self.trap = self.illcond = None
        self._key_masks: dict[str, torch.Tensor] | None = None
        if self.variant == "trap":
            self.trap = Trap(cfg.pmp, sim_blocks, t.batch_size, t.data_seed, t.steps, self._autocast)
        if self.variant == "illcond":
            self._set_channel_key(resume)
        ckpt = self.ctx.main_first(lambda: _latest(self.run.checkpoints) if resume else None)
        if ckpt is not None:
            self._restore(Path(ckpt))
        elif resume and self.ctx.is_main:
            print(f"[pmp] --resume: no checkpoint in {self.run.checkpoints} yet; starting from step 0")
            _truncate_metrics(self.run.metrics, -1)  # all of it will be produced again
        if self.net is None:
            self.net = wrap_dense(self.model) if self.mode == "ddp" else self.model
        self.log = RunLogger(self.run.metrics, t.steps, self.step, t.progress,
                             self.run.root / "tb" if t.tensorboard else None, active=self.ctx.is_main)

    # ------------------------------------------------------------------------------------------ set-up
    def _dense_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        groups = param_groups([p for p in self.model.parameters() if p.requires_grad], t.weight_decay)
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)

    def _masked_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        hyper = {"lr": t.lr, "betas": (t.beta1, t.beta2), "eps": t.eps, "weight_decay": t.weight_decay}
        if self.mode == "fsdp":  # compaction inside the optimizer, on each rank's shard (train/fsdp.py)
            return ShardedMaskedAdamW(self.model, self.mask, **hyper)
        return MaskedAdamW(self.masked, **hyper)

    def _set_channel_key(self, resume: bool) -> None:
        """pmp.variant=illcond: the run's secret channel mask, drawn once from the run's secret init seed (OS entropy
        unless pinned: a pinned seed reproduces the key, and makes it as public as the init) and saved before
        training (a resume reads it back: owner secrets are never redrawn), and the regulariser keyed by it."""
        p = self.cfg.pmp
        if resume and self.run.has_mask():
            self.mask = PrivateMask.load(self.run.private)
            self.mask.check_matches(self.model)
        else:
            key = draw_key(self.model, masked_scope(self.model, "linear"), p.density, key_seed(self.run.init_seed()))
            meta = {"density": p.density, "scope": "linear", "selection": "input_channels", "scorer": "random",
                    "variant": "illcond", "identification_step": 0}
            self.mask = channel_mask(self.model, key, meta)
            self.ctx.main_first(lambda: self.mask.save(self.run.private))
        self.illcond = IllCond(self.model, key_of(self.mask), p.illcond_ill_weight, p.illcond_well_weight)

    def _new_identifier(self) -> MaskIdentifier:
        named = dict(self.model.named_parameters())
        scope = masked_scope(self.model, self.cfg.pmp.scope)
        return MaskIdentifier({n: named[n] for n in scope}, self.cfg.pmp,
                              block_names=set(masked_scope(self.model, "linear")) & set(scope),
                              random_seed=self.ctx.broadcast(secrets.randbits(63)))

    # ------------------------------------------------------------------------------------------ phases
    def _finish_identification(self, rec: dict) -> None:
        """Freeze the mask, check that every rank holds it, save it privately, rewind, and switch to masked
        training."""
        p = self.cfg.pmp
        meta = {"density": p.density, "scope": p.scope, "selection": p.selection, "scorer": p.scorer,
                "block_size": p.block_size,
                "ema_beta": p.ema_beta, "identification_step": self.step, "reason": rec["reason"]}
        blocks = {n: p.block_size for n in self.identifier.block_names}
        self.mask = PrivateMask.from_bool(self.identifier.current_mask(), meta, block_sizes=blocks)
        self.ctx.agree("masks", self.mask.fingerprint(),
                       "identification scores the reduced gradient, so this means the ranks' gradients or scores "
                       "differed")
        self.ctx.main_first(self._save_mask)
        checks = sum(1 for r in self.identifier.history if r.get("checked"))
        iou = f"last IoU {rec['iou']:.4f}" if checks >= 2 else f"{checks} mask check(s): no IoU to compare yet"
        self.log.echo(f"[pmp] mask identified at step {self.step} ({rec['reason']}, {iou}): "
                      f"{self.mask.nnz:,} of {self.mask.total:,} entries ({self.mask.density():.4f})")
        by_kind = self.mask.density_by_kind()
        self.log.echo("[pmp] mask density by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in by_kind.items()))
        self.log.log({"step": self.step, "phase": "identify", "mask_density_by_kind": by_kind})
        if self.variant == "trap":  # nothing is rewound or frozen: dense training goes on, keyed by the mask
            self.identifier, self.phase = None, "dense"
            return
        plan = self.ctx.main_first(self._plan_complement)  # rank 0 decides (and records) it for every rank
        if p.rewind:  # pmp.complement=project needs it (config check)
            self._load_weights(self.init_state)
            self._project_complement_(plan)
        else:  # the complement stays at today's values, which no init reproduces: record them (private)
            self._save_complement_weights()
        if plan.mode != "frozen":
            self.log.echo(f"[pmp] {plan.summary()}")
        self.identifier = None
        self._enter_masked_phase(self.step)

    def _plan_complement(self) -> ComplementPlan:
        """Rank 0: what the masked phase holds the complement at (pmp/complement.py), from the whole initial weights
        (FSDP keeps only each rank's part in memory: they are read again), recorded in RUN/private."""
        p = self.cfg.pmp
        if p.complement == "frozen":
            plan = ComplementPlan("frozen")
        else:
            init = self.run.load_init() if self.mode == "fsdp" else self.init_state
            plan = ComplementPlan.plan(p.complement, p.complement_radius, init, self.mask)
        plan.save(self.run.private)
        return plan

    @torch.no_grad()
    def _project_complement_(self, plan: ComplementPlan) -> None:
        """Scale the complement in place (this rank's shards under FSDP; a tied weight once): the same elementwise
        fp32 product as `ComplementPlan.apply`, which the release checks recompute on CPU."""
        if plan.scale == 1.0:
            return
        masks = self.mask.to_bool()
        for name, prm in self.model.named_parameters():
            if name in masks:
                w = local(prm)
                w.copy_(scaled(w, local(shaped_like(masks[name], prm)), plan.scale))

    def _save_complement_weights(self) -> None:
        """pmp.rewind=false: the masked tensors as the masked phase begins (a collective under FSDP; rank 0
        writes), the reference the release checks compare the complement with (pmp.run_dir.complement_share)."""
        whole = self._whole_state_dict()
        if self.ctx.is_main:
            self.run.save_complement_weights(whole, self.mask)

    def _check_complement_record(self) -> None:
        """Resuming in the masked phase: the run's complement record must be the plan of this config (rank 0;
        rewritten when lost -- it is a function of the init and the mask -- refused when it disagrees)."""
        p = self.cfg.pmp
        expected = ComplementPlan("frozen") if p.complement == "frozen" else ComplementPlan.plan(
            p.complement, p.complement_radius, self.run.load_init(), self.mask)
        if not self.run.complement_record.is_file():
            if expected.mode != "frozen":
                expected.save(self.run.private)
                print(f"[pmp] rebuilt {self.run.complement_record} from the initial weights and the mask")
            return
        recorded = self.run.complement_plan()
        if (recorded.mode, recorded.scale) != (expected.mode, expected.scale):
            raise ValueError(f"{self.run.complement_record} records mode {recorded.mode} with scale "
                             f"{recorded.scale!r}, but this run's config and initial weights give {expected.mode} "
                             f"with scale {expected.scale!r}: restore the run's own private/ files")

    def _save_mask(self) -> None:
        self.mask.save(self.run.private)
        with atomic_file(self.run.identification, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.identifier.history)

    def _enter_masked_phase(self, start: int) -> None:
        if self.mode != "fsdp":  # FSDP keeps the stock model: its optimizer compacts on each shard
            # fp32 weights are their own master: no compact copy of the masked values (pmp/masked_state.py)
            self.masked = MaskedModel(self.model, self.mask.layouts, master=False)
        self.optimizer = self._masked_optimizer()
        if self.mode == "ddp":  # the trainable set changed: a new wrapper that reduces the compact gradients
            release(self.net)
            self.net = None
            self.net = wrap_masked(self.model, self.masked)
        else:
            self.net = self.model
        self.phase, self.phase_start = "masked", start

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> None:
        t = self.cfg.train
        ranks = f", {self.ctx.world} ranks ({self.mode})" if self.ctx.distributed else ""
        self.log.echo(f"[pmp] {t.method} run in {self.run.root}: {count_parameters(self.model):,} parameters, "
                      f"{len(self.train_blocks):,} train / {len(self.val_blocks):,} val blocks of "
                      f"{self.cfg.data.seq_len} tokens, device {self.device}{ranks}")
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
            if self.trap is not None and self.trap.active(self.step):
                self.trap.add_grads_(self.model, self._trap_masks(), self.step)
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
            toks += t.batch_size * t.grad_accum * self.cfg.data.seq_len  # the global batch, whatever the ranks
            if rec is not None:
                if rec["checked"]:
                    self.log.log({"step": self.step, "phase": "identify", "iou": rec["iou"],
                                  "stable_steps": rec["stable_steps"]})
                if rec["done"]:
                    self._finish_identification(rec)
            if self.step % t.log_every == 0 or self.step == t.steps:
                dt = time.perf_counter() - t0
                mem = self.ctx.max(memory_mb(self.device))
                row = {"step": self.step, "phase": step_phase, "loss": window_loss / window_steps, "lr": lr,
                       "grad_norm": grad_norm, "tokens_per_s": toks / dt, "mem_mb": mem}
                for extra in (self.trap, self.illcond):  # the variants' terms (absent without a variant)
                    row.update(extra.pop_window() if extra is not None else {})
                self.log.log(row, f"step {self.step:6d} | {step_phase:8s} | loss {row['loss']:.4f} | lr {lr:.2e} | "
                                  f"{row['tokens_per_s']:8.0f} tok/s | mem {row['mem_mb']:.0f} MB")
                window_loss, window_steps, t0, toks = 0.0, 0, time.perf_counter(), 0
            if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                self._evaluate()
            if t.snapshot_every and self.step % t.snapshot_every == 0 and self.step < t.steps:
                weights = self._whole_state_dict()
                self.ctx.main_first(lambda w=weights: save_snapshot(self.run.snapshots, self.step, w))
            if (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.steps:
                self._save_checkpoint()
        self._finish()

    def _non_finite(self, what: str, value: float, skippable: bool = True) -> None:
        """Stop with an error that names the step (the last checkpoint stays valid), or skip the batch. The loss
        and the gradient norm are global, so every rank takes the same decision."""
        t = self.cfg.train
        self.skipped_in_a_row = getattr(self, "skipped_in_a_row", 0) + 1
        if skippable and t.skip_nonfinite_batches and self.skipped_in_a_row <= MAX_SKIPS_IN_A_ROW:
            self.optimizer.zero_grad(set_to_none=True)
            self.log.log({"step": self.step, "phase": self.phase, "skipped_batch": what, "value": str(value)},
                         f"step {self.step:6d} | skipped a batch: {what} is {value}")
            return
        if self.skipped_in_a_row > MAX_SKIPS_IN_A_ROW:
            what = f"{what} of {self.skipped_in_a_row} batches in a row (the weights themselves may be broken)"
        self.ctx.stop_together()  # the loss and the norm are global: every rank stops here
        raise NonFiniteLoss(f"the training {what} is {value} at step {self.step + 1} ({self.phase} phase, lr "
                            f"{self.optimizer.param_groups[0]['lr']:.3g}): lower train.lr or check the data"
                            + ("; train.skip_nonfinite_batches=true skips such batches" if skippable else "")
                            + f"; `pmp pretrain --out {self.run.root} --resume` continues from the last checkpoint")

    def _forward_backward(self) -> float:
        """This rank's micro-batches of the global batch; returns the global mean loss. Each micro-batch loss is
        scaled by 1/accum here and DDP averages over ranks, so the gradient is that of the global mean (with one
        micro-batch per rank, bit-identical to one process accumulating the same micro-batches)."""
        micro = self.batches.step_indices(self.stream, self.cfg.train.grad_accum)
        total = 0.0
        for i, idx in enumerate(micro):
            # Randomness in the forward (dropout, e.g. GPT-2's) gets a stream per micro-batch, keyed by its place in
            # the global batch: ranks never share a stream, and 1, 2 or 4 ranks draw the same numbers.
            torch.manual_seed(_micro_batch_seed(self.cfg.train.data_seed, self.step, self.batches.offset(i)))
            batch = self.stream.take(idx).to(self.device)
            last = i == len(micro) - 1
            with nullcontext() if last or self.mode != "ddp" else self.net.no_sync():  # reduce once per step
                with self._autocast():
                    loss = self.net(input_ids=batch, labels=batch).loss
                # pmp.variant=illcond: its regulariser of this forward's layer inputs (the LM loss is what is logged)
                objective = loss if self.illcond is None else loss + self.illcond.penalty()
                (objective / len(micro)).backward()
            total += loss.item() / len(micro)
        return self.ctx.sum([total])[0] / self.ctx.world if self.ctx.distributed else total

    def _bf16(self) -> bool:
        return self.cfg.train.bf16 and self.device.type == "cuda"

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16())

    def _trap_masks(self) -> dict[str, torch.Tensor]:
        """The mask of every masked parameter, laid out like it (pmp.variant=trap's owner step)."""
        if self._key_masks is None:
            named = dict(self.model.named_parameters())
            self._key_masks = {n: shaped_like(m, named[n]) for n, m in self.mask.to_bool().items()}
        return self._key_masks

    def _clip(self) -> float:
        clip = self.cfg.train.grad_clip
        clip = clip if clip > 0 else math.inf
        if isinstance(self.optimizer, ShardedMaskedAdamW):  # the norm of what trains: masked entries, summed
            return self.optimizer.clip_grad_norm_(clip)
        params = self.masked.trainable_parameters() if self.masked else list(self.model.parameters())
        params = [p for p in params if p.grad is not None]
        return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)))

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Held-out loss; the ranks split the fixed held-out batches round-robin and sum (loss x count)."""
        self.model.eval()
        total, count = 0.0, 0
        t = self.cfg.train
        slices = eval_slices(len(self.val_blocks), t.batch_size, t.eval_batches)
        mine = slices[self.ctx.rank::self.ctx.world]
        if self.mode == "fsdp":  # every rank runs as many forwards (each one all-gathers): pad with ignored batches
            rounds = -(-len(slices) // self.ctx.world)
            mine = mine + [None] * (rounds - len(mine))
        with self.illcond.measure() if self.illcond is not None else nullcontext():
            for s in mine:
                batch = torch.from_numpy(self.val_blocks[s if s is not None else slices[0]].astype("int64"))
                batch = batch.to(self.device)
                with self._autocast():
                    loss = float(self.model(input_ids=batch, labels=batch).loss)
                if s is not None:
                    total, count = total + loss * len(batch), count + len(batch)  # the last batch may be smaller
        if self.ctx.distributed:
            total, count = self.ctx.sum([total, count])
        self.model.train()
        val = total / max(count, 1)
        row = {"step": self.step, "phase": self.phase, "val_loss": val, "val_ppl": math.exp(val)}
        kappa = self.illcond.kappa_metrics() if self.illcond is not None else {}
        self.log.log({**row, **kappa}, f"step {self.step:6d} | {self.phase:8s} | held-out loss {val:.4f} | "
                     f"perplexity {math.exp(val):.2f}"
                     + (f" | kappa(K_c)/kappa(K_m) {kappa['kappa_ratio']:.3g}" if kappa else ""))
        self.last_val = val
        return val

    # ------------------------------------------------------------------------------------------ persistence
    def _load_weights(self, state: dict[str, torch.Tensor]) -> None:
        if self.mode == "fsdp":
            copy_full_(self.model, state)  # each rank takes its shard
        else:
            self.model.load_state_dict(state)

    def _whole_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole state_dict where rank 0 writes it (FSDP gathers it: every rank must call this)."""
        return gather_state_dict(self.model) if self.mode == "fsdp" else self.model.state_dict()

    def _trainer_state(self) -> dict:
        state = {"step": self.step, "phase": self.phase, "phase_start": self.phase_start,
                 "stream": self.stream.state_dict(), "rng": rng_state()}
        if self.identifier is not None:
            state["identifier"] = self.identifier.state_dict()
        if self.mask is not None and self.phase != "masked":  # a variant's dense phase, keyed by the mask
            state["mask_sha256"] = self.mask.fingerprint()
        if self.phase == "masked":
            state["mask_sha256"] = self.mask.fingerprint()
            state["mask_words"] = {n: lay.packed_bytes().cpu() for n, lay in self.mask.layouts.items()}
        if self.ctx.distributed:
            state["trained_on"] = {"ranks": self.ctx.world, "parallel": self.mode}
        return state

    def _save_checkpoint(self) -> None:
        """Replicated state (one process, DDP): rank 0 writes the one-process format, which resumes at any number
        of ranks. Sharded state (FSDP): every rank writes its part of dcp/ (train/checkpoint.py)."""
        keep = self.cfg.train.keep_last
        if self.mode == "fsdp":
            weights, state = self._whole_state_dict(), self._trainer_state()
            steps, sharded = self._named_optimizer_state()
            state["optimizer_steps"] = steps
            sharded = {f"optim.{k}": v for k, v in sharded.items()}
            if self.identifier is not None:
                state["identifier"] = {k: v for k, v in state["identifier"].items() if k != "ema"}
                sharded.update({f"ident.ema.{n}": v for n, v in self.identifier.ema.items()})
            save_sharded_checkpoint(self.ctx, self.run.checkpoints, self.step, weights, state, sharded, keep)

        def write() -> None:  # rank 0
            if self.mode != "fsdp":
                state = {**self._trainer_state(), "optimizer": self.optimizer.state_dict()}
                save_checkpoint(self.run.checkpoints, self.step, self.model.state_dict(), state, keep)
            self.run.write_status(step=self.step, phase=self.phase, **self._ranks_status())

        self.ctx.main_first(write)

    def _ranks_status(self) -> dict:
        return {"ranks": self.ctx.world, "parallel": self.mode} if self.ctx.distributed else {}

    def _optimizer_names(self) -> list[str]:
        return optimizer_param_names(self.model, set(self.mask.layouts) if self.phase == "masked" else None)

    def _named_optimizer_state(self, zeros: bool = False) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """The optimizer state by name, laid out for this mode (targets of zeros to load into, with `zeros`)."""
        if isinstance(self.optimizer, ShardedMaskedAdamW):
            return self.optimizer.named_state(zeros)
        if self.mode == "fsdp":
            return adamw_named_state(self.optimizer, self.model, zeros)
        assert zeros, "replicated optimizers are checkpointed by index (state_dict)"
        named = dict(self.model.named_parameters())
        compact = set(self.mask.layouts) if self.phase == "masked" else set()
        shape = {n: (self.mask.layouts[n].nnz,) if n in compact else tuple(named[n].shape) for n in named}
        return {}, {f"{n}.{k}": torch.zeros(shape[n]) for n in named for k in MOMENTS}

    def _restore(self, path: Path) -> None:
        step, model_state, state = load_checkpoint(path)
        self._load_weights(model_state)
        self.step, self.phase_start = step, state["phase_start"]
        if state["phase"] == "masked":
            self.identifier = None
            self.mask = PrivateMask.load(self.run.private)
            if self.mask.fingerprint() != state["mask_sha256"]:
                raise ValueError(f"checkpoint {path} was trained with a different mask than {self.run.private}: "
                                 "refusing to resume (restore the run's own private/mask.* files)")
            self.ctx.agree("masks", self.mask.fingerprint(), "every rank must read the run's own private/mask.*")
            self.ctx.main_first(self._check_complement_record)
            if not self.cfg.pmp.rewind and not self.run.complement_weights.is_file():
                # lost: the masked phase never moves the complement, so the checkpoint's is the reference
                self._save_complement_weights()
            self.phase = "masked"
            self._enter_masked_phase(self.phase_start)
        elif "mask_sha256" in state:  # pmp.variant=trap after identification, or illcond (its key is loaded)
            self.identifier = None
            if self.mask is None:
                self.mask = PrivateMask.load(self.run.private)
            if self.mask.fingerprint() != state["mask_sha256"]:
                raise ValueError(f"checkpoint {path} was trained with a different mask than {self.run.private}: "
                                 "refusing to resume (restore the run's own private/mask.* files)")
        sharded = None
        if is_sharded(path):  # an FSDP checkpoint: the moments (and scores) come from dcp/, cut for this job
            sharded = {f"optim.{k}": v for k, v in self._named_optimizer_state(zeros=True)[1].items()}
            if state["phase"] == "identify":
                sharded.update({f"ident.ema.{n}": torch.zeros_like(p) if self.mode == "fsdp" else
                                torch.zeros(p.shape) for n, p in self.identifier.params.items()})
            load_sharded(path, sharded)
        if state["phase"] == "identify":
            ident = dict(state["identifier"])
            if sharded is not None:
                ident["ema"] = {k.removeprefix("ident.ema."): v for k, v in sharded.items() if k.startswith("ident.")}
            self.identifier.load_state_dict(ident)
        self._load_optimizer(state, sharded)
        self.stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        self.phase = state["phase"]
        if self.ctx.is_main:
            _truncate_metrics(self.run.metrics, step)
            print(f"[pmp] resumed {self.run.root} at step {step} ({self.phase})"
                  + (f" on {self.ctx.world} ranks" if self.ctx.distributed else ""))

    def _load_optimizer(self, state: dict, sharded: dict | None) -> None:
        if sharded is None and self.mode != "fsdp":  # the one-process format into a replicated optimizer
            self.optimizer.load_state_dict(state["optimizer"])
            return
        if sharded is None:  # one-process checkpoint -> FSDP
            steps, tensors = named_from_indexed(state["optimizer"], self._optimizer_names())
        else:
            steps = state["optimizer_steps"]
            tensors = {k.removeprefix("optim."): v for k, v in sharded.items() if k.startswith("optim.")}
        if isinstance(self.optimizer, ShardedMaskedAdamW):
            self.optimizer.load_named_state(steps, tensors)
        elif self.mode == "fsdp":
            load_adamw_named_state(self.optimizer, self.model, steps, tensors)
        else:  # FSDP checkpoint -> one process / DDP
            load_named_into(self.optimizer, self._optimizer_names(), steps, tensors)

    def _finish(self) -> None:
        if not hasattr(self, "last_val"):  # resumed a run that had already reached its last step
            logged = self.ctx.broadcast(self.run.val_loss_by_step().get(self.step) if self.ctx.is_main else None)
            self.last_val = logged if logged is not None else self._evaluate()
        if self.mode == "ddp":  # replicas must be bit-identical: the same reduced updates from the same init
            self.ctx.agree("final weights", weights_digest(self.model))
        if self.mode == "fsdp":
            weights = self._whole_state_dict()
            self.ctx.main_first(lambda: self._write_final(self._plain_model(weights)))
        else:
            model = self.masked.detach() if self.masked is not None else self.model
            self.ctx.main_first(lambda: self._write_final(model))
        self.log.echo(f"[pmp] finished: held-out perplexity {math.exp(self.last_val):.2f}; final private model in "
                      f"{self.run.final}")

    def _plain_model(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = build_model(self.hf_cfg, 0)
        model.load_state_dict(weights)
        return model

    def _write_final(self, model: torch.nn.Module) -> None:
        with atomic_dir(self.run.final, overwrite=True) as tmp:
            model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
        self.run.write_status(status="finished", step=self.step, phase=self.phase, final_val_loss=self.last_val,
                              final_val_ppl=math.exp(self.last_val), finished_with=provenance(),
                              **self._ranks_status())


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the names and bytes of a model's state_dict (replicas compare it)."""
    h = hashlib.sha256()
    for name, v in sorted(model.state_dict().items()):
        h.update(name.encode() + b"\0" + v.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _micro_batch_seed(data_seed: int, step: int, offset: int) -> int:
    return int.from_bytes(hashlib.sha256(f"pmp-dropout|{data_seed}|{step}|{offset}".encode()).digest()[:8], "little")


def _latest(root: Path) -> str | None:
    ckpts = list_step_dirs(root)
    return str(ckpts[-1]) if ckpts else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (they will be produced again)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with atomic_file(path, "w") as f:
        f.write("".join(ln + "\n" for ln in keep))

