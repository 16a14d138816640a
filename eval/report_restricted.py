"""The report's restricted-domain view: models protected against ONE restricted domain (`pmp protect sophon |
sophon_nlp | mlac`, read from their private runs' run.json) beside the other protected models (PMP) and the
baseline, under the same attacks and budgets.

For each such model: its restricted task, the retain perplexity before and after protection (the price), its
roll-backs and cost; then per task of the results the best-attack gain ratio (validation-chosen, against the
baseline) -- on the restricted task that is the protection, on every other task it is collateral damage (a
ratio well below 1 there means the method damaged what it should keep).
"""

from __future__ import annotations

import math
from pathlib import Path

from pmp.eval import metrics as M
from pmp.eval.report_format import fmt as _f
from pmp.eval.report_format import mean_std as _ms
from pmp.eval.report_format import row as _row
from pmp.eval.report_format import table_head as _table_head
from pmp.run_dir import RunDir


def load_protections(protections: dict[str, str], models: list[str]) -> dict[str, dict]:
    """model -> the run.json of its protection run; refuses names not in the results and runs that are not
    finished restricted-domain protections."""
    out = {}
    for name, path in protections.items():
        if name not in models:
            raise ValueError(f"--protections {name}=...: {name!r} is not a model in these results "
                             f"({', '.join(models)})")
        run = RunDir(Path(path))
        if not run.is_run():
            raise FileNotFoundError(f"--protections {name}={path}: not a pmp run directory (pass the --out of "
                                    "`pmp protect`)")
        status = run.read_status()
        if status.get("status") != "finished" or "restricted" not in status:
            raise ValueError(f"--protections {name}={path}: not a finished restricted-domain protection run "
                             f"(method {status.get('method')!r}, status {status.get('status')!r})")
        out[name] = status
    return out


def restricted_sections(d, protections: dict[str, dict]) -> list[str]:
    """Markdown lines (nothing without protections). `d`: eval/report.py `ReportData`."""
    if not protections:
        return []
    lines = ["## Restricted-domain view", "",
             "Models protected against one restricted domain, beside the other protected models and the baseline "
             f"`{d.base or 'n/a'}` under the same attacks and budgets (validation-chosen best attack). On the "
             "restricted task a gain ratio below 1 is protection; on every other task it is collateral damage.", ""]
    hdr = ["model", "method", "restricted task", "retain ppl before -> after", "roll-backs",
           "protection cost (x pre-training tokens, wall s)", "restricted ppl before -> after (no fine-tuning)"]
    lines += _table_head(hdr)
    for m, s in protections.items():
        b, a = s.get("before", {}), s.get("after", {})
        rb, ra = b.get("retain_ppl"), a.get("retain_ppl")
        price = f" ({100 * (ra / rb - 1):+.1f} %)" if rb and ra else ""
        cost = s.get("cost", {})
        lines.append(_row([f"`{m}`", s["method"], s["restricted"], f"{_f(rb, 2)} -> {_f(ra, 2)}{price}",
                           str(s.get("rollbacks", "n/a")), f"{_f(cost.get('x_pretraining'), 2)}, "
                           f"{_f(cost.get('wall_s'), 0)}",
                           f"{_f(b.get('restricted_ppl'), 2)} -> {_f(a.get('restricted_ppl'), 2)}"]))
    lines.append("")
    shown = list(protections) + [p for p in d.prot if p not in protections]
    hdr = ["task", "validity", "budget (steps x batch)", f"{d.base or 'baseline'} best attack: after (gain)"]
    hdr += [f"{m}: after (gain ratio) [shortfall]" for m in shown]
    lines += _table_head(hdr)
    for t in d.tasks:
        v = d.validity(t)
        valid = {True: "valid", False: "INVALID", None: "n/a"}[v["valid"]]
        budget = M.budget_key(d.task_info[t])
        row = [t, valid, f"{budget[0]} x {budget[1]}"]
        base = M.best_attack(d.agg, d.base, t) if d.base else None
        row.append(f"{_ms(base['after'])} ({_f(base['gain']['mean'])})" if base else "n/a")
        for m in shown:
            best = M.best_attack(d.agg, m, t)
            r = M.ratio(best["gain"]["mean"], base["gain"]["mean"]) if best and base else None
            tag = " **restricted**" if protections.get(m, {}).get("restricted") == t else ""
            short = f" [{_f(shortfall(best, base), 3)}]" if best and base else ""
            row.append(f"{_ms(best['after'])} ({_f(r, 2)}){short}{tag}" if best else "n/a")
        lines.append(_row(row))
    return lines + ["", "**shortfall** = how much worse the protected model ends than the baseline under each one's "
                        "best attack (perplexity: ln ppl(protected) - ln ppl(baseline), nats/token; accuracy: baseline "
                        "- protected): a gain ratio above 1 with a shortfall near 0 means the protection only moved "
                        "the starting point, and the attacker recovered it. A protection statement holds only at the "
                        "budget in its row; the durable suite's budget curves (below, when run) show where it "
                        "disappears.", ""]


def shortfall(protected: dict, baseline: dict) -> float:
    """How much worse the protected model's best attack ends than the baseline's (positive = protected worse)."""
    a, b = protected["after"]["mean"], baseline["after"]["mean"]
    if protected["direction"] == "lower":  # perplexity: compare in nats/token, like the gains
        return math.log(a) - math.log(b)
    return b - a
