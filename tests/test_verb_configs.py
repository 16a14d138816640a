"""Every CLI verb takes a typed config: a YAML recipe, `--set` overrides and one flag per field, with the same
errors (a misspelled key names the closest valid one) and `--help` listing every field with its default."""

from __future__ import annotations

import pytest

from pmp.cli import VERBS, build_parser, load_verb_config, main
from pmp.config import ExportConfig, load_config
from pmp.eval.config import AttackConfig
from pmp.typed_config import field_docs, load_typed

# argv that gets each verb past argparse (required positionals / flags), and a misspelled key of its config
VERB_ARGS = {
    "prepare": (["data", "prepare"], "forse", "force"),
    "pretrain": (["pretrain", "--out", "RUN"], "train.stepz", "train.steps"),
    "pipeline": (["pipeline", "--out", "EXP"], "atack.suite", "attack"),
    "study": (["study", "--out", "EXP"], "kill_abov", "kill_above"),
    "export": (["export", "RUN", "--out", "REL"], "dtpye", "dtype"),
    "verify-release": (["verify-release", "REL"], "privte", "private"),
    "prove-ownership": (["prove-ownership", "REL", "--private", "RUN"], "releese", "release"),
    "attack": (["attack", "--models", "pmp=REL", "--out", "RES"], "suit", "suite"),
    "report": (["report", "RES"], "baseline_", "baseline"),
    "audit": (["audit", "REL", "--private", "RUN"], "max_seed_", "max_seed"),
    "protect": (["protect", "rescale", "--base", "RUN", "--out", "RUN2"], "strenght", "strength"),
}


def test_every_verb_is_covered():
    assert {v.name for v in VERBS} == set(VERB_ARGS)


def _with_recipe(argv: list[str], recipe: str) -> list[str]:
    if argv[0] in ("pretrain", "pipeline", "study"):
        return [argv[0], recipe, *argv[1:]]
    return [*argv, "--config", recipe]


@pytest.mark.parametrize("name", sorted(VERB_ARGS))
def test_misspelled_key_in_recipe_or_set_names_the_closest(name, tmp_path, capsys):
    argv, typo, closest = VERB_ARGS[name]
    recipe = tmp_path / "r.yaml"
    keys = typo.split(".")
    recipe.write_text("".join(f"{'  ' * i}{k}:\n" for i, k in enumerate(keys[:-1])) + f"{'  ' * (len(keys) - 1)}"
                      f"{keys[-1]}: 1\n")
    for args in (_with_recipe(argv, str(recipe)), [*argv, "--set", f"{typo}=1"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"did you mean '{closest}'" in err, err
    assert list(tmp_path.iterdir()) == [recipe]  # nothing written


@pytest.mark.parametrize("name", sorted(VERB_ARGS))
def test_help_lists_every_field_with_its_default(name, capsys):
    argv = VERB_ARGS[name][0]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[: 2 if argv[0] == "data" else 1], "--help"])
    out = capsys.readouterr().out
    verb = next(v for v in VERBS if v.name == name)
    for key, _, default, _ in field_docs(verb.config):
        assert f"{key} (" in out and f"default {default!r}" in out, key


def test_flags_win_over_set_which_wins_over_the_recipe(tmp_path):
    recipe = tmp_path / "a.yaml"
    recipe.write_text("suite: full\nseeds: 2\ntasks: none\nmodels: {pmp: rel1}\nout: res\n")
    args = build_parser().parse_args(["attack", "--config", str(recipe), "--set", "seeds=3", "--set", "tasks=trec",
                                      "--tasks", "movie_dialog", "--no-scratch", "--private", "pmp=run"])
    cfg = load_verb_config(args.verb_spec, args)
    assert isinstance(cfg, AttackConfig)
    assert (cfg.suite, cfg.seeds, cfg.tasks, cfg.scratch) == ("full", 3, "movie_dialog", False)
    assert cfg.models == {"pmp": "rel1"} and cfg.private == {"pmp": "run"} and cfg.out == "res"


def test_pipeline_aliases_set_nested_keys():
    args = build_parser().parse_args(["pipeline", "--out", "x", "--suite", "full", "--seeds", "4", "--no-audit",
                                      "--matched-baseline", "--set", "audit.max_seed=5"])
    cfg = load_verb_config(args.verb_spec, args)
    assert (cfg.attack.suite, cfg.attack.seeds, cfg.pipeline.audit, cfg.pipeline.matched_baseline) == \
        ("full", 4, False, True)
    assert cfg.audit.max_seed == 5 and cfg.run_config().train.steps == cfg.train.steps


@pytest.mark.parametrize("override, match", [
    ("step=0", "step must be >= 1"),
    ("dtype=fp16", "dtype must be one of"),
    ("license=not a license", "SPDX"),
    ("step=@", "not a plain YAML value"),
    ("name=!!python/object:os.system ls", "not a plain YAML value"),
    ("step=1e400", "expected"),
])
def test_export_config_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_typed(ExportConfig, None, [override], {"run": "r", "out": "o"})


def test_non_finite_numbers_are_refused():
    with pytest.raises(ValueError, match="finite"):
        load_typed(AttackConfig, None, ["mask_density=.inf"], {"models": {"a": "b"}, "out": "o"})
    with pytest.raises(ValueError, match="train.lr: expected a finite number"):
        load_config(None, ["train.lr=inf"])
