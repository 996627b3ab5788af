"""CVLface converter: parity with our PyTorch module of the published layout, and strictness."""

import pickle

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters import cvlface
from converters.state_dict import ConversionError, read_checkpoint, unwrap
from vitnt_jax import checkpoint
from vitnt_jax.cli import flag
from vitnt_jax.config import PRESETS
from vitnt_jax.model import FaceViT, TraceTap
from vitnt_jax.scorer import Scorer
from vitnt_jax.stability import ScoreSettings

import torch_reference as tr

CFG = PRESETS["testing"]


@pytest.fixture(scope="module")
def torch_model():
    return tr.randomize(tr.FaceViT(CFG, mask_token=True), seed=0)


@pytest.fixture(scope="module")
def converted(torch_model, tmp_path_factory):
    """The torch model saved as CVLface's pretrained_model/model.pt (net. keys), converted by the CLI."""
    root = tmp_path_factory.mktemp("cvlface")
    src = root / "model.pt"
    torch.save({f"net.{k}": v for k, v in torch_model.state_dict().items()}, src)
    assert cvlface.main([str(src), str(root / "ckpt")]) == 0
    return checkpoint.load(root / "ckpt")


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, CFG.img_size, CFG.img_size, generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_every_block_attention_and_embedding_match_pytorch(torch_model, converted, images):
    config, variables = converted
    assert config == CFG
    outputs, attentions, embedding = torch_model.trace(images)
    ours = FaceViT(config, precision="highest").apply(
        variables, images.permute(0, 2, 3, 1).numpy(), tap=TraceTap(), embed=True
    )
    with torch.no_grad():
        for t in range(CFG.depth):
            np.testing.assert_allclose(ours["per_block"]["tokens"][t], outputs[t].numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(
                ours["per_block"]["normed"][t], torch_model.norm(outputs[t]).numpy(), atol=1e-5, rtol=0
            )
            np.testing.assert_allclose(ours["per_block"]["attention"][t], attentions[t].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours["embedding"], embedding.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("blocks", [(0, 1, 2), (0, 2), (1, 2)])
@pytest.mark.parametrize("aggregation, attention", [("mean", "last"), ("attention", "last"), ("attention", "all")])
def test_scores_match_vectorised_pytorch_oracle(torch_model, converted, images, blocks, aggregation, attention):
    config, variables = converted
    expected = tr.oracle_score(torch_model, images, blocks, 8.0, aggregation, attention)
    # The scorer takes uint8 RGB; feed exact [-1, 1] floats through the same maths instead.
    from vitnt_jax.model import truncate_blocks
    from vitnt_jax.scorer import score_streaming

    settings = ScoreSettings(blocks, alpha=8.0, aggregation=aggregation, attention=attention)
    got = score_streaming(
        config,
        truncate_blocks(variables, settings.num_blocks_to_run),
        images.permute(0, 2, 3, 1).numpy(),
        settings,
        precision="highest",
    )
    np.testing.assert_allclose(got["quality"], expected["quality"].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["patch_quality"], expected["patch_quality"].numpy(), atol=1e-5, rtol=0)
    assert np.ptp(expected["quality"].numpy()) > 1e-3  # the images really score differently


def test_uint8_preprocessing_matches_reference_scaling(torch_model, converted):
    config, variables = converted
    u8 = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    expected = tr.oracle_score(torch_model, x, (0, 1, 2))["quality"].numpy()
    got = Scorer(config, variables, ScoreSettings((0, 1, 2)))(u8)["quality"]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def _variables_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"net.{k}": v for k, v in sd.items()}},
        lambda sd: {"model": {f"model.net.{k}": v for k, v in sd.items()}, "epoch": torch.tensor(3)},
    ],
    ids=["plain", "module", "state_dict+net", "model+model.net"],
)
def test_wrappings_and_prefixes(torch_model, converted, tmp_path, wrap):
    src = tmp_path / "model.pt"
    torch.save(wrap(dict(torch_model.state_dict())), src)
    cvlface.convert(src, tmp_path / "out")
    assert _variables_equal(checkpoint.load(tmp_path / "out")[1], converted[1])


