"""The package's import graph: no cycles, dependencies pointing down the layers of docs/architecture.md,
in-function imports only for optional dependencies (and the CLI's lazy commands), every module importable,
and `prinmix --help` without torch."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import prinmix
from fixtures.compressed_deltas import method_deltas
from prinmix.format.delta_file import DeltaFile, save_delta

PACKAGE = Path(prinmix.__file__).parent

# Layers, lowest first: a module may import its own layer's and lower layers' modules only.
LAYERS = [
    {"errors", "algorithms"},
    {"format", "device"},
    {"checkpoint"},
    {"calibration", "runtime"},
    {"pipeline", "evaluate", "export"},
    {"api", "in_memory", "tiny_models", "fleet"},
    {"demo", "serve"},
    {"cli"},
]
# optional dependencies (and the CLI's commands) that may be imported inside functions
OPTIONAL = ("matplotlib", "scipy.optimize", "scipy.sparse", "scipy.stats", "pyscipopt", "triton", "fastapi",
            "uvicorn", "lm_eval", "datasets", "pyarrow", "peft", "ray",
            "transformers.core_model_loading",  # present in newer transformers only (checkpoint/layout.py)
            "torch.utils.cpp_extension")        # the packed kernel's JIT build: needs setuptools, a compiler, ninja


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """Absolute prinmix module names an ImportFrom refers to (a name may itself be a submodule)."""
    if node.level:
        package = module.split(".") if _modules()[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported prinmix module, at module level?) for every import in `path`."""
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    known = _modules()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _resolve(module, node)
        else:
            continue
        for name in names:
            if name in known and name != module:
                out.append((name, id(node) not in in_function))
    return out


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module}: not in any layer of LAYERS (add it, and to docs/architecture.md)")


def test_every_module_imports():
    for name in _modules():
        if not name.endswith(".__main__"):  # running it is what importing it does
            importlib.import_module(name)


def test_no_import_cycles():
    graph = {m: {d for d, top in _imports(m, p) if top} for m, p in _modules().items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if d.startswith(m + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_dependencies_point_down():
    upward = []
    for m, path in _modules().items():
        if m == "prinmix":
            continue
        for d, _top in _imports(m, path):
            if d != "prinmix" and _layer(d) > _layer(m):
                upward.append(f"{m} imports {d}")
    assert not upward, "\n".join(upward)


def test_in_function_imports_are_optional_dependencies_only():
    found = []
    for m, path in _modules().items():
        if m.startswith("prinmix.cli") or m == "prinmix":  # the CLI's (and the package's) lazy loading
            continue
        tree = ast.parse(path.read_text())
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] if not node.level else [f"(relative) {node.module}"]
                else:
                    continue
                for name in names:
                    if not any(name == o or name.startswith(o + ".") for o in OPTIONAL) \
                            and not name.endswith("triton_kernels"):
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {name}")
    assert not found, "\n".join(found)


def test_cli_help_loads_no_torch():
    code = ("import sys\nfrom prinmix.cli import build_parser\nbuild_parser()\n"
            "heavy = [m for m in ('torch', 'transformers', 'safetensors.torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_info_loads_no_torch(tmp_path):
    """`prinmix info` (text and --json) reads a delta, verified, without importing torch or transformers."""
    delta = DeltaFile("prinmix", 0.25, {}, matrices={f"m{i}.weight": m for i, m in enumerate(method_deltas().values())},
                      base_fingerprint={"model_type": "llama", "content_hash": "ab" * 32})
    save_delta(delta, tmp_path / "d.delta")
    code = ("import sys\nfrom prinmix.cli import main\n"
            f"assert main(['info', {str(tmp_path / 'd.delta')!r}]) == 0\n"
            f"assert main(['info', {str(tmp_path / 'd.delta')!r}, '--json']) == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'safetensors.torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "m0.weight" in out and '"matrices"' in out
