"""The import rules of DESIGN.md, checked on the source with `ast` (nothing is imported).

    config -> sol -> sharding -> communicator -> checkpoint -> model -> comm -> engine -> cli

- a module imports only from its own layer and layers to its left, plus tp_runtime.kernels;
- tp_runtime.errors and tp_runtime.units are leaves that anyone may import;
- sol (the speed-of-light model) is pure: of ours only config and errors, and no third-party
  package at all (no torch), so that the bench and the CLI can use it without one;
- kernels/ (tp_runtime.kernels) imports only torch, triton, the standard library and itself;
- only tp_runtime/comm/ imports torch.distributed or zmq;
- only launch/ (tp_runtime.launch) imports subprocess or multiprocessing (kernels/cpu_gemv.py
  runs the C compiler through subprocess: the one exception, named in COMPILER_RUNNERS);
- launch/ (process management: spawner, worker daemon, coordinator) sits between engine and cli;
- cli may import any layer; tp_runtime/__init__.py and __main__.py are free of the layer order.

Imports inside functions count, relative imports are resolved, and `importlib.import_module`
/ `__import__` with a literal name count as imports. The comm-only and launch-only rules apply
to every file, cli and the free ones included (DESIGN: comm/ is "THE ONLY PLACE").
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# source folder -> the package it installs as (pyproject: package-dir)
SOURCE_DIRS = {"tp_runtime": "tp_runtime", "kernels": "tp_runtime.kernels", "launch": "tp_runtime.launch"}

ORDER = ("config", "sol", "sharding", "communicator", "checkpoint", "placement", "model", "comm", "engine", "serve", "launch", "cli")

# first component under tp_runtime -> layer (DESIGN: "engine -> cli/server")
LAYER_OF_COMPONENT = {
    "config": "config",
    "sol": "sol",
    "sharding": "sharding",
    "communicator": "communicator",
    "checkpoint": "checkpoint",
    "placement": "placement",
    "model": "model",
    "comm": "comm",
    "engine": "engine",
    "serve": "serve",
    "cli": "cli",
    "errors": "errors",
    "units": "errors",  # a leaf like errors: flag-value parsing, imports only errors
    "optional": "errors",  # a leaf like errors: optional packages imported with an install hint
    "kernels": "kernels",
    "launch": "launch",
    "__main__": "free",
}

DISTRIBUTED = ("torch.distributed", "zmq")
PROCESSES = ("subprocess", "multiprocessing", "torch.multiprocessing")
# the one exception: the CPU GEMV kernel runs the C compiler (and only that) to build itself
COMPILER_RUNNERS = ("kernels/cpu_gemv.py",)
KERNEL_THIRD_PARTY = ("torch", "triton")


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute dotted name of what is imported
    text: str  # the statement as written


def module_name(rel: Path) -> str:
    """'kernels/reference.py' -> 'tp_runtime.kernels.reference'; '.../__init__.py' -> the package."""
    top, *rest = rel.with_suffix("").parts
    parts = SOURCE_DIRS[top].split(".") + rest
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """Layer of one of our modules; 'package' for bare tp_runtime; None if unmapped."""
    parts = module.split(".")
    if parts[0] != "tp_runtime":
        return None
    if len(parts) == 1:
        return "package"
    return LAYER_OF_COMPONENT.get(parts[1])


def is_submodule(dotted: str) -> bool:
    """Whether tp_runtime.X(.Y) names a module or package of ours (rather than an attribute)."""
    parts = dotted.split(".")
    if parts[0] != "tp_runtime" or len(parts) < 2:
        return False
    # longest package first: tp_runtime.kernels.X lives in kernels/, not tp_runtime/kernels/
    for folder, package in sorted(SOURCE_DIRS.items(), key=lambda fp: -len(fp[1])):
        pk = package.split(".")
        if parts[: len(pk)] == pk:
            base = ROOT / folder / Path(*parts[len(pk) :]) if len(parts) > len(pk) else ROOT / folder
            return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or base.is_dir()
    return False


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def imports_of(source: str, module: str, is_package: bool) -> list[Import]:
    tree = ast.parse(source)
    lines = source.splitlines()
    package = module if is_package else module.rpartition(".")[0]
    out: list[Import] = []

    def text(node: ast.AST) -> str:
        return lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ast.unparse(node)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(node.lineno, alias.name, text(node)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                prefix = ".".join(base)
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            if mod == "__future__":
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                if alias.name != "*" and (is_submodule(sub) or sub in ("torch.distributed", "torch.multiprocessing")):
                    out.append(Import(node.lineno, sub, text(node)))  # from tp_runtime import sharding
                else:
                    out.append(Import(node.lineno, mod, text(node)))
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            target = _literal(node.args[0])
            if name in ("import_module", "__import__") and target:
                out.append(Import(node.lineno, target, text(node)))
        elif isinstance(node, ast.Attribute) and node.attr in ("distributed", "multiprocessing"):
            # torch.distributed.foo() without an import of its own still uses torch.distributed
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                out.append(Import(node.lineno, f"torch.{node.attr}", text(node)))
    return sorted(set(out), key=lambda i: (i.line, i.module))


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations_in(source: str, rel: Path) -> list[str]:
    """Every import in `source` (a file at `rel` under the repo root) that breaks a rule."""
    module = module_name(rel)
    owner = layer_of(module)
    if rel.as_posix() in ("tp_runtime/__init__.py", "tp_runtime/__main__.py"):
        owner = "free"
    where = rel.as_posix()
    if owner is None:
        return [f"{where}: module {module} has no layer; add it to LAYER_OF_COMPONENT in tests/test_layering.py (and to DESIGN.md)"]
    bad: list[str] = []

    def flag(imp: Import, why: str) -> None:
        bad.append(f"{where}:{imp.line}: `{imp.text}` ({owner} imports {imp.module}: {why})")

    for imp in imports_of(source, module, rel.name == "__init__.py"):
        m = imp.module
        # process and transport rules hold for every file
        if _under(m, DISTRIBUTED) and owner != "comm":
            flag(imp, "only tp_runtime/comm/ may import torch.distributed or zmq")
            continue
        if _under(m, PROCESSES) and owner != "launch" and not (m == "subprocess" and where in COMPILER_RUNNERS):
            flag(imp, "only launch/ may import subprocess or multiprocessing")
            continue
        top = m.split(".")[0]
        if owner == "sol" and top != "tp_runtime" and top not in sys.stdlib_module_names:
            flag(imp, "sol.py is pure Python: the standard library, config and errors only")
            continue
        if owner == "kernels":
            if top == "tp_runtime":
                if layer_of(m) != "kernels":
                    flag(imp, "kernels/ is a leaf: of ours it imports only tp_runtime.kernels")
            elif top not in KERNEL_THIRD_PARTY and top not in sys.stdlib_module_names:
                flag(imp, "kernels/ imports only torch, triton and the standard library")
            continue
        if top != "tp_runtime":
            continue  # other third-party and stdlib imports are free outside kernels/
        target = layer_of(m)
        if target is None:
            flag(imp, "imported module has no layer")
            continue
        if owner in ("free", "cli"):
            continue
        if owner == "errors":
            if target not in ("errors",):
                flag(imp, "errors.py is a leaf and imports nothing of ours")
            continue
        # a layer in ORDER
        if target in ("errors", "kernels", "package"):
            continue
        if target in ORDER and ORDER.index(target) <= ORDER.index(owner):
            continue
        flag(imp, f"{owner} may import only from {', '.join(ORDER[: ORDER.index(owner) + 1])}, errors and kernels")
    return bad


def source_files() -> list[Path]:
    files = []
    for folder in SOURCE_DIRS:
        files += sorted(p.relative_to(ROOT) for p in (ROOT / folder).rglob("*.py"))
    return files


def test_sources_found():
    files = {p.as_posix() for p in source_files()}
    for must in ("tp_runtime/config.py", "tp_runtime/sharding.py", "kernels/__init__.py", "launch/__init__.py", "tp_runtime/cli/run.py"):
        assert must in files, f"{must} not found: is ROOT ({ROOT}) the repository root?"


def test_import_rules():
    problems = []
    for rel in source_files():
        problems += violations_in((ROOT / rel).read_text(), rel)
    assert not problems, "import rules of DESIGN.md broken:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------
# the checker itself: it must catch what it claims to catch


@pytest.mark.parametrize(
    "rel, source",
    [
        ("tp_runtime/config.py", "from tp_runtime import sharding\n"),
        ("tp_runtime/sharding.py", "from tp_runtime.communicator import Communicator\n"),
        ("tp_runtime/model/llama.py", "def f():\n    from tp_runtime.engine.llm import LLM\n"),
        ("tp_runtime/model/llama.py", "from ..comm import create\n"),
        ("tp_runtime/model/llama.py", "from tp_runtime.launch import spawn\n"),
        ("tp_runtime/checkpoint/loader.py", "import tp_runtime.model.llama\n"),
        ("tp_runtime/comm/local.py", "from tp_runtime.engine import generate\n"),
        ("tp_runtime/engine/llm.py", "import torch.distributed as dist\n"),
        ("tp_runtime/engine/llm.py", "from torch import distributed\n"),
        ("tp_runtime/engine/llm.py", "import torch\nok = torch.distributed.is_initialized()\n"),
        ("tp_runtime/model/linear.py", "import zmq\n"),
        ("tp_runtime/cli/run.py", "import zmq.asyncio\n"),
        ("launch/spawn.py", "import torch.distributed\n"),
        ("tp_runtime/engine/llm.py", "import subprocess\n"),
        ("tp_runtime/comm/local.py", "from multiprocessing import Process\n"),
        ("tp_runtime/comm/local.py", "import torch.multiprocessing as mp\n"),
        ("tp_runtime/cli/run.py", "import subprocess\n"),
        ("kernels/reference.py", "import numpy\n"),
        ("kernels/reference.py", "from tp_runtime.errors import ConfigError\n"),
        ("kernels/reference.py", "from tp_runtime.config import ModelConfig\n"),
        ("kernels/flash.py", "def f():\n    import tp_runtime.model\n"),
        ("launch/spawn.py", "from tp_runtime.cli import main\n"),
        ("tp_runtime/errors.py", "from tp_runtime.config import ModelConfig\n"),
        ("tp_runtime/model/llama.py", "import importlib\nm = importlib.import_module('tp_runtime.engine.llm')\n"),
        ("tp_runtime/unmapped.py", "import math\n"),  # a module with no layer
        ("tp_runtime/sol.py", "import torch\n"),
        ("tp_runtime/sol.py", "def f():\n    import numpy as np\n"),
        ("tp_runtime/sol.py", "from tp_runtime.sharding import spec\n"),
        ("tp_runtime/config.py", "from tp_runtime import sol\n"),
    ],
)
def test_checker_catches(rel, source):
    found = violations_in(source, Path(rel))
    assert found, f"not caught: {rel}: {source!r}"
    assert rel in found[0]


@pytest.mark.parametrize(
    "rel, source",
    [
        ("tp_runtime/config.py", "import json\nfrom tp_runtime.errors import ConfigError\n"),
        ("tp_runtime/sharding.py", "from tp_runtime.config import ModelConfig\n"),
        ("tp_runtime/model/llama.py", "from tp_runtime import sharding, kernels\nfrom .attention import X\nfrom ..checkpoint.loader import copy_checked\n"),
        ("tp_runtime/model/norm.py", "import torch\nfrom torch import nn\nfrom tp_runtime.kernels import reference\n"),
        ("tp_runtime/comm/torch_dist.py", "import torch.distributed as dist\nimport zmq\nfrom tp_runtime.communicator import Timer\n"),
        ("tp_runtime/engine/llm.py", "from tp_runtime.comm import create\nfrom tp_runtime.model.registry import model_class\n"),
        ("tp_runtime/cli/run.py", "from tp_runtime.launch.spawn import spawn\nfrom tp_runtime.engine.llm import LLM\n"),
        ("tp_runtime/__main__.py", "from tp_runtime.cli import main\n"),
        ("kernels/__init__.py", "import os\nfrom tp_runtime.kernels import reference\nfrom . import flash_prefill\nimport triton.language as tl\n"),
        ("launch/spawn.py", "import subprocess\nimport multiprocessing\nfrom tp_runtime.errors import LaunchError\nfrom tp_runtime.config import ParallelConfig\n"),
        ("launch/env.py", "from tp_runtime.launch import spawn\nfrom .spawn import x\n"),
        ("tp_runtime/sol.py", "import json, math\nfrom tp_runtime.config import ModelConfig\nfrom tp_runtime.errors import ConfigError\n"),
        ("tp_runtime/cli/bench.py", "from tp_runtime import sol\nimport torch\nimport matplotlib\n"),
    ],
)
def test_checker_allows(rel, source):
    assert violations_in(source, Path(rel)) == []
