"""The package's rooms keep their rules (docs/architecture.md): imports only run down the layers, no cycle,
imports at module level except the optional heavy backends, no private name used across modules, every
collective in ``distributed/``, small modules, a README per room, and tests that import only the shared
``tests.testing`` helpers of other test files.

Read from the source with ``ast`` (nothing is imported), so a violation is named by file and line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "folora_ds"

# Rooms from the bottom up: a room may import itself and the rooms before it. The face (folora_ds/__init__.py,
# cli.py, hf.py) may import every room.
LAYERS = ("common", "method", "distributed", "controller", "adapters", "training", "toolkit")
FACE = {"folora_ds", "folora_ds.cli", "folora_ds.hf"}
# Imported inside functions where used: slow to import or optional (docs/architecture.md).
HEAVY_BACKENDS = {"deepspeed", "transformers", "peft", "matplotlib", "datasets", "megatron"}
# Only the distribution layer talks across ranks.
COLLECTIVE_MODULES = ("torch.distributed", "deepspeed.comm")
MAX_MODULE_LINES = 450
MAX_TOP_LEVEL_MODULES = 12


@dataclass(frozen=True)
class Import:
    """One import statement: the importing module, the imported module, the names taken from it, where."""

    importer: str
    module: str
    names: tuple[str, ...]
    line: int
    in_function: bool
    type_checking: bool


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, path: Path) -> list[Import]:
    """Every import of ``path``, with whether it sits inside a function or an ``if TYPE_CHECKING`` block."""
    found: list[Import] = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, (), child.lineno, in_function, type_checking)
                             for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join([*package.split(".")[:len(package.split(".")) - child.level + 1], base]).strip(".")
                found.append(Import(module, base, tuple(alias.name for alias in child.names), child.lineno,
                                    in_function, type_checking))
            else:
                guarded = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                      type_checking or guarded)

    visit(ast.parse(path.read_text(encoding="utf-8")), False, False)
    return found


def _internal_target(imported: Import, modules: dict[str, Path]) -> list[str]:
    """The folora_ds modules an import reaches (``from folora_ds.x import y`` reaches x.y when y is a module)."""
    if not imported.module.startswith("folora_ds"):
        return []
    targets = [f"{imported.module}.{name}" for name in imported.names if f"{imported.module}.{name}" in modules]
    if len(targets) < len(imported.names) or not imported.names:
        targets.append(imported.module)
    return targets


def _room(module: str) -> str | None:
    """The room of a package module (None for the face)."""
    if module in FACE:
        return None
    return module.split(".")[1]


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return _package_modules()


@pytest.fixture(scope="module")
def imports(modules) -> list[Import]:
    return [found for module, path in modules.items() for found in _imports(module, path)]


def test_every_module_belongs_to_a_room_or_the_face(modules):
    strays = [module for module in modules if module not in FACE and _room(module) not in LAYERS]
    assert not strays, f"modules outside the rooms {LAYERS}: {strays}"


def test_imports_only_run_down_the_layers(imports, modules):
    upward = []
    for found in imports:
        room = _room(found.importer)
        if room is None:
            continue
        for target in _internal_target(found, modules):
            target_room = _room(target)
            if target_room is None or LAYERS.index(target_room) > LAYERS.index(room):
                upward.append(f"{modules[found.importer].relative_to(REPO)}:{found.line} ({room}) imports {target}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_the_package_has_no_import_cycle(imports, modules):
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for found in imports:
        graph[found.importer].update(t for t in _internal_target(found, modules) if t != found.importer)
    # a package imports its own submodules to export them; that edge is the package's, not a cycle
    for module in modules:
        graph[module] = {t for t in graph[module] if not t.startswith(f"{module}.")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_imports_sit_at_module_level_except_heavy_backends(imports, modules):
    inside = [f"{modules[f.importer].relative_to(REPO)}:{f.line} imports {f.module}" for f in imports
              if f.in_function and f.module.split(".")[0] not in HEAVY_BACKENDS]
    assert not inside, "imports inside functions (only heavy backends belong there):\n" + "\n".join(inside)


def test_no_import_hides_behind_type_checking(imports, modules):
    hidden = [f"{modules[f.importer].relative_to(REPO)}:{f.line}" for f in imports if f.type_checking]
    assert not hidden, f"imports under TYPE_CHECKING (a hidden cycle?): {hidden}"


def test_only_the_distribution_layer_reaches_collectives(imports, modules):
    outside = [f"{modules[f.importer].relative_to(REPO)}:{f.line} imports {f.module}" for f in imports
               if f.module.startswith(COLLECTIVE_MODULES) and _room(f.importer) != "distributed"]
    method_heavy = [f"{modules[f.importer].relative_to(REPO)}:{f.line} imports {f.module}" for f in imports
                    if _room(f.importer) == "method" and f.module.split(".")[0] == "deepspeed"]
    assert not outside and not method_heavy, outside + method_heavy


def test_no_private_name_is_used_across_modules(imports, modules):
    private = [f"{modules[f.importer].relative_to(REPO)}:{f.line} takes {name} from {f.module}" for f in imports
               if f.module.startswith("folora_ds") for name in f.names if name.startswith("_")]
    for path in modules.values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported_modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                            and (node.module or "").startswith("folora_ds") for alias in node.names
                            if f"{node.module}.{alias.name}" in modules}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in imported_modules):
                private.append(f"{path.relative_to(REPO)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not private, "private names used from another module:\n" + "\n".join(private)


def test_modules_stay_small(modules):
    large = {str(path.relative_to(REPO)): lines for path in modules.values()
             if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not large, f"modules over {MAX_MODULE_LINES} lines: {large}"


def test_few_modules_sit_directly_under_the_package():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_every_room_has_a_readme_naming_what_it_may_and_must_never_import():
    for room in LAYERS:
        readme = PACKAGE / room / "README.md"
        assert readme.is_file(), f"{room}/ has no README.md"
        text = readme.read_text(encoding="utf-8").lower()
        assert "may import" in text and "never import" in text, f"{readme} must say what it may and never imports"


def test_test_files_share_helpers_only_through_tests_testing():
    crossing = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        if "testing" in path.relative_to(REPO / "tests").parts:
            continue
        for found in _imports(_module_name(path), path):
            if found.module.startswith("tests") and not found.module.startswith("tests.testing"):
                crossing.append(f"{path.relative_to(REPO)}:{found.line} imports {found.module}")
    assert not crossing, "tests importing other test files (use tests/testing/):\n" + "\n".join(crossing)


def test_the_unit_tests_mirror_the_rooms():
    unit = REPO / "tests" / "unit"
    missing = [room for room in LAYERS if not any((unit / room).glob("test_*.py"))]
    assert not missing, f"rooms without a tests/unit/<room>/ folder of tests: {missing}"
