"""The package builds without setuptools warnings and installs the `rar-hf` command with its data files; every module
imports in a fresh interpreter and the package's import graph has no cycle."""

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_warnings_and_ships_command_and_data(tmp_path):
    # What `pip install -e .` / `pip install .` run (build_py, egg_info), without network: the installed setuptools.
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Warning" not in output and "would be ignored" not in output, output
    (wheel,) = tmp_path.glob("rar_hf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "rar-hf = rar_hf.cli:main" in entry_points
    for name in (
        "rar_hf/cli.py",
        "rar_hf/commands/sample.py",
        "rar_hf/model_cards/rar-generic.md",
        "rar_hf/metrics/rar_fid/rar_fid.py",
        "rar_hf/pretrained/tiny-digits/model_index.json",
        "rar_hf/pretrained/tiny-digits/transformer/model.safetensors",
        "rar_hf/pretrained/tiny-digits/vqvae/config.json",
    ):
        assert name in names, name


PACKAGE = REPO / "src" / "rar_hf"


def package_modules() -> dict[str, Path]:
    """Every importable module of the package (name -> file); `__main__` runs the command, so it is left out, and
    files under folders that are not identifiers (the shipped model's `pipeline_rar.py` stub) are data."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if not all(part.isidentifier() for part in parts) or parts[-1] == "__main__":
            continue
        modules[".".join(parts).removesuffix(".__init__")] = path
    return modules


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(package_modules())
    assert "rar_hf.cli" in names and "rar_hf.commands.generate" in names and "rar_hf.metrics.rar_fid.rar_fid" in names
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('imported', len(sys.argv) - 1)"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"imported {len(names)}" in result.stdout


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level AND inside functions (parsed with ast): `import
    rar_hf.x`, `from rar_hf.x import y`, `from .x import y`, `from . import x` (a module x, or the package's own
    namespace), and `importlib.import_module("...")` with a literal name."""
    modules = package_modules()

    def resolve(target: str, names: list[str]) -> set[str]:
        found = set()
        for name in names:  # `from package import submodule` imports the submodule
            if f"{target}.{name}" in modules:
                found.add(f"{target}.{name}")
        if len(found) < len(names) or not names:
            found.add(target)
        return {module for module in found if module in modules}

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges |= resolve(alias.name, [])
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                edges |= resolve(target, [alias.name for alias in node.names])
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                name = node.args[0].value
                if name.startswith("."):
                    name = package + name if name != "." else package
                edges |= resolve(name, [])
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_package_has_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # The graph sees what it must: relative, absolute, function-level and `from . import` imports.
    assert "rar_hf.modeling_rar" in graph["rar_hf.convert"]
    assert "rar_hf" in graph["rar_hf.cli"]  # `from . import __version__`, inside main()
    assert "rar_hf.arguments" in graph["rar_hf.commands._loading"]
    assert "rar_hf.pipeline_rar" in graph["rar_hf.commands._loading"]  # a function-level import


def test_the_cycle_check_finds_function_level_cycles(tmp_path):
    # What cli.py <-> convert.py was: one side imports the other inside a function only.
    graph = {"rar_hf.cli": {"rar_hf.convert"}, "rar_hf.convert": {"rar_hf.arguments"}, "rar_hf.arguments": set()}
    assert find_cycle(graph) is None
    graph["rar_hf.convert"].add("rar_hf.cli")
    assert find_cycle(graph) == ["rar_hf.cli", "rar_hf.convert", "rar_hf.cli"]