def test_safetensors_with_model_net_prefix(torch_model, converted, tmp_path):
    # CVLface's hub repos also ship model.safetensors of the wrapper, keys "model.net.*".
    state = {f"model.net.{k}": v.contiguous() for k, v in torch_model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    cvlface.convert(tmp_path / "model.safetensors", tmp_path / "out")
    assert _variables_equal(checkpoint.load(tmp_path / "out")[1], converted[1])


def test_fp16_weights_are_widened(torch_model, tmp_path):
    torch.save(torch_model.half().state_dict(), tmp_path / "half.pt")
    torch_model.float()
    config, variables = checkpoint.load(cvlface.convert(tmp_path / "half.pt", tmp_path / "out"))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))


def _state(torch_model):
    return {k: v.clone() for k, v in torch_model.state_dict().items()}


def test_missing_and_unexpected_keys_are_named(torch_model):
    state = _state(torch_model)
    del state["blocks.1.attn.proj.bias"]
    state["blocks.1.attn.proj.bais"] = torch.zeros(CFG.embed_dim)
    with pytest.raises(ConversionError) as error:
        cvlface.convert_state_dict(state, "testing")
    message = str(error.value)
    assert "missing keys [blocks.1.attn.proj.bias]" in message
    assert "unexpected keys [blocks.1.attn.proj.bais]" in message


def test_shape_mismatch_names_key_and_both_shapes(torch_model):
    state = _state(torch_model)
    state["blocks.2.mlp.fc1.weight"] = torch.zeros(7, CFG.embed_dim)
    with pytest.raises(ConversionError, match=r"blocks\.2\.mlp\.fc1\.weight has shape \(7, 16\), expected \(32, 16\)"):
        cvlface.convert_state_dict(state, "testing")


def test_qkv_bias_is_unexpected_for_cvlface(torch_model):
    state = _state(torch_model)
    state["blocks.0.attn.qkv.bias"] = torch.zeros(3 * CFG.embed_dim)
    with pytest.raises(ConversionError, match=r"unexpected keys \[blocks\.0\.attn\.qkv\.bias\]"):
        cvlface.convert_state_dict(state, "testing")


def test_training_only_keys_are_dropped(torch_model):
    state = _state(torch_model)
    assert "mask_token" in state and "feature.1.num_batches_tracked" in state
    config, _, variant = cvlface.convert_state_dict(state)
    assert variant == "testing" and config == CFG


def test_variant_inference_and_its_error(torch_model):
    assert cvlface.infer_variant(_state(torch_model)) == "testing"
    state = {k: v for k, v in _state(torch_model).items() if not k.startswith("blocks.2.")}
    with pytest.raises(ConversionError, match="depth 2, width 16, MLP 32, patch 8.*set variant if") as error:
        cvlface.infer_variant(state)
    assert error.value.render(flag).endswith("; set --variant if it is one of them.")  # as the CLI words it
    with pytest.raises(ConversionError, match="not a CVLface ViT state_dict"):
        cvlface.infer_variant({"conv1.weight": torch.zeros(1)})


