"""A function-preserving secret rescaling of a Llama-family model: the positive control of the protection suite.

The released function is unchanged and it is still a stock Hugging Face model, but neither SGD nor Adam is
invariant to these scales, so naive fine-tuning should struggle -- while an attacker who re-balances each scaled
pair (`canonicalise`) undoes the lock completely. A suite that "finds protection" here and has no canonicalising
attack is not durable; a suite that sees none under naive attacks cannot see protection at all.

Symmetries used (per decoder layer; x -> y means y = W x, W_OI shaped [out, in]):
  - RMSNorm gains folded into the next linear layers (input_layernorm -> q/k/v columns, post_attention_layernorm ->
    gate/up columns, the final norm -> lm_head columns when it is not tied), gains set to 1;
  - SwiGLU: h_j = silu(gate_j x) * (up_j x), out = down h: up row j * c_j and down column j / c_j (the gate row
    cannot be scaled: silu is not homogeneous);
  - attention values: softmax(.) V is linear in V, so value row r * c_r and every o_proj column fed by r / c_r
    (with grouped-query attention a value row feeds one column per query head of its group);
  - rotary query/key: q.k is preserved by q * c and k / c when both members of a rotary pair (dims i and
    i + head_dim/2 of a head) share c, so the rotation commutes with the scaling.
The scales are the owner's secret (`RescaleKey`), kept privately like the mask; `unscale` inverts exactly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = ("llama",)


@dataclass
class RescaleKey:
    """log-scales per layer: mlp [intermediate], v [kv_heads * head_dim], qk [kv_heads * head_dim / 2]."""
    mlp: list[torch.Tensor]
    v: list[torch.Tensor]
    qk: list[torch.Tensor]
    strength: float

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (m, v, q) in enumerate(zip(self.mlp, self.v, self.qk, strict=True)):
            out.update({f"layers.{i}.mlp": m, f"layers.{i}.v": v, f"layers.{i}.qk": q})
        return out

    def fingerprint(self) -> str:
        """sha256 over the strength, names, shapes and float32 log-scales: identifies the key exactly."""
        h = hashlib.sha256(repr(float(self.strength)).encode() + b"\0")
        for n, t in sorted(self.tensors().items()):
            h.update(n.encode() + b"\0" + repr(list(t.shape)).encode() + b"\0")
            h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], strength: float) -> RescaleKey:
        n = len([k for k in t if k.endswith(".mlp")])
        return cls([t[f"layers.{i}.mlp"] for i in range(n)], [t[f"layers.{i}.v"] for i in range(n)],
                   [t[f"layers.{i}.qk"] for i in range(n)], strength)


def _check_family(model: nn.Module) -> None:
    mt = getattr(model.config, "model_type", "?")
    if mt not in SUPPORTED:
        raise ValueError(f"function-preserving rescaling is implemented for {', '.join(SUPPORTED)} models, not "
                         f"{mt!r}")


def _dims(model: nn.Module) -> tuple[int, int, int]:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return head_dim, kv, c.num_attention_heads // kv


def draw_key(model: nn.Module, strength: float, generator: torch.Generator) -> RescaleKey:
    """log c ~ U[-ln C, ln C] for every scaled unit; C = `strength` > 1."""
    _check_family(model)
    if not strength > 1 or not math.isfinite(strength):
        raise ValueError(f"rescale strength C must be a finite number > 1 (log c ~ U[-ln C, ln C]), got {strength}")
    head_dim, kv, _ = _dims(model)
    span = math.log(strength)

    def u(n: int) -> torch.Tensor:
        return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * span

    layers = model.model.layers
    return RescaleKey([u(layer.mlp.up_proj.out_features) for layer in layers], [u(kv * head_dim) for _ in layers],
                      [u(kv * head_dim // 2) for _ in layers], strength)


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Move every RMSNorm gain into the linear layers it feeds (function-preserving); gains become 1."""
    _check_family(model)
    for layer in model.model.layers:
        for norm, linears in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                       layer.self_attn.v_proj)),
                              (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
            for lin in linears:
                lin.weight.mul_(norm.weight.to(lin.weight.dtype)[None, :])
            norm.weight.fill_(1.0)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if not tied:
        model.lm_head.weight.mul_(model.model.norm.weight.to(model.lm_head.weight.dtype)[None, :])
        model.model.norm.weight.fill_(1.0)


@torch.no_grad()
def _apply(model: nn.Module, key: RescaleKey, sign: float) -> None:
    head_dim, kv, group = _dims(model)
    for layer, lm, lv, lqk in zip(model.model.layers, key.mlp, key.v, key.qk, strict=True):
        att, mlp = layer.self_attn, layer.mlp
        c = torch.exp(sign * lm)
        mlp.up_proj.weight.mul_(c.to(mlp.up_proj.weight.dtype)[:, None])
        mlp.down_proj.weight.div_(c.to(mlp.down_proj.weight.dtype)[None, :])
        c = torch.exp(sign * lv)  # [kv * head_dim]: value row r of kv head g feeds o columns of q heads g*group..
        att.v_proj.weight.mul_(c.to(att.v_proj.weight.dtype)[:, None])
        per_q = c.view(kv, 1, head_dim).expand(kv, group, head_dim).reshape(-1)
        att.o_proj.weight.div_(per_q.to(att.o_proj.weight.dtype)[None, :])
        c = torch.exp(sign * lqk).view(kv, head_dim // 2)
        c = torch.cat([c, c], dim=1)  # rotate_half pairs dim i with i + head_dim/2
        att.k_proj.weight.div_(c.reshape(-1).to(att.k_proj.weight.dtype)[:, None])
        per_q = c.view(kv, 1, head_dim).expand(kv, group, head_dim).reshape(-1)
        att.q_proj.weight.mul_(per_q.to(att.q_proj.weight.dtype)[:, None])


def rescale(model: nn.Module, key: RescaleKey) -> None:
    """Apply the secret scales in place (call `fold_norms` first so the norms give nothing away)."""
    _check_family(model)
    _apply(model, key, +1.0)


def unscale(model: nn.Module, key: RescaleKey) -> None:
    """The owner's inverse: back to the balanced model (for authorized fine-tuning), in place."""
    _check_family(model)
    _apply(model, key, -1.0)


@torch.no_grad()
def canonicalise(model: nn.Module) -> None:
    """The attacker's answer: give each scaled pair equal norms (up row j vs down column j; value row r vs its o
    columns; each rotary pair of q rows vs its k rows), which is the same whatever secret scales were applied.
    Function-preserving, in place."""
    _check_family(model)
    head_dim, kv, group = _dims(model)
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        a, b = mlp.up_proj.weight.norm(dim=1), mlp.down_proj.weight.norm(dim=0)
        c = torch.sqrt(b / a.clamp_min(1e-30))
        mlp.up_proj.weight.mul_(c[:, None])
        mlp.down_proj.weight.div_(c[None, :])
        a = att.v_proj.weight.norm(dim=1)  # [kv*hd]
        b = att.o_proj.weight.norm(dim=0).view(kv, group, head_dim).pow(2).sum(1).sqrt().reshape(-1)
        c = torch.sqrt(b / a.clamp_min(1e-30))
        att.v_proj.weight.mul_(c[:, None])
        att.o_proj.weight.div_(c.view(kv, 1, head_dim).expand(kv, group, head_dim).reshape(-1)[None, :])
        q = att.q_proj.weight.view(kv, group, 2, head_dim // 2, -1).pow(2).sum(dim=(1, 2, 4)).sqrt()
        k = att.k_proj.weight.view(kv, 2, head_dim // 2, -1).pow(2).sum(dim=(1, 3)).sqrt()
        c = torch.sqrt(k / q.clamp_min(1e-30))  # [kv, hd/2]
        c = torch.cat([c, c], dim=1)
        att.q_proj.weight.mul_(c.view(kv, 1, head_dim).expand(kv, group, head_dim).reshape(-1)[:, None])
        att.k_proj.weight.div_(c.reshape(-1)[:, None])
