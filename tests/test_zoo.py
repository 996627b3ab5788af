"""Model zoo: insightface / TransFace / CLIP / timm layouts convert exactly (our PyTorch modules
of each published layout, random weights) and score with the class token handled as documented."""

import copy
import dataclasses

import jax
import numpy as np
import pytest
import torch

from converters import clip, insightface
from converters import timm as timm_converter
from converters.state_dict import ConversionError
from vitnt_jax import checkpoint
from vitnt_jax.cli import flag
from vitnt_jax.config import PRESETS
from vitnt_jax.model import FaceViT, TraceTap, truncate_blocks
from vitnt_jax.scorer import score_streaming
from vitnt_jax.stability import ScoreSettings

import torch_reference as tr
from helpers import tiny_clip_config

TOL = 1e-5


def _close(ours, theirs, tol=TOL):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    scale = max(1.0, float(np.abs(theirs).max()))  # absolute, or relative to the magnitude
    np.testing.assert_allclose(ours, theirs, atol=tol * scale, rtol=0)


def _compare(config, variables, torch_model, images, prefix):
    """Every block's patch tokens, the attention to patch keys and the embedding equal PyTorch's."""
    outputs, attentions, embedding = torch_model.trace(images)
    ours = FaceViT(config, precision="highest").apply(
        variables, images.permute(0, 2, 3, 1).numpy(), tap=TraceTap(), embed=True
    )
    with torch.no_grad():
        for t in range(config.depth):
            _close(ours["per_block"]["tokens"][t], outputs[t][:, prefix:].numpy())
            _close(ours["per_block"]["attention"][t], attentions[t][..., prefix:].numpy())
    _close(ours["embedding"], embedding.detach().numpy())


def _score_parity(config, variables, torch_model, images, prefix):
    for blocks, aggregation, attention in [
        ((0, 1, 2), "mean", "last"),
        ((0, 1, 2), "attention", "last"),
        ((0, 2), "attention", "all"),
    ]:
        settings = ScoreSettings(blocks, aggregation=aggregation, attention=attention)
        want = tr.oracle_score_prefixed(torch_model, images, blocks, 8.0, aggregation, attention, prefix)
        got = score_streaming(
            config,
            truncate_blocks(variables, settings.num_blocks_to_run),
            images.permute(0, 2, 3, 1).numpy(),
            settings,
            precision="highest",
        )
        _close(got["quality"], want["quality"].numpy())
        _close(got["patch_quality"], want["patch_quality"].numpy())


def _images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("family", ["insightface", "transface"])
def test_insightface_and_transface_vit_t_through_the_cli(family, tmp_path):
    cfg = PRESETS[f"{family}_vit_t"]
    model = tr.TransFaceViT(cfg) if family == "transface" else tr.FaceViT(cfg, mask_token=True)
    model = tr.randomize(model, seed=2)
    # A full training checkpoint: the backbone (module.-prefixed) next to other state.
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"epoch": 3, "state_dict_backbone": state, "state_dict_softmax_fc": {"w": torch.zeros(2)}},
        tmp_path / "checkpoint_gpu_0.pt",
    )
    assert insightface.main([str(tmp_path / "checkpoint_gpu_0.pt"), str(tmp_path / "ck")]) == 0
    config, variables = checkpoint.load(tmp_path / "ck")
    assert config == cfg and config.grid_size == 12 and config.num_patches == 144
    images = _images(2, 112)
    _compare(config, variables, model, images, prefix=0)
    _score_parity(config, variables, model, images, prefix=0)


def test_pixels_past_the_patch_grid_are_never_read(tmp_path):
    cfg = PRESETS["insightface_vit_t"]
    model = tr.randomize(tr.FaceViT(cfg, mask_token=True), seed=4)
    _, variables, variant = insightface.convert_state_dict(dict(model.state_dict()))
    assert variant == "vit_t"
    images = np.random.default_rng(0).uniform(-1, 1, (1, 112, 112, 3)).astype(np.float32)
    changed = images.copy()
    changed[:, 108:, :, :] = 5.0
    changed[:, :, 108:, :] = -5.0
    run = lambda x: FaceViT(cfg).apply(variables, x, embed=True)["embedding"]  # noqa: E731
    np.testing.assert_array_equal(run(images), run(changed))


def test_insightface_variant_inference_and_errors():
    for variant in insightface.VARIANTS:
        with torch.device("meta"):
            model = tr.FaceViT(PRESETS[f"insightface_{variant}"], mask_token=True)
        assert insightface.infer_variant(model.state_dict()) == variant
    with torch.device("meta"):
        state = tr.FaceViT(PRESETS["cvlface_vit_base"]).state_dict()  # patch 8: not insightface
    with pytest.raises(ConversionError, match="matches no insightface ViT.*set variant if") as error:
        insightface.infer_variant(state)
    assert error.value.render(flag).endswith("; set --variant if it is one of them.")  # as the CLI words it


