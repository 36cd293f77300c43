"""Import layering of tadistill: no import cycles, and no import from a lower layer up to a higher one.

The imports of every module under src/tadistill are read with ``ast`` (nothing is imported), including
the imports inside functions. Two rules:

- no cycle among the imports that run when a module is imported (module level, not under
  ``if TYPE_CHECKING``), counting the package ``__init__`` files Python runs on the way;
- every import, lazy ones included (a lazy import is still a dependency, only a later one), goes to a
  module of the importer's own layer or of a layer below it (``LAYERS``).

An upward import that cannot be fixed at once goes into ``ALLOWED`` with a comment; the test fails
when an import outside it runs upward, and when an entry there is no longer needed (delete it then).
Fix an upward import by moving what both layers need below both (as ``measure/`` holds what training
and evaluation both measure), or by passing it in from above.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "tadistill"

# The layers, lowest first: a module may import from its own layer and from the layers below it.
# A module belongs to the entry naming it or the nearest package above it ("tadistill.teachers.tokenizer"
# before "tadistill.teachers"). The package root belongs to the top layer: its exports are imported
# lazily through importlib (PEP 562), which no import statement shows.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # What everything uses and what uses nothing else: user errors with one-line messages, atomic
    # writes, the rules that keep a user's --out folder safe.
    ("foundation", ("tadistill.errors", "tadistill.fileio", "tadistill.outdir")),
    # Mechanisms on tensors and modules: hooks on model internals, pure objectives, prunable units (masks,
    # materialisation). They know no config, no data and no loading, so that each is testable on hand-made tensors.
    ("mechanisms", ("tadistill.capture", "tadistill.objectives", "tadistill.structure")),
    # Typed configuration; it checks layer-mapping names with objectives.layer_maps.
    ("configuration", ("tadistill.config",)),
    # Text in, token tensors out (reads its DataConfig); the BPE tokenizer trainer is a data tool.
    ("data", ("tadistill.data", "tadistill.teachers.tokenizer")),
    # Models: loading teachers and tokenizers, building and initialising students; what determines the built-in
    # GPT-2 teacher and where its trained copy is cached (loading looks 'builtin-gpt2' up there); the same for the
    # built-in teacher's fitted masked-LM head ('builtin-mlm').
    ("models", ("tadistill.loading", "tadistill.students", "tadistill.teachers.spec",
                "tadistill.teachers.mlm_spec")),
    # What a run summary and the evaluation both measure: sentence embeddings, perplexity, parameters.
    ("measurements", ("tadistill.measure",)),
    # Training: the loop, its set-up, terms and method hooks, and the one table that names objectives,
    # methods and recipes (it points at the terms and hooks, so it sits with them); resolve reads that
    # table to turn a recipe and overrides into a config.
    ("training", ("tadistill.training", "tadistill.methods", "tadistill.registry", "tadistill.resolve")),
    # Scoring trained students: fidelity, downstream tasks, latency, cost. Never imported by training.
    ("evaluation", ("tadistill.evaluation",)),
    # Tables and figures of evaluated results.
    ("reports", ("tadistill.reports",)),
    # Studies: grids of cells trained, evaluated and reported together.
    ("study", ("tadistill.study",)),
    # Whole runs: distill and cache-teacher (api), and the built-in teacher, whose training is a run too; prompt
    # compression (LLMLingua-2: annotate with a teacher LLM, train an encoder, compress), a pipeline of its own.
    # search: the sub-network of an AutoDistil SuperLM under a budget, extracted (and distilled: it runs api).
    # publish: a finished run's student pushed to the hub.
    ("entry points", ("tadistill.api", "tadistill.teachers", "tadistill.lingua", "tadistill.search",
                      "tadistill.publish")),
    # The command line, ``python -m tadistill`` and the package root.
    ("interface", ("tadistill.cli", "tadistill.__main__", PACKAGE)),
]

# Upward imports still present, (importer, imported): each one is to be fixed, then deleted from here.
# Nothing may be added without a comment that says why it cannot be fixed now.
ALLOWED: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------------------ the checker


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name; a package is named by its __init__'s package
    imported: str  # the module the import statement names (the nearest existing one)
    line: int
    lazy: bool  # inside a function, or under `if TYPE_CHECKING`: does not run on import

    def where(self, src: Path) -> str:
        return f"{module_files(src, self.importer.split('.')[0])[self.importer].relative_to(src)}:{self.line}"


def module_files(src: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every .py file of ``package`` under ``src``."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def read_imports(src: Path, package: str) -> list[Import]:
    """Every import of a module of ``package`` by a module of ``package``, with its line and laziness."""
    files = module_files(src, package)

    def nearest(name: str) -> str | None:  # "pkg.mod.Class" -> "pkg.mod"
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    found: list[Import] = []
    for module, path in files.items():
        is_package = path.name == "__init__.py"

        def visit_children(node: ast.AST, lazy: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    for stmt in child.body:  # does not run
                        visit(stmt, True)
                    for stmt in child.orelse:  # runs
                        visit(stmt, lazy)
                else:
                    visit(child, lazy)

        def visit(node: ast.AST, lazy: bool) -> None:
            lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package, one level up per extra dot
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import mod` names the submodule mod; `from mod import name` names mod.
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for name in names:
                target = nearest(name) if name.split(".")[0] == package else None
                if target is not None and target != module:
                    found.append(Import(module, target, node.lineno, lazy))
            visit_children(node, lazy)

        visit_children(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
    return found


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """The module-level import cycles (strongly connected components of more than one module).

    Importing ``a.b.c`` first runs the ``__init__`` of ``a`` and ``a.b``: an edge goes to each of those
    packages too, unless the importer is inside it (its ``__init__`` has then already started).
    """
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.lazy:
            continue
        parts = imp.imported.split(".")
        for n in range(1, len(parts) + 1):
            target = ".".join(parts[:n])
            inside = imp.importer == target or imp.importer.startswith(target + ".")
            if not inside:
                graph[imp.importer].add(target)
    # Tarjan's strongly connected components, iteratively (no recursion limit).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def layer_index(module: str, layers: list[tuple[str, tuple[str, ...]]], package: str) -> int | None:
    """The position in ``layers`` of the longest entry naming ``module`` or a package above it."""
    best, best_length = None, -1
    for position, (_, entries) in enumerate(layers):
        for entry in entries:
            # The package root names itself only, not every module below it.
            covers = module == entry or (entry != package and module.startswith(entry + "."))
            if covers and len(entry) > best_length:
                best, best_length = position, len(entry)
    return best


def upward_imports(
    imports: list[Import], layers: list[tuple[str, tuple[str, ...]]], package: str
) -> dict[tuple[str, str], list[Import]]:
    """{(importer, imported): its import statements} for every import into a higher layer.

    Modules in no layer are left out (``test_every_module_has_a_layer...`` names them).
    """
    found: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in imports:
        low, high = layer_index(imp.importer, layers, package), layer_index(imp.imported, layers, package)
        if low is not None and high is not None and high > low:
            found[(imp.importer, imp.imported)].append(imp)
    return dict(found)


# ------------------------------------------------------------------------------------------ tadistill


def test_every_module_has_a_layer_and_every_entry_a_module() -> None:
    files = module_files(SRC, PACKAGE)
    unplaced = sorted(m for m in files if layer_index(m, LAYERS, PACKAGE) is None)
    assert not unplaced, f"modules in no layer (add their package to LAYERS in {__file__}): {unplaced}"
    entries = [e for _, group in LAYERS for e in group]
    assert len(entries) == len(set(entries)), "an entry appears in two layers"
    stale = [e for e in entries if e not in files]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_no_import_cycles() -> None:
    cycles = import_cycles(read_imports(SRC, PACKAGE))
    assert not cycles, f"module-level import cycles (make one of the imports lazy or move code down): {cycles}"


def test_no_import_runs_up_a_layer() -> None:
    found = upward_imports(read_imports(SRC, PACKAGE), LAYERS, PACKAGE)
    new = [
        f"{imp.where(SRC)}: {imp.importer} ({LAYERS[layer_index(imp.importer, LAYERS, PACKAGE)][0]}) imports "
        f"{imp.imported} ({LAYERS[layer_index(imp.imported, LAYERS, PACKAGE)][0]})"
        for key, statements in sorted(found.items()) if key not in ALLOWED for imp in statements
    ]
    assert not new, "imports from a higher layer:\n" + "\n".join(new)
    fixed = sorted(set(ALLOWED) - set(found))
    assert not fixed, f"fixed, so delete these from ALLOWED in {__file__}: {fixed}"


# ------------------------------------------------------------------------------------------ the checker itself


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_checker_reads_every_kind_of_import(tmp_path) -> None:
    src = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from pkg.low.a import f\n",
        "pkg/low/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import H\n"
                        "def f():\n    import pkg.high.b\n",
        "pkg/high/__init__.py": "from . import b\n",
        "pkg/high/b.py": "from ..low import a\nfrom pkg.low.a import f as g\nimport os\n",
    })
    got = {(i.importer, i.imported, i.line, i.lazy) for i in read_imports(src, "pkg")}
    assert got == {
        ("pkg.low", "pkg.low.a", 1, False),
        ("pkg.low.a", "pkg.high", 3, True),  # under TYPE_CHECKING
        ("pkg.low.a", "pkg.high.b", 5, True),  # inside a function
        ("pkg.high", "pkg.high.b", 1, False),  # relative, a submodule
        ("pkg.high.b", "pkg.low.a", 1, False),  # relative, two dots
        ("pkg.high.b", "pkg.low.a", 2, False),  # absolute, a name from a module
    }
    layers = [("low", ("pkg.low",)), ("high", ("pkg.high", "pkg"))]
    assert set(upward_imports(read_imports(src, "pkg"), layers, "pkg")) == {
        ("pkg.low.a", "pkg.high"), ("pkg.low.a", "pkg.high.b"),
    }
    assert import_cycles(read_imports(src, "pkg")) == []  # the upward imports are lazy: no cycle


def test_checker_finds_cycles_through_package_inits(tmp_path) -> None:
    src = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/x/__init__.py": "from pkg.x.m import M\n",
        "pkg/x/m.py": "M = 1\n",
        "pkg/y.py": "from pkg.x.m import M\n",
        "pkg/x/n.py": "import pkg.y\n",  # imports pkg.y, which imports pkg.x.m: fine, no cycle
    })
    assert import_cycles(read_imports(src, "pkg")) == []
    # pkg.x's __init__ now imports pkg.y, which needs pkg.x (its __init__ runs before pkg.x.m): a cycle.
    (src / "pkg/x/__init__.py").write_text("from pkg.x.m import M\nimport pkg.y\n", encoding="utf-8")
    assert import_cycles(read_imports(src, "pkg")) == [["pkg.x", "pkg.y"]]
    # The package root names itself, not every module below it.
    root_only = [("top", ("pkg",))]
    assert layer_index("pkg", root_only, "pkg") == 0 and layer_index("pkg.y", root_only, "pkg") is None
