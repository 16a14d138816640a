"""Config loading, overrides and validation: every bad value is a ValueError with an actionable sentence."""

import pytest

from pmp.config import RunConfig, load_config
from pmp.typed_config import field_docs


def test_defaults_validate():
    RunConfig().validate()


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 50\nmodel:\n  preset: tiny\npmp:\n  max_warmup_steps: 10\n  min_warmup_steps: 5\n")
    cfg = load_config(p, ["train.lr=1e-4", "pmp.rewind=false", "model.init_seed=7", "data.corpus=a.txt,b.txt"])
    assert cfg.train.steps == 50 and cfg.train.lr == 1e-4 and cfg.pmp.rewind is False
    assert cfg.model.init_seed == 7 and cfg.data.corpus == "a.txt,b.txt"
    assert load_config(None, ["model.init_seed=null"]).model.init_seed is None


@pytest.mark.parametrize("override, match", [
    ("train.stpes=5", "did you mean 'train.steps'"),
    ("trian.steps=5", "did you mean 'train'"),
    ("pmp.densty=0.3", "did you mean 'pmp.density'"),
])
def test_typo_names_closest_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override, match", [
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("pmp.rewind=maybe", "pmp.rewind: expected true/false"),
    ("train=3", "expected a section"),
])
def test_wrong_types(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override, match", [
    ("pmp.density=0", r"pmp.density \(rho\) must be in \(0, 1\]"),
    ("pmp.density=1.5", r"pmp.density \(rho\) must be in \(0, 1\]"),
    ("pmp.scorer=magic", "pmp.scorer must be one of"),
    ("pmp.scope=some", "pmp.scope must be matrices, all or linear"),
    ("pmp.selection=local", "pmp.selection must be global or per_tensor"),
    ("model.preset=huge", "model.preset must be one of"),
    ("train.method=lora", "train.method must be pmp or dense"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("train.device=tpu", "train.device must be"),
    ("data.val_fraction=0.9", "data.val_fraction"),
])
def test_nonsense_values(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_warmup_must_leave_masked_steps():
    with pytest.raises(ValueError, match="max_warmup_steps"):
        load_config(None, ["train.steps=100", "pmp.max_warmup_steps=100"])
    load_config(None, ["train.steps=100", "pmp.max_warmup_steps=100", "train.method=dense"])


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(lst)


def test_every_field_documented():
    rows = field_docs(RunConfig)
    assert len(rows) > 40
    for key, _tp, _default, text in rows:
        assert text, f"{key} has no help line"


def test_recipes_load():
    for name in ("debug", "small"):
        load_config(f"configs/{name}.yaml")
