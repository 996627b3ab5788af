"""The import rules (.importlinter): one direction, core -> converters -> top layer -> experiments, checked.

`lint-imports` checks the contracts on the real tree, and is shown to fail on a copy of the tree with
a forbidden import planted in a core module. The rest reads the sources: every module of the library
is classified, nothing imports tests/, converters use only public names of the core.
"""

import ast
import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vitnt_jax", "converters", "experiments")
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", "--config", str(root / ".importlinter")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _contracts() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    return config


def _modules(config: configparser.ConfigParser, section: str, key: str) -> set[str]:
    return set(config[f"importlinter:contract:{section}"][key].split())


def _sources(*packages: str) -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), str(p)) for package in packages for p in sorted((REPO / package).rglob("*.py"))}


def test_every_contract_is_kept():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "planted, broken",
    [
        ("from converters import mtcnn", "The core never imports converters or experiments BROKEN"),
        ("from vitnt_jax import models", "The core never imports the top layer BROKEN"),
        ("from experiments import edc", "The library and the converters never import experiments BROKEN"),
    ],
)
def test_a_forbidden_import_in_a_core_module_breaks_the_check(tmp_path, planted, broken):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(REPO / ".importlinter", tmp_path)
    align = tmp_path / "vitnt_jax" / "align.py"
    # Inside a function, where a lazy import would hide: it still counts.
    align.write_text(align.read_text() + f"\n\ndef _planted():\n    {planted}\n")
    result = _lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert broken in result.stdout and "vitnt_jax.align ->" in result.stdout


def test_every_library_module_is_core_or_top_layer():
    config = _contracts()
    core = _modules(config, "core-without-converters", "source_modules")
    assert _modules(config, "core-below-top", "source_modules") == core
    top = _modules(config, "core-below-top", "forbidden_modules")
    assert not core & top
    found = {f"vitnt_jax.{p.stem}" for p in (REPO / "vitnt_jax").glob("*.py") if p.stem not in ("__init__", "__main__")}
    unlisted, gone = sorted(found - core - top), sorted(core | top - found)
    assert found == core | top, f"classify in .importlinter: {unlisted}; listed but gone: {gone}"


def test_nothing_imports_tests():
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")} | {"tests"}
    for path, tree in _sources(*PACKAGES).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            bad = [n for n in names if n.split(".")[0] in test_modules]
            assert not bad, f"{path.relative_to(REPO)}:{node.lineno} imports {bad} from tests/"
        text = path.read_text()
        assert not any("sys.path" in line and "tests" in line for line in text.splitlines()), path


def test_converters_use_only_public_names_of_the_core():
    for path, tree in _sources("converters").items():
        aliases = set()  # names bound to vitnt_jax modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vitnt_jax"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(REPO)}:{node.lineno} imports private {private}"
                aliases |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name.startswith("vitnt_jax")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                assert not node.attr.startswith("_"), f"{path.relative_to(REPO)}:{node.lineno} uses {node.attr}"
