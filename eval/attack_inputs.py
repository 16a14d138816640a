"""The inputs of `pmp attack`: releases (+ the owner's private runs, recovered masks, the from-scratch
reference) as `ModelSpec`s with roles, and task names (`TASK`, `TASK:lm`, `TASK:text`) or files as `TaskData`.

Models: `--models NAME=PATH` releases (any HF causal-LM directory with a tokenizer), `--private NAME=RUN` the
owner's run directory for the PMP model(s) (enables `authorized` attacks and gives the random-mask density), and
the `from_scratch` reference (the first release's config.json, random init) which runs the probe and every attack
marked `scratch`. Roles: `protected` (has --private, or is named pmp*), `baseline` (--baseline NAME, else the
model named dense*), `matched` (--matched NAME), `scratch`, `other`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pmp.data.task_formulations import formulate, split_formulation
from pmp.data.tasks import (
    TASKS,
    TaskData,
    default_classification_tasks,
    default_lm_probe,
    list_tasks,
    lm_task_from_text,
    load_task,
    load_task_file,
)
from pmp.eval.models import check_release, load_tokenizer
from pmp.eval.recovered_mask import recovered_mask_sparse_attack_inputs
from pmp.eval.release_weights import StoredTensors
from pmp.mask import PrivateMask
from pmp.run_dir import RunDir, check_complement, open_private_run

SCRATCH = "from_scratch"


@dataclass
class ModelSpec:
    name: str
    path: Path | None  # None for from_scratch
    role: str  # protected | baseline | matched | scratch | other
    private: Path | None = None
    config_from: Path | None = None  # from_scratch: the release whose config.json gives the architecture
    recovered: Path | None = None  # a mask recovered from the release by an attacker (`pmp audit`)
    reference: Path | None = None  # the unprotected release a secret-free protection started from (D0 compares)

    @property
    def tokenizer_dir(self) -> Path:
        return self.path if self.path is not None else self.config_from


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    """`NAME=PATH` command-line items -> {NAME: PATH}; names must be usable in result file names."""
    out: dict[str, str] = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{what} takes NAME=PATH pairs, got {it!r}")
        if "__" in name or "/" in name or name == SCRATCH:
            raise ValueError(f"{what}: model name {name!r} may not contain '__' or '/' nor be {SCRATCH!r}")
        if name in out:
            raise ValueError(f"{what}: model name {name!r} given twice")
        out[name] = path
    return out


def resolve_models(models: dict[str, str], private: dict[str, str] | None = None, baseline: str = "",
                   scratch: bool = True, recovered: dict[str, str] | None = None,
                   matched: str = "", references: dict[str, str] | None = None) -> list[ModelSpec]:
    """Check every input (releases are complete, private runs are runs and trained their release, recovered masks
    load and fit, references have the model's architecture and tokenizer) and assign roles; nothing is written and
    no model is trained, so a wrong input fails at once. `matched`: a second dense baseline whose pre-training
    quality matches the protected model's (an earlier state of the dense run, `pmp export --step`): gains are also
    compared against it. `references`: NAME -> the unprotected release a protection without an owner secret
    (`pmp protect sophon|mlac|sdd`) started from; D0 compares NAME's updates with the same updates of it."""
    private, recovered, references = private or {}, recovered or {}, references or {}
    baseline = _check_names(models, private, recovered, baseline, matched)
    unknown = sorted(set(references) - set(models))
    if unknown:
        raise ValueError(f"--references names {unknown} that are not in --models ({', '.join(models)})")
    both = sorted(set(references) & set(private))
    if both:
        raise ValueError(f"{both[0]} has both --private and --references: D0 compares a model with its owner's "
                         "secret when it has one; give --references only for protections without a secret")
    specs = []
    for name, path in models.items():
        rel = check_release(path)
        load_tokenizer(rel)
        priv = None
        if name in private:
            run = open_private_run(private[name], f"--private {name}=", need_mask=False)
            if run.has_mask():
                check_release_of_run(rel, run, run.load_mask(), name)
            elif run.has_rescale_key():
                check_release_of_rescale_run(rel, run, name)
            else:
                raise ValueError(f"--private {name}={run.root} holds no owner secret: neither a mask "
                                 "(private/mask.json, a method=pmp run) nor a rescale key "
                                 "(private/rescale.safetensors, pmp protect rescale): dense runs have none")
            priv = run.root
        role = ("baseline" if name == baseline else "matched" if name == matched else
                "protected" if priv is not None or name.startswith("pmp") else "other")
        rec = None
        if name in recovered:
            rec = Path(recovered[name])
            recovered_mask_sparse_attack_inputs(rec, rel)  # loads and checks it against the release
        ref = None
        if name in references:
            ref = check_release(references[name])
            _check_same_architecture(rel, ref, f"--references {name}=")
        specs.append(ModelSpec(name, rel, role, priv, recovered=rec, reference=ref))
    if scratch:
        ref = next((s for s in specs if s.role == "baseline"), specs[0])
        specs.append(ModelSpec(SCRATCH, None, "scratch", config_from=ref.path))
    return specs


def _check_same_architecture(release: Path, reference: Path, what: str) -> None:
    """A reference must be the same architecture with the same tokenizer as the release it is compared with."""
    a, b = (json.loads((d / "config.json").read_text()) for d in (release, reference))
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    diff = [k for k in keys if a.get(k) != b.get(k)]
    if diff:
        raise ValueError(f"{what}{reference} is another architecture than {release} ({diff[0]}: {b.get(diff[0])} vs "
                         f"{a.get(diff[0])}): the reference is the model the protection started from")
    if load_tokenizer(release).get_vocab() != load_tokenizer(reference).get_vocab():
        raise ValueError(f"{what}{reference} has another tokenizer than {release}: the reference is the model the "
                         "protection started from")


def check_release_of_run(release: Path, run: RunDir, mask: PrivateMask, name: str) -> None:
    """The release given for `--private NAME=RUN` must be the one RUN trained: the mask names only parameters the
    release has, with their shapes, and where the run kept its initial weights the mask's complement still equals
    them (`pmp.run_dir.check_complement`, compared in the dtype the release stores). Reads the weight files only
    (no model is built), so every pair is checked before any cell runs."""
    weights = StoredTensors(release)
    missing = [n for n in mask.layouts if n not in weights and n != "lm_head.weight"]  # lm_head may be tied
    if missing:
        raise ValueError(f"the private mask of {run.root} names parameters the release {release} does not have "
                         f"(e.g. {missing[0]}): --private {name}= points at another model's run")
    wrong = [(n, tuple(lay.shape), weights.shape(n)) for n, lay in mask.layouts.items()
             if n in weights and tuple(lay.shape) != weights.shape(n)]
    if wrong:
        n, want, got = wrong[0]
        raise ValueError(f"the private mask of {run.root} has {n} of shape {want}, the release {release} {got}: "
                         f"--private {name}= points at another model's run")
    check_complement(weights, mask, run, release, storage_dtype=weights.dtype)


def check_release_of_rescale_run(release: Path, run: RunDir, name: str) -> None:
    """The release given for `--private NAME=RUN` of a rescale run must be RUN's rescaled model: the tensors the
    key scales in the first and last layer equal the run's final ones (the release's storage dtype; a key is drawn
    afresh per run, so another run's release differs there)."""
    key, weights = run.load_rescale_key(), StoredTensors(release)
    final = StoredTensors(run.final)
    scaled = [f"model.layers.{i}.{p}.weight" for i in sorted({0, len(key.mlp) - 1})
              for p in ("mlp.up_proj", "mlp.down_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_proj",
                        "self_attn.k_proj")]
    for n in scaled:
        if n not in weights or n not in final or weights.shape(n) != final.shape(n):
            raise ValueError(f"the rescale key of {run.root} does not fit the release {release} ({n} missing or of "
                             f"another shape): --private {name}= points at another model's run")
        if not torch.equal(weights[n], final[n].to(weights.dtype).float()):
            raise ValueError(f"the release {release} is not the rescaled model of {run.root} ({n} differs): "
                             f"--private {name}= points at another model's run")


def _check_names(models: dict[str, str], private: dict[str, str], recovered: dict[str, str], baseline: str,
                 matched: str) -> str:
    """Refuse names that are not models or roles that collide; -> the baseline's name ('' = none)."""
    if not models:
        raise ValueError("no models: pass --models NAME=PATH [NAME=PATH ...]")
    for flag, given in (("--private", private), ("--recovered", recovered)):
        unknown = sorted(set(given) - set(models))
        if unknown:
            raise ValueError(f"{flag} names {unknown} that are not in --models ({', '.join(models)})")
    if baseline and baseline not in models:
        raise ValueError(f"--baseline {baseline!r} is not one of the models: {', '.join(models)}")
    if matched and matched not in models:
        raise ValueError(f"--matched {matched!r} is not one of the models: {', '.join(models)}")
    if not baseline:
        baseline = next((n for n in models if n.startswith("dense") and n not in private and n != matched), "")
    if matched and matched == baseline:
        raise ValueError(f"--matched {matched!r} is also the baseline; the matched baseline is a second dense model")
    return baseline


def resolve_tasks(names: str = "default", cache_dir: str = "", task_file: str = "", text_column: str = "text",
                  label_column: str = "label", lm_file: str = "",
                  verbalisers: dict[str, str] | None = None) -> list[TaskData]:
    """TaskData for: the default tasks ('default'), a comma list of registered tasks, plus user files. A name may
    carry a formulation, `TASK:lm` (classification as language modelling) or `TASK:text` (the task's texts as an LM
    domain), of a registered classification task or of the task file (by its stem); pmp/data/task_formulations.py.
    `verbalisers`: TASK -> 'word1,word2,...' label words of `TASK:lm`. Every name is checked before any is loaded."""
    verbalisers = verbalisers or {}
    wanted: list[str] = []
    file_stem = Path(task_file).stem if task_file else None
    for n in [x.strip() for x in (names or "").split(",") if x.strip()]:
        if n == "default":
            # the LM probe first: it is where pre-training clearly helps (DESIGN.md, validity), so a partial
            # sweep has the most informative comparison
            wanted += [default_lm_probe()] + default_classification_tasks()
            continue
        if n in ("none", ""):
            continue
        base, form = split_formulation(n)
        if base not in list_tasks() and not (form and base == file_stem):
            raise ValueError(f"unknown task {n!r}; valid tasks: default, none, {', '.join(list_tasks())}, each "
                             f"classification task also as TASK:lm or TASK:text (or --task-file / --lm-file for your "
                             "own data)")
        if form and base in TASKS and TASKS[base].kind != "classification":
            raise ValueError(f"task {n!r}: {base} is an {TASKS[base].kind} task; ':{form}' reads a classification "
                             f"task (name {base} without a suffix)")
        wanted.append(n)
    wanted = list(dict.fromkeys(wanted))
    as_lm = {split_formulation(n)[0] for n in wanted if split_formulation(n)[1] == "lm"}
    stray = sorted(set(verbalisers) - as_lm)
    if stray:
        raise ValueError(f"verbalisers given for {stray}, but no such TASK:lm task is attacked (tasks: "
                         f"{', '.join(wanted) or 'none'}); add it to --tasks as e.g. {stray[0]}:lm")
    # user files first: they fail fast (missing columns) before any slow loading
    tasks = []
    file_task = None
    if task_file:
        file_task = load_task_file(task_file, text_column, label_column)
        tasks.append(file_task)
    if lm_file:
        tasks.append(lm_task_from_text(lm_file))
    loaded: dict[str, TaskData] = {}
    for n in wanted:
        base, form = split_formulation(n)
        if form and file_task is not None and base == file_stem:
            src = file_task
        else:
            if base not in loaded:
                loaded[base] = load_task(base, cache_dir)
            src = loaded[base]
        tasks.append(formulate(src, form, verbalisers.get(base)) if form else src)
    if not tasks:
        raise ValueError("no tasks: pass --tasks default|t1,t2 and/or --task-file / --lm-file")
    names_seen = [t.name for t in tasks]
    if len(set(names_seen)) != len(names_seen):
        raise ValueError(f"two tasks share a name ({names_seen}); rename the task file")
    return tasks
