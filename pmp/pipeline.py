"""The whole experiment in one call: the README's main job.

prepare data -> pre-train a dense baseline and a PMP model on the same batches and budget -> export both as
public releases -> audit the PMP release's mask secrecy (mask-recovery attacks) -> attack both (and a
from-scratch model) with a fine-tuning suite, including fine-tuning on the audit's recovered mask -> report.
Every stage is resumable: a finished stage is skipped on a second call, so an interrupted pipeline continues
where it stopped.

With several pre-training seeds (`pipeline.seeds`, default [0]) the whole chain runs once per seed, seed after
seed: seed s trains with train.data_seed = the recipe's + s and, where the recipe pins model.init_seed, init seed
+ s (`seeded_config`), so the first seed of the default [0] is exactly the recipe. The first seed keeps the
one-seed layout at OUT's root (a pipeline directory grows more seeds without recomputing the first); every other
seed gets the same layout under seeds/s<seed>/. Then report_pooled/ pools the attack results over the seeds.

OUT/
  runs/{dense,pmp}/       private run directories (never publish)
  releases/{dense,pmp}/   public releases (+ dense_matched/ with pipeline.matched_baseline)
  attack/                 one results JSON per (model, task, attack, seed) cell
  report/                 report.md + PNG plots
  audit/                  audit.md / audit.json (mask recovery against the true mask)
  seeds/s<seed>/          the same five for every further pre-training seed
  report_pooled/          with >= 2 seeds: the report pooled over them (eval/report_pooled.py)
  summary.md              what happened, with pointers
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pmp.atomic import sha256_file, write_text
from pmp.config import ExportConfig, RunConfig
from pmp.data.prepare import prepare
from pmp.eval.attack import run_attack
from pmp.eval.attack_inputs import SCRATCH
from pmp.eval.attacks import get_suite
from pmp.eval.audit import run_audit
from pmp.eval.config import AttackConfig, AttackSettings, AuditConfig, AuditSettings, ReportConfig
from pmp.eval.report import write_report
from pmp.release import export_release
from pmp.run_dir import RunDir, config_difference
from pmp.train.trainer import pretrain
from pmp.typed_config import check, doc


@dataclass
class PipelineStages:
    audit: bool = doc("run the mask secrecy audit (its recovered mask feeds the recovered_mask attacks)", True)
    matched_baseline: bool = doc(
        "also attack the earlier dense state whose held-out perplexity matches PMP's final one (needs "
        "train.snapshot_every; adds ~1/3 to the attack time)", False)
    seeds: list[int] = doc(
        "pre-training seeds: the whole chain runs at each (seed s: train.data_seed + s and, where model.init_seed is "
        "pinned, init seed + s; the first seed in DIR, the others in DIR/seeds/s<seed>), then a report pooled over "
        "them (DIR/report_pooled); e.g. 0,1", default_factory=lambda: [0])


@dataclass
class PipelineConfig(RunConfig):
    """A pre-training recipe (the RunConfig sections) plus the evaluation settings of the pipeline."""
    attack: AttackSettings = field(default_factory=AttackSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    pipeline: PipelineStages = field(default_factory=PipelineStages)

    def validate(self) -> PipelineConfig:
        super().validate()
        self.attack.validate()
        self.audit.validate()
        check_seeds(self.pipeline.seeds, "pipeline.seeds", "they are added to train.data_seed")
        return self

    def run_config(self) -> RunConfig:
        """The pre-training part alone (what a run directory records and compares)."""
        return RunConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)})


def check_seeds(seeds: list[int], key: str, meaning: str) -> None:
    """A list of pre-training seeds: at least one, none negative, none twice (the pipeline's and the study's)."""
    check(bool(seeds), "{} must list at least one pre-training seed, e.g. {}: [0, 1]", key, key)
    check(all(s >= 0 for s in seeds), "{} must be integers >= 0 ({}), got {}", key, meaning, seeds)
    check(len(set(seeds)) == len(seeds), "{} lists a seed twice: {}", key, seeds)


def seeded_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The recipe at pre-training seed `seed`: train.data_seed + seed (the batch order) and, where model.init_seed
    is pinned, init seed + seed (else every run draws its own from OS entropy). Seed 0 is the recipe itself."""
    init = None if cfg.model.init_seed is None else cfg.model.init_seed + seed
    return replace(cfg, train=replace(cfg.train, data_seed=cfg.train.data_seed + seed),
                   model=replace(cfg.model, init_seed=init))


