"""The import graph of stepflow_ext: no circle, every layer imports only the layers below it, and
nothing imports the command line (README, "Where things live").

The graph is read from the source with ast: every `import` and `from ... import` of a project module,
at module level or inside a function (a lazy import is a dependency too, only a later one), with
relative imports resolved. A package's __init__ depends on what it imports; a submodule does not
depend on its package's __init__ (Python runs it first, but that is containment, not a dependency).
Then every module is imported alone, in a process that has imported no other module of the project.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "stepflow_ext"
EXTENSIONS = ("stepflow_ext._C",)  # compiled from csrc/; imports nothing of the package

# Lowest first. A module may import modules of its own layer (no circle: checked separately) or below.
LAYERS = [  # the lines of README, "Where things live"
    ("stepflow_ext._C", "stepflow_ext.ops", "stepflow_ext.reference", "stepflow_ext.hf", "stepflow_ext.diagnostics",
     "stepflow_ext.traces", "stepflow_ext.console", "stepflow_ext.tiny", "stepflow_ext.tiny.*"),
    ("stepflow_ext.segment", "stepflow_ext.segment_result", "stepflow_ext.segment_text", "stepflow_ext.segment_rule",
     "stepflow_ext.segment_tracker", "stepflow_ext.config", "stepflow_ext.controls"),
    ("stepflow_ext.saliency", "stepflow_ext.intervention", "stepflow_ext.intervention_state", "stepflow_ext"),
    ("stepflow_ext.report", "stepflow_ext.plot", "stepflow_ext.plot_core"),
    ("stepflow_ext.vllm", "stepflow_ext.vllm.*"),
    ("stepflow_ext.eval", "stepflow_ext.eval.*"),
    ("stepflow_ext.demo",),
    ("stepflow_ext.cli", "stepflow_ext.cli.*"),
]
# Imports that go up a layer, each with its reason. Add none without one.
UPWARD = {
    # StepSaliencyResult.plot(path): a convenience that draws one result with plot.plot_result (a lazy
    # import; saliency.py does not otherwise need matplotlib).
    ("stepflow_ext.saliency", "stepflow_ext.plot"),
}


def _modules() -> dict[str, Path | None]:
    found: dict[str, Path | None] = {name: None for name in EXTENSIONS}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules that the module `name` (source `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:  # from . import ops: the submodule
                    found.add(f"{source}.{alias.name}")
                elif source in MODULES:  # from .ops import oeb_attention: the module
                    found.add(source)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: (_imports(name, path) if path else set()) for name, path in MODULES.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(name: str) -> int:
    for rank, patterns in enumerate(LAYERS):
        if any(fnmatch(name, p) for p in patterns):
            return rank
    raise AssertionError(f"{name} is in no layer of tests/test_imports.py (LAYERS): place it there")


def test_the_graph_sees_the_imports():
    """A sanity check of the reader: known edges of each kind are found."""
    graph = import_graph()
    assert "stepflow_ext._C" in graph["stepflow_ext.ops"]                 # from . import _C
    assert "stepflow_ext.segment" in graph["stepflow_ext"]                # from .segment import ...
    assert "stepflow_ext.hf" in graph["stepflow_ext.config"]              # lazy, inside a method
    assert "stepflow_ext" in graph["stepflow_ext.cli.generate"]           # import stepflow_ext as sf
    assert "stepflow_ext.eval.boxed" in graph["stepflow_ext.eval.grade"]  # from .boxed import ...
    assert "stepflow_ext.eval.run" in graph["stepflow_ext.cli.eval"]      # from ..eval.run import ...
    assert "stepflow_ext.console" in graph["stepflow_ext.cli.compare"]    # from ..console import span


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    graph = import_graph()
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if layer_of(b) > layer_of(a) and (a, b) not in UPWARD)
    assert not upward, "imports that go up a layer (README, 'Where things live'): " + ", ".join(
        f"{a} -> {b}" for a, b in upward)
    stale = sorted(edge for edge in UPWARD if edge[1] not in graph.get(edge[0], ()))
    assert not stale, f"UPWARD lists imports that are gone: {stale}"


def test_nothing_imports_the_command_line():
    graph = import_graph()
    inside = {n for n in graph if n == "stepflow_ext.cli" or n.startswith("stepflow_ext.cli.")}
    users = sorted(f"{a} -> {b}" for a in graph if a not in inside for b in graph[a] if b in inside)
    assert not users, f"only the command line may import stepflow_ext.cli: {users}"


def test_the_command_modules_share_through_common_only():
    """cli.common imports no other module of the CLI; the family modules (common_analysis,
    common_eval) import only cli.common; no command imports app, the parser assembly."""
    graph = import_graph()
    cli = {n: {t for t in targets if t.startswith("stepflow_ext.cli.")}
           for n, targets in graph.items() if n.startswith("stepflow_ext.cli.")}
    assert cli["stepflow_ext.cli.common"] == set()
    for family in ("stepflow_ext.cli.common_analysis", "stepflow_ext.cli.common_eval"):
        assert cli[family] <= {"stepflow_ext.cli.common"}, (family, cli[family])
    for name, targets in cli.items():
        if name not in ("stepflow_ext.cli.__main__",):
            assert "stepflow_ext.cli.app" not in targets, name


def test_each_command_has_its_module():
    import argparse
    import importlib

    from stepflow_ext.cli import app

    sub = next(a for a in app.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["generate", "analyze", "compare", "make-tiny-model", "eval", "compare-runs", "sweep",
                                 "demo"]
    for command, module in zip(sub.choices, app.COMMANDS):
        assert module.__name__.startswith("stepflow_ext.cli."), module
        func = sub.choices[command].get_default("func")
        assert func.__module__ == module.__name__, (command, func.__module__)
        assert importlib.import_module(module.__name__) is module


def _imports_vllm(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name == "vllm" or a.name.startswith("vllm.") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "vllm":
            return True
    return False


def test_only_the_plugin_imports_vllm():
    """vLLM is optional: only stepflow_ext.vllm's modules import it (docs/vllm.md)."""
    users = sorted(n for n, path in MODULES.items() if path is not None and _imports_vllm(path))
    assert users and all(n.startswith("stepflow_ext.vllm.") for n in users), users


