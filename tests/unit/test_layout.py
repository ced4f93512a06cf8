"""The package's layout is its architecture (docs/architecture.md): checked, not only described.

- no import cycles between modules of moe_cluster, imports inside functions included;
- each package imports only the packages below it:
      core  <-  checkpoint  <-  hf  <-  engine  ->  protocol (numpy only)  <-  client      (all: dtypes)
        ^            ^           ^        ^           ^
        └────────────┴───────────┴────────┴───────────┴─ serving (the only Ray code, with tools/ and the CLI)
- cli_checks (the command line's checks of paths and ports, no moe_cluster import) serves both CLI
  modules: cli.py and train/cli.py (the train and perplexity commands);
- Ray only in serving/, tools/, the CLI and train/{distributed,cluster}.py (Ray Train, scoring on
  the cluster); no torch in protocol/ or the client;
- modules of at most 400 lines, functions of at most 60.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "moe_cluster"

# area -> the areas it may import (an area is the first part below moe_cluster: core, serving, cli, ...)
ALLOWED = {
    "dtypes": set(),
    "core": {"dtypes"},
    "checkpoint": {"core", "dtypes"},
    "hf": {"core", "checkpoint", "protocol", "dtypes"},
    "engine": {"hf", "protocol", "dtypes"},
    "protocol": {"dtypes"},
    "client": {"protocol", "dtypes"},
    "serving": {"core", "checkpoint", "hf", "engine", "protocol", "dtypes", "__init__"},
    "tools": {"core", "checkpoint", "hf", "engine", "protocol", "serving", "client", "dtypes", "__init__"},
    "train": {"core", "checkpoint", "hf", "engine", "serving", "dtypes", "cli_checks"},
    "cli_checks": set(),
    "cli": {"core", "checkpoint", "hf", "engine", "protocol", "serving", "tools", "client", "train", "dtypes", "__init__",
            "cli_checks"},
    "__init__": {"core"},
}
RAY_ALLOWED = {"serving", "tools", "cli", "train"}
RAY_MODULES_OF_TRAIN = {"moe_cluster.train.distributed", "moe_cluster.train.cluster"}  # Ray Train; scoring on Serve
TORCH_FORBIDDEN = {"protocol", "client", "dtypes", "cli_checks"}  # cli_checks: before any slow import
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """(modules of moe_cluster, top-level third-party packages) that `module` imports anywhere in its code."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    ours, theirs = set(), set()
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue  # `if TYPE_CHECKING:` imports never run: annotations only
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import submodule` imports the submodule
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "moe_cluster":
                ours.add(name)
            elif name != "__future__":
                theirs.add(name.split(".")[0])
    return ours, theirs


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


GRAPH = {m: imports_of(m) for m in MODULES}


def find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module][0]):
            if target not in GRAPH:
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in GRAPH:
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_import_names_a_module_that_exists():
    unknown = {(m, t) for m, (ours, _) in GRAPH.items() for t in ours if t not in MODULES}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_packages_import_only_the_packages_below_them(module):
    mine = area(module)
    wrong = sorted(t for t in GRAPH[module][0] if area(t) != mine and area(t) not in ALLOWED[mine])
    assert not wrong, f"{module} ({mine}/) may import only {sorted(ALLOWED[mine])}, but imports {wrong}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_ray_only_in_serving_and_torch_not_on_the_wire(module):
    theirs = GRAPH[module][1]
    if area(module) not in RAY_ALLOWED or (area(module) == "train" and module not in RAY_MODULES_OF_TRAIN):
        assert not theirs & {"ray", "starlette"}, (f"{module} imports Ray: only serving/, tools/, the CLI and "
                                                   f"{sorted(RAY_MODULES_OF_TRAIN)} may")
    if area(module) in TORCH_FORBIDDEN:
        assert "torch" not in theirs, f"{module} imports torch: the wire formats and the client are numpy only"


def test_module_and_function_sizes():
    too_long = []
    for module, path in MODULES.items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{module}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {lines} lines")
    assert not too_long, f"over {MAX_MODULE_LINES} lines per module / {MAX_FUNCTION_LINES} per function: {too_long}"


def test_at_most_a_handful_of_plain_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert set(top) <= {"__init__.py", "cli.py", "cli_checks.py", "client.py", "dtypes.py"}, top
