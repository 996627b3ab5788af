"""experiments.benchmark_align and experiments.aligned_example: their command lines and one small run."""

import json

import pytest

from experiments import aligned_example, benchmark_align
from experiments import torch_mtcnn as tm

needs_facenet = pytest.mark.skipif(tm.facenet_data() is None, reason="facenet-pytorch (data only) is not installed")


@pytest.mark.parametrize("module", [benchmark_align, aligned_example])
def test_an_existing_result_is_never_replaced_without_overwrite(module, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("keep")
    assert module.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {out} exists; pass --overwrite to replace it, or choose another --out.\n"
    assert out.read_text() == "keep"


@pytest.mark.parametrize("module, prog", [(benchmark_align, "benchmark_align"), (aligned_example, "aligned_example")])
def test_a_flag_error_is_one_line_with_status_2(module, prog, capsys):
    with pytest.raises(SystemExit) as stop:
        module.main(["--batch", "3"])  # the flag is --batch-size, as everywhere
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unrecognized arguments: --batch 3") and err.count("\n") == 1
    assert err.strip().endswith(f"see python -m experiments.{prog} --help.")


@needs_facenet
def test_a_small_benchmark_run_writes_its_report(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["--count", "2", "--runs", "1", "--reference", "1", "--sets", "lfw_like", "--out", str(out)]
    assert benchmark_align.main(argv) == 0
    report = json.loads(out.read_text())
    row = report["sets"]["lfw_like"]
    assert row["images"] == 2 and row["aligned_faces"] == 2 and row["reference_images"] == 1
    assert report["batch"] == 16 and report["planned_pnet_shapes"]["images"] == 1500
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}")