def seed_dir(out: Path, seeds: list[int], seed: int) -> Path:
    """Where a pre-training seed's runs, releases, audit, attack and report live: OUT for the first seed (the
    one-seed layout), OUT/seeds/s<seed> for the others."""
    return out if seed == seeds[0] else out / "seeds" / f"s{seed}"


_T0 = [time.perf_counter()]


def _stage(name: str) -> None:
    print(f"\n[pipeline] ==== {name} ==== (at {time.perf_counter() - _T0[0]:.0f} s)", flush=True)


def pretrain_if_needed(cfg: RunConfig, out: Path) -> Path:
    run = RunDir(out)
    if run.is_run():
        diff = config_difference(run, cfg)
        if diff:
            raise ValueError(f"{out} was trained with another config ({diff}); give the pipeline a new --out "
                             "directory (or move that run away) to train with this one")
        status = run.read_status()
        if status.get("status") == "finished":
            print(f"[pipeline] {out} already finished with the same config; skipping")
            return out
        return pretrain(cfg, out, resume=True).root
    return pretrain(cfg, out).root


def matched_dense_step(dense_run: Path, pmp_run: Path) -> dict | None:
    """The earlier state of the dense run whose held-out loss is closest to the PMP run's final one, among the
    steps whose weights the run kept (snapshots, checkpoints); None when the dense run does not end better than
    PMP (then its final model is already the matched or a weaker baseline) or kept no earlier weights."""
    dense, pmp = RunDir(Path(dense_run)), RunDir(Path(pmp_run))
    target = pmp.read_status().get("final_val_ppl")
    d_status = dense.read_status()
    if not target or not d_status.get("final_val_ppl") or d_status["final_val_ppl"] >= target:
        return None
    kept = set(dense.kept_weight_steps())
    ppl = {s: p for s, p in dense.val_ppl_by_step().items() if s in kept and 0 < s < int(d_status["step"])}
    if not ppl:
        return None
    step = min(ppl, key=lambda s: (abs(math.log(ppl[s]) - math.log(target)), -s))
    return {"step": step, "dense_ppl": ppl[step], "pmp_ppl": target}


def export_if_needed(run: Path, target: Path, step: int | None = None) -> Path:
    """The public release of `run` in `target`, exported unless it already holds one."""
    if (target / "config.json").is_file():
        print(f"[pipeline] {target} exists; skipping")
    else:
        export_release(ExportConfig(run=str(run), out=str(target), step=step))
    return target


def _matched_baseline(runs: dict[str, Path], out: Path) -> dict | None:
    _stage("export (quality-matched dense baseline)")
    matched = matched_dense_step(runs["dense"], runs["pmp"])
    if matched is None:
        print("[pipeline] no matched baseline: the dense run does not end better than PMP, or kept no earlier "
              "weights (set train.snapshot_every)")
        return None
    target = out / "releases" / "dense_matched"
    if not (target / "config.json").is_file():
        print(f"[pipeline] dense step {matched['step']} (held-out ppl {matched['dense_ppl']:.2f}) matches PMP's "
              f"final {matched['pmp_ppl']:.2f}")
    export_if_needed(runs["dense"], target, matched["step"])
    return matched