@pytest.mark.parametrize("variant", ["small", "base"])
def test_full_size_layout_is_inferred_and_maps_exactly(variant):
    """The real CVLface shapes: variant inferred, every key mapped, scores equal PyTorch's.

    Catches preset errors that shapes cannot show (the head count) at the published size.
    """
    name = cvlface.VARIANTS[variant]
    cfg = PRESETS[name]
    torch_model = tr.randomize(tr.FaceViT(cfg), seed=1)
    state = {f"net.{k}": v for k, v in torch_model.state_dict().items()}
    config, variables, inferred = cvlface.convert_state_dict(unwrap(state, (), ("net.",)))
    assert (inferred, config) == (variant, cfg)
    image = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blocks = (0, 1, 2, 3)
    expected = tr.oracle_score(torch_model, image, blocks, alpha=8.0)["quality"].numpy()
    from vitnt_jax.model import truncate_blocks
    from vitnt_jax.scorer import score_streaming

    got = score_streaming(
        config,
        truncate_blocks(variables, 4),
        image.permute(0, 2, 3, 1).numpy(),
        ScoreSettings(blocks),
        precision="highest",
    )["quality"]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_cli_truncated_checkpoint_is_one_clear_line(torch_model, tmp_path, capsys):
    src = tmp_path / "model.pt"
    torch.save(torch_model.state_dict(), src)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    assert cvlface.main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not read") and "truncated" in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_missing_file_and_existing_destination(torch_model, tmp_path, capsys):
    assert cvlface.main([str(tmp_path / "nope.pt"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    src = tmp_path / "model.pt"
    torch.save(torch_model.state_dict(), src)
    assert cvlface.main([str(src), str(tmp_path / "out")]) == 0
    assert cvlface.main([str(src), str(tmp_path / "out")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cvlface.main([str(src), str(tmp_path / "out"), "--overwrite"]) == 0


class Payload:
    """A pickled object that must never be instantiated by our loader."""

    def __reduce__(self):
        return (print, ("this must not run",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    src = tmp_path / "evil.pt"
    torch.save({"state_dict": {"pos_embed": torch.zeros(1)}, "extra": Payload()}, src)
    with pytest.raises(
        ConversionError,
        match="holds Python objects other than tensors .*; refusing it, since loading it could run code",
    ):
        read_checkpoint(src)
    assert "this must not run" not in capsys.readouterr().out
    # A plain pickle (not a torch zip archive) is refused the same way, never unpickled.
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"a": Payload()}))
    with pytest.raises(ConversionError):
        read_checkpoint(tmp_path / "raw.pt")
    assert "this must not run" not in capsys.readouterr().out


def test_unwrap_rejects_non_dict():
    with pytest.raises(ConversionError, match="not a state_dict"):
        unwrap([1, 2], ("state_dict",), ("net.",))


def test_overwrite_never_deletes_a_foreign_folder(torch_model, tmp_path):
    src = tmp_path / "model.pt"
    torch.save(torch_model.state_dict(), src)
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.txt").write_text("years of work")
    with pytest.raises(ConversionError, match="not a vitnt-jax checkpoint; refusing to replace it"):
        cvlface.convert(src, precious, overwrite=True)
    assert (precious / "chapter1.txt").read_text() == "years of work"
    inside = tmp_path / "ckpt"
    inside.mkdir()
    torch.save(torch_model.state_dict(), inside / "model.pt")
    with pytest.raises(ConversionError, match="contains the source"):
        cvlface.convert(inside / "model.pt", inside, overwrite=True)
    assert (inside / "model.pt").exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConversionError, match="not a folder"):
        cvlface.convert(src, tmp_path / "a_file", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("id,quality\nnot a checkpoint\n"), "neither safetensors .* nor a PyTorch checkpoint"),
        (lambda p: p.mkdir(), "is a folder; pass the .pt"),
    ],
)
def test_foreign_sources_are_one_clear_error(tmp_path, make, message):
    src = tmp_path / "model.pt"
    make(src)
    with pytest.raises(ConversionError, match=message):
        read_checkpoint(src)


def test_prefix_collisions_are_refused(torch_model):
    state = {f"net.{k}": v for k, v in torch_model.state_dict().items()}
    state["blocks.0.norm1.weight"] = torch.full((CFG.embed_dim,), 7.0)
    with pytest.raises(ConversionError, match="both name 'blocks.0.norm1.weight'"):
        unwrap(state, cvlface.WRAPPERS, cvlface.PREFIXES)


def test_fp16_values_survive_widening(torch_model, converted, tmp_path):
    half = {k: v.half() if v.is_floating_point() else v for k, v in torch_model.state_dict().items()}
    torch.save(half, tmp_path / "half.pt")
    _, variables = checkpoint.load(cvlface.convert(tmp_path / "half.pt", tmp_path / "out"))
    np.testing.assert_array_equal(variables["params"]["pos_embed"], half["pos_embed"].float().numpy())
    np.testing.assert_allclose(variables["params"]["pos_embed"], converted[1]["params"]["pos_embed"], atol=1e-3)


def test_damaged_checkpoint_metadata(converted, tmp_path):
    import shutil

    from vitnt_jax.config import PRESETS as presets

    target = tmp_path / "ck"
    checkpoint.save(target, presets["testing"], converted[1])
    (target / "config.json").write_text("[]")
    with pytest.raises(checkpoint.CheckpointError, match="not a version-1 vitnt-jax checkpoint"):
        checkpoint.load(target)
    shutil.rmtree(target)
    (tmp_path / "model.pt").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is a file; convert it first"):
        checkpoint.load(tmp_path / "model.pt")
