"""Import layering, for every package.

- The foundation (edgemoe's own modules, arch, checkpoint, format, quant) stays
  light and never reaches into the runtime, the converters or the app.
- The runtime and the converters do not import each other, nor the app.
- The app: ``edgemoe.cli`` (the parser) over ``edgemoe.commands`` (a module per
  command), and ``edgemoe.ui`` (the chat); both print through
  ``edgemoe.report`` and ``edgemoe.progress``. Nothing below imports them, the
  UI never imports the CLI, and only the chat command starts the UI.
"""

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
    "edgemoe.sampling_params",
    "edgemoe.cli",
    "edgemoe.commands.options",
    "edgemoe.commands.probe",
    "edgemoe.commands.profile",
    "edgemoe.commands.run",
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


FRONT_ENDS = ["edgemoe.cli", "edgemoe.commands", "edgemoe.ui", "edgemoe.serve"]
APP = [*FRONT_ENDS, "edgemoe.report", "edgemoe.progress"]
APP_MODULES = {"cli.py", "report.py", "progress.py", "__main__.py", "__init__.py"}
"""edgemoe's own modules that are not the foundation: the app's, and the
package's facade (``edgemoe.load`` imports the runtime when called)."""
BELOW_APP = ["edgemoe.runtime", "edgemoe.converters", *APP]

# folder -> (its package name, prefixes it must never import)
RULES = {
    "edgemoe": ("edgemoe", BELOW_APP),  # the foundation modules (APP_MODULES aside)
    "edgemoe/arch": ("edgemoe.arch", BELOW_APP),
    "edgemoe/checkpoint": ("edgemoe.checkpoint", BELOW_APP),
    "edgemoe/format": ("edgemoe.format", BELOW_APP),
    "edgemoe/quant": ("edgemoe.quant", BELOW_APP),
    "profiles": ("edgemoe.profiles", BELOW_APP),
    "converters": ("edgemoe.converters", ["edgemoe.runtime", *APP]),
    "runtime": ("edgemoe.runtime", ["edgemoe.converters", *APP]),
    "edgemoe/commands": ("edgemoe.commands", ["edgemoe.cli"]),
    "edgemoe/ui": ("edgemoe.ui", ["edgemoe.cli", "edgemoe.commands", "edgemoe.serve"]),
    "edgemoe/serve": (
        "edgemoe.serve",
        ["edgemoe.cli", "edgemoe.commands", "edgemoe.ui"],
    ),
}
APP_RULE = FRONT_ENDS
"""report.py and progress.py serve the CLI and the chat alike: they import neither."""


def modules_of(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).glob("*.py"))
    if folder == "edgemoe":
        files = [p for p in files if p.name not in APP_MODULES]
    return files


def test_every_package_has_a_rule():
    """A new package cannot slip past the rules: pyproject's packages are
    exactly the folders above."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = conf.get("package-dir", {})
    folders = {dirs.get(p, p.replace(".", "/")) for p in conf["packages"]}
    assert folders == set(RULES)


@pytest.mark.parametrize("folder", sorted(RULES))
def test_static_layering(folder):
    package, banned = RULES[folder]
    files = modules_of(folder)
    assert files, f"no modules in {folder}"
    bad = {
        str(p.relative_to(ROOT)): sorted(hits(sorted(imports_of(p, package)), banned))
        for p in files
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_report_and_progress_serve_both_front_ends():
    for name in ("report.py", "progress.py"):
        found = imports_of(ROOT / "edgemoe" / name, "edgemoe")
        assert hits(sorted(found), APP_RULE) == [], name


@pytest.mark.parametrize(
    "front, command", [("edgemoe.ui", "chat.py"), ("edgemoe.serve", "serve.py")]
)
def test_only_its_command_starts_a_front_end(front, command):
    users = [
        p.name
        for p in modules_of("edgemoe/commands")
        if hits(sorted(imports_of(p, "edgemoe.commands")), [front])
    ]
    assert users == [command]


def test_building_the_parser_is_light(tmp_path):
    """``edgemoe --help`` and a usage error import no numpy, ggml or Textual."""
    code = (
        "import json, sys\n"
        "from edgemoe.cli import build_parser\n"
        "build_parser()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    heavy = ["numpy", "gguf", "textual", "rich", "torch", "llama_cpp", "onnxruntime"]
    assert hits(loaded, heavy) == []
    assert "edgemoe.commands.chat" in loaded  # it did build every command


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