def audit_if_needed(audit: AuditSettings, attack: AttackSettings, data_cache_dir: str, release: Path, run: Path,
                    out: Path) -> Path:
    """The mask secrecy audit of `release` against `run` in `out` (-> its audit.md), run unless audit.md exists.
    Without audit text or task of its own it reads the attack's held-out LM file, if any; the data cache defaults
    to the pre-training recipe's."""
    audit_md = out / "audit.md"
    if audit_md.is_file():
        print(f"[pipeline] {audit_md} exists; skipping")
        return audit_md
    text = audit.text or ("" if audit.task else attack.lm_file)  # the user's held-out text, if any, feeds the attacks
    run_audit(AuditConfig(**{**dataclasses.asdict(audit), "text": text,
                             "cache_dir": audit.cache_dir or data_cache_dir},
                          release=str(release), private=str(run), out=str(out)))
    return audit_md


def attack_config(attack: AttackSettings, data_cache_dir: str, **inputs) -> AttackConfig:
    """The `pmp attack` config of a recipe's `attack:` settings and the given inputs (models, private, recovered,
    baseline, matched, out); the data cache defaults to the pre-training recipe's."""
    return AttackConfig(**{**dataclasses.asdict(attack), "cache_dir": attack.cache_dir or data_cache_dir}, **inputs)


def prepare_data_if_needed(cfg: RunConfig, attack: AttackSettings) -> None:
    """Fetch (or verify) the default corpus and tasks when the recipe or the attack uses them."""
    if cfg.data.corpus == "default" or attack.tasks == "default":
        prepare(cfg.data.cache_dir)


def _audit(cfg: PipelineConfig, release: Path, run: Path, out: Path) -> Path:
    _stage("mask secrecy audit")
    return audit_if_needed(cfg.audit, cfg.attack, cfg.data.cache_dir, release, run, out)


