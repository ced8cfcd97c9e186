"""The installable package: the lazy public API, one list of dependencies."""

import subprocess
import sys

import pytest
from conftest import REPO


def test_import_is_lazy():
    code = (
        "import sys, ddpm_hf\n"
        "cfg = ddpm_hf.DDPMConfig(dataset='mnist5k')\n"
        "ddpm_hf.validate(cfg)\n"
        "print(ddpm_hf.__version__, sorted(m for m in ('torch', 'diffusers', 'accelerate', 'datasets') if m in "
        "sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split(" ", 1)[1].strip() == "[]"  # neither the import nor the config loaded torch


def test_public_api_resolves():
    import ddpm_hf

    missing = [name for name in ddpm_hf.__all__ if getattr(ddpm_hf, name, None) is None]
    assert not missing
    assert (
        ddpm_hf.train.__module__ == "ddpm_hf.commands.train"
        and ddpm_hf.load_model.__module__ == "ddpm_hf.models.loader"
    )
    assert ddpm_hf.__version__.count(".") == 2


def test_unknown_names_raise_attribute_error():
    import ddpm_hf

    try:
        _ = ddpm_hf.no_such_name
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("ddpm_hf.no_such_name did not raise")
    assert "train" in dir(ddpm_hf)


def _pins() -> dict:
    """{name: exact version or None} of requirements.txt, the tested lock."""
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return {
        line.partition("==")[0].lower().replace("_", "-"): line.partition("==")[2] or None for line in lines if line
    }


def test_dependencies_are_ranges_that_the_tested_pins_satisfy():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [Requirement(r) for r in project["dependencies"] + [r for rs in extras.values() for r in rs]]
    declared = {r.name.lower().replace("_", "-"): r for r in declared if r.name != "ddpm-hf"}
    pins = _pins()
    assert pins["torch"] == "2.14.1" and pins["diffusers"] == "0.42.1" and pins["accelerate"] == "1.15.0"
    assert not any("==" in r for r in project["dependencies"])  # ranges, not pins
    # Every lock entry is declared, and its pin lies in the declared range (the lock installs a valid set).
    assert set(pins) <= set(declared), set(pins) - set(declared)
    assert [n for n, v in pins.items() if v and not declared[n].specifier.contains(v)] == []
    assert set(extras) == {"tracking", "lpips", "medmnist", "dinov2", "demo", "all", "test", "space"}
    # The Space's lock (gradio, selenium) is its own file: `make venv` reads requirements.txt unchanged.
    space_pins = [line.split("#")[0].strip() for line in (REPO / "requirements-space.txt").read_text().splitlines()]
    space_pins = dict(line.split("==") for line in space_pins if line)
    for req in map(Requirement, extras["space"]):
        assert req.specifier.contains(space_pins[req.name]), (req, space_pins[req.name])
    assert extras["all"] == ["ddpm-hf[tracking,lpips,medmnist,dinov2,demo]"] and "ddpm-hf[all]" in extras["test"]
    # animal-mnist stays out (it declares tensorflow); requirements.txt is a plain list, usable as constraints.
    assert "animal-mnist" not in pins and "animal-mnist" not in declared
    assert not any(line.startswith("-") for line in (REPO / "requirements.txt").read_text().splitlines())


# ---- layers: the import graph (module-level and function-level imports alike) ----------------------


def _module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """{module: modules of ddpm_hf it imports anywhere in its file}, read with `ast` (nothing is imported)."""
    import ast

    files = {_module_name(p): p for p in (REPO / "ddpm_hf").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import ood`
        graph[name] = {t for t in targets if t in files and t not in (name, "ddpm_hf")}
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert {
        "ddpm_hf.models.pipeline",
        "ddpm_hf.models.loader",
        "ddpm_hf.commands.sample",
        "ddpm_hf.commands.ood",
    } <= set(graph)
    assert "ddpm_hf.models.convert_gzoo" in graph["ddpm_hf.models.loader"]  # function-level imports are read too
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# Sub-packages from the bottom up: each imports only from the layers below it (and itself); the
# packages of one layer do not import each other.
LAYERS = [
    ("util",),
    ("config",),
    ("data",),
    ("diffusion",),
    ("models",),
    ("metrics", "hub", "ood"),
    ("training",),
    ("commands",),
    ("__main__",),  # python -m ddpm_hf: the command line itself
]


def subpackage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_subpackages_import_only_lower_layers():
    rank = {package: level for level, packages in enumerate(LAYERS) for package in packages}
    graph = import_graph()
    assert set(rank) == {subpackage(m) for m in graph if m.count(".") >= 1}  # every sub-package has its layer
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if subpackage(m) and subpackage(t) != subpackage(m) and rank[subpackage(t)] >= rank[subpackage(m)]
    )
    assert upward == []


def test_no_flat_modules_beside_the_subpackages():
    assert sorted(p.name for p in (REPO / "ddpm_hf").glob("*.py")) == ["__init__.py", "__main__.py"]


def test_library_never_imports_the_command_layer():
    graph = import_graph()
    library = [m for m in graph if not m.startswith(("ddpm_hf.commands", "ddpm_hf.__main__"))]
    offenders = {m: sorted(t for t in graph[m] if t.startswith("ddpm_hf.commands")) for m in library}
    assert not {m: t for m, t in offenders.items() if t}


def test_no_private_name_is_imported_across_modules():
    """A name another module needs is public where it is defined; `_name` stays inside its module."""
    import ast

    found = []
    for path in (REPO / "ddpm_hf").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("ddpm_hf")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                found += [f"{path.relative_to(REPO)}: {name}" for name in private]
    assert found == []


def test_functions_stay_short():
    """No function of ddpm_hf/ over 60 lines (the Trainer's longest method is ~30)."""
    import ast

    long = []
    for path in (REPO / "ddpm_hf").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def test_every_subpackage_is_installed():
    """pyproject.toml lists packages by name: a new subpackage (ddpm_hf/commands/) must be listed too,
    or a non-editable install leaves it out."""
    tomllib = pytest.importorskip("tomllib")

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p.parent / "__init__.py") for p in (REPO / "ddpm_hf").rglob("__init__.py")}
    assert found == listed
