"""The converters' command lines share one vocabulary: --overwrite, one-line errors, --debug, --help without JAX."""

import subprocess
import sys

import pytest
import torch

from converters import cvlface, mtcnn
from vitnt_jax import checkpoint
from vitnt_jax.config import PRESETS

import torch_reference as tr

CONVERTERS = ["cvlface", "insightface", "clip", "timm", "mtcnn"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("cvlface_src")
    model = tr.randomize(tr.FaceViT(PRESETS["testing"]), seed=5)
    torch.save({f"net.{k}": v for k, v in model.state_dict().items()}, root / "model.pt")
    return root / "model.pt"


@pytest.mark.parametrize("name", CONVERTERS)
def test_help_answers_without_importing_jax_or_torch(name):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['converters.{name}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('converters.{name}', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        "print(sorted(m for m in ('jax', 'torch', 'flax') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    *helps, imported = result.stdout.strip().splitlines()
    assert imported == "[]" and "--overwrite" in "\n".join(helps) and "--debug" in "\n".join(helps)


@pytest.mark.parametrize("name", CONVERTERS)
def test_a_flag_error_is_one_line_with_status_2(name, capsys):
    module = __import__(f"converters.{name}", fromlist=["main"])
    with pytest.raises(SystemExit) as stop:
        module.main(["a", "b", "--no-such-flag"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unrecognized arguments: --no-such-flag") and err.count("\n") == 1
    assert err.strip().endswith(f"see python -m converters.{name} --help.")


def test_an_existing_result_is_never_replaced_without_overwrite(source, tmp_path, capsys):
    dst = tmp_path / "ckpt"
    assert cvlface.main([str(source), str(dst)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {dst.absolute()}"
    before = (dst / "config.json").read_bytes()
    assert cvlface.main([str(source), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {dst.absolute()} already exists; choose a new path, or replace it with --overwrite.\n"
    assert (dst / "config.json").read_bytes() == before
    assert cvlface.main([str(source), str(dst), "--overwrite"]) == 0 and checkpoint.is_checkpoint(dst)
    # A folder that is not a checkpoint is never replaced, with --overwrite or not.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x")
    assert cvlface.main([str(source), str(other), "--overwrite"]) == 1
    assert "is a folder that is not a vitnt-jax checkpoint" in capsys.readouterr().err
    assert (other / "keep.jpg").read_bytes() == b"x"


def test_mtcnn_weights_are_never_replaced_without_overwrite(tmp_path, capsys):
    dst = tmp_path / "w.npz"
    dst.write_bytes(b"keep")
    assert mtcnn.main([str(tmp_path), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {dst} already exists; choose another path, or replace it with --overwrite.\n"
    assert dst.read_bytes() == b"keep"


def test_an_error_is_one_line_and_debug_shows_its_traceback(tmp_path, capsys, monkeypatch):
    argv = [str(tmp_path / "absent.pt"), str(tmp_path / "out")]
    assert cvlface.main(argv) == 1
    assert capsys.readouterr().err == f"error: checkpoint {tmp_path / 'absent.pt'} does not exist; check the path.\n"
    assert cvlface.main([*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "ConversionError" in err
    assert err.splitlines()[-1] == f"error: checkpoint {tmp_path / 'absent.pt'} does not exist; check the path."
    monkeypatch.setenv("VITNT_JAX_DEBUG", "1")
    assert cvlface.main(argv) == 1
    assert capsys.readouterr().err.startswith("Traceback (most recent call last)")