def test_insightface_strictness():
    cfg = PRESETS["insightface_vit_t"]
    state = dict(tr.FaceViT(cfg, mask_token=True).state_dict())
    del state["blocks.3.mlp.fc2.bias"]
    state["blocks.3.mlp.fc3.bias"] = torch.zeros(3)
    state["norm.weight"] = torch.zeros(7)
    with pytest.raises(
        ConversionError,
        match=r"missing keys \[blocks\.3\.mlp\.fc2\.bias\].*unexpected keys \[blocks\.3\.mlp\.fc3\.bias\]",
    ):
        insightface.convert_state_dict(state)
    del state["blocks.3.mlp.fc3.bias"]
    state["blocks.3.mlp.fc2.bias"] = torch.zeros(256)
    with pytest.raises(ConversionError, match=r"norm\.weight has shape \(7,\), expected \(256,\)"):
        insightface.convert_state_dict(state)


TINY_CLIP = tiny_clip_config()
TINY_TIMM = dataclasses.replace(
    PRESETS["timm_vit_base_patch16_224"],
    name="tiny_timm",
    img_size=32,
    patch_size=8,
    embed_dim=16,
    depth=3,
    num_heads=2,
    embedding_dim=16,
)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_clip_layout_parity(activation):
    cfg = dataclasses.replace(TINY_CLIP, activation=activation)
    model = tr.perturb(tr.Clip(cfg), seed=5)
    config, variables = clip.convert_state_dict(dict(model.state_dict()), activation, config=TINY_CLIP)
    assert config.activation == activation
    images = _images(3, 32, seed=1)
    with torch.no_grad():
        _compare(config, variables, model, images, prefix=1)
        _score_parity(config, variables, model, images, prefix=1)


def test_clip_openai_torchscript_archive_through_the_cli(tmp_path):
    """The real ViT-B/16 size, saved as OpenAI does: a TorchScript archive with fp16 weights."""
    cfg = PRESETS["clip_vit_b16"]
    model = tr.perturb(tr.Clip(cfg), seed=6, scale=0.02)
    images = _images(1, 224, seed=2)
    model.half().float()  # fp16-representable weights, as OpenAI ships them
    with torch.no_grad():
        archive = torch.jit.trace(copy.deepcopy(model), images)
    torch.jit.save(archive.half(), str(tmp_path / "ViT-B-16.pt"))
    assert clip.main([str(tmp_path / "ViT-B-16.pt"), str(tmp_path / "ck")]) == 0
    config, variables = checkpoint.load(tmp_path / "ck")
    assert config.name == "clip_vit_b16" and config.activation == "quick_gelu"
    with torch.no_grad():
        _, _, embedding = model.trace(images)
    ours = FaceViT(config, precision="highest").apply(variables, images.permute(0, 2, 3, 1).numpy(), embed=True)
    _close(ours["embedding"], embedding.numpy())


def test_clip_rejects_non_clip_files():
    with pytest.raises(ConversionError, match="no visual"):
        clip.convert_state_dict({"blocks.0.norm1.weight": torch.zeros(2)})


def test_timm_layout_parity_and_classifier_dropped():
    model = tr.perturb(tr.TimmViT(TINY_TIMM), seed=7)
    state = dict(model.state_dict())
    assert "head.weight" in state
    config, variables = timm_converter.convert_state_dict(state, TINY_TIMM)
    images = _images(3, 32, seed=3)
    with torch.no_grad():
        _compare(config, variables, model, images, prefix=1)
        _score_parity(config, variables, model, images, prefix=1)
    state["blocks.0.ls1.gamma"] = torch.ones(16)  # layer scale: a layout we do not convert
    with pytest.raises(ConversionError, match=r"unexpected keys \[blocks\.0\.ls1\.gamma\]"):
        timm_converter.convert_state_dict(state, TINY_TIMM)


def test_timm_real_size_through_the_cli(tmp_path):
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in tr.TimmViT(PRESETS["timm_vit_base_patch16_224"], 1000).state_dict().items()}
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    assert timm_converter.main([str(tmp_path / "model.safetensors"), str(tmp_path / "ck")]) == 0
    config, variables = checkpoint.load(tmp_path / "ck")
    assert config.name == "timm_vit_base_patch16_224" and config.num_tokens == 197


def test_class_token_attention_weights_are_renormalised_over_patches():
    model = tr.perturb(tr.TimmViT(TINY_TIMM), seed=8)
    config, variables = timm_converter.convert_state_dict(dict(model.state_dict()), TINY_TIMM)
    images = _images(2, 32, seed=4).permute(0, 2, 3, 1).numpy()
    out = score_streaming(config, truncate_blocks(variables, 3), images, ScoreSettings((0, 1, 2)))
    assert out["patch_weight"].shape == (2, 16)  # patches only, no class token
    np.testing.assert_allclose(np.asarray(out["patch_weight"]).sum(-1), 1.0, rtol=1e-6)
    assert jax.tree.leaves(variables["params"]["cls_token"])[0].shape == (1, 1, 16)
