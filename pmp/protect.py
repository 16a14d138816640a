"""`pmp protect`: turn a finished run into a protected run directory that `pmp export`, `pmp attack` and the rest
treat like any other run.

Implemented: `rescale` -- the function-preserving secret rescaling of pmp/rescale.py, applied to a dense run (a PMP
run's frozen complement would stop equalling its init). The protected run holds the base run's config and
tokenizer, the rescaled model in final/, and the secret scales in private/rescale.{safetensors,json}; run.json
records the method, the base and the strength. The owner un-scales with the key for authorized fine-tuning.

RUN2/
  run.json, config.yaml, tokenizer/   as the base run's (run.json: method rescale, base, strength)
  final/                               the rescaled model (stock HF directory)
  private/rescale.safetensors + .json  the secret log-scales per layer (owner only)
"""

from __future__ import annotations

import copy
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pmp.atomic import atomic_dir, owner_only, sha256_file, write_json
from pmp.config import ProtectConfig
from pmp.paths import overlaps
from pmp.provenance import provenance
from pmp.rescale import draw_key, fold_norms, rescale
from pmp.run_dir import RunDir

PROBE_TOKENS = 64  # tokens of the function check (a random batch: the symmetry is exact for any input)


def protect(cfg: ProtectConfig) -> Path:
    """Library entry point of `pmp protect`: write the protected run `cfg.out`; every input is checked first."""
    cfg.validate()
    base, out = RunDir(Path(cfg.base)), Path(cfg.out)
    status = _check_base(base)
    if overlaps(out, base.root):
        raise ValueError(f"--out {out} overlaps the base run {base.root}: choose a new directory outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty directory; choose a new one")
    model = AutoModelForCausalLM.from_pretrained(str(base.final), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
    fold_norms(model)
    key = draw_key(model, cfg.strength, torch.Generator().manual_seed(secrets.randbits(63)))
    rescale(model, key)
    check = _function_check(model, ids, ref, cfg.strength, cfg.bf16_tolerance)
    # atomic: a concurrent `protect` into the same --out fails at the rename instead of mixing two keys
    with owner_only(), atomic_dir(out, overwrite=out.exists()) as tmp:
        run = RunDir(tmp)
        shutil.copy2(base.config, run.config)
        shutil.copytree(base.tokenizer, run.tokenizer)
        model.save_pretrained(str(run.final))
        AutoTokenizer.from_pretrained(str(base.tokenizer)).save_pretrained(str(run.final))
        run.private.mkdir()
        save_file({k: v.contiguous() for k, v in key.tensors().items()}, str(run.rescale_key))
        write_json(run.rescale_record, {"strength": cfg.strength, "sha256": sha256_file(run.rescale_key),
                                        "scheme": "pmp.rescale: fold norms, then up/down, v/o, q/k pairs by exp(key)"})
        write_json(run.status, {**{k: status[k] for k in ("step", "final_val_loss", "final_val_ppl") if k in status},
                                "status": "finished", "method": cfg.method, "base": str(base.root),
                                "strength": cfg.strength, "function_check": check, "finished_with": provenance()})
    print(f"[protect] {cfg.method} (C = {cfg.strength:g}) of {base.root} -> {out}: logits unchanged "
          f"(fp32 max rel diff {check['fp32_max_rel_diff']:.1e}, bf16 {check['bf16_max_rel_diff']:.1e}); "
          f"the key stays in {out}/private")
    return out


def _check_base(base: RunDir) -> dict:
    if not base.is_run():
        raise FileNotFoundError(f"--base {base.root} is not a pmp run directory (no run.json): pass the --out of "
                                "`pmp pretrain` (a release as base is not supported yet)")
    status = base.read_status()
    if status.get("status") != "finished":
        raise ValueError(f"--base {base.root} is not finished; finish it with `pmp pretrain --out {base.root} "
                         "--resume`")
    if status.get("method") != "dense":
        raise ValueError(f"--base {base.root} is a {status.get('method')} run: rescale protects a dense model (a "
                         "PMP run's frozen complement would no longer equal its stored init)")
    return status


def _function_check(model: torch.nn.Module, ids: torch.Tensor, ref: torch.Tensor, strength: float,
                    bf16_tol: float) -> dict:
    """The rescaled model must compute the base's function: fp32 to 1e-4, bf16 to `bf16_tol` without overflow."""
    with torch.no_grad():
        fp32 = model(input_ids=ids).logits.double()
        bf16 = copy.deepcopy(model).to(torch.bfloat16)(input_ids=ids).logits.double()
    scale = ref.abs().max()
    d32, d16 = float((fp32 - ref).abs().max() / scale), float((bf16 - ref).abs().max() / scale)
    if not d32 < 1e-4:
        raise RuntimeError(f"rescaled model changed the fp32 logits by {d32:.2e} (relative): a bug in pmp.rescale")
    if not torch.isfinite(bf16).all() or not d16 <= bf16_tol:
        raise ValueError(f"strength {strength:g}: in bf16 the rescaled model's logits move by {d16:.3g} relative "
                         f"(> bf16_tolerance) or overflow; choose a smaller strength")
    return {"fp32_max_rel_diff": d32, "bf16_max_rel_diff": d16, "probe_tokens": int(ids.numel())}
