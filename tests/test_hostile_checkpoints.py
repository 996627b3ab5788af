"""Checkpoints that are damaged, absurd or hostile: each is refused in one sentence, none runs code."""

import json

import numpy as np
import torch

from converters import cvlface
from vitnt_jax import checkpoint
from vitnt_jax.config import PRESETS
from vitnt_jax.model import init_variables

import torch_reference as tr

CFG = PRESETS["testing"]


def _converted(tmp_path, name="model.pt"):
    src = tmp_path / name
    torch.save(dict(tr.randomize(tr.FaceViT(CFG), seed=0).state_dict()), src)
    return src, cvlface.convert(src, tmp_path / "ckpt", "testing")


def test_describe_names_the_folder_the_source_file_and_its_sha256(tmp_path):
    src, ckpt = _converted(tmp_path, "ViT-T-CASIA.pth")
    digest = __import__("hashlib").sha256(src.read_bytes()).hexdigest()
    assert checkpoint.describe(ckpt) == f"checkpoint {ckpt} (from ViT-T-CASIA.pth, sha256 {digest})"


def test_describe_of_a_checkpoint_without_a_recorded_source_names_the_folder(tmp_path):
    ckpt = checkpoint.save(tmp_path / "plain", CFG, init_variables(CFG))
    assert checkpoint.describe(ckpt) == f"checkpoint {ckpt}"
    meta = json.loads((ckpt / "config.json").read_text())
    meta.pop("source")  # as an older writer may have left it
    (ckpt / "config.json").write_text(json.dumps(meta))
    assert checkpoint.describe(ckpt) == f"checkpoint {ckpt}"
    assert checkpoint.describe(tmp_path / "missing") == f"checkpoint {tmp_path / 'missing'}"
    assert np.isfinite(checkpoint.load(ckpt)[1]["params"]["pos_embed"]).all()