# Modules that import vLLM at module level: imported alone only where vLLM is installed.
NEEDS_VLLM = {"stepflow_ext.vllm.backend"}


# Imported once before the forks: third-party packages only, so each child still imports every project
# module it needs itself, in the order that module's own imports ask for.
PRELOAD = ("torch", "numpy", "transformers", "transformers.masking_utils", "transformers.modeling_utils")
ALONE = """
import os, sys, traceback
for name in {preload!r}:
    __import__(name)
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:  # a fresh child: no module of the project imported yet
        try:
            __import__(name)
        except BaseException:
            print(f"import {{name}} failed:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print(" ".join(failed))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="imports each module in a forked child")
def test_each_module_imports_alone():
    """Every module imported first, in a process that has imported no other module of the project
    (a fork of one that preloaded torch and transformers, to keep this fast)."""
    import importlib.util

    skip = NEEDS_VLLM if importlib.util.find_spec("vllm") is None else set()
    names = sorted(n for n in MODULES if n not in EXTENSIONS and not n.endswith("__main__") and n not in skip)
    run = subprocess.run([sys.executable, "-c", ALONE.format(preload=PRELOAD), *names], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.split() == [], run.stderr[-4000:]


def test_python_dash_m_runs_the_command_line():
    run = subprocess.run([sys.executable, "-m", "stepflow_ext.cli", "compare", "--help"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: stepflow compare"), run.stdout[:200]
    assert "Warning" not in run.stderr, run.stderr
