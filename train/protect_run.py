"""`pmp protect sophon | sophon_nlp | mlac | sdd | sdd_reject`: train a finished run into a restricted-domain-
protected run, resumably.

Every input is checked and all data tokenized before anything is written. The protected run directory looks like
any run to `pmp export`, `pmp attack` and the pipeline:

RUN2/
  run.json, config.yaml, tokenizer/   run.json: status, method, base, restricted domain, retain corpus, rollbacks,
                                      retain / restricted perplexity before and after, cost (wall time and token
                                      passes, also as a multiple of the base's pre-training)
  protect.yaml                        the ProtectConfig it was made with (a resume must match it)
  metrics.jsonl                       one row per logged outer step and per retain check
  checkpoints/step_*/                 resumable state (weights, optimizer moments, samplers, generator)
  final/                              the protected model (stock HF directory), written last

Retain guard (SOPHON's roll-back): every `check_every` outer steps the retain perplexity is measured; above
(1 + retain_tolerance) x the base's, the model and optimizers return to the last accepted state (the data and
the random draws go on, so the next attempt differs); otherwise the state is accepted, and checkpointed when the
step is a multiple of `ckpt_every`. The final model is always an accepted state.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from pmp.atomic import atomic_dir, owner_only, remove_leftovers, write_json, write_text
from pmp.config import SDD_METHODS, ProtectConfig, RunConfig, load_config
from pmp.dir_lock import exclusive
from pmp.paths import overlaps
from pmp.provenance import provenance
from pmp.run_dir import RunDir
from pmp.step_dir import list_step_dirs
from pmp.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pmp.train.logger import RunLogger
from pmp.train.mlac import mlac_step
from pmp.train.protect_data import Restricted, Retain, Sampler, load_restricted_task, load_retain, tokenize_restricted
from pmp.train.restricted_forward import lm_loss, next_token
from pmp.train.sdd import SddPairs, build_pairs, sdd_loss
from pmp.train.sophon import suppression_gradient
from pmp.typed_config import to_dict

CONFIG_FILE = "protect.yaml"


def protect_by_training(cfg: ProtectConfig) -> Path:
    """Library entry point of the trained protections; returns the protected run directory."""
    cfg.validate()
    t = cfg.train
    out = Path(cfg.out)
    base = resolve_base(Path(cfg.base), cfg.cache_dir)
    if overlaps(out, base.root):
        raise ValueError(f"--out {out} overlaps the base {base.root}: choose a new directory outside it")
    _check_out(out, cfg)
    if t.threads:
        torch.set_num_threads(t.threads)
    cache_dir = cfg.cache_dir or base.run_cfg.data.cache_dir
    if not cfg.retain and cfg.restricted and _restricted_in_corpus(cfg.restricted, base.run_cfg.data.corpus):
        raise ValueError(f"--restricted {cfg.restricted} is part of the base run's pre-training corpus, which is the "
                         "retain corpus by default: choose another restricted domain or pass --retain FILES")
    tok = AutoTokenizer.from_pretrained(str(base.tokenizer))
    task = load_restricted_task(cfg.restricted, cache_dir)
    if cfg.method == "sophon_nlp" and task.kind != "classification":
        raise ValueError(f"sophon_nlp protects a classification task, but --restricted {task.name} is a language-"
                         "modelling domain: use method sophon for it, or pass a classification task")
    restricted = tokenize_restricted(task, tok, t.seq_len, t.seed)
    retain = load_retain(base.run_cfg, cfg.retain, tok, t.seq_len, t.batch_size, t.eval_batches, cache_dir)
    pairs = None if cfg.method not in SDD_METHODS else \
        build_pairs(restricted, retain, tok, t, t.sdd_refusal if cfg.method == "sdd_reject" else "")
    model = AutoModelForCausalLM.from_pretrained(str(base.model), dtype=torch.float32).train()
    with owner_only(), exclusive(out, "protected run directory"):
        remove_leftovers(out)
        job = _Job(cfg, base, out, model, restricted, retain, pairs)
        job.run()
    return out


# ---------------------------------------------------------------------------------------------- input checks
@dataclass
class Base:
    """What is protected: a finished pmp run (its final model, tokenizer, config) or a release directory (a stock
    HF causal LM with its tokenizer; its pre-training is unknown here, so the retain corpus defaults to pmp's)."""

    root: Path
    model: Path
    tokenizer: Path
    status: dict
    run_cfg: RunConfig
    release: bool


def resolve_base(root: Path, cache_dir: str = "") -> Base:
    if not root.exists():
        raise FileNotFoundError(f"--base {root} does not exist")
    run = RunDir(root)
    if run.is_run():
        status = run.read_status()
        if status.get("status") != "finished" or not (run.final / "config.json").is_file():
            raise ValueError(f"--base {root} is not finished; finish it with `pmp pretrain --out {root} --resume`")
        return Base(root, run.final, run.tokenizer, status, run.load_config(), release=False)
    if not (root / "config.json").is_file() or not any(root.glob("*.safetensors")):
        raise FileNotFoundError(f"--base {root} is neither a pmp run directory (no run.json) nor a release (no "
                                "config.json + *.safetensors): pass the --out of `pmp pretrain` or of `pmp export`")
    try:
        AutoTokenizer.from_pretrained(str(root))
    except (OSError, ValueError) as e:
        raise ValueError(f"--base {root}: the release has no loadable tokenizer ({type(e).__name__})") from None
    run_cfg = load_config(None, [f"data.cache_dir={cache_dir}"] if cache_dir else [])
    return Base(root, root, root, {"step": 0}, run_cfg, release=True)


def _restricted_in_corpus(restricted: str, corpus: str) -> bool:
    p = Path(restricted).expanduser()
    if not p.exists():
        return False
    return str(p.resolve()) in {str(Path(c.strip()).expanduser().resolve()) for c in corpus.split(",") if c.strip()}


def _saved_config(cfg: ProtectConfig) -> dict:
    d = copy.deepcopy(vars(cfg))
    d["train"] = dict(vars(cfg.train))
    d.pop("resume")
    d["train"].pop("log_every")
    d["train"].pop("threads")
    if cfg.method not in SDD_METHODS:  # irrelevant there; also keeps runs recorded before SDD existed resumable
        d["train"] = {k: v for k, v in d["train"].items() if not k.startswith("sdd_")}
    return d


def _check_out(out: Path, cfg: ProtectConfig) -> None:
    busy = out.exists() and (not out.is_dir() or any(p.name != ".pmp.lock" for p in out.iterdir()))
    if not busy:
        if cfg.resume:
            raise FileNotFoundError(f"--resume: {out} holds no protection run to continue; drop --resume to start one")
        return
    record = out / CONFIG_FILE
    if not record.is_file():
        raise FileExistsError(f"--out {out} exists and is not a protection run of pmp; choose a new directory")
    if not cfg.resume:
        raise FileExistsError(f"--out {out} already holds a protection run: pass --resume to continue it, or choose "
                              "a new directory")
    saved = yaml.safe_load(record.read_text())
    if saved != _saved_config(cfg):
        diff = sorted(k for k in set(saved) | set(_saved_config(cfg)) if saved.get(k) != _saved_config(cfg).get(k))
        raise ValueError(f"--resume: {out} was started with different settings ({', '.join(diff)}); resume with the "
                         f"settings in {record}, or choose a new directory")


# ---------------------------------------------------------------------------------------------- the run
class _Job:
    def __init__(self, cfg: ProtectConfig, base: Base, out: Path, model: torch.nn.Module, restricted: Restricted,
                 retain: Retain, pairs: SddPairs | None = None):
        self.cfg, self.t, self.base, self.base_status, self.run_cfg = cfg, cfg.train, base, base.status, base.run_cfg
        self.dir, self.model, self.restricted, self.retain, self.pairs = RunDir(out), model, restricted, retain, pairs
        t = self.t
        self.support = Sampler(restricted.size(), t.batch_size, t.seed * 7919 + 1)
        self.query = Sampler(restricted.size(), t.batch_size, t.seed * 7919 + 2)
        self.retain_batches = Sampler(len(retain.train), t.batch_size, t.seed * 7919 + 3)
        self.samplers = ("support", "query", "retain_batches")
        self.gen = torch.Generator().manual_seed(t.seed)
        if cfg.method == "mlac":
            self.opts = {"joint": torch.optim.Adam(model.parameters(), lr=t.alpha * t.lr)}
        elif pairs is not None:  # sdd, sdd_reject: SFT on (prompt, unrelated response) pairs + retain steps
            self.pair_batches = Sampler(len(pairs), t.batch_size, t.seed * 7919 + 4)
            self.samplers += ("pair_batches",)
            self.opts = {"sft": torch.optim.Adam(model.parameters(), lr=t.alpha * t.lr),
                         "ntr": torch.optim.Adam(model.parameters(), lr=t.beta * t.lr)}
        else:
            self.opts = {"fts": torch.optim.Adam(model.parameters(), lr=t.alpha * t.lr),
                         "ntr": torch.optim.Adam(model.parameters(), lr=t.beta * t.lr)}
        self.step, self.rollbacks, self.wall_s, self.token_passes = 0, 0, 0.0, 0
        self.before: dict = {}

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {"step": self.step, "rollbacks": self.rollbacks, "wall_s": self.wall_s,
                "token_passes": self.token_passes, "before": self.before,
                "opts": {k: o.state_dict() for k, o in self.opts.items()},
                "samplers": {k: getattr(self, k).state_dict() for k in self.samplers},
                "generator": self.gen.get_state(), "rng": rng_state(),
                "sdd_pairs_sha256": self.pairs.sha256 if self.pairs is not None else ""}

    def _load(self, state: dict) -> None:
        self.step, self.rollbacks = int(state["step"]), int(state["rollbacks"])
        self.wall_s, self.token_passes = float(state["wall_s"]), int(state["token_passes"])
        self.before = dict(state["before"])
        if state.get("sdd_pairs_sha256", "") != (self.pairs.sha256 if self.pairs is not None else ""):
            raise ValueError(f"--resume: the SDD pairs rebuilt from the data differ from those {self.dir.root} was "
                             "started with (a restricted or retain file changed?); start a new run")
        for k, o in self.opts.items():
            o.load_state_dict(state["opts"][k])
        for k, s in state["samplers"].items():
            getattr(self, k).load_state_dict(s)
        self.gen.set_state(state["generator"])
        set_rng_state(state["rng"])

    def _accept(self) -> None:
        self.accepted = ({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                         {k: copy.deepcopy(o.state_dict()) for k, o in self.opts.items()})

    def _roll_back(self) -> None:
        weights, opts = self.accepted
        self.model.load_state_dict(weights)
        for k, o in self.opts.items():
            o.load_state_dict(copy.deepcopy(opts[k]))
        self.rollbacks += 1

    # ------------------------------------------------------------------ measurements
    @torch.no_grad()
    def retain_ppl(self) -> float:
        tot, n = 0.0, 0
        for b in self.retain.held_out:
            logits, target = next_token(self.model, b)
            tot += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            n += target.numel()
        return math.exp(tot / n)

    @torch.no_grad()
    def restricted_ppl(self) -> float | None:
        if self.restricted.kind != "lm":
            return None  # a classification domain needs a trained head: the attack suite measures it
        blocks = self.restricted.held_out["blocks"][: self.t.eval_batches * self.t.batch_size]
        tot, n = 0.0, 0
        for i in range(0, len(blocks), self.t.batch_size):
            logits, target = next_token(self.model, blocks[i:i + self.t.batch_size])
            tot += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            n += target.numel()
        return math.exp(tot / n)

    # ------------------------------------------------------------------ one outer step
    def _clip_and_step(self, opt: torch.optim.Optimizer) -> None:
        if self.t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _retain_batch(self) -> torch.Tensor:
        idx = self.retain_batches.next()
        return torch.from_numpy(self.retain.train[idx].astype("int64"))

    def outer_step(self) -> dict:
        t, bt = self.t, self.t.batch_size * self.t.seq_len
        if self.cfg.method == "mlac":
            info = mlac_step(self.model, self.restricted, self.support, self.query, self._retain_batch(), t, self.gen)
            self._clip_and_step(self.opts["joint"])
            self.token_passes += bt * (3 if t.mlac_adversary == "head" else 2 * t.inner_steps + 2)
            return info
        if self.pairs is not None:  # sdd, sdd_reject: one SFT step on the response tokens (train/sdd.py)
            loss = sdd_loss(self.model, self.pairs.batch(self.pair_batches.next()))
            loss.backward()
            self._clip_and_step(self.opts["sft"])
            info, passes = {"sdd_loss": float(loss.detach())}, 1
        else:
            grads, info = suppression_gradient(self.model, self.restricted, self.support, self.query, t, self.gen)
            for n, p in self.model.named_parameters():
                p.grad = grads.get(n)
            self._clip_and_step(self.opts["fts"])
            passes = 2 * t.inner_steps + 1
        retain = []
        for _ in range(t.ntr_steps):
            loss = lm_loss(self.model, self._retain_batch())
            loss.backward()
            self._clip_and_step(self.opts["ntr"])
            retain.append(float(loss.detach()))
        self.token_passes += bt * (passes + t.ntr_steps)
        return {**info, "retain_loss": sum(retain) / len(retain) if retain else float("nan")}

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        run, t = self.dir, self.t
        if run.is_run() and run.read_status().get("status") == "finished":
            print(f"[protect] {run.root} is already finished")
            return
        ckpts = list_step_dirs(run.checkpoints)
        if ckpts:
            step, weights, state = load_checkpoint(ckpts[-1])
            self.model.load_state_dict(weights)
            self._load(state)
            _truncate_metrics(run.metrics, self.step)
            print(f"[protect] resuming {run.root} at outer step {self.step}")
        else:
            self._start()
        self._accept()
        log = RunLogger(run.metrics, t.steps, self.step, progress=True)
        try:
            self._loop(log)
        finally:
            log.close()
        self._finish()

    def _start(self) -> None:
        run = self.dir
        if self.base.release:  # a stand-in config for `pmp export` (the card says the base is a release)
            write_text(run.config, yaml.safe_dump(to_dict(self.run_cfg), sort_keys=False))
        else:
            shutil.copy2(RunDir(self.base.root).config, run.config)
        if not run.tokenizer.is_dir():
            with atomic_dir(run.tokenizer, overwrite=True) as tmp:
                AutoTokenizer.from_pretrained(str(self.base.tokenizer)).save_pretrained(str(tmp))
        write_text(run.root / CONFIG_FILE, yaml.safe_dump(_saved_config(self.cfg), sort_keys=True))
        self.before = {"retain_ppl": self.retain_ppl(), "restricted_ppl": self.restricted_ppl()}
        write_json(run.status, {"status": "protecting", "method": self.cfg.method, "base": str(self.base.root),
                                "step": int(self.base_status.get("step", 0)), "protect_step": 0,
                                "started_with": provenance()})
        if run.metrics.exists():
            run.metrics.unlink()
        print(f"[protect] {self.cfg.method} of {self.base.root}: restricted {self.restricted.name} "
              f"({self.restricted.kind}, {self.restricted.size():,} train examples/blocks), retain "
              f"{self.retain.corpus} ({len(self.retain.train):,} blocks); retain perplexity before "
              f"{self.before['retain_ppl']:.2f}")
        if self.pairs is not None:
            p = self.pairs.stats
            print(f"[protect] sdd pairs: {p['pairs']:,} of {p['prompts']:,} prompts ({p['dropped_prompts']:,} had no "
                  f"passage within TF-IDF cosine {p['max_similarity_bound']}), {p['distinct_passages']:,} distinct "
                  f"passages of a pool of {p['pool']:,}, mean similarity {p['mean_similarity']:.3f}")

    def _loop(self, log: RunLogger) -> None:
        t, limit = self.t, self.before["retain_ppl"] * (1 + self.t.retain_tolerance)
        while self.step < t.steps:
            t0 = time.perf_counter()
            info = self.outer_step()
            self.step += 1
            row = {"step": self.step, **info}
            if self.step % t.check_every == 0 or self.step == t.steps:
                ppl = self.retain_ppl()
                ok = ppl <= limit
                if ok:
                    self._accept()
                else:
                    self._roll_back()
                row.update({"retain_ppl": ppl, "accepted": ok, "rollbacks": self.rollbacks})
            self.wall_s += time.perf_counter() - t0
            log.log(row, self._line(row) if t.log_every and (self.step % t.log_every == 0 or "retain_ppl" in row)
                    else None)
            log.advance()
            if row.get("accepted") and t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                save_checkpoint(self.dir.checkpoints, self.step, self.model.state_dict(), self._state(), keep_last=2)
                write_json(self.dir.status, {**self.dir.read_status(), "protect_step": self.step})

    def _line(self, row: dict) -> str:
        if "sdd_loss" in row:
            s = f"step {row['step']:5d} | {self.cfg.method} | response loss {row['sdd_loss']:.4f}"
        else:
            s = (f"step {row['step']:5d} | {self.cfg.method} | suppression {row['suppression']:.4f} | attacker loss "
                 f"{row['attacker_loss']:.3f} ({row['inner_optimizer']} {row['inner_lr']:.1e})")
        s += f" | retain loss {row['retain_loss']:.3f}"
        if "retain_ppl" in row:
            s += f" | retain ppl {row['retain_ppl']:.2f} {'ok' if row['accepted'] else 'ROLLED BACK'}"
        return s

    def _finish(self) -> None:
        run, t = self.dir, self.t
        after = {"retain_ppl": self.retain_ppl(), "restricted_ppl": self.restricted_ppl()}
        with atomic_dir(run.final, overwrite=run.final.exists()) as tmp:
            self.model.save_pretrained(str(tmp))
            AutoTokenizer.from_pretrained(str(run.tokenizer)).save_pretrained(str(tmp))
        rt = self.run_cfg.train
        pretrain_passes = None if self.base.release else \
            int(self.base_status.get("step", rt.steps)) * rt.batch_size * rt.grad_accum * self.run_cfg.data.seq_len
        status = {
            "status": "finished", "method": self.cfg.method, "base": str(self.base.root),
            "base_release": self.base.release, "base_method": self.base_status.get("method"),
            "step": int(self.base_status.get("step", 0)),
            "protect_steps": t.steps, "restricted": self.restricted.name, "restricted_kind": self.restricted.kind,
            "retain": self.retain.corpus, "rollbacks": self.rollbacks, "before": self.before, "after": after,
            "cost": {"wall_s": round(self.wall_s, 1), "token_passes": self.token_passes,
                     "pretrain_token_passes": pretrain_passes,
                     "x_pretraining": round(self.token_passes / pretrain_passes, 3) if pretrain_passes else None},
        }
        status["started_with"] = run.read_status().get("started_with")  # run.json is rewritten whole below
        status["finished_with"] = provenance()
        if self.pairs is not None:
            status["sdd"] = self.pairs.stats
        if not self.cfg.retain:  # the held-out split of the base's own corpus: what the model card reports
            status["final_val_ppl"] = after["retain_ppl"]
        write_json(run.status, status)
        restricted = (f", restricted perplexity {self.before['restricted_ppl']:.2f} -> {after['restricted_ppl']:.2f}"
                      if after["restricted_ppl"] is not None else "")
        cost = f", {status['cost']['x_pretraining']:.2f} x the base's pre-training tokens" if pretrain_passes else ""
        print(f"[protect] {self.cfg.method} finished: retain perplexity {self.before['retain_ppl']:.2f} -> "
              f"{after['retain_ppl']:.2f}{restricted}; {self.rollbacks} roll-back(s); {self.wall_s:.0f} s{cost}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past the checkpoint a resumed run restarts from (they will be written again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_text(path, "".join(line + "\n" for line in keep))
