"""The layers of pmp, enforced: every import in the package (top-level or inside a function) is read from the AST.

  pmp.kernels                       imports only torch, triton and the standard library
  core (pmp, pmp.data, release)     imports the core and pmp.kernels -- nothing above
  pmp.train, pmp.eval               import the core (and kernels), never each other
  pmp.cli, pmp.pipeline, pmp.study  on top; nothing imports them (except `python -m pmp`)
and no import cycle among the package's modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"pmp": ROOT / "pmp", "pmp.kernels": ROOT / "kernels", "pmp.train": ROOT / "train",
                "pmp.eval": ROOT / "eval"}
TOP = {"pmp.cli", "pmp.pipeline", "pmp.study", "pmp.__main__"}
KERNEL_THIRD_PARTY = {"torch", "triton"}


def package_sources() -> dict[str, str]:
    """{dotted module name: source} for every module of the installed package layout."""
    out = {}
    for pkg, d in PACKAGE_DIRS.items():
        for f in sorted(d.rglob("*.py")):
            rel = f.relative_to(d).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "pmp" and parts and parts[0] in ("kernels", "train", "eval"):
                continue
            out[".".join([pkg, *parts])] = f.read_text()
    return out


def is_package(module: str) -> bool:
    pkg = max((p for p in PACKAGE_DIRS if module == p or module.startswith(p + ".")), key=len)
    rest = module.split(".")[len(pkg.split(".")):]
    return (PACKAGE_DIRS[pkg].joinpath(*rest) / "__init__.py").is_file()


def layer(module: str) -> str:
    if module in TOP:
        return "top"
    for sub in ("kernels", "train", "eval"):
        if module == f"pmp.{sub}" or module.startswith(f"pmp.{sub}."):
            return sub
    return "core"


ALLOWED = {"kernels": {"kernels"}, "core": {"core", "kernels"}, "train": {"core", "kernels", "train"},
           "eval": {"core", "kernels", "eval"}, "top": {"core", "kernels", "train", "eval", "top"}}


def imports_of(module: str, source: str, is_package: bool) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement, relative imports resolved."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                stem = node.module
            found.append((stem, node.lineno))
            found += [(f"{stem}.{a.name}", node.lineno) for a in node.names]  # `from pkg import module`
    return found


def violations(sources: dict[str, str]) -> list[str]:
    """Every forbidden arrow and every import cycle among `sources` (empty = the layering holds)."""
    problems, graph = [], {m: set() for m in sources}
    stdlib = set(sys.stdlib_module_names)
    for mod, src in sources.items():
        for target, line in imports_of(mod, src, is_package(mod)):
            top = target.split(".")[0]
            if layer(mod) == "kernels" and top != "pmp" and top not in KERNEL_THIRD_PARTY | stdlib | {"__future__"}:
                problems.append(f"{mod}:{line} imports {target}: kernels import only torch and triton")
            if top != "pmp":
                continue
            if target not in sources:
                continue  # `from pmp.x import name`: the module edge is recorded through its stem
            if mod != "pmp.__main__" and (layer(target) not in ALLOWED[layer(mod)]
                                          or layer(target) == "top" and layer(mod) != "top"):
                problems.append(f"{mod}:{line} imports {target}: a {layer(mod)} module may not import "
                                f"{layer(target)}")
            if target != mod and not mod.startswith(target + "."):  # a parent package loads first: no cycle
                graph[mod].add(target)
    problems += [f"import cycle among: {', '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_package_respects_its_layers():
    problems = violations(package_sources())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module, planted, expected", [
    ("pmp.release", "from pmp.train.trainer import pretrain", "a core module may not import train"),
    ("pmp.eval.metrics", "import pmp.train.checkpoint", "a eval module may not import train"),
    ("pmp.train.trainer", "from pmp.eval.metrics import aggregate", "a train module may not import eval"),
    ("pmp.kernels.routing", "import numpy", "kernels import only torch and triton"),
    ("pmp.kernels.routing", "from pmp.mask import PrivateMask", "a kernels module may not import core"),
    ("pmp.mask", "from pmp.cli import main", "a core module may not import top"),
    ("pmp.eval.metrics", "def f():\n    from pmp.pipeline import run_pipeline", "may not import top"),
])
def test_a_planted_forbidden_import_is_caught(module, planted, expected):
    sources = package_sources()
    sources[module] = sources[module] + "\n" + planted + "\n"
    assert any(expected in p for p in violations(sources)), violations(sources)


def test_a_planted_cycle_is_caught():
    sources = package_sources()
    sources["pmp.atomic"] += "\nfrom pmp.mask import PrivateMask\n"  # mask imports atomic
    found = violations(sources)
    assert any(p.startswith("import cycle among:") and "pmp.atomic" in p and "pmp.mask" in p for p in found), found
