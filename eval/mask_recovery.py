"""Mask-recovery attacks: read the private mask off a public release, using public information only.

Every attack maps the release (+ the public architecture, this code, and data anyone can have) to a score per
entry, higher = "probably masked (trained)". Scores are dicts {parameter name: tensor of the parameter's shape}; an
attack that does not apply to a tensor leaves it out. Nothing here ever reads a private run directory: the ground
truth enters only in `pmp.eval.audit`, which scores these rankings.

Why the release can betray the mask: PMP keeps the complement bit-exactly at its initial values, so
  - entries at an init CONSTANT (RMSNorm weights = 1.0, biases = 0.0) that were never trained are still exactly
    that constant: a "structural tell" (`structural`);
  - the complement of a random tensor is an exact sample of the init distribution (Llama: N(0, 0.02^2)) while
    trained entries drifted away from it (`magnitude`, `zscore`, `init_nll`, `init_mixture`);
  - trained entries sit near a stationary point of the training loss, untrained ones do not (`grad*`, `fisher`);
  - whoever regenerates the initial weights compares exactly (`seed_guess`). `torch.manual_seed` keeps only the
    low 32 bits of a seed (on CPU); `pmp.model.seed_rng` now fills the whole generator state from the 128-bit
    seed, and the audit measures whether s and s + 2^32 still collide.

Seed guessing is fast because only a fingerprint is regenerated per seed: the first initial-weight draw that
survives into the model, after skipping the random numbers the model's construction consumed. The draw sequence
is traced once from `pmp.model.build_model` (public code), the skip is one bulk `uniform_` of the same count of
32-bit draws, and the fast path is validated against a real build before use (else exact replay, else full builds).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import pmp.model

Scores = dict[str, torch.Tensor]
FINGERPRINT_LEN = 4096  # entries of the fingerprint tensor compared per seed (a multiple of 16: see _consumed)
COMMON_SEEDS = (1234, 2020, 2021, 2022, 2023, 2024, 2025, 2026, 3407, 4242, 12345, 31337, 54321, 123456, 123456789)


# ---------------------------------------------------------------------------------------------- the release
@dataclass
class Release:
    path: Path
    config: object  # transformers PretrainedConfig
    model: torch.nn.Module  # fp32, eval mode
    weights: dict[str, torch.Tensor]  # named_parameters (fp32 views of the model's parameters)
    storage_dtype: torch.dtype  # dtype of the tensors on disk (bf16 releases compare after rounding)


def load_release(path: str | Path) -> Release:
    """A release directory (stock HF model dir with a tokenizer), loaded in fp32 on CPU."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from pmp.eval.probes import check_release

    p = check_release(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any failure means the release cannot be audited
        raise ValueError(f"release {p}: the model cannot be loaded ({type(e).__name__}: {e})") from None
    model.eval()
    dtype = torch.float32
    shards = sorted(p.glob("*.safetensors"))
    if shards:
        with safe_open(str(shards[0]), "pt") as f:
            dtype = f.get_tensor(next(iter(f.keys()))).dtype
    weights = {n: prm.detach() for n, prm in model.named_parameters()}
    return Release(p, model.config, model, weights, dtype)


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if dtype == torch.float32 else t.to(dtype).float()


# ---------------------------------------------------------------------------------------------- init knowledge
@dataclass
class InitDist:
    """What the attacker knows about one tensor's initial distribution, measured from builds at public seeds."""
    const_mask: torch.Tensor  # bool, entries that are the same constant at every seed (norm weights, pad row...)
    const_value: torch.Tensor  # the constant at those entries (0 elsewhere)
    mean: float  # of the random entries
    std: float  # of the random entries (0 when the whole tensor is constant)

    @property
    def all_const(self) -> bool:
        return bool(self.const_mask.all())


def init_distribution(release: Release, seeds: tuple[int, ...] = (0, 1, 2),
                      norm_jitter: float = 0.0) -> dict[str, InitDist]:
    """Per tensor: the entries that are constant at init, and mean/std of the rest (the empirical init check).

    `norm_jitter` > 0 is a what-if of a proposed fix: constant init entries get N(const, jitter^2) instead."""
    from pmp.model import build_model

    builds = [dict(build_model(release.config, s).named_parameters()) for s in seeds]
    out = {}
    for n, w in release.weights.items():
        if n not in builds[0] or builds[0][n].shape != w.shape:
            raise ValueError(f"release parameter {n} is not in the architecture built from {release.path}/config.json")
        x = builds[0][n].detach()
        const = torch.ones_like(x, dtype=torch.bool)  # equal at every seed (two seeds: ~1 chance tie per 10^7)
        for b in builds[1:]:
            const &= b[n].detach() == x
        rand = x[~const]
        mean, std = (float(rand.mean()), float(rand.std())) if rand.numel() > 1 else (0.0, 0.0)
        if norm_jitter > 0 and rand.numel() <= 1:  # the fix applies to all-constant tensors (norms, biases)
            const, mean, std = torch.zeros_like(const), float(x.flatten()[0]), norm_jitter
        out[n] = InitDist(const, torch.where(const, x, torch.zeros_like(x)), mean, std)
    return out


# ---------------------------------------------------------------------------------------------- weight attacks
def magnitude(release: Release) -> Scores:
    return {n: w.abs() for n, w in release.weights.items()}


def zscore(release: Release) -> Scores:
    out = {}
    for n, w in release.weights.items():
        sd = float(w.std()) if w.numel() > 1 else 0.0
        out[n] = (w - w.mean()).abs() / (sd if sd > 0 else 1.0)
    return out


_CERTAIN = 1e6  # score of an entry whose value is impossible (or certain) under the init distribution


def init_nll(release: Release, dist: dict[str, InitDist]) -> Scores:
    """Negative log-likelihood under the init distribution: Gaussian for random entries; a point mass for
    constant-init entries (exactly at the constant = -_CERTAIN, anywhere else = +_CERTAIN + distance)."""
    out = {}
    for n, w in release.weights.items():
        d = dist[n]
        sd = d.std if d.std > 0 else 1.0
        s = 0.5 * ((w - d.mean) / sd) ** 2 + torch.log(torch.tensor(sd)) + 0.9189385
        off = w != _rounded(d.const_value, release.storage_dtype)
        s = torch.where(d.const_mask, torch.where(off, _CERTAIN + (w - d.const_value).abs(), -_CERTAIN), s)
        out[n] = s
    return out


def init_mixture(release: Release, dist: dict[str, InitDist], iters: int = 30, sample: int = 20_000,
                 seed: int = 0, fits: dict | None = None) -> Scores:
    """Posterior P(trained | w) under a per-tensor two-component mixture: the KNOWN init Gaussian (complement)
    and a free Gaussian (trained entries) fitted by EM. Calibrated across tensors, unlike raw |w|."""
    out, g = {}, torch.Generator().manual_seed(seed)
    for n, w in release.weights.items():
        d = dist[n]
        if d.std <= 0:  # an all-constant tensor: the point mass decides
            out[n] = (w != _rounded(d.const_value, release.storage_dtype)).float()
            continue
        x = w[~d.const_mask].double()
        if x.numel() > sample:
            x = x[torch.randint(x.numel(), (sample,), generator=g)]
        m0, s0 = d.mean, d.std
        pi, m1, s1 = 0.5, float(x.mean()), max(float(x.std()), 1.5 * s0)

        for _ in range(iters):
            r = _posterior(x, m0, s0, pi, m1, s1)
            pi = float(r.mean().clamp(1e-4, 1 - 1e-4))
            m1 = float((r * x).sum() / r.sum().clamp_min(1e-12))
            s1 = max(float(((r * (x - m1) ** 2).sum() / r.sum().clamp_min(1e-12)).sqrt()), 1e-3 * s0)
        if fits is not None:
            fits[n] = {"pi": pi, "mean": m1, "std": s1}
        s = _posterior(w.double(), m0, s0, pi, m1, s1).float()
        off = w != _rounded(d.const_value, release.storage_dtype)
        out[n] = torch.where(d.const_mask, off.float(), s)
    return out


def shadow_scores(release: Release, shadow_masks: dict[str, torch.Tensor], mixture: Scores,
                  fits: dict[str, dict]) -> dict[str, Scores]:
    """Attacks that use the attacker's OWN shadow PMP run (public code, public data, its own random init): its mask
    is known to the attacker. `shadow_mask`: the shadow mask itself (same data -> same frequent-token rows, same
    tensors favoured). `shadow_density`: the shadow mask's per-tensor density (which tensors the global top-rho
    |gradient| rule favours is a property of the architecture and data). `shadow_prior+mixture`: the per-tensor
    density as the prior of the `init_mixture` posterior: logit P = logit(shadow density) + log likelihood ratio."""
    out: dict[str, Scores] = {"shadow_mask": {}, "shadow_density": {}, "shadow_prior+mixture": {}}
    for n, w in release.weights.items():
        m = shadow_masks.get(n)
        if m is None or m.shape != w.shape:
            continue
        dens = float(m.float().mean())
        out["shadow_mask"][n] = m.float()
        out["shadow_density"][n] = torch.full_like(w, dens)
        prior = min(max(dens, 1e-4), 1 - 1e-4)
        post = mixture[n].double().clamp(1e-12, 1 - 1e-12)
        llr = torch.logit(post) - math.log(fits[n]["pi"] / (1 - fits[n]["pi"])) if n in fits else torch.logit(post)
        out["shadow_prior+mixture"][n] = torch.sigmoid(math.log(prior / (1 - prior)) + llr).float()
    return out


def _posterior(v: torch.Tensor, m0: float, s0: float, pi: float, m1: float, s1: float) -> torch.Tensor:
    """P(component 1 | v) for pi*N(m1, s1^2) + (1-pi)*N(m0, s0^2)."""
    l0 = -0.5 * ((v - m0) / s0) ** 2 - math.log(s0) + math.log(1 - pi)
    l1 = -0.5 * ((v - m1) / s1) ** 2 - math.log(s1) + math.log(pi)
    return torch.sigmoid(l1 - l0)


def structural(release: Release, dist: dict[str, InitDist]) -> Scores:
    """Structural tells: on entries that are a constant at init (norm weights 1.0, biases 0.0, the padding row),
    0 = exactly at the constant (probably untrained), 1 = moved. Random-init entries are NaN (no opinion);
    tensors without constant-init entries are left out."""
    out = {}
    for n, w in release.weights.items():
        d = dist[n]
        if not d.const_mask.any():
            continue
        off = (w != _rounded(d.const_value, release.storage_dtype)).float()
        out[n] = torch.where(d.const_mask, off, torch.full_like(w, float("nan")))
    return out


# ---------------------------------------------------------------------------------------------- gradients
def text_batches(release: Release, texts: list[str], batches: int, batch_size: int = 8,
                 seq_len: int = 128) -> list[torch.Tensor]:
    """Token blocks of the attacker's text with the release's own tokenizer."""
    from pmp.eval.probes import load_tokenizer

    tok = load_tokenizer(release.path)
    seq_len = min(seq_len, int(getattr(release.config, "max_position_embeddings", seq_len) or seq_len))
    need, ids = batches * batch_size * seq_len, []
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        if len(ids) >= need:
            break
    n_blocks = min(len(ids) // seq_len, batches * batch_size)
    if n_blocks < 1:
        raise ValueError(f"the attacker text gives {len(ids)} tokens, fewer than one block of {seq_len}: "
                         "give more text (--text FILE or --task NAME)")
    blocks = torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len)
    return [blocks[i: i + batch_size] for i in range(0, n_blocks, batch_size)]


def _grad_stats(model: torch.nn.Module, batches: list[torch.Tensor], t_end: float) -> tuple[dict, dict, dict, int]:
    params = dict(model.named_parameters())
    g_sum = {n: torch.zeros_like(p) for n, p in params.items()}
    g_sq = {n: torch.zeros_like(p) for n, p in params.items()}
    g_abs = {n: torch.zeros_like(p) for n, p in params.items()}
    used = 0
    for x in batches:
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                g_sum[n] += p.grad
                g_sq[n] += p.grad ** 2
                g_abs[n] += p.grad.abs()
        used += 1
        if time.perf_counter() > t_end:
            break
    model.zero_grad(set_to_none=True)
    return g_sum, g_sq, g_abs, used


def gradient_scores(release: Release, batches: list[torch.Tensor], max_seconds: float = 0.0,
                    shadow_seed: int = 20_260_101) -> tuple[dict[str, Scores], dict]:
    """Gradients of the LM loss on the attacker's text.

    At the released weights: |mean grad| (`grad`), mean squared grad (`fisher`, the diagonal empirical Fisher) and
    |mean| / rms over batches (`grad_snr`). Masked entries were chosen for their large |gradient| during warm-up and
    stay the sensitive coordinates. (The negated scores `-s` have AUROC exactly 1 - AUROC(s); not listed.)
    At a SHADOW init (the architecture built at a public seed, weights unrelated to the secret init): mean |grad|
    (`shadow_grad`), a cheap stand-in for re-running the public identification rule: which tensors, embedding rows
    (token frequencies) and lm_head rows get large gradients is a property of the architecture and the data, not
    of the particular random init."""
    from pmp.model import build_model

    t0 = time.perf_counter()
    half = t0 + (max_seconds / 2 if max_seconds else float("inf"))
    g_sum, g_sq, _, used = _grad_stats(release.model, batches, half)
    out: dict[str, Scores] = {"grad": {}, "fisher": {}, "grad_snr": {}, "shadow_grad": {}}
    for n in g_sum:
        mean, msq = g_sum[n] / used, g_sq[n] / used
        out["grad"][n] = mean.abs()
        out["fisher"][n] = msq
        out["grad_snr"][n] = mean.abs() / (msq.sqrt() + 1e-30)
    shadow = build_model(release.config, shadow_seed)
    shadow.eval()
    _, _, g_abs, used_s = _grad_stats(shadow, batches[:used], t0 + max_seconds if max_seconds else float("inf"))
    out["shadow_grad"] = {n: g / used_s for n, g in g_abs.items() if n in release.weights}
    return out, {"batches": used, "shadow_batches": used_s, "tokens": int(sum(b.numel() for b in batches[:used])),
                 "seconds": time.perf_counter() - t0, "shadow_seed": shadow_seed}


# ---------------------------------------------------------------------------------------------- seed guessing
@dataclass
class InitTrace:
    """The RNG draws of `build_model` (public code), up to the first draw that survives into the model."""
    calls: list[tuple]  # (op, shape, dtype, args, kwargs) in order, the last one is the fingerprint draw
    name: str  # the parameter the fingerprint draw initialises
    length: int  # fingerprint entries compared
    method: str = ""  # "bulk skip" | "exact replay" | "full build"
    random: torch.Tensor | None = None  # bool: fingerprint entries that differ between seeds (not init constants)
    notes: list[str] = field(default_factory=list)


def trace_init(config, seed: int = 987_654) -> InitTrace:
    from pmp.model import build_model

    calls, orig = [], {op: getattr(torch.Tensor, op) for op in ("normal_", "uniform_")}

    def spy(op):
        def f(self, *a, **k):
            calls.append((op, tuple(self.shape), self.dtype, a, k, self.data_ptr(), self.is_contiguous()))
            return orig[op](self, *a, **k)
        return f

    for op in orig:
        setattr(torch.Tensor, op, spy(op))
    try:
        model = build_model(config, seed)
    finally:
        for op, f in orig.items():
            setattr(torch.Tensor, op, f)
    ptr = {p.data_ptr(): n for n, p in model.named_parameters()}
    last = {}
    for i, c in enumerate(calls):
        last[c[5]] = i
    surviving = [i for p, i in last.items() if p in ptr]
    if not surviving:
        raise ValueError("seed guessing: no random draw of build_model lands in a parameter (unexpected init)")
    first = min(surviving)
    name = ptr[calls[first][5]]
    numel = int(torch.Size(calls[first][1]).numel())
    length = min(FINGERPRINT_LEN, numel // 16 * 16) if numel >= 16 else numel
    return InitTrace([c[:5] + (c[6],) for c in calls[: first + 1]], name, length)


def _consumed(op: str, numel: int, dtype: torch.dtype, contiguous: bool) -> int | None:
    """32-bit draws one CPU mt19937 call consumes, where known (verified by `_fingerprint` at a real build):
    float32 uniform_ takes 1 per entry; float32 normal_ on >= 16 contiguous entries fills uniforms, then
    Box-Muller in blocks of 16, redrawing the last 16 when n is not a multiple of 16."""
    if dtype != torch.float32 or not contiguous:
        return None
    if op == "uniform_":
        return numel
    if op == "normal_" and numel >= 16:
        return numel + (16 if numel % 16 else 0)
    return None


def _seed_rng(seed: int) -> None:
    """Seed the global CPU RNG the way `build_model` does (a `pmp.model.seed_rng` hook if the model factory has
    one, else `torch.manual_seed`); a mismatch is caught by `choose_fingerprint_method`'s validation."""
    import pmp.model

    getattr(pmp.model, "seed_rng", torch.manual_seed)(seed)


def _fingerprint(trace: InitTrace, seed: int, bulk: bool) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        _seed_rng(seed)
        skip = 0
        for op, shape, dtype, a, k, contig in trace.calls[:-1]:
            n = int(torch.Size(shape).numel())
            used = _consumed(op, n, dtype, contig) if bulk else None
            if used is not None:
                skip += used
                continue
            if skip:
                torch.empty(skip).uniform_()
                skip = 0
            getattr(torch.empty(shape, dtype=dtype), op)(*a, **k)
        if skip:
            torch.empty(skip).uniform_()
        op, shape, dtype, a, k, _ = trace.calls[-1]
        if trace.length == int(torch.Size(shape).numel()):
            return getattr(torch.empty(shape, dtype=dtype), op)(*a, **k).flatten()
        return getattr(torch.empty(trace.length, dtype=dtype), op)(*a, **k)


def _built_fingerprint(config, trace: InitTrace, seed: int) -> torch.Tensor:
    from pmp.model import build_model

    return dict(build_model(config, seed).named_parameters())[trace.name].detach().flatten()[: trace.length]


def choose_fingerprint_method(config, trace: InitTrace) -> InitTrace:
    """Validate the fast fingerprint against real builds at two seeds; fall back to slower exact methods."""
    refs = {s: _built_fingerprint(config, trace, s) for s in (3, 77)}
    trace.random = refs[3] != refs[77]  # e.g. the padding row of an embedding is 0 at every seed
    for method, bulk in (("bulk skip", True), ("exact replay", False)):
        if all(torch.equal(_fingerprint(trace, s, bulk)[trace.random], r[trace.random]) for s, r in refs.items()):
            trace.method = method
            return trace
    trace.method = "full build"
    trace.notes.append("the traced RNG replay does not reproduce build_model: each seed is a full build (slow)")
    return trace


def public_seeds(release_dir: Path) -> list[int]:
    """Integers the release's own files call a seed (config.json, generation_config.json, README.md...)."""
    found = set()
    for f in sorted(release_dir.glob("*.json")) + sorted(release_dir.glob("*.md")):
        try:
            text = f.read_text(errors="ignore")
        except OSError:
            continue
        for m in re.finditer(r"seed[\"'_ a-z]*[\"']?\s*[:=]\s*(\d{1,20})", text, flags=re.IGNORECASE):
            found.add(int(m.group(1)))
    return sorted(found)


def seed_guess(release: Release, max_seed: int = 1000, extra_seeds: list[int] | None = None,
               max_seconds: float = 0.0) -> tuple[Scores | None, dict]:
    """Try seeds 0..max_seed, the release's public seeds and common ones; on a fingerprint match, build the
    init and score 1 where the release differs from it (trained), 0 where equal (complement)."""
    t0 = time.perf_counter()
    trace = choose_fingerprint_method(release.config, trace_init(release.config))
    target = release.weights[trace.name].flatten()[: trace.length][trace.random]
    public = public_seeds(release.path)
    cands = list(dict.fromkeys(list(extra_seeds or []) + public + list(range(max_seed + 1)) + list(COMMON_SEEDS)))
    def fingerprint(seed: int) -> torch.Tensor:
        fp = (_built_fingerprint(release.config, trace, seed) if trace.method == "full build"
              else _fingerprint(trace, seed, trace.method == "bulk skip"))
        return _rounded(fp, release.storage_dtype)[trace.random]

    truncated = torch.equal(fingerprint(5), fingerprint(5 + 2**32))  # measured, not assumed
    info = {"fingerprint_tensor": trace.name, "fingerprint_entries": int(trace.random.sum()), "method": trace.method,
            "notes": trace.notes, "public_seeds": public, "candidates": len(cands), "tried": 0,
            "matched_seed": None, "seed_truncated_to_32_bits": truncated,
            "effective_seed_bits": 32 if truncated else pmp.model.SEED_BITS,
            "note": ("build_model(cfg, s) == build_model(cfg, s + 2^32) (torch.manual_seed keeps the low 32 bits on "
                     "CPU): a brute force needs at most 2^32 fingerprints, whatever the seed's size") if truncated
            else "seeds s and s + 2^32 give different inits"}
    t_loop = time.perf_counter()
    perm = torch.randperm(target.numel(), generator=torch.Generator().manual_seed(0))
    for s in cands:
        if max_seconds and time.perf_counter() - t0 > max_seconds:
            info["stopped"] = f"time budget ({max_seconds:.0f}s) reached after {info['tried']} seeds"
            break
        fp = fingerprint(s)
        n_eq = int((fp == target).sum())
        # control: the same values at shuffled positions measure chance collisions (many in bf16, ~0 in fp32)
        n_ctrl = int((fp[perm] == target).sum())
        info["tried"] += 1
        if n_eq >= 4 and n_eq > 5 * n_ctrl + 0.002 * trace.length:
            info["matched_seed"] = int(s)
            info["fingerprint_equal"] = n_eq
            break
    info["seconds"] = time.perf_counter() - t0
    dt = time.perf_counter() - t_loop
    info["seeds_per_second"] = info["tried"] / dt if dt > 0 and info["tried"] else None
    if info["seeds_per_second"]:
        space = 2**32 if truncated else 2**pmp.model.SEED_BITS
        info["cpu_days_for_whole_seed_space_at_this_rate"] = space / info["seeds_per_second"] / 86400
    if info["matched_seed"] is None:
        return None, info
    from pmp.model import build_model

    init = dict(build_model(release.config, info["matched_seed"]).named_parameters())
    scores = {n: (w != _rounded(init[n].detach(), release.storage_dtype)).float() for n, w in release.weights.items()}
    info["entries_equal_to_init"] = int(sum(int((s == 0).sum()) for s in scores.values()))
    return scores, info


# ---------------------------------------------------------------------------------------------- recovered mask
def recovered_mask(release: Release, scores: Scores, rho: float, meta: dict | None = None):
    """The attacker's mask: global top-rho entries of `scores` (ties broken by position), as a PrivateMask."""
    from pmp.mask import PrivateMask

    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    names = [n for n in release.weights if n in scores]
    if not names:
        raise ValueError("recovered_mask: the scores cover no release parameter")
    flat = torch.cat([scores[n].flatten().float() for n in names])
    k = max(1, round(rho * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    masks, i = {}, 0
    for n in names:
        m = release.weights[n].numel()
        masks[n] = keep[i: i + m].view(release.weights[n].shape)
        i += m
    return PrivateMask.from_bool(masks, {"source": "recovered", "density": rho, **(meta or {})})


def recovered_mask_sparse_attack_inputs(mask_dir: str | Path, release_dir: str | Path) -> dict:
    """What a sparse fine-tuning attack needs to train exactly the recovered entries: the loaded mask's
    layouts (for `pmp.masked_state.MaskedModel` / `pmp.eval.finetune.finetune(..., mask_layouts=...)`), checked
    against the release's parameter names and shapes, plus the record fields for a result cell."""
    from pmp.mask import PrivateMask

    mask = PrivateMask.load(mask_dir)
    cfg_file = Path(release_dir) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{release_dir} is not a release directory (no config.json)")
    from transformers import AutoConfig

    from pmp.model import build_model

    mask.check_matches(build_model(AutoConfig.from_pretrained(str(release_dir)), 0))
    return {"layouts": mask.layouts, "density": mask.density(), "sha256": mask.fingerprint(),
            "mask_info": {"source": "recovered", "path": str(mask_dir), "density": mask.density(),
                          "sha256": mask.fingerprint(), "attack": mask.meta.get("attack")}}


def load_attacker_texts(text_file: str = "", task: str = "", cache_dir: str = "") -> tuple[list[str], str]:
    """The attacker's text for gradient attacks: a file, a task's train split, or the default LM probe."""
    if text_file:
        p = Path(text_file)
        if not p.is_file():
            raise FileNotFoundError(f"--text {p} does not exist")
        text = p.read_text(errors="replace")
        return [text[i: i + 2000] for i in range(0, len(text), 2000)], f"file {p}"  # chunks: below max length
    from pmp.data.prepare import is_prepared
    from pmp.data.tasks import default_lm_probe, load_task

    name = task or default_lm_probe()
    if not task and not is_prepared(cache_dir):
        return [], "none (data cache not prepared; pass --text FILE or --task NAME)"
    data = load_task(name, cache_dir)
    return list(data.train["text"]), f"task {name} (train split)"
