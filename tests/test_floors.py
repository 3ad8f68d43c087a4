"""The tree's floors, read from the imports of every product file (ast, no import runs).

Rule (design.md, style.md 13): kernels < runtime < scheduler core < pipeline processes <
front ends. A file imports only from its own floor or below, and no files import each
other in a circle. Imports inside functions count for both rules (they still run); imports
under ``if TYPE_CHECKING:`` count for floors (a file must not know a higher floor's types)
but not for circles (they never run: annotations only). bench/ sits beside the front ends.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("kernels", "runtime", "scheduler", "workers", "tools", "bench")

KERNELS, RUNTIME, CORE, PROCESSES, FRONT = range(5)
NAMES = ["kernels", "runtime", "scheduler core", "pipeline processes", "front ends"]

# The floor of each file, by its path from the repository root. Folders give the floor of
# their files; the scheduler folder holds three floors, so its files are named.
FOLDERS = {"kernels": KERNELS, "runtime": RUNTIME, "workers": PROCESSES, "tools": FRONT,
           "bench": FRONT, "scheduler/serve": FRONT}
SCHEDULER = {
    # the pure request state machine, batching, the layer planner and the in-process
    # engine and client built on them
    "core": CORE, "batches": CORE, "planner": CORE, "engine": CORE, "client": CORE,
    # the pipeline's processes: the scheduler process, launch, sockets, its configuration
    "process": PROCESSES, "server": PROCESSES, "launch": PROCESSES, "transport": PROCESSES,
    "rundir": PROCESSES, "logs": PROCESSES, "config": PROCESSES, "zmq_client": PROCESSES,
    # which engine a command joins or starts: a running launch (its socket) or a new one
    "discover": PROCESSES,
    # front ends
    "chat": FRONT,
}


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def floor_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] == "scheduler" and len(parts) == 2:
        if parts[1] not in SCHEDULER:
            raise AssertionError(f"scheduler/{parts[1]}.py has no floor: add it to SCHEDULER "
                                 "in tests/test_floors.py")
        return SCHEDULER[parts[1]]
    for prefix in ("scheduler/serve", parts[0]):
        if "/".join(parts[: prefix.count("/") + 1]) == prefix:
            return FOLDERS[prefix]
    raise AssertionError(f"{module} has no floor")


def product_files() -> dict[str, Path]:
    files = {}
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            files[module_of(path)] = path
    return files


def imports(path: Path, module: str, known: set[str], *, type_only: bool = True) -> set[str]:
    """The product modules ``path`` imports (relative, or absolute through ``dejavu.``);
    ``type_only=False`` leaves out those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.split(".")[:-1]
    skip: set[int] = set()
    if not type_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("dejavu."):
                target = node.module.split(".")[1:]
            else:
                continue
            name = ".".join(target)
            # ``from . import wire`` names a module; ``from .model import X`` a module's member.
            for alias in node.names:
                candidate = f"{name}.{alias.name}" if name else alias.name
                if candidate in known:
                    out.add(candidate)
                elif name in known:
                    out.add(name)
                elif f"{name}.__init__" in known:
                    out.add(f"{name}.__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dejavu."):
                    name = alias.name.removeprefix("dejavu.")
                    if name in known:
                        out.add(name)
    out.discard(module)
    return out


def graph(type_only: bool = True) -> dict[str, set[str]]:
    files = product_files()
    known = set(files)
    return {m: imports(p, m, known, type_only=type_only) for m, p in files.items()}


def test_no_file_imports_from_a_floor_above_its_own():
    bad = []
    for module, targets in graph().items():
        for target in sorted(targets):
            if floor_of(target) > floor_of(module):
                bad.append(f"{module} ({NAMES[floor_of(module)]}) imports {target} "
                           f"({NAMES[floor_of(target)]})")
    assert not bad, "imports from a higher floor:\n" + "\n".join(bad)


def test_the_cli_folder_is_imported_by_no_other_product_folder():
    # tools/ holds the CLI and its commands, the top of the tree: the scheduler's front ends
    # (chat, serve) stand on the scheduler and runtime, never on a CLI command's module.
    bad = sorted(f"{module} imports {target}" for module, targets in graph().items()
                 for target in targets
                 if target.startswith("tools.") and module.split(".")[0] not in ("tools",
                                                                                  "bench"))
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    edges = graph(type_only=False)
    # Tarjan's strongly connected components: a component of more than one file is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_graph_is_read():
    # The reader itself: known edges are found (a parser that found nothing would pass).
    edges = graph()
    assert "runtime.model" in edges["runtime.stage"]
    assert "runtime.wire" in edges["workers.worker"]
    assert "scheduler.serve.app" in edges["scheduler.serve.server"]
    assert floor_of("kernels.sparse_mlp") < floor_of("runtime.model") < floor_of(
        "scheduler.core") < floor_of("workers.worker") < floor_of("tools.cli")