def run_pipeline(cfg: PipelineConfig, out: str | Path) -> Path:
    """Library entry point of `pmp pipeline`: run (or continue) the whole experiment in `out`, at every
    pre-training seed of `cfg.pipeline.seeds`, then pool the seeds' attack results."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    get_suite(cfg.attack.suite)  # fail on a bad suite name before hours of training
    t0 = _T0[0] = time.perf_counter()
    if cfg.data.corpus == "default" or cfg.attack.tasks == "default":
        _stage("data")
    prepare_data_if_needed(cfg, cfg.attack)

    seeds = cfg.pipeline.seeds
    done = {s: _run_seed(cfg, s, seed_dir(out, seeds, s), len(seeds) > 1, seed_dir(out, seeds, seeds[0]))
            for s in seeds}
    pooled = None
    if len(seeds) > 1:
        _stage(f"report pooled over pre-training seeds {seeds}")
        pooled = write_report(ReportConfig(
            results=str(seed_dir(out, seeds, seeds[0]) / "attack"),
            more_results=[str(seed_dir(out, seeds, s) / "attack") for s in seeds[1:]],
            names=[f"s{s}" for s in seeds], out=str(out / "report_pooled"), baseline="dense", protected=["pmp"]))

    lines = ["# pmp pipeline summary", "",
             f"- wall time: {(time.perf_counter() - t0) / 60:.1f} min (this call; finished stages were skipped)"]
    if pooled is not None:
        lines.append(f"- report pooled over pre-training seeds {seeds}: {pooled}")
    for s in seeds:
        lines += (["", f"## pre-training seed {s} (train.data_seed {seeded_config(cfg, s).train.data_seed}, "
                   f"{seed_dir(out, seeds, s)})", ""] if len(seeds) > 1 else []) + done[s]["lines"]
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[2:]))
    print(f"\n[pipeline] done: read {pooled or done[seeds[0]]['report']}")
    return out


def _scratch_identity(release: Path) -> dict[str, str] | None:
    """What the from-scratch reference built beside a release depends on: the release's config and tokenizer
    files (name -> sha256), or None when the release has no config."""
    if not (release / "config.json").is_file():
        return None
    names = [f for f in sorted(release.iterdir()) if f.is_file() and (
        f.name == "config.json" or f.name.startswith("tokenizer") or
        f.name in ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt"))]
    return {f.name: sha256_file(f) for f in names}


def share_scratch_cells(src: Path, src_baseline: Path, dst: Path, dst_baseline: Path) -> int:
    """Copy the first pre-training seed's from-scratch cells (results directory `src`, baseline release
    `src_baseline`) into a later seed's results `dst` when both baseline releases have the same config and
    tokenizer: the from-scratch reference is the architecture trained on the task alone, so it does not depend on
    the pre-training seed, and re-running it per seed would repeat the same fine-tunes. Cells already there are left
    alone, and the sweep still checks every copied cell's inputs (a mismatch is recomputed) -> the number copied."""
    src, dst = src / "cells", dst / "cells"
    ident = _scratch_identity(src_baseline)
    if ident is None or ident != _scratch_identity(dst_baseline) or not src.is_dir():
        return 0
    copied = 0
    for cell in sorted(src.glob(f"{SCRATCH}__*.json")):
        if not (dst / cell.name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            write_text(dst / cell.name, cell.read_text())
            copied += 1
    return copied


def _run_seed(cfg: PipelineConfig, seed: int, out: Path, several: bool, first: Path) -> dict:
    """The whole chain at one pre-training seed in `out` (`first`: the first seed's directory, whose from-scratch
    cells a later seed shares) -> {'report': report.md, 'lines': its summary lines}."""
    at = f", pre-training seed {seed}" if several else ""
    run_cfg = seeded_config(cfg.run_config(), seed)
    runs, releases = {}, {}
    for method in ("dense", "pmp"):
        _stage(f"pre-train ({method}{at})")
        runs[method] = pretrain_if_needed(replace(run_cfg, train=replace(run_cfg.train, method=method)),
                                          out / "runs" / method)
    for method in ("dense", "pmp"):
        _stage(f"export ({method}{at})")
        releases[method] = export_if_needed(runs[method], out / "releases" / method)
    matched = _matched_baseline(runs, out) if cfg.pipeline.matched_baseline else None
    if matched is not None:
        releases["dense_matched"] = out / "releases" / "dense_matched"

    # The audit comes first: its best recovered mask feeds the attack suite (recover-then-fine-tune).
    audit_md = _audit(cfg, releases["pmp"], runs["pmp"], out / "audit") if cfg.pipeline.audit else None
    recovered = {"pmp": str(out / "audit" / "recovered_mask")} if audit_md else {}

    _stage(f"attack (suite {cfg.attack.suite}{at})")
    if out != first and cfg.attack.scratch:
        shared = share_scratch_cells(first / "attack", first / "releases" / "dense", out / "attack",
                                     out / "releases" / "dense")
        if shared:
            print(f"[pipeline] {shared} from-scratch cells taken from {first / 'attack'} (same config and "
                  "tokenizer: the from-scratch reference does not depend on the pre-training seed)", flush=True)
    sweep = run_attack(attack_config(cfg.attack, cfg.data.cache_dir, models={n: str(p) for n, p in releases.items()},
                                     private={"pmp": str(runs["pmp"])}, recovered=recovered, baseline="dense",
                                     matched="dense_matched" if matched else "", out=str(out / "attack")))
    _stage(f"report{at}")
    report = write_report(ReportConfig(results=str(out / "attack"), out=str(out / "report"), baseline="dense",
                                       protected=["pmp"]))

    st = {m: RunDir(runs[m]).read_status() for m in runs}
    lines = [
        *(f"- {m}: held-out perplexity {st[m].get('final_val_ppl', float('nan')):.2f} "
          f"(private run {runs[m]}, release {releases[m]})" for m in ("dense", "pmp")),
        *([f"- dense_matched: the dense run at step {matched['step']}, held-out perplexity "
           f"{matched['dense_ppl']:.2f} (release {releases['dense_matched']})"] if matched else []),
        f"- attack suite `{cfg.attack.suite}`: {sweep['run']} cells run in {sweep['wall_seconds'] / 60:.1f} min "
        f"({sweep['skipped']} already done, {sweep['cells']} in the plan)",
        f"- attack report: {report}",
        *([f"- mask secrecy audit: {audit_md}"] if audit_md else []),
    ]
    return {"report": report, "lines": lines}
