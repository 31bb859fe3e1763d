"""The code's structure, checked so that it cannot quietly regress: packages import each other normally (no path
manipulation outside the task plugin mechanism), without load-time cycles, with the serving/training package
(fastchat) below the agent package (eval_agent), without private names crossing module lines, and every module
imports cleanly in a fresh interpreter."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# our packages: name -> folder
PACKAGES = {"eval_agent": REPO / "eval_agent", "fastchat": REPO / "fastchat", "webshop": REPO / "envs" / "webshop",
            "scripts": REPO / "scripts", "bench": REPO / "bench"}
OURS = set(PACKAGES) | {"tests"}
# the one place that may touch the import path: task configs' own modules beside them (eval_agent/config.py)
PATH_ALLOWED = {REPO / "eval_agent" / "config.py"}
# third-party packages a module may need that the project does not require (GPU-only serving)
OPTIONAL_PACKAGES = {"vllm"}
SKIPPED_DIRS = {"__pycache__", "build", "data", "models", "outputs", "node_modules"}


def repository_files(root: Path = REPO) -> list[Path]:
    """Every .py file of the repository (hidden folders, caches, data and outputs left out)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts[:-1]
        if not any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts):
            found.append(path)
    return found


def package_modules(packages: dict[str, Path] = PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} of every module of the packages."""
    modules = {}
    for name, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_names(node: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) of an import statement; relative imports resolved against `module`."""
    if isinstance(node, ast.Import):
        return [(alias.name, []) for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [(base, [alias.name for alias in node.names])]


def load_time_imports(tree: ast.Module) -> list[ast.AST]:
    """The import statements that run when the module is imported: at module level and in class bodies, also inside
    if/try blocks. An import inside a function runs only when the function is called, so it cannot form a
    load-time cycle; `if TYPE_CHECKING:` blocks never run."""
    found = []

    def visit(statements):
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, []))

    visit(tree.body)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the modules of ours it imports at load time}."""
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in load_time_imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target, names in imported_names(node, name, path.name == "__init__.py"):
                if target in modules:
                    edges.add(target)
                # `from package import module` imports that module
                edges.update(f"{target}.{n}" for n in names if f"{target}.{n}" in modules)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


# the import path named in any form, code or comment: the sys module's attribute, or its name imported from sys
PATH_USE = re.compile(r"\bsys\.path\b|\bfrom\s+sys\s+import\b[^\n]*\bpath\b")


def path_uses(files: list[Path]) -> list[str]:
    """Where a file names the import path (this file spells its pattern with an escaped dot, so it names none)."""
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if PATH_USE.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}")
    return found


def agent_references(files: list[Path]) -> list[str]:
    """fastchat code that imports eval_agent (anywhere, functions included) or names it in a string (a module to
    import, a folder to read); docstrings may mention it."""
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and (body := node.body) and isinstance(body[0], ast.Expr)
                      and isinstance(body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = any(m.split(".")[0] == "eval_agent" for m in modules)
            else:
                bad = (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                       and "eval_agent" in node.value)
            if bad:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def private_imports(files: list[Path]) -> list[str]:
    """`from <our module> import _name`: a private name crossing a module line."""
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in OURS):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                if names:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import "
                                 f"{', '.join(names)}")
    return found


# Imports every module given on the command line, in this fresh interpreter; prints what failed and why.
IMPORT_ALL = """
import importlib, json, sys, traceback
failed, skipped = {}, {}
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in json.loads(sys.argv[1]):
            skipped[name] = e.name
        else:
            failed[name] = traceback.format_exc(limit=-3)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps({"failed": failed, "skipped": skipped}))
"""


def import_all(modules: list[str]) -> dict:
    # from the repository root, as `python -m bench.x` runs (bench is not installed)
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, json.dumps(sorted(OPTIONAL_PACKAGES)), *modules],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_only_the_task_plugin_mechanism_touches_the_import_path():
    uses = path_uses(repository_files())
    assert [u for u in uses if REPO / u.split(":")[0] not in PATH_ALLOWED] == []
    assert uses, "eval_agent/config.py appends a task config's folder: the check must see it"


def test_no_load_time_import_cycle_among_our_modules():
    graph = import_graph(package_modules())
    assert "scripts.pipeline.stages" in graph["scripts.eto_pipeline"]  # the graph sees our imports
    assert cycles(graph) == []


def test_fastchat_never_imports_the_agent_package():
    files = [p for p in package_modules({"fastchat": PACKAGES["fastchat"]}).values()]
    assert agent_references(files) == []


def test_no_private_name_crosses_a_module_line():
    assert private_imports(repository_files()) == []


def test_every_module_imports_in_a_fresh_interpreter():
    modules = sorted(package_modules())
    result = import_all(modules)
    assert result["failed"] == {}, "\n".join(f"{m}:\n{tb}" for m, tb in result["failed"].items())
    if result["skipped"]:
        warnings.warn("not imported, an optional package is absent: "
                      + ", ".join(f"{m} (needs {pkg})" for m, pkg in sorted(result["skipped"].items())))
