"""The package facade: `import vitnt_jax` imports no JAX, and every name it exports resolves."""

import subprocess
import sys

import pytest

import vitnt_jax


def test_import_loads_no_jax():
    code = "import sys, vitnt_jax; print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("name", vitnt_jax.__all__)
def test_every_export_resolves(name):
    assert getattr(vitnt_jax, name) is not None and name in dir(vitnt_jax)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        vitnt_jax.nothing  # noqa: B018
