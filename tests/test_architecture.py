"""Imports only go down the layers (docs/ARCHITECTURE.md), and no import circles.

Every module under gptfast/ (and the Triton kernels, installed as gptfast.kernels) is parsed with
`ast`; every `import` / `from ... import` of a gptfast module counts, the lazy ones inside
functions included (a lazy upward import is still a dependency, just a hidden one). A module may
import its own layer or any lower one, never a higher one; within a layer the imports must not form
a cycle. Modules listed in LAYERS that do not exist (yet) are simply not checked; a module that
exists but is not listed fails the test, so a new module is placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Bottom to top. A name covers the module and everything below it (gptfast.ops covers
# gptfast.ops.native._loader). The longest listed prefix wins.
LAYERS: list[tuple[str, ...]] = [
    # 0: leaves: error classes, the numerical-test rule, the native build's flags (no gptfast imports)
    ("gptfast.errors", "gptfast.testing", "gptfast._build"),
    # 1: plain data: model configuration, tokenizers
    ("gptfast.config", "gptfast.tokenizers"),
    # 2: ops dispatch and its backends (reference, torch, native CPU/CUDA, Triton kernels)
    ("gptfast.ops", "gptfast.kernels"),
    # 3: the model and the modules it is made of or swapped with
    ("gptfast.model", "gptfast.kv_cache", "gptfast.quantize", "gptfast.fused_decode", "gptfast.sampling"),
    # 4: features that use a model: generation, evaluation, training, data, files, interop
    ("gptfast.generate", "gptfast.generation", "gptfast.perplexity", "gptfast.attention_map",
     "gptfast.data", "gptfast.train", "gptfast.io", "gptfast.gguf", "gptfast.hf_patch"),
    # 5: the public API (gptfast/__init__.py re-exports from the layers below)
    ("gptfast",),
    # 6: tools built on everything: benchmarks, the CLI's thread fitting (uses bench.load)
    ("gptfast.bench", "gptfast.threads"),
    # 7: the command line
    ("gptfast.cli",),
]

# Deliberate upward imports, each lazy (inside a function) and each a convenience on the model that
# delegates to the layer that does the work; nothing else may go up.
ALLOWED_UPWARD = {
    ("gptfast.model", "gptfast.io"): "GPT.from_pretrained / GPT.save_pretrained delegate to gptfast.io",
    ("gptfast.model", "gptfast.generate"): "GPT.generate delegates to gptfast.generate",
    ("gptfast.model", "gptfast.generation"): "GPT.generate delegates to the generation loop",
}

# Where each top-level package's source lives (gptfast.kernels is the repo's kernels/ folder).
SOURCES = {"gptfast": "gptfast", "gptfast.kernels": "kernels"}


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The layer of `module`: its longest listed prefix ("gptfast" itself matches only the package's
    __init__, so an unlisted gptfast.x is in no layer rather than in the API's)."""
    best, best_len = None, -1
    for i, names in enumerate(layers):
        for name in names:
            covers = module == name or ("." in name and module.startswith(name + "."))
            if covers and len(name) > best_len:
                best, best_len = i, len(name)
    return best


