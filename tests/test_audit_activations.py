"""Activation-statistics audit attacks (`pmp.eval.recovery_activations`): the per-channel statistics against a hand
computation on a tiny embedding -> Linear -> Conv1D model, the scores' orientation, bad settings."""

from pathlib import Path

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from pmp.eval.config import AuditSettings
from pmp.eval.recovery_activations import activation_scores, channel_stats
from pmp.eval.release_weights import Release


class _Tiny(torch.nn.Module):
    """ids -> embedding (V=7, H=3) -> Linear 3 -> 4 (W_OI, with bias) -> Conv1D 4 -> 2 (W_IO) -> Linear 2 -> 7
    whose weight is TIED to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 3)
        self.lin = torch.nn.Linear(3, 4)
        self.conv = Conv1D(2, 4)  # nf = 2 outputs, nx = 4 inputs: weight [4, 2]
        self.head = torch.nn.Linear(3, 7, bias=False)
        self.head.weight = self.embed.weight
        self.mix = torch.nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.normal_()

    def forward(self, input_ids):
        return self.head(self.mix(self.conv(torch.tanh(self.lin(self.embed(input_ids))))))


def _release(model: torch.nn.Module) -> Release:
    return Release(Path("unused"), None, model.eval(), {n: p.detach() for n, p in model.named_parameters()},
                   torch.float32)


def test_channel_stats_match_a_hand_computation():
    torch.manual_seed(0)
    model = _Tiny()
    batches = [torch.tensor([[0, 1, 1, 3], [3, 3, 6, 0]]), torch.tensor([[1, 1, 1, 2]])]
    stats = channel_stats(model, batches, {n for n, _ in model.named_parameters()})
    # the tied weight is scored from its first user in module order (the embedding), not from the head's use of it
    assert set(stats) == {"embed.weight", "lin.weight", "conv.weight", "mix.weight"}
    ids = torch.cat([b.flatten() for b in batches])  # 12 tokens
    with torch.no_grad():
        e = model.embed(ids).double()  # [12, 3]
        h = model.lin(e.float()).double()  # [12, 4]
        a = torch.tanh(h)
        c = model.conv(a.float()).double()  # [12, 2]
    counts = torch.bincount(ids, minlength=7).double()
    want = {"embed.weight": (counts, e), "lin.weight": (e, h), "conv.weight": (a, c)}
    for n, (x_in, y_out) in want.items():
        st = stats[n]
        assert st.tokens == 12
        in_rms = (counts / 12).sqrt() if n == "embed.weight" else x_in.pow(2).mean(0).sqrt()
        torch.testing.assert_close(st.in_rms(), in_rms, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(st.out_rms(), y_out.pow(2).mean(0).sqrt(), rtol=1e-6, atol=1e-9)
    assert stats["embed.weight"].in_dim == 0 and stats["lin.weight"].in_dim == 1 and stats["conv.weight"].in_dim == 0
    torch.testing.assert_close(stats["embed.weight"].in_rms()[[4, 5]], torch.zeros(2, dtype=torch.float64))  # unseen


def test_activation_scores_orientation():
    torch.manual_seed(1)
    model = _Tiny()
    release = _release(model)
    batches = [torch.tensor([[0, 1, 2, 3, 4, 5, 6, 6]])]
    scores, info = activation_scores(release, batches)
    assert info == {"batches": 1, "tokens": 8, "layers": 4}
    stats = channel_stats(model, batches, set(release.weights))
    w = release.weights
    # nn.Linear stores W_OI: the input channel is the column
    lin_in, lin_out = stats["lin.weight"].in_rms().float(), stats["lin.weight"].out_rms().float()
    torch.testing.assert_close(scores["act_wanda"]["lin.weight"], w["lin.weight"].abs() * lin_in[None, :])
    torch.testing.assert_close(scores["act_in_rms"]["lin.weight"], lin_in[None, :].expand(4, 3))
    torch.testing.assert_close(scores["act_out_rms"]["lin.weight"], lin_out[:, None].expand(4, 3))
    # Conv1D and the embedding store W_IO: the input channel is the row
    conv_in = stats["conv.weight"].in_rms().float()
    torch.testing.assert_close(scores["act_wanda"]["conv.weight"], w["conv.weight"].abs() * conv_in[:, None])
    emb_in = stats["embed.weight"].in_rms().float()  # sqrt(token frequency): token 6 twice, the others once
    torch.testing.assert_close(emb_in, torch.tensor([1, 1, 1, 1, 1, 1, 2 ** 0.5]) / 8 ** 0.5)
    torch.testing.assert_close(scores["act_in_rms"]["embed.weight"], emb_in[:, None].expand(7, 3))
    # biases: no opinion (left out)
    assert "lin.bias" not in scores["act_wanda"] and "conv.bias" not in scores["act_out_rms"]
    for sc in scores.values():
        for n, t in sc.items():
            assert t.shape == w[n].shape


def test_bad_activation_settings():
    model = _Tiny()
    with pytest.raises(ValueError, match="at least one batch"):
        activation_scores(_release(model), [])
    with pytest.raises(ValueError, match="activation_batches must be >= 0"):
        AuditSettings(activation_batches=-1).validate()
    AuditSettings(activation_batches=0).validate()
