"""Public release: export a finished private run as a stock Hugging Face model directory.

RELEASE/
  config.json                 stock config (run-specific and unknown fields scrubbed)
  generation_config.json      stock generation config
  model.safetensors           weights (model-XXXXX-of-YYYYY.safetensors + index json above max_shard_size);
                              metadata exactly {"format": "pt"}
  tokenizer.json, tokenizer_config.json[, special_tokens_map.json, chat_template.*]
  README.md                   model card (YAML front matter + what it is, how it was trained, what PMP means)

Nothing derived from the private mask reaches the release: no tensor, no metadata, no config field, no file
name, no line in the card (the mask density only with `publish_density=True`). The directory is checked by
`pmp.verify_release.scan_release` (with the private run's bytes) before it is renamed into place. The owner
keeps the mask in RUN/private; `mask_bundle` copies it elsewhere, never into the release. `commitment=True`
publishes sha256(salt || mask fingerprint) in the card; the 32-byte salt stays in RUN/private/commitment.json,
and `verify_commitment(release, run)` proves that a run's mask is the one committed to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pmp.atomic import atomic_dir, owner_only, remove_leftovers, write_json, write_text
from pmp.config import ExportConfig
from pmp.mask import MASK_FILE, META_FILE, PrivateMask
from pmp.model_card import attached_evaluation, model_card
from pmp.run_dir import RunDir, check_complement
from pmp.verify_release import FORBIDDEN_KEY_WORDS, RELEASE_FILE_RE, scan_release, stock_config_keys

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMMITMENT_RE = re.compile(r"sha256\(salt \|\| mask fingerprint\) = `([0-9a-f]{64})`")


def export_release(cfg: ExportConfig) -> Path:
    """Write the public release of the finished run `cfg.run` to `cfg.out` (atomically) and return `cfg.out`.

    `cfg.step`: release the weights the run kept at that earlier step (RUN/snapshots or RUN/checkpoints) instead of
    the final model -- e.g. a dense baseline whose quality matches a PMP model's.

    Every input is checked before anything is written; a failure leaves `out` (and `mask_bundle`) untouched.
    """
    cfg.validate()
    run, out = RunDir(Path(cfg.run)), Path(cfg.out)
    status, run_cfg = _check_run(run)
    _check_target(out, run.root, cfg.overwrite, "--out")
    method = status.get("method", run_cfg.train.method)
    mask = run.load_mask() if method == "pmp" else None
    weights = None
    if cfg.step is not None:
        weights, status = _earlier_state(run, status, mask, cfg.step)
    if mask is None and (cfg.commitment or cfg.mask_bundle or cfg.publish_density):
        raise ValueError(f"{run.root} is a {method} run without a mask: --commitment, --mask-bundle and "
                         "--publish-density need a PMP run")
    mask_bundle = Path(cfg.mask_bundle) if cfg.mask_bundle else None
    if mask_bundle is not None:
        if _inside(mask_bundle, out):
            raise ValueError(f"--mask-bundle {mask_bundle} lies inside the release directory {out}: the mask must "
                             "never be published; choose a private location outside the release")
        if _inside(mask_bundle, run.private):
            raise ValueError(f"--mask-bundle {mask_bundle} lies inside {run.private}, which already holds the mask")
        _check_target(mask_bundle, run.root, cfg.overwrite, "--mask-bundle", allow_run=True)

    evaluation = attached_evaluation(Path(cfg.report)) if cfg.report else None
    model = _load_checked(run, mask, weights)
    name = cfg.name or out.resolve().name
    remove_leftovers(out.resolve().parent, out.resolve().name)  # of an export of `out` that was interrupted
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        n_params, hf = _save_model(model, tmp, DTYPES[cfg.dtype], cfg.max_shard_size)
        _save_tokenizer(run.final if (run.final / "tokenizer_config.json").is_file() else run.tokenizer, tmp)
        with owner_only():  # the salt is an owner secret
            commit_hex = _commitment(run, mask) if cfg.commitment else None
        card = model_card(name=name, hf=hf, n_params=n_params, cfg=run_cfg, status=status, method=method,
                          dtype=cfg.dtype, license=cfg.license,
                          density=mask.density() if cfg.publish_density else None, commitment=commit_hex,
                          evaluation=evaluation)
        write_text(tmp / "README.md", card)
        _public_permissions(tmp)
        report = scan_release(tmp, run.root)
        if not report.ok:  # an invariant of this module, not bad user input
            raise RuntimeError(f"refusing to publish: the release fails its own audit\n{report}")
    if mask_bundle is not None:
        with owner_only(), atomic_dir(mask_bundle, overwrite=mask_bundle.exists()) as tmp:
            for f in (MASK_FILE, META_FILE):
                shutil.copy2(run.private / f, tmp / f)
    return out


# ---------------------------------------------------------------------------------------------- input checks
def _check_run(run) -> tuple[dict, object]:
    if not run.root.exists():
        raise FileNotFoundError(f"run directory {run.root} does not exist")
    if not run.root.is_dir() or not run.is_run():
        raise FileNotFoundError(f"{run.root} is not a pmp run directory (no run.json); pass the --out of "
                                "`pmp pretrain`")
    status = run.read_status()
    if status.get("status") != "finished":
        raise ValueError(f"run {run.root} is not finished (status {status.get('status')!r} at step "
                         f"{status.get('step')}); finish it with `pmp pretrain --out {run.root} --resume`")
    if not (run.final / "config.json").is_file() or not any(run.final.glob("*.safetensors")):
        raise ValueError(f"run {run.root} has no final model in {run.final}; finish it with "
                         f"`pmp pretrain --out {run.root} --resume`")
    return status, run.load_config()


def _earlier_state(run, status: dict, mask, step: int) -> tuple[Path, dict]:
    """The verified weights of an earlier `step`, and the status the model card should state for them."""
    final_step = int(status.get("step", 0))
    if not 0 < step < final_step:
        raise ValueError(f"--step must be between 1 and {final_step - 1} (the run finished at step {final_step}; "
                         f"export without --step for the final model), got {step}")
    if mask is not None and step <= int(mask.meta.get("identification_step", 0)):
        raise ValueError(f"--step {step}: the PMP run identified its mask at step {mask.meta['identification_step']};"
                         " earlier weights were trained densely (and rewound), so they are not a PMP model")
    weights = run.weights_at_step(step)
    ppl = run.val_ppl_by_step().get(step)
    return weights, {**status, "step": step, "final_val_ppl": ppl, "exported_step": step}


def _inside(path: Path, parent: Path) -> bool:
    path, parent = path.resolve(), parent.resolve()
    return path == parent or parent in path.parents


def _check_target(target: Path, run_root: Path, overwrite: bool, flag: str, allow_run: bool = False) -> None:
    """Refuse a target that is a file, overlaps the private run, or is non-empty (unless overwrite and it looks
    like a release or mask bundle: `--overwrite` must never delete unrelated data)."""
    if not allow_run and (_inside(target, run_root) or _inside(run_root, target)):
        raise ValueError(f"{flag} {target} overlaps the private run directory {run_root}: write the release "
                         "somewhere outside it")
    if allow_run and _inside(run_root, target):
        raise ValueError(f"{flag} {target} contains the run directory {run_root}; choose another directory")
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{flag} {target} exists and is not a directory")
    entries = list(target.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"{flag} {target} is not empty; pass --overwrite to replace it, or choose a new "
                              "directory")
    expected = {"mask.safetensors", "mask.json"} if flag == "--mask-bundle" else None
    unknown = [p.name for p in entries
               if p.is_dir() or (expected is not None and p.name not in expected)
               or (expected is None and not RELEASE_FILE_RE.match(p.name))]
    if unknown:
        raise FileExistsError(f"--overwrite: {flag} {target} holds files a release does not have ({unknown[0]}, "
                              "...); refusing to delete it -- choose a new directory")


# ---------------------------------------------------------------------------------------------- writing
def _load_checked(run: RunDir, mask: PrivateMask | None, weights: Path | None) -> torch.nn.Module:
    """The model to publish (final, or an earlier state), refused when a weight is not finite or -- for a PMP run --
    when its complement is not the run's stored init (e.g. two runs wrote into one directory)."""
    model = AutoModelForCausalLM.from_pretrained(str(run.final), dtype=torch.float32)
    if weights is not None:  # an earlier state of the same run: same architecture, every key present
        model.load_state_dict(load_file(str(weights)), strict=True)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"{run.root}: the weights to release hold NaN/inf values ({len(bad)} tensors, e.g. {bad[0]}); "
                         "the run diverged -- refusing to publish it")
    if mask is not None:
        check_complement(dict(model.named_parameters()), mask, run, run.final)
    return model


