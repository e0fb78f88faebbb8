"""Import layering: the core (edgemoe, arch, checkpoint, errors) stays light and
never reaches into the runtime or converters; runtime and converters do not
import each other."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE = [
    "edgemoe",
    "edgemoe.arch",
    "edgemoe.checkpoint",
    "edgemoe.checkpoint.hf",
    "edgemoe.checkpoint.gguf_file",
    "edgemoe.errors",
    "edgemoe.units",
    "edgemoe.profile",
    "edgemoe.profiler",
    "edgemoe.profile_cli",
    "edgemoe.cli",
]
FORBIDDEN = [
    "edgemoe.runtime",
    "edgemoe.converters",
    "textual",
    "onnxruntime",
    "torch",
    "llama_cpp",
]


def imported_after(modules: list[str], tmp_path) -> list[str]:
    """``sys.modules`` of a fresh interpreter after importing ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # off the repo root, where `edgemoe` is the bare folder
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hits(loaded: list[str], prefixes: list[str]) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_core_imports_neither_runtime_nor_heavy_dependencies(tmp_path):
    loaded = imported_after(CORE, tmp_path)
    assert set(CORE) <= set(loaded)
    assert hits(loaded, FORBIDDEN) == []


def test_importing_edgemoe_is_light(tmp_path):
    loaded = imported_after(["edgemoe"], tmp_path)
    assert hits(loaded, FORBIDDEN + ["numpy", "gguf", "jinja2"]) == []


def test_the_subprocess_check_sees_the_runtime(tmp_path):
    """The check above can fail: importing the runtime shows up in it."""
    loaded = imported_after(["edgemoe.runtime.sampling"], tmp_path)
    assert hits(loaded, ["edgemoe.runtime"]) == [
        "edgemoe.runtime",
        "edgemoe.runtime.sampling",
    ]
    assert "edgemoe.runtime" in hits(
        imported_after(["edgemoe.runtime.engine"], tmp_path), FORBIDDEN
    )


# -- static: every import statement, at any depth, of every module -----------------


def imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of all modules ``path`` imports (functions included);
    ``package`` resolves relative imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


FRONT_ENDS = ["edgemoe.cli", "edgemoe.convert_cli", "edgemoe.profile_cli", "edgemoe.ui"]
"""The command line and the chat: nothing below them imports them, and the
chat shares the CLI's text through edgemoe.report, not through the CLI."""

# folder -> (its package name, prefixes it must never import)
RULES = {
    "converters": ("edgemoe.converters", ["edgemoe.runtime", *FRONT_ENDS]),
    "runtime": ("edgemoe.runtime", ["edgemoe.converters", *FRONT_ENDS]),
    "edgemoe/ui": (
        "edgemoe.ui",
        ["edgemoe.cli", "edgemoe.convert_cli", "edgemoe.profile_cli"],
    ),
    "edgemoe/quant": ("edgemoe.quant", ["edgemoe.runtime", "edgemoe.converters"]),
    "edgemoe/format": ("edgemoe.format", ["edgemoe.converters", *FRONT_ENDS]),
    "edgemoe/arch": ("edgemoe.arch", ["edgemoe.runtime", "edgemoe.converters"]),
    "edgemoe/checkpoint": (
        "edgemoe.checkpoint",
        ["edgemoe.runtime", "edgemoe.converters"],
    ),
}


@pytest.mark.parametrize("folder", sorted(RULES))
def test_static_layering(folder):
    package, banned = RULES[folder]
    files = sorted((ROOT / folder).glob("*.py"))
    assert files, f"no modules in {folder}"
    bad = {
        str(p.relative_to(ROOT)): sorted(hits(sorted(imports_of(p, package)), banned))
        for p in files
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_static_scan_finds_imports(tmp_path):
    """The scanner sees top-level, nested, ``from ... import`` and relative forms."""
    p = tmp_path / "m.py"
    p.write_text(
        "import edgemoe.converters.synth\n"
        "def f():\n"
        "    from edgemoe.runtime import graph\n"
        "    from . import sampling\n"
        "    from ..converters import llama_gguf\n"
    )
    found = imports_of(p, "edgemoe.runtime")
    assert hits(sorted(found), ["edgemoe.converters"]) == [
        "edgemoe.converters",
        "edgemoe.converters.llama_gguf",
        "edgemoe.converters.synth",
    ]
    assert "edgemoe.runtime.graph" in found and "edgemoe.runtime.sampling" in found
