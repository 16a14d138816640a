"""Mask identification: exact top-k with deterministic ties, global/per-tensor/block selection, stability rule."""

import pytest
import torch

from pmp.config import PMPConfig
from pmp.identify import MaskIdentifier, block_scores, mask_iou, select_top, select_units
from pmp.kernels import MaskLayout


def test_select_top_exact_count_and_ties_to_lower_index():
    s = torch.tensor([0.5, 1.0, 0.5, 0.5, 0.2, 1.0])
    assert select_top(s, 3).tolist() == [True, True, False, False, False, True]
    assert select_top(s, 0).sum() == 0 and select_top(s, 6).all()
    g = torch.Generator().manual_seed(0)
    for k in (1, 17, 500, 999):
        x = torch.randint(0, 5, (1000,), generator=g).float()  # heavy ties
        sel = select_top(x, k)
        assert int(sel.sum()) == k
        assert x[sel].min() >= x[~sel].max()
        assert torch.equal(sel, select_top(x.clone(), k))


def test_select_units_blocks_close_to_k():
    scores = torch.tensor([3.0, 2.0, 1.0, 0.5])
    sizes = torch.tensor([4, 4, 4, 4])
    assert select_units(scores, sizes, 8).tolist() == [True, True, False, False]
    assert select_units(scores, sizes, 7).tolist() == [True, True, False, False]  # 8 is closer to 7 than 4
    assert select_units(scores, sizes, 5).tolist() == [True, False, False, False]


def test_block_scores_average_edge_blocks():
    s = torch.arange(15.0).view(3, 5)
    b = block_scores(s, 2)
    assert b.shape == (2, 3)
    assert b[0, 0] == (0 + 1 + 5 + 6) / 4
    assert b[1, 2] == 14.0  # a 1x1 edge block


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.nn.Parameter(torch.randn(40, 30, generator=g)),
            "b": torch.nn.Parameter(torch.randn(70, generator=g)),
            "c": torch.nn.Parameter(torch.randn(130, 64, generator=g))}


def set_grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps.values():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("selection", ["global", "per_tensor"])
def test_density_within_one_entry(selection):
    ps = params()
    ident = MaskIdentifier(ps, PMPConfig(density=0.37, selection=selection))
    set_grads(ps, 1)
    ident.observe(1)
    m = ident.current_mask()
    if selection == "global":
        total = sum(p.numel() for p in ps.values())
        assert abs(sum(int(v.sum()) for v in m.values()) - 0.37 * total) <= 1
    else:
        for n, p in ps.items():
            assert abs(int(m[n].sum()) - 0.37 * p.numel()) <= 1


def test_block_masks_are_block_constant():
    ps = params()
    ident = MaskIdentifier(ps, PMPConfig(density=0.25, selection="per_tensor", block_size=64), block_names={"c"})
    set_grads(ps, 1)
    ident.observe(1)
    m = ident.current_mask()["c"]
    MaskLayout.from_bool(m, block_size=64)  # raises unless block-constant
    assert abs(int(m.sum()) - 0.25 * m.numel()) <= 64 * 64


def test_stops_when_stable_after_patience():
    ps = params()
    cfg = PMPConfig(scorer="weight", patience=3, min_warmup_steps=2, max_warmup_steps=50, iou_lag_steps=1)
    ident = MaskIdentifier(ps, cfg)
    recs = [ident.observe(i) for i in range(1, 6)]
    # weights do not move: step 1 has no previous mask (IoU 0), steps 2.. have IoU 1
    assert [r["iou"] for r in recs[:2]] == [0.0, 1.0]
    assert [r["done"] for r in recs] == [False, False, False, True, True]
    assert recs[3]["reason"] == "stable"


def test_stops_at_max_warmup_when_never_stable():
    ps = params()
    ident = MaskIdentifier(ps, PMPConfig(ema_beta=0.0, max_warmup_steps=4, min_warmup_steps=0, iou_lag_steps=1))
    done = []
    for i in range(1, 5):
        set_grads(ps, i)  # fresh random gradients: raw masks never agree
        done.append(ident.observe(i))
    assert [r["done"] for r in done] == [False, False, False, True]
    assert done[-1]["reason"] == "max_warmup_steps" and done[-1]["iou"] < 0.9


def test_ema_smoothing_raises_iou():
    def last_iou(beta):
        ps = params()
        ident = MaskIdentifier(ps, PMPConfig(ema_beta=beta, max_warmup_steps=100, iou_lag_steps=1))
        for i in range(30):
            set_grads(ps, i)
            for p in ps.values():
                p.grad += 2 * p.detach().abs()  # a persistent signal plus noise
            rec = ident.observe(i)
        return rec["iou"]

    assert last_iou(0.9) > last_iou(0.0) + 0.1


def drifting_run(lag: int, steps: int = 60) -> list[dict]:
    """Scores whose ranking drifts steadily (a real, slow change): EMA-smoothed masks of consecutive steps still
    agree almost perfectly, masks `lag` steps apart do not."""
    ps = params()
    g = torch.Generator().manual_seed(1)
    start = {n: torch.rand(p.shape, generator=g) for n, p in ps.items()}
    end = {n: torch.rand(p.shape, generator=g) for n, p in ps.items()}
    ident = MaskIdentifier(ps, PMPConfig(scorer="grad", ema_beta=0.98, iou_lag_steps=lag, patience=2,
                                         min_warmup_steps=5, max_warmup_steps=steps))
    recs = []
    for i in range(steps):
        for n, p in ps.items():
            p.grad = start[n] + (end[n] - start[n]) * (i / steps)
        recs.append(ident.observe(i + 1))
        if recs[-1]["done"]:
            break
    return recs


def test_lagged_iou_does_not_stop_on_ema_inertia():
    # The flaw the lag fixes: with a step-to-step comparison the rule fires right at min_warmup_steps
    recs = drifting_run(lag=1)
    assert recs[-1]["reason"] == "stable" and len(recs) == 5
    recs = drifting_run(lag=10)
    assert recs[-1]["reason"] == "max_warmup_steps" and len(recs) == 60
    checked = [r for r in recs if r["checked"]]
    assert [r["step"] for r in checked] == [10, 20, 30, 40, 50, 60]
    assert checked[0]["iou"] == 0.0 and all(r["iou"] < 0.99 for r in checked)


def test_lagged_iou_stops_once_settled():
    ps = params()
    ident = MaskIdentifier(ps, PMPConfig(scorer="weight", iou_lag_steps=4, patience=2, min_warmup_steps=0,
                                         max_warmup_steps=100))
    recs = [ident.observe(i) for i in range(1, 13)]
    # checks at 4 (no previous: IoU 0), 8 and 12 (weights never move: IoU 1) -> stable at the 2nd agreeing check
    assert [r["done"] for r in recs].index(True) == 11 and recs[11]["reason"] == "stable"
    assert [r["checked"] for r in recs[:4]] == [False, False, False, True]


def test_random_scorer_is_a_fixed_mask_and_state_roundtrips():
    ps = params()
    ident = MaskIdentifier(ps, PMPConfig(scorer="random"))
    ident.observe(1)
    m1 = ident.current_mask()
    ident.observe(2)
    assert mask_iou(m1, ident.current_mask()) == 1.0
    other = MaskIdentifier(ps, PMPConfig(scorer="random"))
    other.load_state_dict(ident.state_dict())
    other.observe(3)
    assert mask_iou(m1, other.current_mask()) == 1.0
