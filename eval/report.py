"""`pmp report`: results JSONs -> REPORT_DIR/report.md + gains.png + curves_<task>.png (eval/report_plots.py).

Numbers are the validation-selected test metric (mean +- sample std over seeds) with the final-step metric
beside it; the arithmetic lives in eval/metrics.py. The report is built section by section, each a function of
the loaded results (`ReportData`) returning its Markdown lines: header, vocabulary, main table with the headline
summary, then one section per task (validity, budget, attack table, authorized recovery, curves); results of the
durable suite add its sections after them (eval/report_durable.py). Several results directories, one per
pre-training seed (`pmp report RES1 RES2 ...`), make a pooled report: the same sections read on the cells of all
of them, with the pooled ratios, their two-stage bootstrap intervals and each seed's own ratios
(eval/report_pooled.py) in place of the per-task attack tables.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pmp.atomic import write_text
from pmp.eval import metrics as M
from pmp.eval.config import ReportConfig
from pmp.eval.report_durable import durable_sections, pooled_durable_sections
from pmp.eval.report_format import fmt as _f
from pmp.eval.report_format import mean_std as _ms
from pmp.eval.report_format import row as _row
from pmp.eval.report_format import table_head as _table_head
from pmp.eval.report_plots import write_plots
from pmp.eval.report_pooled import check_poolable, pooled_header, pooled_task_table, pooled_vocabulary
from pmp.eval.report_restricted import load_protections, restricted_sections

ROLE_ORDER = ("protected", "baseline", "matched", "other", "scratch")  # column order of the models

VOCABULARY = (
    "**Vocabulary.** Metrics are the *validation-selected* test metric (the attacker keeps the checkpoint best "
    "on its own validation split carved from the task's train split); the final-step metric is in brackets. "
    "**gain** = metric after fine-tuning - the same model's frozen-probe metric, sign-adjusted so that "
    "**positive = better** (for perplexity, the loss reduction in nats/token: gain = ln ppl(probe) - ln "
    "ppl(after); raw perplexity differences would scale with the starting perplexity). **gain ratio** = mean "
    "gain(protected) / mean gain(baseline), same task/attack/budget (n/a if the baseline gain <= 0); brackets: "
    "min-max of per-seed paired ratios. **authorized recovery** = mean gain of the protected model's best "
    "mask-aware (authorized) fine-tune (a rescale run: un-scaled by the owner's key first) / mean gain of the "
    "baseline's best attack at the same budget. A task is "
    "**valid** only where the baseline's best attack beats the from-scratch model's best attack; ratios on "
    "invalid tasks are shown but never averaged. **best attack** = the attack with the best mean validation "
    "metric (the choice an attacker can make on its own split); **oracle** = the attack best on test "
    "(generous to the attacker). **matched** (when present): a second dense baseline, an earlier state of the "
    "dense run whose held-out perplexity matches the protected model's, so that a lower PMP gain cannot be "
    "explained by a worse (or better) starting model. ± = sample std over seeds.")


# ---------------------------------------------------------------------------------------------- formatting
def _ratio_cell(r: float | None, valid: bool | None) -> str:
    """A ratio for the table, flagged where the task is not valid (such ratios are never averaged)."""
    return _f(r, 2) + ("" if valid or r is None else " (invalid)")


def _valid_tag(v: dict) -> str:
    return {True: "valid", False: "**INVALID**", None: "unknown"}[v["valid"]]


# ---------------------------------------------------------------------------------------------- the results
@dataclass(frozen=True)
class ReportData:
    """The results of one sweep as every section reads them."""

    results_dir: Path
    cells: list[dict]
    agg: dict  # (model, task, attack) -> seed statistics (metrics.aggregate)
    role_of: dict[str, str]  # model -> role
    models: list[str]  # in ROLE_ORDER
    tasks: list[str]
    attacks: list[str]  # the probe first
    base: str  # the baseline's name ('' = none)
    matched: str  # the matched baseline's name ('' = none)
    prot: list[str]  # the protected models
    task_info: dict[str, dict]  # task -> its first cell (metric, direction, kind, budget)
    all_cells: tuple = ()  # `cells` plus the durable suite's exploration cells (search, curve, data stages)
    pools: tuple = ()  # pooled: each results directory's own ReportData (one per pre-training seed), else ()
    pool_names: tuple = ()  # pooled: their names, as the cells' metrics.POOL tags

    def validity(self, task: str) -> dict:
        return M.validity(self.agg, self.role_of, task)


def report_data(cfg: ReportConfig) -> ReportData:
    """The results of `cfg.results`, or pooled with `cfg.more_results` (each cell tagged with its directory's name,
    metrics.POOL; directories whose suites or models differ are refused)."""
    dirs = cfg.result_dirs()
    if len(dirs) == 1:
        return _report_data(Path(cfg.results), M.load_cells(cfg.results), cfg)
    pools = tuple(_report_data(Path(r), M.load_cells(r), cfg) for r in dirs)
    names = cfg.pool_names()
    check_poolable(pools, names)
    tagged = [{**c, M.POOL: n} for p, n in zip(pools, names) for c in p.all_cells]
    return replace(_report_data(Path(dirs[0]), tagged, cfg), pools=pools, pool_names=tuple(names))


def _report_data(results_dir: Path, all_cells: list[dict], cfg: ReportConfig) -> ReportData:
    cells = M.classic_cells(all_cells)  # the durable exploration stages have their own sections
    agg = M.aggregate(cells)
    role_of = M.roles(agg, cfg.baseline, [*cfg.protected, *(m for m in cfg.protections if m not in cfg.protected)])
    models = sorted(role_of, key=lambda m: ROLE_ORDER.index(role_of[m]))
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    attacks = list(dict.fromkeys(c["attack"] for c in sorted(cells, key=lambda c: c.get("attack_kind") != "probe")))
    return ReportData(
        results_dir=results_dir, cells=cells, agg=agg, role_of=role_of, models=models, tasks=tasks,
        attacks=attacks, base=next((m for m in models if role_of[m] == "baseline"), ""),
        matched=next((m for m in models if role_of[m] == "matched"), ""),
        prot=[m for m in models if role_of[m] == "protected"],
        task_info={t: next(c for c in cells if c["task"] == t) for t in tasks}, all_cells=tuple(all_cells))


def _best_ratio(agg: dict, protected: str, reference: str, task: str, by: str) -> float | None:
    """Mean gain of the protected model's best attack / that of the reference model's (each chosen `by`)."""
    bp = M.best_attack(agg, protected, task, by=by)
    br = M.best_attack(agg, reference, task, by=by) if reference else None
    return M.ratio(bp["gain"]["mean"], br["gain"]["mean"]) if bp and br else None


# ---------------------------------------------------------------------------------------------- the verb
def write_report(cfg: ReportConfig) -> Path:
    """`pmp report`: the Markdown report and its plots of the results in `cfg.results` (pooled with
    `cfg.more_results`: by default in RESULTS/report_pooled, leaving RESULTS's own report alone) -> report.md."""
    cfg.validate()
    d = report_data(cfg)
    protections = load_protections(cfg.protections, d.models)
    out = Path(cfg.out) if cfg.out else Path(cfg.results) / ("report_pooled" if d.pools else "report")
    out.mkdir(parents=True, exist_ok=True)
    if d.pools:
        lines = pooled_header(d) + [VOCABULARY, "", pooled_vocabulary(len(d.pools)), ""] + _main_table(d)
        lines += _headline(d) + restricted_sections(d, protections)
        for t in d.tasks:
            lines += _task_intro(d, t) + pooled_task_table(d, t) + _authorized_lines(d, t)
            lines += ["", f"![curves](curves_{t}.png)", ""]
        lines += ["![gains](gains.png)", ""]
        lines += pooled_durable_sections(d, out)
    else:
        lines = _header(d) + [VOCABULARY, ""] + _main_table(d) + _headline(d) + restricted_sections(d, protections)
        for t in d.tasks:
            lines += _task_section(d, t)
        lines += ["![gains](gains.png)", ""]
        lines += durable_sections(d, out)  # nothing for results without durable cells or diagnostics
    write_text(out / "report.md", "\n".join(lines) + "\n")
    write_plots(out, d.agg, d.cells, d.models, d.tasks, d.attacks)
    return out / "report.md"


# ---------------------------------------------------------------------------------------------- sections
def _header(d: ReportData) -> list[str]:
    first = d.cells[0]
    return ["# Unauthorized fine-tuning evaluation", "",
            f"- results: `{d.results_dir}` ({len(d.cells)} cells), suite `{first.get('suite')}`, "
            f"seeds {sorted({c['seed'] for c in d.cells})}",
            "- models: " + ", ".join(f"`{m}` ({d.role_of[m]})" for m in d.models),
            f"- versions: {first.get('versions')}, commit `{first.get('git_commit')}`", ""]


def _main_table(d: ReportData) -> list[str]:
    """One row per task: validity, every model's probe and best attack, the protected models' ratios."""
    hdr = ["task", "metric", "validity"] + [f"{m} probe" for m in d.models]
    hdr += [f"{m} best attack: after (gain)" for m in d.models]
    hdr += [f"gain ratio {p} (best)" for p in d.prot] + [f"gain ratio {p} (oracle)" for p in d.prot]
    hdr += [f"gain ratio {p} vs {d.matched} (best)" for p in d.prot if d.matched]
    hdr += [f"authorized recovery {p}" for p in d.prot]
    return ["## Main table", ""] + _table_head(hdr) + [_main_row(d, t) for t in d.tasks] + [""]


def _main_row(d: ReportData, t: str) -> str:
    info, v, agg = d.task_info[t], d.validity(t), d.agg
    row = [t, f"{info['metric']} ({'↑' if info['direction'] == 'higher' else '↓'})", _valid_tag(v)]
    probe_name = next((a for a in d.attacks if agg.get((d.models[0], t, a), {}).get("attack_kind") == "probe"), "")
    for m in d.models:
        pa = agg.get((m, t, probe_name))
        row.append(_ms(pa["after"]) if pa else "n/a")
    for m in d.models:
        b = M.best_attack(agg, m, t)
        row.append(f"{_ms(b['after'])} ({_f(b['gain']['mean'])}) `{b['attack']}`" if b else "n/a")
    row += [_ratio_cell(_best_ratio(agg, p, d.base, t, "val"), v["valid"]) for p in d.prot]
    row += [_ratio_cell(_best_ratio(agg, p, d.base, t, "test"), v["valid"]) for p in d.prot]
    row += [_ratio_cell(_best_ratio(agg, p, d.matched, t, "val"), v["valid"]) for p in d.prot if d.matched]
    for p in d.prot:
        ar = M.authorized_recovery(agg, p, d.base, t) if d.base else {"recovery": None}
        row.append(_ratio_cell(ar["recovery"], v["valid"]))
    return _row(row)


def _headline(d: ReportData) -> list[str]:
    """The summary under the main table: each protected model's best-attack gain ratio averaged over the VALID
    tasks only."""
    lines = []
    for p in d.prot:
        vr = [r for t in d.tasks
              if (r := _best_ratio(d.agg, p, d.base, t, "val")) is not None and d.validity(t)["valid"]]
        lines.append(f"- best-attack gain ratio of `{p}` over valid tasks: " +
                     (f"mean {_f(sum(vr) / len(vr), 2)} over {len(vr)} task(s)" if vr else "no valid task"))
    return lines + [""]


def _task_section(d: ReportData, t: str) -> list[str]:
    return (_task_intro(d, t) + _attack_table(d, t) + _authorized_lines(d, t)
            + ["", f"![curves](curves_{t}.png)", ""])


def _task_intro(d: ReportData, t: str) -> list[str]:
    """Heading, validity and budget of one task."""
    info, v = d.task_info[t], d.validity(t)
    lines = [f"## {t} ({info['task_kind']}, {info['metric']}, {'higher' if info['direction'] == 'higher' else 'lower'}"
             f" is better) -- {_valid_tag(v)}", ""]
    if v["valid"] is not None:
        lines.append(f"Validity: baseline best {_f(v['baseline_best'])} (`{v['baseline_attack']}`) vs from scratch "
                     f"best {_f(v['scratch_best'])} (`{v['scratch_attack']}`). {v['why']}")
    else:
        lines.append(f"Validity unknown: {v['why']}.")
    b = info.get("budget", {})
    return lines + [f"Budget: {b.get('steps')} steps x batch {b.get('batch_size')}, max_len {b.get('max_len')}, "
                    f"data {b.get('data')}", ""]


def _attack_table(d: ReportData, t: str) -> list[str]:
    """One row per attack run on task t (every model's after and gain, the protected models' ratios), then the
    best-attack row."""
    hdr = ["attack"] + [f"{m}: after [final]" for m in d.models] + [f"{m}: gain" for m in d.models]
    hdr += [f"ratio {p}" for p in d.prot] + [f"ratio {p} vs {d.matched}" for p in d.prot if d.matched]
    valid = d.validity(t)["valid"]
    rows = [_attack_row(d, t, a, valid) for a in d.attacks if any((m, t, a) in d.agg for m in d.models)]
    return _table_head(hdr) + rows + [_best_attack_row(d, t), ""]


def _attack_row(d: ReportData, t: str, a: str, valid: bool | None) -> str:
    agg = d.agg
    row = [f"`{a}`"]
    for m in d.models:
        x = agg.get((m, t, a))
        row.append(f"{_ms(x['after'])} [{_f(x['after_final']['mean'])}]" if x else "")
    for m in d.models:
        x = agg.get((m, t, a))
        row.append(_ms(x["gain"]) if x else "")
    for p in d.prot:
        gr = M.gain_ratio(agg, p, d.base, t, a) if d.base else {"ratio": None}
        s = _f(gr["ratio"], 2)
        if gr["ratio"] is not None and gr.get("paired_min") is not None:
            s += f" [{_f(gr['paired_min'], 2)}, {_f(gr['paired_max'], 2)}]"
        if gr["ratio"] is not None and not valid:
            s += " (invalid)"
        row.append(s if (p, t, a) in agg else "")
    for p in d.prot if d.matched else []:
        gr = M.gain_ratio(agg, p, d.matched, t, a)
        row.append(_f(gr["ratio"], 2) if (p, t, a) in agg else "")
    return _row(row)


def _best_attack_row(d: ReportData, t: str) -> str:
    bests = {m: M.best_attack(d.agg, m, t) for m in d.models}

    def ratio_to(p: str, ref: str) -> float | None:
        return M.ratio(bests[p]["gain"]["mean"], bests[ref]["gain"]["mean"]) if ref and bests[p] and bests[ref] \
            else None

    row = ["**best attack**"]
    row += [f"{_ms(bests[m]['after'])} `{bests[m]['attack']}`" if bests[m] else "" for m in d.models]
    row += [_ms(bests[m]["gain"]) if bests[m] else "" for m in d.models]
    row += [_f(ratio_to(p, d.base), 2) for p in d.prot]
    row += [_f(ratio_to(p, d.matched), 2) for p in d.prot if d.matched]
    return _row(row)


def _authorized_lines(d: ReportData, t: str) -> list[str]:
    """The owner's authorized recovery of each protected model, where it has authorized cells."""
    lines = []
    for p in d.prot:
        ar = M.authorized_recovery(d.agg, p, d.base, t) if d.base else {"recovery": None, "why": "no baseline"}
        if ar["recovery"] is not None or ar.get("authorized_attack"):
            lines.append(f"Authorized recovery `{p}`: {_f(ar['recovery'], 2)} = gain {_f(ar.get('authorized_gain'))} "
                         f"(`{ar.get('authorized_attack')}`) / baseline gain {_f(ar.get('baseline_gain'))} "
                         f"(`{ar.get('baseline_attack')}`) {ar['why']}")
    return lines
