"""Named models: resolution, one-time conversion into the cache, and the offline error (no network)."""

import csv
import logging

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from vitnt_jax import checkpoint, models, score
from vitnt_jax.config import PRESETS
from vitnt_jax.model import init_variables

import torch_reference as tr
from helpers import smooth_faces


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """Replaces the download with a local file of the CVLface layout (the tiny testing variant)."""
    model = tr.randomize(tr.FaceViT(PRESETS["testing"]), seed=9)
    local = tmp_path / "hub" / "model.pt"
    local.parent.mkdir()
    torch.save({f"net.{k}": v for k, v in model.state_dict().items()}, local)
    calls = []

    def download(repo_id, filename, target):
        calls.append((repo_id, filename))
        return local

    monkeypatch.setattr(models, "hub_download", download)
    return calls


def test_paths_pass_through(tmp_path):
    assert models.resolve(tmp_path) == tmp_path
    assert models.resolve("./relative/ckpt").as_posix() == "relative/ckpt"


def test_named_model_is_downloaded_and_converted_once(cache, fake_hub):
    first = models.resolve("cvlface_vit_base_webface4m")
    assert first == cache / "cvlface_vit_base_webface4m" and checkpoint.is_checkpoint(first)
    assert fake_hub == [("minchul/cvlface_adaface_vit_base_webface4m", "pretrained_model/model.pt")]
    assert models.resolve("cvlface_vit_base_webface4m") == first
    assert len(fake_hub) == 1  # cached: no second download
    assert checkpoint.load(first)[0].name == "testing"


def test_offline_is_one_clear_sentence(cache, monkeypatch):
    def offline(repo_id, filename, target):
        raise ConnectionError("huggingface.co is unreachable")

    monkeypatch.setattr(models, "hub_download", offline)
    with pytest.raises(models.ModelError) as error:
        models.resolve("timm_vit_base_patch16_224")
    text = str(error.value)
    assert "could not download model.safetensors" in text and "huggingface.co is unreachable" in text
    assert "https://huggingface.co/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k" in text
    assert "python -m converters.timm FILE" in text and "\n" not in text


def test_manual_and_unknown_names(cache):
    with pytest.raises(
        models.ModelError, match="not on the Hugging Face Hub: download model.pt .*converters.insightface"
    ):
        models.resolve("insightface_vit_b_webface42m")
    with pytest.raises(models.ModelError, match="neither a converted checkpoint folder nor a known model name"):
        models.resolve("resnet_50")


