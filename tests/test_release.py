"""Public release: export of PMP and dense runs, stock loading without pmp, the mask-leak audit (with negative
controls that plant mask-derived content and must fail it), the model card, bad input, ownership commitment."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from corpus_fixture import write_corpus
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pmp.cli import main
from pmp.config import ExportConfig, load_config
from pmp.mask import PrivateMask
from pmp.release import export_release, verify_commitment
from pmp.step_dir import CheckpointError
from pmp.train.trainer import pretrain
from pmp.verify_release import mask_needles, verify_release


def export(run, out, **kw) -> Path:
    """The library's export with ExportConfig built from paths and keyword settings."""
    return export_release(ExportConfig(run=str(run), out=str(out), **{k: str(v) if isinstance(v, Path) else v
                                                                       for k, v in kw.items()}))

DENSITY = 0.3


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("release_runs")
    files = write_corpus(d)
    base = {"data.corpus": files, "data.cache_dir": str(d / "cache"), "data.seq_len": 32, "data.val_fraction": 0.1,
            "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32,
            "model.intermediate_size": 64, "train.steps": 20, "train.threads": 1, "train.batch_size": 4,
            "train.warmup_steps": 3,
            "train.eval_every": 0, "train.eval_batches": 2, "train.log_every": 5, "train.ckpt_every": 0,
            "train.progress": False, "train.snapshot_every": 5, "pmp.min_warmup_steps": 10, "pmp.max_warmup_steps": 10,
            "pmp.density": DENSITY, "pmp.scorer": "random"}  # random scorer: an unstructured mask to search for

    def run(name, **extra):
        ov = {**base, **extra}
        return pretrain(load_config(None, [f"{k}={v}" for k, v in ov.items()]), d / name).root

    return SimpleNamespace(pmp=run("pmp"), dense=run("dense", **{"train.method": "dense"}), root=d)


@pytest.fixture(scope="session")
def release(runs):
    return export(runs.pmp, runs.root / "release")


@pytest.fixture(scope="session")
def dense_release(runs):
    return export(runs.dense, runs.root / "dense_release")


def snapshot(path: Path) -> dict:
    if not path.exists():
        return {"<absent>": b""}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(path.rglob("*"))}


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return model(ids).logits.float(), model


