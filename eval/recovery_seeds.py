"""Seed forensics: regenerate the initial weights by guessing the init seed, then read the mask off exactly.

Whoever regenerates the initial weights compares exactly: PMP keeps the complement bit-exactly at init, so every
entry that differs from the regenerated init was trained (`seed_guess`). `torch.manual_seed` keeps only the low 32
bits of a seed (on CPU); `pmp.model.seed_rng` now fills the whole generator state from the 128-bit seed, and the
audit measures whether s and s + 2^32 still collide.

Seed guessing is fast because only a fingerprint is regenerated per seed: the first initial-weight draw that
survives into the model, after skipping the random numbers the model's construction consumed. The draw sequence
is traced once from `pmp.model.build_model` (public code), the skip is one bulk `uniform_` of the same count of
32-bit draws, and the fast path is validated against a real build before use (else exact replay, else full builds).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pmp import model as model_factory
from pmp.eval.release_weights import Release, Scores, as_stored
from pmp.model import SEED_BITS, build_model

FINGERPRINT_LEN = 4096  # entries of the fingerprint tensor compared per seed (a multiple of 16: see _consumed)
COMMON_SEEDS = (1234, 2020, 2021, 2022, 2023, 2024, 2025, 2026, 3407, 4242, 12345, 31337, 54321, 123456, 123456789)
_RNG_DRAW_METHODS = ("normal_", "uniform_")  # the in-place draws torch.nn.init uses


@dataclass
class InitTrace:
    """The RNG draws of `build_model` (public code), up to the first draw that survives into the model."""
    calls: list[tuple]  # (op, shape, dtype, args, kwargs) in order, the last one is the fingerprint draw
    name: str  # the parameter the fingerprint draw initialises
    length: int  # fingerprint entries compared
    method: str = ""  # "bulk skip" | "exact replay" | "full build"
    random: torch.Tensor | None = None  # bool: fingerprint entries that differ between seeds (not init constants)
    notes: list[str] = field(default_factory=list)


@contextmanager
def _recording_rng_draws(calls: list[tuple]) -> Iterator[None]:
    """While active, every `Tensor.normal_` / `Tensor.uniform_` call appends (op, shape, dtype, args, kwargs,
    data_ptr, contiguous) to `calls`, then draws as usual.

    The init code of `transformers` reaches the RNG through these tensor methods (via torch.nn.init), and the class
    attribute is the only hook in it, so they are patched on `torch.Tensor` itself: process-wide, for every tensor.
    A patch left behind would silently record (and slow) every later draw of the process, so the originals are
    restored on exit however the block ends (an exception in build_model included)."""
    orig = {op: getattr(torch.Tensor, op) for op in _RNG_DRAW_METHODS}

    def spy(op):
        def f(self, *a, **k):
            calls.append((op, tuple(self.shape), self.dtype, a, k, self.data_ptr(), self.is_contiguous()))
            return orig[op](self, *a, **k)
        return f

    try:
        for op in orig:
            setattr(torch.Tensor, op, spy(op))
        yield
    finally:
        for op, f in orig.items():
            setattr(torch.Tensor, op, f)


def trace_init(config, seed: int = 987_654) -> InitTrace:
    calls: list[tuple] = []
    with _recording_rng_draws(calls):
        model = build_model(config, seed)
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
    """Seed the global CPU RNG the way `build_model` does; a mismatch is caught by `choose_fingerprint_method`'s
    validation. Looked up on the module at call time, as `build_model` itself does: whoever replaces
    `pmp.model.seed_rng` (e.g. with `torch.manual_seed`, to audit the old 32-bit seeding) changes both alike,
    whereas a name imported here would keep the original and silently force the slow "full build" path."""
    model_factory.seed_rng(seed)


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
        return as_stored(fp, release.storage_dtype)[trace.random]

    truncated = torch.equal(fingerprint(5), fingerprint(5 + 2**32))  # measured, not assumed
    info = {"fingerprint_tensor": trace.name, "fingerprint_entries": int(trace.random.sum()), "method": trace.method,
            "notes": trace.notes, "public_seeds": public, "candidates": len(cands), "tried": 0,
            "matched_seed": None, "seed_truncated_to_32_bits": truncated,
            "effective_seed_bits": 32 if truncated else SEED_BITS,
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
        space = 2**32 if truncated else 2**SEED_BITS
        info["cpu_days_for_whole_seed_space_at_this_rate"] = space / info["seeds_per_second"] / 86400
    if info["matched_seed"] is None:
        return None, info
    init = dict(build_model(release.config, info["matched_seed"]).named_parameters())
    scores = {n: (w != as_stored(init[n].detach(), release.storage_dtype)).float() for n, w in release.weights.items()}
    info["entries_equal_to_init"] = int(sum(int((s == 0).sum()) for s in scores.values()))
    return scores, info
