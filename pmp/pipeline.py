"""The whole experiment in one call: the README's main job.

prepare data -> pre-train a dense baseline and a PMP model on the same batches and budget -> export both as
public releases -> audit the PMP release's mask secrecy (mask-recovery attacks) -> attack both (and a
from-scratch model) with a fine-tuning suite, including fine-tuning on the audit's recovered mask -> report.
Every stage is resumable: a finished stage is skipped on a second call, so an interrupted pipeline continues
where it stopped.

OUT/
  runs/{dense,pmp}/       private run directories (never publish)
  releases/{dense,pmp}/   public releases (+ dense_matched/ with --matched-baseline)
  attack/                 one results JSON per (model, task, attack, seed) cell
  report/                 report.md + PNG plots
  audit/                  audit.md / audit.json (mask recovery against the true mask)
  summary.md              what happened, with pointers
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from pmp.atomic import write_text
from pmp.config import RunConfig

_T0 = [time.perf_counter()]


def _stage(name: str) -> None:
    print(f"\n[pipeline] ==== {name} ==== (at {time.perf_counter() - _T0[0]:.0f} s)", flush=True)


def pretrain_if_needed(cfg: RunConfig, out: Path) -> Path:
    from pmp.train.run_dir import RunDir, config_difference
    from pmp.train.trainer import pretrain

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
    import math

    from pmp.train.checkpoint import kept_weight_steps
    from pmp.train.run_dir import RunDir

    dense, pmp = RunDir(Path(dense_run)), RunDir(Path(pmp_run))
    target = pmp.read_status().get("final_val_ppl")
    d_status = dense.read_status()
    if not target or not d_status.get("final_val_ppl") or d_status["final_val_ppl"] >= target:
        return None
    kept = set(kept_weight_steps(dense.root))
    ppl = {s: p for s, p in dense.val_ppl_by_step().items() if s in kept and 0 < s < int(d_status["step"])}
    if not ppl:
        return None
    step = min(ppl, key=lambda s: (abs(math.log(ppl[s]) - math.log(target)), -s))
    return {"step": step, "dense_ppl": ppl[step], "pmp_ppl": target}


def run_pipeline(cfg: RunConfig, out: str | Path, suite: str = "quick", tasks: str = "default",
                 seeds: int = 0, audit: bool = True, task_file: str = "", text_column: str = "text",
                 label_column: str = "label", lm_file: str = "", matched_baseline: bool = False) -> Path:
    from pmp.data.prepare import prepare
    from pmp.eval.attacks import get_suite
    from pmp.eval.report import write_report
    from pmp.eval.sweep import Sweep, resolve_models, resolve_tasks
    from pmp.release import export_release
    from pmp.train.run_dir import RunDir

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suite_obj = get_suite(suite)  # fail on a bad suite name before hours of training
    t0 = _T0[0] = time.perf_counter()
    if cfg.data.corpus == "default" or tasks == "default":
        _stage("data")
        prepare(cfg.data.cache_dir)

    runs, releases = {}, {}
    for method in ("dense", "pmp"):
        _stage(f"pre-train ({method})")
        runs[method] = pretrain_if_needed(replace(cfg, train=replace(cfg.train, method=method)),
                                          out / "runs" / method)
    for method in ("dense", "pmp"):
        _stage(f"export ({method})")
        target = out / "releases" / method
        if (target / "config.json").is_file():
            print(f"[pipeline] {target} exists; skipping")
        else:
            export_release(runs[method], target)
        releases[method] = target
    matched = None
    if matched_baseline:
        _stage("export (quality-matched dense baseline)")
        matched = matched_dense_step(runs["dense"], runs["pmp"])
        target = out / "releases" / "dense_matched"
        if matched is None:
            print("[pipeline] no matched baseline: the dense run does not end better than PMP, or kept no earlier "
                  "weights (set train.snapshot_every)")
        elif (target / "config.json").is_file():
            print(f"[pipeline] {target} exists; skipping")
        else:
            print(f"[pipeline] dense step {matched['step']} (held-out ppl {matched['dense_ppl']:.2f}) matches PMP's "
                  f"final {matched['pmp_ppl']:.2f}")
            export_release(runs["dense"], target, step=matched["step"])
        if matched is not None:
            releases["dense_matched"] = target

    # The audit comes first: its best recovered mask feeds the attack suite (recover-then-fine-tune).
    audit_md, recovered = None, {}
    if audit:
        from pmp.eval.audit import run_audit

        _stage("mask secrecy audit")
        audit_md = out / "audit" / "audit.md"
        if audit_md.is_file():
            print(f"[pipeline] {audit_md} exists; skipping")
        else:
            run_audit(releases["pmp"], runs["pmp"], out / "audit", cache_dir=cfg.data.cache_dir, text_file=lm_file)
        recovered = {"pmp": str(out / "audit" / "recovered_mask")}

    _stage(f"attack (suite {suite})")
    models = resolve_models({name: str(path) for name, path in releases.items()}, {"pmp": str(runs["pmp"])},
                            "dense", recovered=recovered, matched="dense_matched" if matched else "")
    task_list = resolve_tasks(tasks, cfg.data.cache_dir, task_file, text_column, label_column, lm_file)
    sweep = Sweep(models, task_list, suite_obj, out / "attack", seeds=seeds).run()
    _stage("report")
    report = write_report(out / "attack", out / "report", "dense", ["pmp"])

    st = {m: RunDir(runs[m]).read_status() for m in runs}
    lines = [
        "# pmp pipeline summary", "",
        f"- wall time: {(time.perf_counter() - t0) / 60:.1f} min (this call; finished stages were skipped)",
        *(f"- {m}: held-out perplexity {st[m].get('final_val_ppl', float('nan')):.2f} "
          f"(private run {runs[m]}, release {releases[m]})" for m in ("dense", "pmp")),
        *([f"- dense_matched: the dense run at step {matched['step']}, held-out perplexity "
           f"{matched['dense_ppl']:.2f} (release {releases['dense_matched']})"] if matched else []),
        f"- attack suite `{suite}`: {sweep['run']} cells run in {sweep['wall_seconds'] / 60:.1f} min "
        f"({sweep['skipped']} already done, {sweep['cells']} in the plan)",
        f"- attack report: {report}",
        *([f"- mask secrecy audit: {audit_md}"] if audit_md else []),
    ]
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[2:]))
    print(f"\n[pipeline] done: read {report}")
    return out
