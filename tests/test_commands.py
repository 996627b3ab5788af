"""Every command of the project (each module with a `__main__` block) answers `--help` and a flag error
without importing JAX, so both come back at once (importing JAX takes seconds)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, runpy, sys
seen = []
for module in sys.argv[1:]:
    for flag in ("--help", "--no-such-flag"):
        sys.argv = [module, flag]
        try:
            runpy.run_module(module, run_name="__main__")
            code = "returned"
        except SystemExit as stop:
            code = stop.code
        heavy = sorted(m for m in ("jax", "flax", "torch") if m in sys.modules)
        seen.append([module, flag, code, heavy])
        if heavy:  # later modules would inherit it: the first one that imported it is the culprit
            break
    if heavy:
        break
print(json.dumps(seen))
"""


def commands() -> list[str]:
    """Returns every module of vitnt_jax, converters and experiments that runs as `python -m`."""
    found = []
    for package in ("vitnt_jax", "converters", "experiments"):
        for path in sorted((ROOT / package).glob("*.py")):
            if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8"):
                found.append(f"{package}.{path.stem}")
    return found


def test_every_command_is_found():
    found = commands()
    assert {"vitnt_jax.score", "vitnt_jax.models", "converters.mtcnn", "experiments.evaluate"} <= set(found)
    assert len(found) >= 20, found


def test_every_help_and_flag_error_answers_without_jax():
    names = commands()
    done = subprocess.run([sys.executable, "-c", PROBE, *names], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row for row in seen if row[3]] == []  # no command imported JAX, Flax or PyTorch
    assert [(m, f, c) for m, f, c, _ in seen] == [
        (m, f, 0 if f == "--help" else 2) for m in names for f in ("--help", "--no-such-flag")
    ]


def test_the_probe_catches_a_command_that_imports_jax_first(tmp_path):
    (tmp_path / "eager_cli.py").write_text(
        "import argparse, jax\nif __name__ == '__main__':\n    argparse.ArgumentParser().parse_args()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "eager_cli"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [["eager_cli", "--help", 0, ["jax"]]]
