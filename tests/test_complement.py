"""pmp.complement=project (the authors' stage II): the radius rule, the projection, a tiny run whose complement is
held at init x scale with L2 norm R, its release checks, the complement record on resume, and bad config."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from corpus_fixture import write_corpus
from safetensors.torch import load_file

from pmp.complement import AUTHORS_COMPLEMENT_ENTRIES, ComplementPlan, auto_radius, complement_norm
from pmp.config import ExportConfig, ModelConfig, load_config
from pmp.mask import PrivateMask
from pmp.model import build_model, hf_config
from pmp.release import export_release
from pmp.train.checkpoint import load_checkpoint
from pmp.train.trainer import pretrain
from pmp.verify_release import verify_release

RADIUS = 0.05  # the tiny model's auto radius is ~0.004: an explicit one is also exercised (by the run below)


def test_auto_radius_is_the_authors_per_entry_size():
    assert auto_radius(AUTHORS_COMPLEMENT_ENTRIES) == pytest.approx(2.0, rel=1e-12)
    assert auto_radius(4 * AUTHORS_COMPLEMENT_ENTRIES) == pytest.approx(4.0, rel=1e-12)
    # the `small` preset at its nominal vocabulary, rho 0.5, scope matrices: R ~ 0.164 (research/protection.md)
    model = build_model(hf_config(ModelConfig(preset="small"), 8192), 0)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert auto_radius(matrices // 2) == pytest.approx(0.1641, abs=1e-4)


def _model_and_mask(density=0.4, seed=0):
    model = build_model(hf_config(ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64), 97), seed)
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if p.dim() >= 2}
    return model.state_dict(), PrivateMask.from_bool(masks)


def test_projection_scales_the_global_complement_to_the_radius():
    init, mask = _model_and_mask()
    masks = mask.to_bool()
    norm = complement_norm(init, masks)
    ref = math.sqrt(sum(float((init[n][~m].double() ** 2).sum()) for n, m in masks.items()))
    assert norm == pytest.approx(ref, rel=1e-12)
    threads = torch.get_num_threads()
    try:  # the norm (hence the scale) must not depend on the thread count: a resume may use another
        torch.set_num_threads(1)
        assert complement_norm(init, masks) == norm
    finally:
        torch.set_num_threads(threads)

    plan = ComplementPlan.plan("project", 0.0, init, mask)
    assert plan.radius == pytest.approx(auto_radius(mask.total - mask.nnz)) and plan.norm_at_init == norm
    out = plan.apply(init, mask)
    assert complement_norm(out, masks) == pytest.approx(plan.radius, rel=1e-6)
    per_tensor = [complement_norm(out, {n: m}) / complement_norm(init, {n: m}) for n, m in masks.items()]
    assert max(per_tensor) == pytest.approx(min(per_tensor), rel=1e-5)  # one global factor, not one per tensor
    for n, m in masks.items():
        assert torch.equal(out[n][m], init[n][m])  # the masked entries are untouched
        assert not torch.equal(out[n][~m], init[n][~m])
    for n in set(init) - set(masks):
        assert out[n] is init[n]  # tensors without a mask (norms) are untouched

    # a ball, as in the authors' code: a complement already inside the radius is left as it is
    inside = ComplementPlan.plan("project", 10 * norm, init, mask)
    assert inside.scale == 1.0 and all(torch.equal(v, init[k]) for k, v in inside.apply(init, mask).items())
    # frozen: the identity
    assert all(v is init[k] for k, v in ComplementPlan("frozen").apply(init, mask).items())


# ------------------------------------------------------------------------------------------------ a tiny run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("complement")
    files = write_corpus(d, chars_per_file=4000)
    ov = {"data.corpus": files, "data.cache_dir": str(d / "cache"), "data.seq_len": 32, "data.val_fraction": 0.1,
          "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32, "model.intermediate_size": 64,
          "train.steps": 16, "train.batch_size": 4, "train.warmup_steps": 2, "train.eval_every": 0,
          "train.eval_batches": 1, "train.log_every": 4, "train.ckpt_every": 8, "train.snapshot_every": 4,
          "train.progress": False, "train.threads": 1, "pmp.min_warmup_steps": 6, "pmp.max_warmup_steps": 6,
          "pmp.density": 0.5, "pmp.complement": "project", "pmp.complement_radius": RADIUS}
    overrides = [f"{k}={v}" for k, v in ov.items()]
    root = pretrain(load_config(None, overrides), d / "run").root
    return SimpleNamespace(root=root, overrides=overrides, d=d)


def test_project_run_holds_the_complement_at_radius(run):
    record = json.loads((run.root / "private" / "complement.json").read_text())
    mask = PrivateMask.load(run.root / "private")
    masks = mask.to_bool()
    init = load_file(str(run.root / "private" / "init.safetensors"))
    assert record["mode"] == "project" and record["radius"] == RADIUS
    assert record["entries"] == mask.total - mask.nnz
    assert record["norm_at_init"] == pytest.approx(complement_norm(init, masks), rel=1e-12)
    assert 0 < record["scale"] < 0.2
    expected = ComplementPlan.load(run.root / "private").apply(init, mask)
    kept = {s: load_file(str(run.root / "snapshots" / f"step_{s:08d}" / "model.safetensors")) for s in (8, 12)}
    kept[16] = load_file(str(run.root / "final" / "model.safetensors"))
    for step, weights in kept.items():  # every state after identification (step 6)
        assert complement_norm(weights, masks) == pytest.approx(RADIUS, rel=1e-6), step
        for n, m in masks.items():
            assert torch.equal(weights[n][~m], expected[n][~m]), (step, n)  # bit-exactly init x scale
    assert any(not torch.equal(kept[16][n][m], kept[8][n][m]) for n, m in masks.items())  # the ticket trains
    before = load_file(str(run.root / "snapshots" / "step_00000004" / "model.safetensors"))  # dense warm-up
    assert complement_norm(before, masks) > 10 * RADIUS
    # compact optimizer state: moments only for the masked entries (plus the densely trained norms)
    _, _, state = load_checkpoint(run.root / "checkpoints" / "step_00000016")
    moments = sum(s["exp_avg"].numel() for s in state["optimizer"]["state"].values())
    dense = sum(v.numel() for k, v in init.items() if k not in masks)
    assert moments == mask.nnz + dense


def test_project_release_exports_and_verifies(run, tmp_path):
    for dtype in ("fp32", "bf16"):
        out = export_release(ExportConfig(run=str(run.root), out=str(tmp_path / dtype), dtype=dtype))
        report = verify_release(out, run.root, load=False)
        assert report.ok, str(report)
        card = (out / "README.md").read_text()
        assert "shrunk nearly to zero" in card
        record = json.loads((run.root / "private" / "complement.json").read_text())
        for value in (record["scale"], record["norm_at_init"]):  # the card knows nothing of the projection's size
            assert str(value) not in card and f"{value:.4g}" not in card
    step = export_release(ExportConfig(run=str(run.root), out=str(tmp_path / "step8"), step=8))  # kept weights
    assert verify_release(step, run.root, load=False).ok
    # The check compares with the recorded reference: without the record the run claims a frozen complement, and
    # its own release is refused.
    lost = Path(shutil.copytree(run.root, tmp_path / "lost"))
    (lost / "private" / "complement.json").unlink()
    with pytest.raises(ValueError, match="initial weights"):
        export_release(ExportConfig(run=str(lost), out=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()


def test_resume_rebuilds_or_refuses_the_complement_record(run, tmp_path):
    cfg = load_config(None, run.overrides)
    original = (run.root / "private" / "complement.json").read_text()
    lost = Path(shutil.copytree(run.root, tmp_path / "lost"))
    (lost / "private" / "complement.json").unlink()
    pretrain(cfg, lost, resume=True)  # resumes the last (masked-phase) checkpoint: the record is rebuilt
    assert json.loads((lost / "private" / "complement.json").read_text()) == json.loads(original)
    edited = Path(shutil.copytree(run.root, tmp_path / "edited"))
    rec = json.loads(original)
    rec["scale_fp32_hex"] = "0000803f"  # 1.0
    (edited / "private" / "complement.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="complement.json records"):
        pretrain(cfg, edited, resume=True)


@pytest.mark.parametrize("setting, message", [
    ("pmp.complement=zero", r"pmp.complement must be one of \['frozen', 'project'\], got 'zero'"),
    ("pmp.complement_radius=-1", r"pmp.complement_radius must be a finite L2 radius >= 0 \(0 = auto\), got -1"),
    ("pmp.complement_radius=nan", r"pmp.complement_radius: expected a finite number"),  # typed_config
    ("pmp.rewind=false", r"pmp.complement=project needs pmp.rewind=true"),
])
def test_bad_complement_config(setting, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["pmp.complement=project", setting])
    load_config(None, ["pmp.complement=project", "pmp.complement_radius=0.2"])  # a good one passes


# ------------------------------------------------------------------------------- pmp.rewind=false (frozen)
def test_no_rewind_run_records_its_complement_and_exports(run, tmp_path):
    """Without the rewind the complement stays at its values at identification, which no init reproduces: the
    run records them (private) and the release checks compare with them; a lost record is rebuilt on resume from
    the masked-phase checkpoint (the masked phase never moves the complement)."""
    overrides = [o for o in run.overrides if not o.startswith(("pmp.complement", "train.snapshot_every"))]
    overrides += ["pmp.rewind=false", "train.snapshot_every=6"]
    cfg = load_config(None, overrides)
    root = pretrain(cfg, tmp_path / "norewind").root
    status = json.loads((root / "run.json").read_text())
    for when in ("started_with", "finished_with"):  # provenance of every run
        assert status[when]["git_commit"] and status[when]["versions"]["torch"] == torch.__version__
    ref = load_file(str(root / "private" / "complement.safetensors"))
    mask = PrivateMask.load(root / "private")
    masks = mask.to_bool()
    assert set(ref) == set(masks)
    at_identification = load_file(str(root / "snapshots" / "step_00000006" / "model.safetensors"))
    final = load_file(str(root / "final" / "model.safetensors"))
    init = load_file(str(root / "private" / "init.safetensors"))
    for n, m in masks.items():
        assert torch.equal(ref[n], at_identification[n]), n  # the weights as the masked phase began
        assert torch.equal(final[n][~m], ref[n][~m]), n  # ... whose complement the masked phase kept
    assert any(not torch.equal(final[n][~m], init[n][~m]) for n, m in masks.items())  # not the init's

    out = export_release(ExportConfig(run=str(root), out=str(tmp_path / "release")))
    assert verify_release(out, root, load=False).ok
    assert not any(p.name == "complement.safetensors" for p in out.rglob("*"))  # private: never in a release

    lost = Path(shutil.copytree(root, tmp_path / "lost"))
    (lost / "private" / "complement.safetensors").unlink()
    with pytest.raises(ValueError, match="initial weights"):  # without it the init is the reference: refused
        export_release(ExportConfig(run=str(lost), out=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()
    pretrain(cfg, lost, resume=True)
    rebuilt = load_file(str(lost / "private" / "complement.safetensors"))
    assert all(torch.equal(rebuilt[n][~m], ref[n][~m]) for n, m in masks.items())
