"""The package's layering: no import circle, and each module imports only modules below it in the README's
list ("Modules, bottom to top"). Every import counts, also one inside a function."""

import ast
import functools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "alphanet_jax"

# The README's module list, bottom to top ("each imports only those above it in this list"). `data` is a
# package: its submodules count as one module. launch.py is the top.
LAYERS = [
    "errors", "malloc_tunables", "files", "console", "compile_cache", "latency", "safe_pickle", "widths", "spaces", "space_dict",
    "search_space", "presets", "resolve", "subnet_encoding", "sampling", "flops", "search_config", "evolution",
    "pareto", "losses", "data", "fingerprint", "mesh", "process_comm", "checkpoint", "layers", "depthwise",
    "supernet_init", "supernet", "evaluate", "export", "onnx_export", "latency_measure", "latency_fit", "convert",
    "metrics", "sandwich", "search_results", "train", "search", "config_check", "tasks", "launch",
]


def _unit(dotted: str) -> str | None:
    """The LAYERS name of a dotted module inside the package ('alphanet_jax.data.pipeline' -> 'data')."""
    parts = dotted.split(".")
    return parts[1] if parts[0] == "alphanet_jax" and len(parts) > 1 else None


def _module_files() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package and launch.py."""
    files = {"launch": ROOT / "launch.py"}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imported_modules(path: pathlib.Path, dotted: str, known: set[str]) -> set[str]:
    """The package modules (dotted names) that a file imports anywhere in it: at the top, inside functions
    or classes, with `import a.b`, `from a import b` or a relative import."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                pkg = dotted.split(".") if is_package else dotted.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return {m for m in out if m in known}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """LAYERS name -> the LAYERS names it imports (itself excluded: `data`'s submodules import each other)."""
    files = _module_files()
    known = set(files)
    graph: dict[str, set[str]] = {}
    for dotted, path in files.items():
        unit = "launch" if dotted == "launch" else _unit(dotted)
        if unit is None:  # the package's own __init__
            unit = "alphanet_jax"
        deps = {_unit(m) for m in imported_modules(path, dotted, known)}
        graph.setdefault(unit, set()).update(d for d in deps if d is not None and d != unit)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_imports_are_parsed_everywhere(tmp_path):
    """A function-level import, `import a.b` and a relative import are all seen."""
    mod = tmp_path / "m.py"
    mod.write_text("import alphanet_jax.errors\n"
                   "def f():\n    from alphanet_jax.flops import count_flops\n"
                   "class C:\n    def g(self):\n        from alphanet_jax import search_space, __version__\n"
                   "from . import spaces\n")
    known = {"alphanet_jax.errors", "alphanet_jax.flops", "alphanet_jax.search_space", "alphanet_jax.spaces"}
    assert imported_modules(mod, "alphanet_jax.m", known) == known


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_every_module_is_in_the_layer_list():
    modules = set(import_graph()) - {"alphanet_jax"}
    assert modules == set(LAYERS), (f"modules missing from LAYERS (and the README): {sorted(modules - set(LAYERS))}; "
                                    f"in LAYERS but not in the code: {sorted(set(LAYERS) - modules)}")


@pytest.mark.parametrize("module", LAYERS)
def test_imports_only_modules_below(module):
    graph = import_graph()
    above = sorted(d for d in graph.get(module, ()) if d not in LAYERS[: LAYERS.index(module)])
    assert not above, f"{module} imports {above}, which are not below it in the README's module list"


def test_readme_lists_the_modules_in_this_order():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"Modules, bottom to top.*?\n\n", readme, re.S)
    assert match, "README has no 'Modules, bottom to top' paragraph"
    names = [n.removesuffix(".py") for n in re.findall(r"`([a-z_]+(?:\.py)?)`", match.group(0))]
    assert [n for n in names if n in LAYERS] == LAYERS