def test_scorer_defaults_to_the_papers_backbone(cache, fake_hub, tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for i, face in enumerate(smooth_faces(3)):
        Image.fromarray(face).save(faces / f"{i}.png")
    out = tmp_path / "s.csv"
    assert score.main(["--images", str(faces), "--out", str(out)]) == 0
    assert fake_hub and fake_hub[0][0] == "minchul/cvlface_adaface_vit_base_webface4m"
    with open(out, newline="") as f:
        assert len(list(csv.reader(f))) == 4


def test_scorer_offline_without_model_is_one_line(cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(models, "hub_download", lambda *a: (_ for _ in ()).throw(OSError("no network")))
    faces = tmp_path / "faces"
    faces.mkdir()
    Image.fromarray(smooth_faces(1)[0]).save(faces / "a.png")
    assert score.main(["--images", str(faces), "--out", str(tmp_path / "s.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: could not download pretrained_model/model.pt") and "convert it with" in err


def test_listing(capsys):
    assert models.main([]) == 0
    out = capsys.readouterr().out
    for name, model in models.MODELS.items():
        assert name in out and model.licence in out
    assert "Default: cvlface_vit_base_webface4m" in out


def test_hub_download_calls_huggingface_hub_with_a_bounded_wait(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # skip the reachability check: no network in tests
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda repo, name, **kw: calls.append((repo, name, kw)) or str(tmp_path / "f.pt"),
    )
    assert models.hub_download("a/b", "c.pt", tmp_path) == tmp_path / "f.pt"
    assert calls[0][:2] == ("a/b", "c.pt") and calls[0][2]["etag_timeout"] == 10


def test_concurrent_first_use_reuses_the_other_conversion(cache, fake_hub, monkeypatch):
    from converters import cvlface

    real = cvlface.convert

    def racing(src, dst, **kwargs):  # another process finishes first, then ours finds DST taken
        real(src, dst, **kwargs)
        return real(src, dst, **kwargs)

    monkeypatch.setattr(cvlface, "convert", racing)
    assert checkpoint.is_checkpoint(models.resolve("cvlface_vit_base_webface4m"))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture()
def model_log():
    handler = _Records()
    logger = logging.getLogger("vitnt_jax.models")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def _no_network(*args):
    pytest.fail("the testing model tried to download")


def test_the_testing_model_is_seeded_random_weights_built_offline(cache, monkeypatch, model_log):
    monkeypatch.setattr(models, "hub_download", _no_network)
    first = models.resolve("testing")
    assert first == cache / "testing"
    config, meta = checkpoint.load_config(first)
    assert config == PRESETS["testing"]
    assert meta["source"] == {"family": "random", "seed": 0, "note": models.RANDOM_WEIGHTS}
    got = jax.tree_util.tree_leaves_with_path(checkpoint.load(first)[1])
    want = jax.tree_util.tree_leaves_with_path(init_variables(PRESETS["testing"], seed=0))
    assert len(got) == len(want) > 0
    for (path, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
    written = (first / "config.json").stat().st_mtime_ns
    assert models.resolve("testing") == first and (first / "config.json").stat().st_mtime_ns == written  # reused
    # Labelled every time it is used, in the listing and in its metadata.
    assert model_log == ["model 'testing': random weights: measures nothing, for trying the pipeline offline"] * 2
    assert models.RANDOM_WEIGHTS in models.MODELS["testing"].description
    assert models.RANDOM_WEIGHTS in models.MODELS["testing"].input_contract


def test_the_testing_model_scores_a_folder_end_to_end_offline(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "hub_download", _no_network)
    faces = tmp_path / "faces"
    faces.mkdir()
    for i, face in enumerate(smooth_faces(3, size=48)):
        Image.fromarray(face).save(faces / f"{i}.png")
    out = tmp_path / "x.csv"
    assert score.main(["--images", str(faces), "--model", "testing", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "quality", "error"] and [r[0] for r in rows[1:]] == ["0.png", "1.png", "2.png"]
    assert all(0 < float(r[1]) <= 1 and r[2] == "" for r in rows[1:])


def test_an_unknown_name_fails_at_once_before_jax_or_any_download():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from vitnt_jax import models\n"
        "def download(*args):\n"
        "    raise AssertionError('downloaded')\n"
        "try:\n"
        "    models.resolve('clip_vit_b16', download=download)\n"
        "except models.ModelError as error:\n"
        "    print(error)\n"
        "print('jax' in sys.modules, 'vitnt_jax.checkpoint' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    message, imported = out.strip().splitlines()
    assert message == (
        "model 'clip_vit_b16' is neither a converted checkpoint folder nor a known model name; did you mean "
        f"clip_vit_b16_openai? (known names: {', '.join(models.MODELS)}; python -m vitnt_jax.models lists them)."
    )
    assert imported == "False False"


@pytest.mark.parametrize("name", ["testing", "cvlface_vit_base_webface4m"])
def test_a_cache_that_is_a_file_is_one_sentence_naming_the_variable(tmp_path, monkeypatch, name):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setattr(models, "hub_download", lambda *args: pytest.fail("a download was started"))
    with pytest.raises(models.ModelError) as caught:
        models.resolve(name)
    assert str(caught.value) == (
        f"${models.CACHE_ENV} ({tmp_path / 'cache'}) is a file, not a folder; point ${models.CACHE_ENV} at a folder "
        "where converted models may be kept."
    )
    with pytest.raises(models.ModelError, match="is a file, not a folder"):
        models.mtcnn_weights()


def test_a_damaged_named_model_in_the_cache_says_to_delete_it(cache, monkeypatch):
    monkeypatch.setattr(models, "hub_download", _no_network)
    folder = models.resolve("testing")
    victim = max((p for p in (folder / "variables").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load(models.resolve("testing"))
    assert str(caught.value) == (
        f"checkpoint {folder} is damaged: its weights do not match the checksum recorded when it was converted; "
        f"delete {folder} so that the named model is converted again on the next run."
    )
