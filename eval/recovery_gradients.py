"""Mask-recovery attacks from gradients of the LM loss on text the attacker has.

Why gradients betray the mask: PMP chose the masked entries for their large |gradient| during warm-up and trained
only them, so trained entries sit near a stationary point of the training loss and stay the sensitive coordinates,
while untrained ones do not (`grad`, `fisher`, `grad_snr`). Which entries get large gradients is also a property of
the architecture and the data more than of the particular init (`shadow_grad`).
"""

from __future__ import annotations

import time

import torch

from pmp.eval.models import load_tokenizer
from pmp.eval.release_weights import Release, Scores
from pmp.model import build_model


def text_batches(release: Release, texts: list[str], batches: int, batch_size: int = 8,
                 seq_len: int = 128) -> list[torch.Tensor]:
    """Token blocks of the attacker's text with the release's own tokenizer."""
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