def _save_model(model: torch.nn.Module, tmp: Path, dtype: torch.dtype, max_shard_size):
    model.to(dtype)
    model.config.dtype = dtype
    model.config._name_or_path = ""
    if getattr(model, "generation_config", None) is not None:
        model.generation_config._name_or_path = ""
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    hf = _scrub_json(tmp / "config.json", stock_config_keys(model.config.model_type))
    _scrub_json(tmp / "generation_config.json", set(GenerationConfig().to_dict()))
    _only_format_metadata(tmp)
    _check_key_set(model.config, tmp)
    return sum(p.numel() for p in model.parameters()), hf


def _scrub_json(path: Path, allowed: set[str]) -> dict:
    """Keep only stock fields, none named after the mask or the run; `_name_or_path` never points anywhere."""
    if not path.is_file():
        return {}
    obj = json.loads(path.read_text())
    clean = {k: v for k, v in obj.items() if k in allowed and not any(w in k.lower() for w in FORBIDDEN_KEY_WORDS)}
    if "_name_or_path" in clean:
        clean["_name_or_path"] = ""
    write_json(path, clean)
    return clean


def _only_format_metadata(tmp: Path) -> None:
    for f in sorted(tmp.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            meta = s.metadata()
        if meta != {"format": "pt"}:
            save_file(load_file(str(f)), str(f), metadata={"format": "pt"})


def _check_key_set(config, tmp: Path) -> None:
    """The saved keys are exactly a fresh stock model's (less the tied copies save_pretrained leaves out)."""
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    fresh_keys, seen, tied = set(fresh.state_dict()), {}, set()
    for n, p in fresh.named_parameters(remove_duplicate=False):
        tied.add(n) if id(p) in seen else seen.setdefault(id(p), n)
    saved = set()
    for f in tmp.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            saved |= set(s.keys())
    if saved - fresh_keys or fresh_keys - saved - tied:
        raise RuntimeError(f"saved key set differs from a fresh stock model's: extra {sorted(saved - fresh_keys)}, "
                           f"missing {sorted(fresh_keys - saved - tied)}")


def _save_tokenizer(src: Path, tmp: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.name_or_path = ""
    tok.save_pretrained(str(tmp))
    path = tmp / "tokenizer_config.json"
    obj = json.loads(path.read_text())
    obj.pop("name_or_path", None)
    write_json(path, obj)


def _public_permissions(tmp: Path) -> None:
    """Temp files are created 0600 / 0700; a release is meant to be read by others (umask respected)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o755 & ~umask)
    for f in tmp.iterdir():
        f.chmod(0o644 & ~umask)


# ---------------------------------------------------------------------------------------------- commitment
def _commit(salt: bytes, fingerprint: str) -> str:
    return hashlib.sha256(salt + bytes.fromhex(fingerprint)).hexdigest()


def _commitment(run: RunDir, mask: PrivateMask) -> str:
    """sha256(salt || fingerprint); the salt is drawn once per mask and kept in RUN/private/commitment.json, so
    re-exporting the same run publishes the same commitment."""
    fp = mask.fingerprint()
    if run.commitment.is_file():
        rec = json.loads(run.commitment.read_text())
        if rec.get("fingerprint") == fp:
            return rec["commitment"]
    salt = secrets.token_bytes(32)
    rec = {"scheme": "sha256(salt || mask fingerprint bytes)", "salt": salt.hex(), "fingerprint": fp,
           "commitment": _commit(salt, fp)}
    write_json(run.commitment, rec)
    return rec["commitment"]


def verify_commitment(release: str | Path, run_dir: str | Path) -> bool:
    """True iff the commitment in `release`'s card opens with the salt and mask of the private run `run_dir`."""
    card = Path(release) / "README.md"
    if not card.is_file():
        raise FileNotFoundError(f"{release} has no README.md model card")
    m = COMMITMENT_RE.search(card.read_text())
    if m is None:
        raise ValueError(f"the model card of {release} publishes no ownership commitment (export with --commitment)")
    run = RunDir(Path(run_dir))
    if not run.commitment.is_file():
        raise FileNotFoundError(f"{run.commitment} is missing: this run never made a commitment")
    salt = bytes.fromhex(json.loads(run.commitment.read_text())["salt"])
    return secrets.compare_digest(_commit(salt, run.load_mask().fingerprint()), m.group(1))
