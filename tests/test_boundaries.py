"""Module boundaries inside ``rabtriever_ray/``, read from the source (AST): no module uses another's private names,
module-level imports form no cycle, and no module is over 400 lines."""

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "rabtriever_ray"
ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400


def module_name(path: Path) -> str:
    """``rabtriever_ray/data/beir.py`` -> ``rabtriever_ray.data.beir``; a package's ``__init__.py`` is the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def imported_module(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from ... import`` in ``module`` reads from."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str, tree: ast.AST, module_level: bool) -> Iterator[tuple[ast.AST, str, list[str]]]:
    """(node, imported module, names) of each import of a package module; with ``module_level``, only those run at
    import: not inside a function, nor under ``if TYPE_CHECKING:``."""

    def walk(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if module_level and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (n for stmt in child.orelse for n in [stmt, *walk(stmt)])
                continue
            yield child
            yield from walk(child)

    for node in walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = imported_module(module, node)
            if source == PACKAGE or source.startswith(PACKAGE + "."):
                yield node, source, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    yield node, alias.name, []


def parsed() -> Iterator[tuple[str, Path, ast.AST]]:
    for module, path in MODULES.items():
        yield module, path, ast.parse(path.read_text(), str(path))


def test_no_module_imports_a_private_name_of_another():
    """``from .x import _y`` and ``x._y`` (``x`` a package module) reach into another module's private names: make
    the name public, or move it to where its users live."""
    found = []
    for module, path, tree in parsed():
        module_aliases = {}  # local name -> package module it is bound to
        for node, source, _ in imports(module, tree, module_level=False):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        module_aliases[alias.asname] = alias.name
                    else:
                        module_aliases.setdefault(alias.name.split(".")[0], alias.name.split(".")[0])
                continue
            for alias in node.names:
                if is_private(alias.name):
                    found.append(f"{where(path, node)}: imports {alias.name} from {source}")
                elif f"{source}.{alias.name}" in MODULES:
                    module_aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                dotted = ast.unparse(node.value).split(".")
                if dotted[0] in module_aliases:
                    target = ".".join([module_aliases[dotted[0]], *dotted[1:]])
                    if target in MODULES and target != module:
                        found.append(f"{where(path, node)}: uses {node.attr} of {target}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_module_level_imports_have_no_cycle():
    """Imports inside functions are deliberate lazy imports and do not count; neither do ``TYPE_CHECKING`` ones."""
    edges: dict[str, dict[str, str]] = {module: {} for module in MODULES}  # module -> {imported: where}
    for module, path, tree in parsed():
        for node, source, names in imports(module, tree, module_level=True):
            targets = [f"{source}.{name}" for name in names if f"{source}.{name}" in MODULES]
            if not names or len(targets) < len(names):
                targets.append(source)  # names defined in ``source`` itself, or a plain ``import``
            for target in targets:
                if target in MODULES and target != module:
                    edges[module].setdefault(target, where(path, node))

    # Tarjan's strongly connected components: every component of more than one module holds a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    report = []
    for component in components:
        report.append("cycle among " + ", ".join(component) + ":")
        report += [f"  {edges[a][b]}: {a} imports {b}" for a in component for b in edges[a] if b in component]
    assert not components, "module-level import cycles:\n" + "\n".join(report)


def test_no_module_is_over_400_lines():
    """A module past 400 lines holds more than one concept: split it by concept (rule 2)."""
    long = {
        str(path.relative_to(ROOT)): n
        for path in MODULES.values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
