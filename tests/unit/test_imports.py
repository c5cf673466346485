"""The package import graph, read from the source: no cycle between packages, lower layers import nothing above.

Every ``import kscale.x`` / ``from kscale.x import y`` counts: at the top of a module, inside a function
(lazy imports are still dependencies) and under ``if TYPE_CHECKING:`` (a type named there is knowledge of
the package that defines it). A package is ``kscale.<name>`` (a folder such as ``kscale.spec``, or a
top-level module such as ``kscale.scoring``). The layers, top down:

    cli -> runner -> stages (analysis, attention, bias, eval, train, extract, scoring) and executors, targets
        -> adapters (MaLoRA and PEFT LoRA on a loaded model: the library every stage may apply adapters with)
        -> spec (every section of a job: JobSpec, the stage sections, the cluster section)
        -> {models, data, store}

``spec`` imports no stage (the stages import their sections from it) and nothing but the lower layers
and ``errors``; models, data and store never import the spec: ``models`` types the ``model:`` section with
its own Protocol (``kscale.models.registry.ModelOptions``). ``adapters`` sits between: any stage may import
it, it imports no stage (only the spec and the lower layers), and neither the spec nor a lower layer
imports it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import kscale

ROOT = Path(kscale.__file__).parent
LOWER = ("models", "data", "store")
STAGES = ("analysis", "attention", "bias", "eval", "train", "extract", "scoring", "executors", "targets", "cli",
          "cli_cluster", "doctor", "runner")
UPPER = ("spec", "spec_schema", "adapters", *STAGES)
SPEC_MAY_IMPORT = ("errors", *LOWER)
ADAPTERS_MAY_IMPORT = ("errors", "spec", *LOWER)

Edges = dict[str, dict[str, list[str]]]  # package -> imported package -> ["file:line", ...]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    p = ROOT.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The kscale modules one import statement names (``from kscale import x``: x where x is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("kscale.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        pkg = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(pkg + ([base] if base else []))
    if base != "kscale" and not base.startswith("kscale."):
        return []
    out = [base] if base != "kscale" else []
    out += [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
    return out


def package_of(module: str) -> str | None:
    """``kscale.store.reader`` -> ``store``; ``kscale.scoring`` -> ``scoring``; ``kscale`` -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def import_graph(root: Path = ROOT) -> Edges:
    edges: Edges = defaultdict(lambda: defaultdict(list))
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path)
        src = package_of(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, module, path.name == "__init__.py"):
                dst = package_of(target)
                if src and dst and dst != src:
                    edges[src][dst].append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return edges


def find_cycle(edges: Edges) -> list[str] | None:
    """One cycle of packages (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, {})):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def _describe(edges: Edges, cycle: list[str]) -> str:
    return "; ".join(f"{a} -> {b} ({', '.join(edges[a][b][:3])})" for a, b in zip(cycle, cycle[1:]))


def test_the_graph_sees_top_level_function_level_and_type_checking_imports() -> None:
    """The reader of the graph itself: known edges of every kind are found (else the checks below prove nothing)."""
    edges = import_graph()
    assert "models" in edges["store"]  # store/queries.py, at the top of the module
    assert "attention" in edges["extract"]  # extract/worker.py, inside run_shard
    assert "spec" in edges["attention"]  # attention/stats.py, only under `if TYPE_CHECKING:`
    assert "scoring" in edges["bias"] and "scoring" in edges["train"]


def test_no_cycle_between_packages() -> None:
    edges = import_graph()
    cycle = find_cycle(edges)
    assert cycle is None, f"package import cycle {' -> '.join(cycle)}: {_describe(edges, cycle)}"


def test_lower_layers_import_nothing_above_them() -> None:
    edges = import_graph()
    bad = [f"{low} -> {up} ({', '.join(edges[low][up])})" for low in LOWER for up in UPPER if up in edges.get(low, {})]
    assert not bad, "models, data and store must not import the spec, stages, executors or the CLI: " + "; ".join(bad)


def test_the_spec_imports_no_stage() -> None:
    """Stages import their sections from ``kscale.spec``; the spec itself stands on the lower layers only."""
    edges = import_graph()
    bad = [f"spec -> {dst} ({', '.join(sites)})" for dst, sites in edges.get("spec", {}).items()
           if dst not in SPEC_MAY_IMPORT]
    assert not bad, "kscale.spec may import only " + ", ".join(SPEC_MAY_IMPORT) + ": " + "; ".join(bad)


def test_the_adapter_library_imports_no_stage() -> None:
    """Every stage applies adapters through ``kscale.adapters`` (extract, bias, eval, train); the library itself
    stands on the spec and the lower layers only, so no stage's import pulls in another stage."""
    edges = import_graph()
    assert "adapters" in edges["extract"] and "adapters" in edges["bias"] and "adapters" in edges["eval"]
    bad = [f"adapters -> {dst} ({', '.join(sites)})" for dst, sites in edges.get("adapters", {}).items()
           if dst not in ADAPTERS_MAY_IMPORT]
    assert not bad, "kscale.adapters may import only " + ", ".join(ADAPTERS_MAY_IMPORT) + ": " + "; ".join(bad)


def test_the_old_malora_names_are_the_library_itself() -> None:
    """``kscale.train.malora`` (and its layer/model/export) are the modules of ``kscale.adapters``, not copies:
    old imports and saved runs get the same classes."""
    import kscale.adapters
    import kscale.adapters.model
    import kscale.train.malora
    import kscale.train.malora.model

    assert kscale.train.malora.model is kscale.adapters.model
    assert kscale.train.malora.MaLoRAModel is kscale.adapters.MaLoRAModel
    defined = [p.name for p in (ROOT / "train" / "malora").glob("*.py")
               if any(isinstance(n, (ast.ClassDef, ast.FunctionDef)) for n in ast.parse(p.read_text()).body)]
    assert not defined, f"kscale/train/malora defines code of its own again: {defined}"


def test_find_cycle_reports_a_cycle_and_none_without() -> None:
    edges: Edges = {"a": {"b": ["a.py:1"]}, "b": {"c": ["b.py:2"]}, "c": {"a": ["c.py:3"]}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ["a.py:1"]}, "b": {}}) is None