def discover(repo: Path, sources=SOURCES) -> dict[str, Path]:
    """{module name: file} for every .py file of the package."""
    out = {}
    for pkg, folder in sources.items():
        root = repo / folder
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` (a dotted import target) is or lies inside."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """[(imported gptfast module, line, lazy)] of one file; `from pkg import name` counts as
    importing pkg.name when that is a module, else pkg."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = alias.name
                    if target == "kernels" or target.startswith("kernels."):
                        target = "gptfast." + target  # the old top-level name: still a dependency
                    found.append((target, child.lineno, lazy))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target == "kernels" or target.startswith("kernels."):
                    target = "gptfast." + target
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in modules else target, child.lineno, lazy))
            visit(child, inner)

    visit(tree, False)
    out = []
    for target, line, lazy in found:
        if not target.startswith("gptfast"):
            continue
        resolved = _resolve(target, modules)
        if resolved is not None and resolved != module:
            out.append((resolved, line, lazy))
    return out


def check(repo: Path, layers=LAYERS, allowed=ALLOWED_UPWARD, sources=SOURCES) -> list[str]:
    """Every violation as one line (empty: the layering holds)."""
    modules = discover(repo, sources)
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        mine = layer_of(module, layers)
        if mine is None:
            problems.append(f"{module} ({path.relative_to(repo)}) is in no layer: add it to LAYERS "
                            "in tests/test_architecture.py and to docs/ARCHITECTURE.md")
            continue
        for target, line, lazy in imports_of(module, path, modules):
            theirs = layer_of(target, layers)
            graph[module].add(target)
            if theirs is None or theirs <= mine:
                continue
            key = next(((a, b) for (a, b) in allowed
                        if (module == a or module.startswith(a + "."))
                        and (target == b or target.startswith(b + "."))), None)
            if key is not None and lazy:
                continue
            how = "lazily " if lazy else ""
            why = " (allowed only inside a function)" if key is not None else ""
            problems.append(f"{path.relative_to(repo)}:{line}: {module} (layer {mine}) {how}imports "
                            f"{target} (layer {theirs}): imports must go down{why}")
    problems += [f"import cycle within layer {layer_of(c[0], layers)}: {' -> '.join(c + [c[0]])}"
                 for c in _cycles(graph, lambda a, b: layer_of(a, layers) == layer_of(b, layers))]
    return problems


def _cycles(graph: dict[str, set[str]], same_layer) -> list[list[str]]:
    """One cycle per strongly connected component (Tarjan) of the same-layer import graph.
    A package's __init__ importing its own submodules is not a cycle unless they import it back."""
    edges = {a: {b for b in bs if b in graph and same_layer(a, b)} for a, bs in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
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
                out.append(_one_cycle(sorted(comp), edges))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _one_cycle(comp: list[str], edges) -> list[str]:
    """A concrete cycle through comp[0] inside the component (for the message)."""
    members, start = set(comp), comp[0]
    prev = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp  # pragma: no cover - a strongly connected component always has a cycle


# ----------------------------------------------------------------------------- the real package


def test_imports_only_go_down():
    problems = check(REPO)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("low, high", [
    ("gptfast.ops", "gptfast.model"), ("gptfast.ops", "gptfast.generate"), ("gptfast.ops", "gptfast.cli"),
    ("gptfast.kernels", "gptfast.model"), ("gptfast.model", "gptfast.cli"), ("gptfast.train", "gptfast.cli"),
    ("gptfast.attention_map", "gptfast.cli"), ("gptfast.bench", "gptfast.cli"), ("gptfast.errors", "gptfast.config"),
    ("gptfast.io", "gptfast.cli"), ("gptfast.model", "gptfast.io"),
])
def test_the_table_says_what_the_issue_asks(low, high):
    """The rules of issue #17 are in the table itself: ops/kernels below the model, the model and
    every feature below the CLI, errors a leaf."""
    assert layer_of(low) < layer_of(high)


def test_every_listed_top_module_exists_or_is_announced():
    """A name in LAYERS that matches no module is fine only for modules announced by issue #17 and
    not written yet; anything else is a typo that would silently check nothing."""
    modules = discover(REPO)
    announced = {"gptfast.generate", "gptfast.kv_cache", "gptfast.quantize", "gptfast.fused_decode",
                 "gptfast.sampling", "gptfast.generation"}
    missing = [n for names in LAYERS for n in names
               if n not in announced and not any(m == n or m.startswith(n + ".") for m in modules)]
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


# ----------------------------------------------------------------------------- the checker can fail


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / "gptfast" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (tmp_path / "kernels").mkdir(exist_ok=True)
    return tmp_path


def test_checker_reports_an_upward_import(tmp_path):
    repo = _tree(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "model.py": "from gptfast.errors import X\n",
        "ops/__init__.py": "",
        "ops/reference.py": "def f():\n    from gptfast.model import GPT\n",  # lazy: still upward
        "train.py": "from gptfast.cli import main\n",
        "cli/__init__.py": "from gptfast import train\n",
    })
    problems = check(repo)
    assert any("ops/reference.py:2: gptfast.ops.reference (layer 2) lazily imports gptfast.model (layer 3)" in p
               for p in problems), problems
    assert any("gptfast.train (layer 4) imports gptfast.cli (layer 7)" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_checker_allows_only_the_listed_lazy_conveniences(tmp_path):
    repo = _tree(tmp_path, {
        "__init__.py": "",
        "model.py": "def from_pretrained():\n    from gptfast.io import load\n",
        "io/__init__.py": "from gptfast.model import GPT\n",
    })
    assert check(repo) == []
    (tmp_path / "gptfast" / "model.py").write_text("from gptfast.io import load\n")  # not lazy
    problems = check(repo)
    assert len(problems) == 1 and "allowed only inside a function" in problems[0], problems


def test_checker_reports_a_cycle_and_an_unplaced_module(tmp_path):
    repo = _tree(tmp_path, {
        "__init__.py": "",
        "data.py": "from . import train\n",  # relative imports count too
        "train.py": "def f():\n    import gptfast.data\n",
        "newthing.py": "",
    })
    problems = check(repo)
    assert any(p.startswith("import cycle within layer 4: gptfast.data -> gptfast.train -> gptfast.data")
               for p in problems), problems
    assert any("gptfast.newthing" in p and "is in no layer" in p for p in problems), problems
