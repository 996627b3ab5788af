"""One parser and one error style: flag errors one line (exit 2), user errors one line (exit 1), --debug,
and `--help` that answers without importing JAX."""

import os
import subprocess
import sys

import pytest
from pipeline_helpers import faces_folder, run

from vitnt_jax import score

COMMANDS = ["vitnt_jax.score", "experiments.evaluate", "experiments.embeddings", "experiments.protocols"]


@pytest.fixture()
def folder(tmp_path):
    return faces_folder(tmp_path / "faces", n=2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--alpha", "-1"], "--alpha must be a positive number"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--root", "."], "--root only applies to the list source"),
        (["--num-processes", "2"], "need all of --num-processes, --process-id and --coordinator"),
        (["--save-embeddings", "e.csv"], "--save-embeddings e.csv must end in .npy"),
        (["--metric", "hamming"], "--metric must be one of"),
        (["--min-face-size", "5"], "--min-face-size must be at least 12 pixels"),
        (["--mtcnn-weights", "w.npz"], "--mtcnn-weights only applies to --align mtcnn"),
    ],
)
def test_flag_errors_are_one_line(tiny_checkpoint, folder, tmp_path, capsys, argv, message):
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "s.csv"), *argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "s.csv").exists()


def test_flag_errors_from_argparse_are_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        score.main(["--images", "x", "--model", "m", "--block", "-2:"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unrecognized arguments: --block") and "\n" not in err
    assert err.endswith("; see python -m vitnt_jax.score --help.")
    with pytest.raises(SystemExit) as stop:
        score.main(["--images", "x", "--model", "m", "--micro-batch", "some"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "--micro-batch: expected a number of images (0 = off) or auto" in err
    assert "\n" not in err


def test_output_path_problems_are_caught_before_work(tiny_checkpoint, folder, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "afile" / "s.csv", "which is a file")):
        assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out)) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --out {out} ") and message in err


def test_output_and_array_paths_must_differ(tiny_checkpoint, folder, tmp_path, capsys):
    same = tmp_path / "x.npy"
    argv = ["--images", str(folder), "--out", str(same), "--save-embeddings", str(tmp_path / "." / "x.npy")]
    assert run(tiny_checkpoint, *argv) == 1
    assert "--out, --save-embeddings and --save-patch-quality must be three different files" in capsys.readouterr().err
    assert not same.exists()


def test_debug_shows_the_traceback_and_its_cause(folder, tmp_path, capsys, monkeypatch):
    argv = ["--images", str(folder), "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s.csv")]
    assert score.main(argv) == 1
    plain = capsys.readouterr().err
    assert plain.startswith("error: ") and "Traceback" not in plain and plain.count("\n") == 1
    assert score.main([*argv, "--debug"]) == 1
    shown = capsys.readouterr().err
    assert "CheckpointError" in shown and "direct cause" in shown and "JobError" in shown
    assert shown.strip().splitlines()[-1] == plain.strip()
    monkeypatch.setenv("VITNT_JAX_DEBUG", "1")
    assert score.main(argv) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_and_flag_errors_answer_without_importing_jax(command):
    # Importing JAX takes seconds: --help and flag errors must not wait for it.
    probe = (
        "import runpy, sys; sys.argv = [sys.argv[0], *sys.argv[1:]]\n"
        "try:\n    runpy.run_module(sys.argv.pop(1), run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    print('jax imported' if 'jax' in sys.modules else 'no jax', stop.code, file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VITNT_JAX_DEBUG"}
    for argv, code in ((["--help"], 0), (["--no-such-flag"], 2)):
        done = subprocess.run(
            [sys.executable, "-c", probe, command, *argv], capture_output=True, text=True, timeout=60, env=env
        )
        last = done.stderr.strip().splitlines()[-1]
        assert last == f"no jax {code}", (command, argv, done.stderr)
        if code == 0:
            assert "usage:" in done.stdout
        else:
            assert done.stderr.strip().splitlines()[0].startswith("error: ") and "--help" in done.stderr


def test_metric_help_names_every_metric():
    from vitnt_jax.stability import METRICS

    text = next(a.help for a in score.build_parser()._actions if a.dest == "metric")
    named = text.split(":")[1].split("(")[0].replace(" or ", ", ").split(",")
    assert sorted(n.strip() for n in named) == sorted(METRICS)


def test_progress_lines_are_printed_once_with_a_root_handler(tiny_checkpoint, folder, tmp_path, capsys, monkeypatch):
    # A host (absl, logging.basicConfig) that gave the root logger a handler must not see every line twice.
    import logging

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    try:
        assert run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "s.csv")) == 0
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("scoring 2 of 2 inputs") == 1 and err.count("scored 2, failed 0") == 1, err


def test_an_error_line_spells_out_control_characters_and_keeps_other_text(capsys):
    from vitnt_jax.cli import run_command
    from vitnt_jax.errors import UserError

    name = "caf\u00e9 \u540d\x1b[2J.csv\rfake line\ncannot be read\udcff"  # a file name may hold all of these

    def body():
        raise UserError("{out} " + name + "; choose another path.", field="out")

    assert run_command(body, names=lambda setting: "--" + setting) == 1
    shown = "caf\u00e9 \u540d\\x1b[2J.csv\\rfake line\\ncannot be read\\udcff"
    assert capsys.readouterr().err == f"error: --out {shown}; choose another path.\n"