# ------------------------------------------------------------------------------------------------ fidelity
def test_fp32_release_equals_private_model(runs, release):
    ids = batch(320)
    rel, model = logits(release, ids)
    ref, _ = logits(runs.pmp / "final", ids)
    assert (rel - ref).abs().max().item() <= 1e-5
    assert model.dtype == torch.float32 and json.loads((release / "config.json").read_text())["dtype"] == "float32"
    # The trained in-memory state, as the trainer checkpointed it at the last step, bit for bit.
    (ckpt,) = sorted((runs.pmp / "checkpoints").glob("step_*"))
    trained = load_file(str(ckpt / "model.safetensors"))
    released = load_file(str(release / "model.safetensors"))
    assert released.keys() == trained.keys()
    assert all(torch.equal(released[k], trained[k]) for k in trained)
    out = model.generate(ids[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_bf16_release_is_close_and_generates(runs, tmp_path):
    out = export(runs.pmp, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as s:
        assert all(s.get_tensor(k).dtype == torch.bfloat16 for k in s.keys())
    ids = batch(320)
    rel, model = logits(out, ids)
    ref, _ = logits(runs.pmp / "final", ids)
    err = ((rel - ref).abs().max() / ref.abs().max()).item()
    assert 0 < err <= 2e-2, err
    gen = model.generate(ids[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)
    assert verify_release(out, runs.pmp, load=False).ok


def test_sharded_release_verifies(runs, tmp_path):
    out = export(runs.pmp, tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    report = verify_release(out, runs.pmp)
    assert report.ok, str(report)


def test_release_loads_in_subprocess_without_pmp(release, tmp_path):
    script = r"""
import json, sys, torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(d)
tok = AutoTokenizer.from_pretrained(d)
fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d))
with safe_open(d + "/model.safetensors", "pt") as s:
    keys = sorted(s.keys())
print(json.dumps({"pmp": any(m == "pmp" or m.startswith("pmp.") for m in sys.modules),
                  "file_keys": keys, "fresh": sorted(fresh.state_dict()), "loaded": sorted(model.state_dict()),
                  "n_tokens": len(tok("hello there").input_ids)}))
"""
    proc = subprocess.run([sys.executable, "-I", "-c", script, str(release)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["pmp"] is False
    assert res["file_keys"] == res["fresh"] == res["loaded"]
    assert res["n_tokens"] > 0


# ------------------------------------------------------------------------------------------------ leak audit
def informative_masks(run) -> dict[str, bytes]:
    out = {}
    for name, lay in PrivateMask.load(run / "private").layouts.items():
        b = lay.packed_bytes().numpy().tobytes()
        if len(b) >= 16 and len(set(b)) > 1:
            out[name] = b
    return out


def test_release_holds_nothing_mask_derived(runs, release):
    """An independent naive scan (not verify_release's code): every file, every tensor's packed mask."""
    masks = informative_masks(runs.pmp)
    assert len(masks) >= 5  # the scan below is not vacuous
    files = sorted(release.iterdir())
    assert {p.name for p in files} == {"README.md", "config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"}
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o644 & ~umask for p in files)  # readable by others: it is public
    fp = PrivateMask.load(runs.pmp / "private").fingerprint()
    seed = json.loads((runs.pmp / "private" / "init.json").read_text())["seed"]
    for p in files:
        data = p.read_bytes()
        for name, b in masks.items():
            assert b not in data, f"{p.name} holds the packed mask of {name}"
            for i in range(0, len(b) - 31, 32):
                if len(set(b[i:i + 32])) > 2:
                    assert b[i:i + 32] not in data, f"{p.name} holds a piece of the mask of {name}"
        assert fp.encode() not in data and bytes.fromhex(fp) not in data
        assert str(seed).encode() not in data and f"{seed:x}".encode() not in data
        assert str(runs.pmp).encode() not in data
    with safe_open(str(release / "model.safetensors"), "pt") as s:
        assert s.metadata() == {"format": "pt"}
    for name in ("config.json", "generation_config.json"):
        keys = json.loads((release / name).read_text())
        bad = [k for k in keys if re.search("mask|pmp|seed|density|rho|private", k, re.I)]
        assert not bad, (name, bad)
    report = verify_release(release, runs.pmp)
    assert report.ok, str(report)
    assert [c.status for c in report.checks].count("PASS") == len(report.checks)


def _plant_mask_in_card(rel, run):
    name, b = max(informative_masks(run).items(), key=lambda kv: len(kv[1]))
    with open(rel / "README.md", "ab") as f:
        f.write(b"\n" + b)


def _plant_mask_in_weights(rel, run):
    """Overwrite the middle of the weight data in place with a packed mask: the file still loads."""
    name, b = max(informative_masks(run).items(), key=lambda kv: len(kv[1]))
    path = rel / "model.safetensors"
    data = bytearray(path.read_bytes())
    at = len(data) // 2 + 3  # deliberately not 8-byte aligned
    data[at:at + len(b)] = b
    path.write_bytes(bytes(data))


def _metadata_key(rel, run):
    path = rel / "model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "pt", "mask_sha256": "0" * 64})


def _config_field(rel, run):
    cfg = json.loads((rel / "config.json").read_text())
    cfg["pmp_density"] = DENSITY
    (rel / "config.json").write_text(json.dumps(cfg))


def _generation_seed(rel, run):
    cfg = json.loads((rel / "generation_config.json").read_text())
    cfg["seed"] = 1234
    (rel / "generation_config.json").write_text(json.dumps(cfg))


def _mask_file(rel, run):
    shutil.copy(run / "private" / "mask.json", rel / "mask.json")


def _fingerprint(rel, run):
    fp = PrivateMask.load(run / "private").fingerprint()
    with open(rel / "README.md", "a") as f:
        f.write(f"\nmask: {fp}\n")


def _seed_in_tokenizer_config(rel, run):
    seed = json.loads((run / "private" / "init.json").read_text())["seed"]
    tc = json.loads((rel / "tokenizer_config.json").read_text())
    tc["model_max_length"] = seed
    (rel / "tokenizer_config.json").write_text(json.dumps(tc))


@pytest.mark.parametrize("plant, failing", [
    (_plant_mask_in_card, "no packed mask bytes in any file"),
    (_plant_mask_in_weights, "no packed mask bytes in any file"),
    (_metadata_key, "safetensors metadata is exactly {format: pt}"),
    (_config_field, "config.json has stock keys only"),
    (_generation_seed, "generation_config.json has stock keys only"),
    (_mask_file, "file names free of mask/private/init/seed"),
    (_fingerprint, "no mask fingerprint in any file"),
    (_seed_in_tokenizer_config, "no init seed in any file"),
])
def test_verify_release_fails_on_planted_content(runs, release, tmp_path, plant, failing):
    rel = Path(shutil.copytree(release, tmp_path / "copy"))
    assert verify_release(rel, runs.pmp, load=False).ok  # control: the untouched copy passes
    plant(rel, runs.pmp)
    report = verify_release(rel, runs.pmp, load=False)
    assert not report.ok and failing in report.failed(), str(report)


def test_verify_release_cli_exit_codes(runs, release, tmp_path, capsys):
    rel = Path(shutil.copytree(release, tmp_path / "copy"))
    _plant_mask_in_weights(rel, runs.pmp)
    assert main(["verify-release", str(rel), "--private", str(runs.pmp)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  no packed mask bytes in any file" in out and "PASS  model card" in out
    assert out.strip().splitlines()[-1].startswith("FAILED:")


# ------------------------------------------------------------------------------------------------ card
def front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1))


def mentions_density(text: str) -> bool:
    return "density" in text.lower() or re.search(rf"(?<![\d.]){DENSITY}\d*", text) is not None


def test_card_pmp_default_hides_density(runs, release):
    text = (release / "README.md").read_text()
    fm = front_matter(text)
    assert fm["library_name"] == "transformers" and fm["pipeline_tag"] == "text-generation"
    assert fm["license"] == "apache-2.0"
    assert "The mask is not released" in text and "hypothesis" in text
    assert "2,560 tokens seen" in text  # 20 steps x 4 x 1 x 32
    assert "method `pmp`" in text
    assert not mentions_density(text)
    assert str(runs.root) not in text


def test_card_density_opt_in_and_license(runs, tmp_path):
    out = export(runs.pmp, tmp_path / "rel", publish_density=True, license="mit")
    text = (out / "README.md").read_text()
    realised = PrivateMask.load(runs.pmp / "private").density()
    assert mentions_density(text) and f"{realised:.4f}" in text
    assert front_matter(text)["license"] == "mit"
    assert verify_release(out, runs.pmp, load=False).ok


def test_dense_release_card_and_audit(runs, dense_release):
    text = (dense_release / "README.md").read_text()
    assert "dense baseline" in text and "method `dense`" in text
    assert front_matter(text)["tags"] == ["causal-lm", "dense-baseline"]
    report = verify_release(dense_release, runs.dense, load=False)  # stock loading: covered for PMP releases
    assert report.ok, str(report)
    assert any(c.status == "SKIP" and c.name == "mask scans" for c in report.checks)
    with pytest.raises(ValueError, match="without a mask"):
        export(runs.dense, runs.root / "never", commitment=True)
    assert not (runs.root / "never").exists()


def test_export_an_earlier_step(runs, tmp_path):
    """A quality-matched baseline: the weights a run kept at an earlier step, released like a final model."""
    out = export(runs.dense, tmp_path / "dense_step10", step=10)
    snap = load_file(str(runs.dense / "snapshots" / "step_00000010" / "model.safetensors"))
    released = load_file(str(out / "model.safetensors"))
    final = load_file(str(runs.dense / "final" / "model.safetensors"))
    assert all(torch.equal(released[k], snap[k]) for k in released)
    assert any(not torch.equal(released[k], final[k]) for k in released)  # really the earlier state
    assert "after step 10 of a longer run" in (out / "README.md").read_text()
    assert verify_release(out, runs.dense, load=False).ok
    # a PMP run's snapshot after identification is a PMP model (complement at init); before it, it is not
    pmp_out = export(runs.pmp, tmp_path / "pmp_step15", step=15)
    assert verify_release(pmp_out, runs.pmp, load=False).ok
    bad = {5: "identified its mask at step 10", 20: "between 1 and 19", 12: r"steps with weights: \[5, 10, 15, 20\]"}
    for step, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            export(runs.pmp, tmp_path / f"never{step}", step=step)
        assert not (tmp_path / f"never{step}").exists()
    broken = Path(shutil.copytree(runs.dense, tmp_path / "broken"))
    f = broken / "snapshots" / "step_00000010" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        export(broken, tmp_path / "never_broken", step=10)
    assert not (tmp_path / "never_broken").exists()


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def bad_runs(runs, tmp_path):
    unfinished = Path(shutil.copytree(runs.pmp, tmp_path / "unfinished"))
    status = json.loads((unfinished / "run.json").read_text())
    (unfinished / "run.json").write_text(json.dumps({**status, "status": "running"}))
    no_final = Path(shutil.copytree(runs.pmp, tmp_path / "no_final"))
    shutil.rmtree(no_final / "final")
    not_run = tmp_path / "not_a_run"
    not_run.mkdir()
    (not_run / "notes.txt").write_text("hello")
    return {"missing": (tmp_path / "missing", FileNotFoundError, "does not exist"),
            "not_a_run": (not_run, FileNotFoundError, "not a pmp run directory"),
            "unfinished": (unfinished, ValueError, "not finished"),
            "no_final": (no_final, ValueError, "no final model")}


@pytest.mark.parametrize("which", ["missing", "not_a_run", "unfinished", "no_final"])
def test_bad_run_is_refused_and_target_untouched(bad_runs, release, tmp_path, which):
    run, exc, msg = bad_runs[which]
    target = Path(shutil.copytree(release, tmp_path / "existing_release"))
    before = snapshot(target)
    with pytest.raises(exc, match=msg):
        export(run, target, overwrite=True)
    assert snapshot(target) == before
    fresh = tmp_path / "fresh"
    assert main(["export", str(run), "--out", str(fresh)]) == 2
    assert not fresh.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_non_empty_target_and_overwrite(runs, release, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("{}")
    before = snapshot(target)
    with pytest.raises(FileExistsError, match="not empty"):
        export(runs.pmp, target)
    assert snapshot(target) == before
    unrelated = tmp_path / "home"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="refusing to delete"):
        export(runs.pmp, unrelated, overwrite=True)
    assert (unrelated / "thesis.tex").read_text() == "years of work"
    for inside in (runs.pmp, runs.pmp / "release", runs.root):  # overlapping the private run: refused
        with pytest.raises(ValueError, match="overlaps the private run"):
            export(runs.pmp, inside, overwrite=True)
    file_target = tmp_path / "a_file"
    file_target.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        export(runs.pmp, file_target)
    with pytest.raises(ValueError, match="dtype"):
        export(runs.pmp, tmp_path / "x", dtype="fp16")
    # --overwrite replaces a previous release (here: the one with a stub config) with a complete one.
    export(runs.pmp, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in release.iterdir())
    assert (target / "model.safetensors").read_bytes() == (release / "model.safetensors").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(runs.pmp, empty) == empty and (empty / "config.json").is_file()


def test_mask_bundle(runs, tmp_path):
    rel = tmp_path / "rel"
    for inside in (rel / "private", rel):
        with pytest.raises(ValueError, match="inside the release"):
            export(runs.pmp, rel, mask_bundle=inside)
        assert not rel.exists()
    bundle = tmp_path / "owner_only" / "mask"
    export(runs.pmp, rel, mask_bundle=bundle)
    assert sorted(p.name for p in bundle.iterdir()) == ["mask.json", "mask.safetensors"]
    assert PrivateMask.load(bundle).fingerprint() == PrivateMask.load(runs.pmp / "private").fingerprint()
    assert verify_release(rel, runs.pmp, load=False).ok


# ------------------------------------------------------------------------------------------------ commitment
def test_commitment_round_trip(runs, release, tmp_path):
    run = Path(shutil.copytree(runs.pmp, tmp_path / "run"))
    rel = export(run, tmp_path / "rel", commitment=True)
    text = (rel / "README.md").read_text()
    assert "sha256(salt || mask fingerprint)" in text
    assert verify_commitment(rel, run) is True
    assert main(["prove-ownership", str(rel), "--private", str(run)]) == 0
    salt = json.loads((run / "private" / "commitment.json").read_text())["salt"]
    assert len(bytes.fromhex(salt)) == 32
    report = verify_release(rel, run, load=False)
    assert report.ok and "no commitment salt in any file" in [c.name for c in report.checks], str(report)
    # Re-exporting the same run publishes the same commitment (the salt is kept per mask).
    again = export(run, tmp_path / "rel2", commitment=True)
    assert (again / "README.md").read_text().replace("rel2", "rel") == text
    # Another mask (same shapes, same salt file) does not open it; nor does another run with its own salt.
    other = Path(shutil.copytree(run, tmp_path / "other"))
    mask = PrivateMask.load(other / "private")
    g = torch.Generator().manual_seed(1)
    flipped = {n: torch.rand(m.shape, generator=g) < DENSITY for n, m in mask.to_bool().items()}
    PrivateMask.from_bool(flipped, mask.meta).save(other / "private")
    assert verify_commitment(rel, other) is False
    assert main(["prove-ownership", str(rel), "--private", str(other)]) == 1
    with pytest.raises(ValueError, match="does not belong to the private run"):  # its complement is not its init
        export(other, tmp_path / "never", commitment=True)
    fresh = Path(shutil.copytree(run, tmp_path / "fresh"))  # the same run without its salt: a new commitment
    (fresh / "private" / "commitment.json").unlink()
    export(fresh, tmp_path / "rel_other", commitment=True)
    assert json.loads((fresh / "private" / "commitment.json").read_text())["salt"] != salt
    assert verify_commitment(rel, fresh) is False
    assert verify_commitment(tmp_path / "rel_other", fresh) is True
    with pytest.raises(ValueError, match="no ownership commitment"):
        verify_commitment(release, run)


def test_tokenizer_round_trips(runs, release):
    a = AutoTokenizer.from_pretrained(str(runs.pmp / "final"))
    b = AutoTokenizer.from_pretrained(str(release))
    text = "The captain walked to the harbour at last."
    assert a(text).input_ids == b(text).input_ids
    assert mask_needles(PrivateMask.load(runs.pmp / "private"))[0]  # the byte scan had needles to look for
