"""Checkpoints that are damaged, absurd or hostile: each is refused in one sentence, none runs code."""

import dataclasses
import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from pipeline_helpers import faces_folder, run

from converters import cvlface
from converters.state_dict import ConversionError
from vitnt_jax import checkpoint
from vitnt_jax.config import PRESETS, ConfigError, ViTConfig
from vitnt_jax.model import init_variables

import torch_reference as tr
from helpers import tiny_clip_config

CFG = PRESETS["testing"]


def _converted(tmp_path, name="model.pt"):
    src = tmp_path / name
    torch.save(dict(tr.randomize(tr.FaceViT(CFG), seed=0).state_dict()), src)
    return src, cvlface.convert(src, tmp_path / "ckpt", "testing")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of the testing layout, written once; tests copy it before damaging it."""
    return checkpoint.save(tmp_path_factory.mktemp("saved") / "ckpt", CFG, init_variables(CFG, seed=3))


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "copy")


def _meta(ckpt):
    return json.loads((ckpt / "config.json").read_text())


def _write_meta(ckpt, meta):
    (ckpt / "config.json").write_text(json.dumps(meta))


def _one_line_error(call) -> str:
    with pytest.raises(checkpoint.CheckpointError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.endswith(".")
    return message


# ------------------------------------------------------------------------------------- which weights


def test_describe_names_the_folder_the_source_file_and_its_sha256(tmp_path):
    src, ckpt = _converted(tmp_path, "ViT-T-CASIA.pth")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert checkpoint.describe(ckpt) == f"checkpoint {ckpt} (from ViT-T-CASIA.pth, sha256 {digest})"


def test_describe_of_a_checkpoint_without_a_recorded_source_names_the_folder(tmp_path):
    ckpt = checkpoint.save(tmp_path / "plain", CFG, init_variables(CFG))
    assert checkpoint.describe(ckpt) == f"checkpoint {ckpt}"
    meta = _meta(ckpt)
    meta.pop("source")  # as an older writer may have left it
    _write_meta(ckpt, meta)
    assert checkpoint.describe(ckpt) == f"checkpoint {ckpt}"
    assert checkpoint.describe(tmp_path / "missing") == f"checkpoint {tmp_path / 'missing'}"


# ------------------------------------------------------------------------------------------ checksums


def test_the_weights_digest_is_recorded_at_conversion_and_is_that_of_the_loaded_arrays(saved, tmp_path):
    digest = checkpoint.weights_digest(saved)
    assert isinstance(digest, str) and len(digest) == 64
    assert checkpoint.weights_sha256(checkpoint.load(saved)[1]) == digest
    other = checkpoint.save(tmp_path / "other", CFG, init_variables(CFG, seed=4))
    assert checkpoint.weights_digest(other) != digest


def test_the_digest_covers_paths_dtypes_and_shapes_not_only_bytes():
    a = {"x": np.zeros(4, np.float32)}
    assert checkpoint.weights_sha256(a) != checkpoint.weights_sha256({"y": np.zeros(4, np.float32)})
    assert checkpoint.weights_sha256(a) != checkpoint.weights_sha256({"x": np.zeros((2, 2), np.float32)})
    assert checkpoint.weights_sha256(a) != checkpoint.weights_sha256({"x": np.zeros(4, np.int32)})
    assert checkpoint.weights_sha256({"a": a["x"], "b": a["x"] + 1}) == checkpoint.weights_sha256(
        {"b": a["x"] + 1, "a": a["x"]}
    )


def test_weights_saved_in_another_dtype_load_as_float32_with_their_checksum(tmp_path):
    import jax

    half = jax.tree.map(lambda a: np.asarray(a, np.float16), init_variables(CFG, seed=2))
    ckpt = checkpoint.save(tmp_path / "half", CFG, half)
    _, variables = checkpoint.load(ckpt)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
    assert checkpoint.weights_digest(ckpt) == checkpoint.weights_sha256(variables)


def test_a_flipped_bit_in_any_file_of_the_weights_is_refused_in_one_line(saved, tmp_path, capfd):
    files = sorted(p.relative_to(saved) for p in (saved / "variables").rglob("*") if p.is_file())
    # The array data (14,176 float32 parameters) is among them, in one data file or split over several.
    assert sum((saved / p).stat().st_size for p in files) > 40_000
    for name in files:
        size = (saved / name).stat().st_size
        for position in sorted({0, size // 2, size - 1}):
            ckpt = tmp_path / f"flip-{len(list(tmp_path.iterdir()))}"
            shutil.copytree(saved, ckpt)
            data = bytearray((ckpt / name).read_bytes())
            data[position] ^= 1 << (position % 8)
            (ckpt / name).write_bytes(bytes(data))
            message = _one_line_error(lambda: checkpoint.load(ckpt))  # noqa: B023
            assert message == (
                f"checkpoint {ckpt} is damaged: its weights do not match the checksum recorded when it was "
                "converted; convert it again."
            ), (name, position)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err  # nothing from TensorStore's threads either


def test_a_missing_weights_file_is_named(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    victim = next(p for p in sorted((ckpt / "variables").rglob("*")) if p.is_file() and p.parent.name == "d")
    victim.unlink()
    message = _one_line_error(lambda: checkpoint.load(ckpt))
    assert message.startswith(f"checkpoint {ckpt} is damaged: its weights file variables/")
    assert message.endswith(" is missing; convert it again.")


def test_arrays_that_differ_from_the_recorded_digest_are_refused_even_with_matching_files(saved, tmp_path):
    # Another checkpoint's files, with their file checksums: only the weights digest can tell.
    ckpt = _copy(saved, tmp_path)
    other = checkpoint.save(tmp_path / "other", CFG, init_variables(CFG, seed=9))
    shutil.rmtree(ckpt / "variables")
    shutil.copytree(other / "variables", ckpt / "variables")
    meta = _meta(ckpt)
    meta["files_sha256"] = _meta(other)["files_sha256"]
    _write_meta(ckpt, meta)
    message = _one_line_error(lambda: checkpoint.load(ckpt))
    assert message == (
        f"checkpoint {ckpt} is damaged: its weights do not match the checksum recorded when it was converted; "
        "convert it again."
    )


def test_an_edited_config_is_refused_as_damaged(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    meta = _meta(ckpt)
    meta["config"]["layer_norm_eps"] = 1e-4  # valid, and different: scores would change silently
    _write_meta(ckpt, meta)
    message = _one_line_error(lambda: checkpoint.load_config(ckpt))
    assert message.startswith(f"checkpoint {ckpt} is damaged: its config.json settings do not match the checksum")


def test_a_checkpoint_without_checksums_loads_with_a_one_line_warning(saved, tmp_path, caplog):
    ckpt = _copy(saved, tmp_path)
    meta = _meta(ckpt)
    for key in ("config_sha256", "weights_sha256", "files_sha256"):
        meta.pop(key)  # as checkpoints written before the checksums
    _write_meta(ckpt, meta)
    with caplog.at_level(logging.WARNING, logger="vitnt_jax.checkpoint"):
        config, variables = checkpoint.load(ckpt)
    assert config == CFG and checkpoint.weights_digest(ckpt) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "vitnt_jax.checkpoint"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0] == (
        f"checkpoint {ckpt} records no checksum of its weights (written by an older vitnt-jax), so damage to it "
        "cannot be detected; convert it again to add one."
    )
    np.testing.assert_array_equal(variables["params"]["pos_embed"], checkpoint.load(saved)[1]["params"]["pos_embed"])


# ---------------------------------------------------------------------------------- absurd configs

ABSURD = [
    ("num_heads", 0, "num_heads is 0, but it must be a whole number from 1"),
    ("num_heads", -2, "num_heads is -2"),
    ("num_heads", 3, "num_heads is 3, but it must divide embed_dim (16)"),
    ("embed_dim", -16, "embed_dim is -16, but it must be a whole number from 1"),
    ("embed_dim", 0, "embed_dim is 0"),
    ("depth", 0, "depth is 0, but it must be a whole number from 1"),
    ("depth", 10**9, "depth is 1000000000"),
    ("embed_dim", 2**40, "embed_dim is 1099511627776"),
    ("img_size", 10**7, "img_size is 10000000"),
    ("img_size", 0, "img_size is 0"),
    ("patch_size", 0, "patch_size is 0"),
    ("patch_size", 64, "patch_size is 64, but it must be a whole number from 1 to 32 (img_size)"),
    ("in_channels", 4, "in_channels is 4, but it must be 3"),
    ("activation", "swish", "activation is 'swish', but it must be one of 'relu6', 'gelu', 'gelu_tanh', 'quick_gelu'"),
    ("activation", 6, "activation is 6"),
    ("mean", [], "mean is (), but it must be three finite numbers"),
    ("mean", [0.5], "mean is (0.5,)"),
    ("mean", "0.5", "mean is '0.5'"),
    ("std", [0.5, 0.5], "std is (0.5, 0.5)"),
    (
        "std",
        [0.5, 0.0, 0.5],
        "std is (0.5, 0.0, 0.5), but it must be three finite numbers (one per channel) from 0.001",
    ),
    ("std", [0.5, -0.5, 0.5], "std is (0.5, -0.5, 0.5)"),
    ("std", [0.5, float("nan"), 0.5], "std is (0.5, nan, 0.5)"),
    ("layer_norm_eps", -1e-5, "layer_norm_eps is -1e-05, but it must be a finite number from 1e-12 to 1"),
    ("layer_norm_eps", 0.0, "layer_norm_eps is 0.0"),
    ("layer_norm_eps", float("nan"), "layer_norm_eps is nan"),
    ("layer_norm_eps", float("inf"), "layer_norm_eps is inf"),
    ("head_batch_norm_eps", -2e-5, "head_batch_norm_eps is -2e-05"),
    ("mlp_ratio", 0, "mlp_ratio is 0, but it must be a finite number above 0"),
    ("mlp_ratio", -4.0, "mlp_ratio is -4.0"),
    ("mlp_ratio", 0.01, "mlp_ratio is 0.01, but the MLP width embed_dim * mlp_ratio must be from 1"),
    ("depth", 3.0, "depth is 3.0, but it must be a whole number"),
    ("depth", "3", "depth is '3'"),
    ("depth", True, "depth is True"),
    ("num_heads", None, "num_heads is None"),
    ("qkv_bias", 1, "qkv_bias is 1, but it must be true or false"),
    ("class_token", "yes", "class_token is 'yes'"),
    ("head", "arcface", "head is 'arcface', but it must be one of"),
    ("head", "cls", "class_token is false, but head 'cls' reads the class token"),
    ("embedding_dim", 0, "embedding_dim is 0"),
    ("embedding_dim", None, "embedding_dim is None with head 'face', but it must be null exactly when head is 'none'"),
    ("color", "grey", "color is 'grey', but it must be one of 'rgb', 'bgr'"),
    ("default_blocks", "7", "default_blocks is '7', which is no selection out of 3 blocks"),
    ("default_blocks", "1", "default_blocks is '1', but it must select at least two blocks"),
    ("default_blocks", 3, "default_blocks is 3"),
    ("name", "", "name is ''"),
]


@pytest.mark.parametrize("field, value, expected", ABSURD, ids=[f"{f}={v!r}" for f, v, _ in ABSURD])
def test_an_absurd_config_value_is_one_sentence_naming_the_field(saved, tmp_path, field, value, expected):
    ckpt = _copy(saved, tmp_path)
    meta = _meta(ckpt)
    meta.pop("config_sha256")  # as a checkpoint from before the checksums, or a crafted one
    meta["config"][field] = value
    _write_meta(ckpt, meta)
    message = _one_line_error(lambda: checkpoint.load_config(ckpt))
    assert message.startswith(f"{ckpt / 'config.json'} holds an invalid config: ")
    assert expected in message and message.endswith("; convert the checkpoint again.")
    with pytest.raises(ConfigError) as caught:
        ViTConfig.from_dict(meta["config"])
    assert field in str(caught.value) and expected in str(caught.value)


def test_every_preset_stays_valid_and_a_bad_field_is_a_user_error():
    from vitnt_jax.errors import UserError

    for config in PRESETS.values():
        assert ViTConfig.from_json(config.to_json()) == config
    with pytest.raises(UserError, match=r"^depth is '3', but it must be a whole number from 1 to 512\.$"):
        ViTConfig(depth="3")


def test_a_config_that_is_no_object_is_one_sentence(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    meta = _meta(ckpt)
    meta.pop("config_sha256")
    meta["config"] = [1, 2]
    _write_meta(ckpt, meta)
    assert (
        _one_line_error(lambda: checkpoint.load_config(ckpt))
        == f"{ckpt / 'config.json'} holds no config; convert the checkpoint again."
    )


def test_a_config_whose_shapes_disagree_with_the_stored_arrays_is_named(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    meta = _meta(ckpt)
    for key in ("config_sha256", "weights_sha256", "files_sha256"):
        meta.pop(key)
    meta["config"]["depth"] = 4  # valid on its own, but the arrays hold 3 blocks
    _write_meta(ckpt, meta)
    message = _one_line_error(lambda: checkpoint.load(ckpt))
    assert message.startswith(f"checkpoint {ckpt} does not match config 'testing': ")
    assert "params/blocks/attn/qkv/kernel is (3, 16, 48) but should be (4, 16, 48)" in message


def test_stored_shapes_of_an_unverified_checkpoint_are_checked_before_any_array_is_read(saved, tmp_path, monkeypatch):
    # Orbax allocates the shapes its metadata claims: a claim that disagrees with the config is
    # refused from the metadata alone (here the arrays hold 6 blocks, the config says 3).
    import orbax.checkpoint as ocp

    ckpt = _copy(saved, tmp_path)
    bigger = dataclasses.replace(CFG, depth=6)
    other = checkpoint.save(tmp_path / "bigger", bigger, init_variables(bigger, seed=1))
    shutil.rmtree(ckpt / "variables")
    shutil.copytree(other / "variables", ckpt / "variables")
    meta = _meta(ckpt)
    for key in ("weights_sha256", "files_sha256", "files_bytes"):
        meta.pop(key, None)
    _write_meta(ckpt, meta)
    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", lambda *a, **k: pytest.fail("arrays were restored"))
    message = _one_line_error(lambda: checkpoint.load(ckpt))
    assert message.startswith(f"checkpoint {ckpt} does not match config 'testing': ")
    assert "params/blocks/attn/qkv/kernel is (6, 16, 48) but should be (3, 16, 48)" in message


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[" * 100_000 + "]" * 100_000, "maximum recursion depth exceeded"),
        ('{"config": "' + "x" * (2 << 20) + '"}', "it is larger than 1048576 bytes"),
    ],
    ids=["nested-100000-deep", "2-MiB"],
)
def test_a_crafted_config_json_is_one_sentence(saved, tmp_path, text, reason):
    ckpt = _copy(saved, tmp_path)
    (ckpt / "config.json").write_text(text)
    message = _one_line_error(lambda: checkpoint.load(ckpt))
    assert message.startswith(f"{ckpt / 'config.json'} is unreadable (") and reason in message
    assert message.endswith("; convert the checkpoint again.") and len(message) < 400
    assert checkpoint.describe(ckpt) == f"checkpoint {ckpt}" and not checkpoint.is_checkpoint(ckpt)


def test_weights_holding_nan_or_infinity_are_not_converted(tmp_path, capsys):
    state = dict(tr.randomize(tr.FaceViT(CFG), seed=0).state_dict())
    state["blocks.1.norm1.weight"] = state["blocks.1.norm1.weight"].clone()
    state["blocks.1.norm1.weight"][3] = float("nan")
    state["norm.bias"] = torch.full_like(state["norm.bias"], float("inf"))
    torch.save(state, tmp_path / "model.pt")
    assert cvlface.main([str(tmp_path / "model.pt"), str(tmp_path / "ckpt"), "--variant", "testing"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: the checkpoint does not match CVLface ViT-testing: [norm.bias, blocks.1.norm1.weight] hold NaN or "
        "infinite values; the file is damaged or was saved from a diverged training run, get a sound copy."
    )
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "field, value, expected",
    [("layer_norm_eps", -1e-5, "layer_norm_eps is -1e-05"), ("std", [0.5, 0.0, 0.5], "std is (0.5, 0.0, 0.5)")],
)
def test_the_scorer_refuses_an_absurd_config_in_one_line(saved, tmp_path, capsys, field, value, expected):
    ckpt = _copy(saved, tmp_path)
    meta = _meta(ckpt)
    meta.pop("config_sha256")
    meta["config"][field] = value
    _write_meta(ckpt, meta)
    folder = faces_folder(tmp_path / "faces", n=2)
    assert run(ckpt, "--images", str(folder), "--out", str(tmp_path / "s.csv")) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err
    assert not (tmp_path / "s.csv").exists()


# ------------------------------------------------------------------------------ refused pickles


class Payload:
    """A class of this test: torch.save pickles it by reference, so loading it would import and build it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled


def _torch_zip_with(pickled: bytes, path):
    """A torch.save zip whose data.pkl is `pickled` (every other member as torch writes it)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            out.writestr(info.filename, pickled if info.filename.endswith("/data.pkl") else data)
    return path


def _system_call(marker) -> bytes:
    command = f"touch {marker}".encode()
    return b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command + b"\x85R."


@pytest.mark.parametrize(
    "make, asked",
    [
        (lambda path, marker: torch.save({"w": torch.zeros(2), "x": Payload(marker)}, path), "io.open"),
        (lambda path, marker: _torch_zip_with(_system_call(marker), path), "os.system"),
    ],
    ids=["open-by-reduce", "os.system"],
)
def test_a_pickle_asking_for_code_is_refused_naming_what_it_asked_for(tmp_path, capsys, make, asked):
    marker = tmp_path / "payload-ran"
    make(tmp_path / "model.pt", marker)
    assert cvlface.main([str(tmp_path / "model.pt"), str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err == (
        f"error: {tmp_path / 'model.pt'} holds Python objects other than tensors ({asked}); refusing it, since "
        "loading it could run code: export a plain state_dict (torch.save(model.state_dict(), ...))."
    )
    assert not marker.exists() and not (tmp_path / "ckpt").exists()


def test_a_pickle_instruction_no_state_dict_uses_is_named(tmp_path):
    from converters.state_dict import ConversionError, read_checkpoint

    marker = tmp_path / "payload-ran"
    path = _torch_zip_with(b"(V" + f"touch {marker}".encode() + b"\nios\nsystem\n.", tmp_path / "inst.pt")
    with pytest.raises(ConversionError) as caught:
        read_checkpoint(path)
    assert str(caught.value).startswith(f"{path} holds a pickle instruction that no plain state_dict uses (opcode ")
    assert "download it again if it should be one" in str(caught.value) and not marker.exists()


# ------------------------------------------------------------------------------------ TorchScript

TINY_CLIP = tiny_clip_config()


class Layers(torch.nn.Module):
    """Parameters, a buffer, a Linear without bias, a Sequential and a ModuleList: what state_dict walks."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.plain = torch.nn.Linear(4, 4, bias=False)
        self.seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        self.stack = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.scale = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(1)))
        self.register_buffer("offset", torch.arange(4.0))

    def forward(self, x):
        y = self.seq(self.plain(self.lin(x))) * self.scale + self.offset
        for layer in self.stack:
            y = layer(y)
        return y


class Hook(torch.nn.Module):
    """A module whose __setstate__, which torch.jit.load runs, writes a file at a path the archive holds."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.marker = marker

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.marker = state[1]
        self.training = state[2]
        torch.save(self.weight, self.marker)


class HostileClip(torch.nn.Module):
    """A traced CLIP with the hook beside it: one archive, as torch.jit.save writes it."""

    def __init__(self, clip, marker: str):
        super().__init__()
        self.clip = clip
        self.hook = Hook(marker)

    def forward(self, x):
        return self.hook(self.clip(x))


def _traced_tiny_clip(path=None):
    model = tr.perturb(tr.Clip(TINY_CLIP), seed=5)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        traced = torch.jit.trace(model, images, check_trace=False)
    if path is not None:
        torch.jit.save(traced.half(), str(path))  # fp16, as OpenAI's
    return traced


def _bits(tensor):
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize(
    "save",
    [
        _traced_tiny_clip,
        lambda path: torch.jit.save(torch.jit.script(Layers()), str(path)),
        lambda path: torch.jit.save(torch.jit.trace(Layers(), torch.zeros(1, 3)).to(torch.bfloat16), str(path)),
    ],
    ids=["traced-clip-fp16", "scripted-layers", "traced-layers-bf16"],
)
def test_torchscript_weights_are_read_as_torch_jit_load_gives_them_without_running_it(tmp_path, save):
    from converters import torchscript

    path = tmp_path / "model.pt"
    save(path)
    want = torch.jit.load(str(path)).state_dict()
    got = torchscript.read_state_dict(path)
    assert list(got) == list(want)
    for key in want:
        assert (got[key].dtype, got[key].shape) == (want[key].dtype, want[key].shape), key
        assert torch.equal(_bits(got[key]), _bits(want[key])), key


def test_a_torchscript_archive_whose_setstate_writes_a_file_is_refused_and_writes_nothing(tmp_path, capsys):
    from converters import clip

    marker = tmp_path / "written-by-the-archive"
    archive = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(HostileClip(_traced_tiny_clip(), str(marker))), str(archive))
    assert not marker.exists()
    assert clip.main([str(archive), str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: the TorchScript archive {archive} is refused: its module __torch__.test_hostile_checkpoints.Hook "
        "runs a __setstate__ method of its own when loaded, and only running its code could say what its weights "
        "are; export a plain state_dict (torch.save(model.state_dict(), ...))."
    )
    assert not marker.exists() and not (tmp_path / "ckpt").exists()
    torch.jit.load(str(archive))  # what the converter used to do: the archive's code runs
    assert marker.exists()


def _rewrite(path, member_suffix, content):
    import zipfile

    with zipfile.ZipFile(path) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as out:
        for info, data in members:
            out.writestr(info, content(data) if info.filename.endswith(member_suffix) else data)


def test_a_torchscript_pickle_asking_for_code_is_refused(tmp_path):
    from converters import clip
    from converters.state_dict import ConversionError

    marker = tmp_path / "payload-ran"
    archive = tmp_path / "ViT-B-16.pt"
    _traced_tiny_clip(archive)
    _rewrite(archive, "/data.pkl", lambda _: _system_call(marker))
    with pytest.raises(ConversionError) as caught:
        clip.read_clip(archive)
    assert str(caught.value).startswith(f"the TorchScript archive {archive} is refused: it asks for os.system, ")
    assert not marker.exists()


def test_a_torchscript_storage_shorter_than_its_tensors_is_damaged(tmp_path):
    from converters import clip
    from converters.state_dict import ConversionError

    archive = tmp_path / "ViT-B-16.pt"
    _traced_tiny_clip(archive)
    _rewrite(archive, "/data/0", lambda data: data[: len(data) // 2])
    with pytest.raises(ConversionError) as caught:
        clip.read_clip(archive)
    assert str(caught.value).startswith(f"could not read the TorchScript archive {archive} (storage 0 holds ")
    assert str(caught.value).endswith("the file is truncated or damaged, download it again.")


# --------------------------------------------------------------- hostile folders (second wave)


def _finishes(call, seconds=10.0):
    """Returns call()'s result, failing the test (not hanging it) when it does not return in time."""
    import threading

    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", call()), daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive(), box.get("result")


def test_a_fifo_as_config_json_is_never_waited_on(saved, tmp_path):
    import os

    ckpt = _copy(saved, tmp_path)
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    try:
        hung, text = _finishes(lambda: checkpoint.describe(ckpt))
        assert not hung and text == f"checkpoint {ckpt}"
        hung, found = _finishes(lambda: checkpoint.is_checkpoint(ckpt))
        assert not hung and found is False
    finally:  # releases a reader the old code left waiting
        fd = os.open(ckpt / "config.json", os.O_RDWR | os.O_NONBLOCK)
        os.close(fd)


def test_describe_escapes_control_characters_of_a_crafted_source(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    meta = _meta(ckpt)
    meta["source"] = {"file": "model\x1b[2J\x1b]0;owned\x07.pt\nerror: fake", "sha256": "ab\rcd" + "e" * 100}
    _write_meta(ckpt, meta)
    text = checkpoint.describe(ckpt)
    assert text.isprintable() and "\x1b" not in text
    assert text.startswith(f"checkpoint {ckpt} (from model\\x1b[2J\\x1b]0;owned\\x07.pt\\nerror: fake, sha256 ab")
    assert len(text) < len(str(ckpt)) + 200


def test_a_config_json_naming_a_key_twice_is_refused(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text.replace('"format": "vitnt-jax"', '"format": "x", "format": "vitnt-jax"'))
    message = _one_line_error(lambda: checkpoint.load_config(ckpt))
    assert (
        message
        == f"{ckpt / 'config.json'} is unreadable (it names the key 'format' twice); convert the checkpoint again."
    )


def test_no_file_is_hashed_unless_every_weights_file_has_its_recorded_size(saved, tmp_path, monkeypatch):
    # A weights file replaced by a 1 GiB sparse one, and a recorded name outside variables/: both are
    # refused from their sizes and names alone, without reading a byte of either.
    ckpt = _copy(saved, tmp_path)
    victim = max((p for p in (ckpt / "variables").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(1 << 30)
    hashed = []
    original = checkpoint._file_sha256
    monkeypatch.setattr(checkpoint, "_file_sha256", lambda path: hashed.append(path) or original(path))
    assert _one_line_error(lambda: checkpoint.load(ckpt)).endswith(
        "its weights do not match the checksum recorded when it was converted; convert it again."
    )
    assert victim not in hashed
    ckpt = _copy(saved, tmp_path / "second")
    meta = _meta(ckpt)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    meta["files_sha256"][str(outside)] = "0" * 64
    _write_meta(ckpt, meta)
    hashed.clear()
    assert "is damaged" in _one_line_error(lambda: checkpoint.load(ckpt))
    assert outside not in hashed and all(str(p).startswith(str(ckpt / "variables")) for p in hashed)


def test_a_fifo_in_place_of_a_weights_file_is_named_as_such(saved, tmp_path):
    import os

    ckpt = _copy(saved, tmp_path)
    victim = next(p for p in sorted((ckpt / "variables").rglob("*")) if p.is_file() and p.parent.name == "d")
    victim.unlink()
    os.mkfifo(victim)
    hung, _ = _finishes(lambda: pytest.raises(checkpoint.CheckpointError, checkpoint.load, ckpt))
    assert not hung
    message = _one_line_error(lambda: checkpoint.load(ckpt))
    assert message.endswith(" is no regular file; convert it again.")


def test_a_checkpoint_another_process_wrote_meanwhile_is_kept(saved, tmp_path, monkeypatch):
    # Two conversions of one named model at once: the one that finishes second must not delete the
    # first one's checkpoint (a third process may be reading it).
    target = tmp_path / "model"
    original = checkpoint.weights_sha256

    def other_process_finishes_first(variables):
        if not target.exists():
            shutil.copytree(saved, target)
        return original(variables)

    monkeypatch.setattr(checkpoint, "weights_sha256", other_process_finishes_first)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.save(target, CFG, init_variables(CFG, seed=5))
    assert "was written by another process meanwhile" in str(caught.value)
    monkeypatch.setattr(checkpoint, "weights_sha256", original)
    assert checkpoint.weights_digest(target) == checkpoint.weights_digest(saved)
    checkpoint.load(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind


def test_overwriting_a_link_to_a_checkpoint_replaces_the_link_not_its_target(saved, tmp_path):
    kept = _copy(saved, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(kept, target_is_directory=True)
    out = checkpoint.save(link, CFG, init_variables(CFG, seed=6), overwrite=True)
    assert out == link and not link.is_symlink()
    assert checkpoint.weights_digest(kept) == checkpoint.weights_digest(saved)
    assert checkpoint.weights_digest(link) != checkpoint.weights_digest(saved)
    checkpoint.load(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "link"]


# ------------------------------------------------------------------- every valid config runs


def _random_tiny_configs(count: int, seed: int = 0):
    """Yields valid tiny configs drawn at random over every field, edge cases (1x1 grid, MLP width 1) first."""
    import random

    yield ViTConfig(img_size=8, patch_size=8, embed_dim=2, depth=2, num_heads=1, mlp_ratio=0.5, embedding_dim=1)
    yield ViTConfig(
        img_size=9,
        patch_size=9,
        embed_dim=4,
        depth=2,
        num_heads=2,
        class_token=True,
        head="cls",
        embedding_dim=4,
        ln_pre=True,
        patch_bias=False,
    )
    yield ViTConfig(
        img_size=5,
        patch_size=2,
        embed_dim=3,
        depth=2,
        num_heads=3,
        class_token=True,
        head="face",
        embedding_dim=2,
        activation="quick_gelu",
        qkv_bias=True,
    )
    rng, made = random.Random(seed), 0
    while made < count:
        img = rng.randint(1, 16)
        width = rng.choice([1, 2, 3, 4, 6])
        head = rng.choice(["face", "transface", "clip", "cls", "none"])
        fields = dict(
            img_size=img,
            patch_size=rng.randint(1, img),
            embed_dim=width,
            depth=rng.randint(1, 3),
            num_heads=rng.choice([h for h in (1, 2, 3) if width % h == 0]),
            mlp_ratio=rng.choice([0.26, 0.5, 1.0, 2.5]),
            activation=rng.choice(["relu6", "gelu", "gelu_tanh", "quick_gelu"]),
            qkv_bias=rng.random() < 0.5,
            class_token=rng.random() < 0.5,
            patch_bias=rng.random() < 0.5,
            ln_pre=rng.random() < 0.5,
            head=head,
            embedding_dim=None if head == "none" else width if head == "cls" else rng.randint(1, 4),
            default_blocks=rng.choice(["all", "0-1", "0,2"]),
        )
        try:
            config = ViTConfig(**fields)
        except ConfigError:
            continue
        made += 1
        yield config


def test_every_config_that_passes_validation_scores_one_image():
    # A hole in validation (TransFace's token gate given a class token) used to pass and then fail
    # inside the model with a shape error on the first batch. Random configs are traced (shapes
    # only, fast); the edge cases (1x1 grid, MLP width 1, a face head with a class token) also run.
    import jax
    import jax.numpy as jnp

    from vitnt_jax.model import truncate_blocks, variable_shapes
    from vitnt_jax.scorer import Scorer, score_streaming
    from vitnt_jax.selection import parse_blocks
    from vitnt_jax.stability import METRICS, ScoreSettings

    with pytest.raises(ConfigError, match="head 'transface' gates patch tokens only"):
        ViTConfig(img_size=8, patch_size=4, embed_dim=4, depth=2, num_heads=2, head="transface", class_token=True)
    for i, config in enumerate(_random_tiny_configs(40)):
        metric = sorted(METRICS)[i % len(METRICS)]
        settings = ScoreSettings(parse_blocks(config.default_blocks, config.depth), metric=metric)
        embed = config.head != "none"
        if i < 3:
            scorer = Scorer(config, init_variables(config, seed=i), settings, embed=embed, devices=jax.devices()[:1])
            image = np.random.default_rng(i).integers(0, 256, (1, config.img_size, config.img_size, 3), np.uint8)
            out = scorer(image)
            assert all(np.isfinite(value).all() for value in out.values()), config
        else:
            images = jax.ShapeDtypeStruct((1, config.img_size, config.img_size, 3), jnp.float32)
            run = settings.num_blocks_to_run
            out = jax.eval_shape(
                lambda v, x, c=config, s=settings, e=embed, r=run: score_streaming(
                    c, v if e else truncate_blocks(v, r), x, s, embed=e
                ),
                variable_shapes(config),
                images,
            )
        assert out["quality"].shape == (1,), config
        assert out["patch_quality"].shape == (1, config.num_patches), config
        if embed:
            assert out["embedding"].shape == (1, config.embedding_dim), config


# ---------------------------------------------------------- crafted TorchScript and torch zips


def _crafted_archive(path, root, storages, classes, compress=False):
    """Writes a TorchScript-shaped zip whose data.pkl pickles `root` (module records and tensors) as torch would.

    Module records are instances of classes named `__torch__.<Name>` (see `_module_class`); `_Tensor`
    pickles as torch's _rebuild_tensor_v2 on the float storage "0".
    """
    import io
    import pickle
    import zipfile

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj[1:] if isinstance(obj, tuple) and obj and obj[0] == "pid" else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(root)
    code = "".join(f'class {c}(Module):\n  __parameters__ = ["weight", ]\n  __buffers__ = []\n' for c in classes)
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as out:
        out.writestr("archive/data.pkl", buffer.getvalue())
        for key, data in storages.items():
            out.writestr(f"archive/data/{key}", data)
        out.writestr("archive/code/__torch__.py", code, compress_type=mode)
        if compress:  # a second code file, as large: each alone stays under the cap the test sets
            out.writestr("archive/code/__torch__/more.py", " " * len(code), compress_type=mode)
    return path


def _module_class(monkeypatch, name="M"):
    import sys
    import types

    module = sys.modules.get("__torch__") or types.ModuleType("__torch__")
    monkeypatch.setitem(sys.modules, "__torch__", module)
    cls = type(name, (), {"__module__": "__torch__", "__qualname__": name})
    monkeypatch.setattr(module, name, cls, raising=False)
    return cls


class _Tensor:
    def __init__(self, size, stride, offset=0):
        self.args = (size, stride, offset)

    def __reduce__(self):
        import collections

        size, stride, offset = self.args
        pid = ("pid", "storage", torch.FloatStorage, "0", "cpu", 4)
        return (torch._utils._rebuild_tensor_v2, (pid, offset, size, stride, False, collections.OrderedDict()))


def _record(cls, **state):
    record = cls.__new__(cls)
    record.__dict__.update({"training": False, **state})
    return record


@pytest.mark.parametrize(
    "size, stride, reason",
    [
        ((-1,), (1,), "a tensor has the negative size (-1,)"),
        ((0, -1), (1, 1), "a tensor has the negative size (0, -1)"),
        ((1 << 40,), (0,), "a tensor of size (1099511627776,) holds more values than its storage (4)"),
    ],
)
def test_a_crafted_torchscript_tensor_shape_is_one_sentence(tmp_path, monkeypatch, size, stride, reason):
    from converters import torchscript
    from converters.state_dict import ConversionError

    cls = _module_class(monkeypatch)
    path = _crafted_archive(tmp_path / "x.pt", _record(cls, weight=_Tensor(size, stride)), {"0": bytes(16)}, ["M"])
    with pytest.raises(ConversionError) as caught:
        torchscript.read_state_dict(path)
    assert str(caught.value) == (
        f"could not read the TorchScript archive {path} ({reason}); "
        "the file is truncated or damaged, download it again."
    )


def test_a_torchscript_chain_of_shared_modules_is_refused_not_walked_along_every_path(tmp_path, monkeypatch):
    # 40 levels, each module holding the one below twice: 2**40 paths from a 3 KB file.
    from converters import torchscript
    from converters.state_dict import ConversionError

    cls = _module_class(monkeypatch)
    node = _record(cls, weight=_Tensor((1,), (1,)))
    for _ in range(40):
        node = _record(cls, weight=_Tensor((1,), (1,)), a=node, b=node)
    path = _crafted_archive(tmp_path / "x.pt", node, {"0": bytes(16)}, ["M"])
    hung, outcome = _finishes(lambda: pytest.raises(ConversionError, torchscript.read_state_dict, path), 20)
    assert not hung
    assert "it holds more than 100000 modules, counted along every path" in str(outcome.value)
    small = _record(cls, weight=_Tensor((1,), (1,)), a=_record(cls, weight=_Tensor((2,), (1,))))
    small = _record(cls, weight=_Tensor((1,), (1,)), a=small, b=small)  # sharing itself is read as torch reads it
    got = torchscript.read_state_dict(_crafted_archive(tmp_path / "y.pt", small, {"0": bytes(16)}, ["M"]))
    assert list(got) == ["weight", "a.weight", "a.a.weight", "b.weight", "b.a.weight"]


def test_torchscript_compressed_members_are_capped_together(tmp_path, monkeypatch):
    import zipfile

    from converters import torchscript
    from converters.state_dict import ConversionError

    cls = _module_class(monkeypatch)
    path = _crafted_archive(
        tmp_path / "x.pt", _record(cls, weight=_Tensor((4,), (1,))), {"0": bytes(16)}, ["M"] * 4000, compress=True
    )
    assert len(torchscript.read_state_dict(path)) == 1
    with zipfile.ZipFile(path) as archive:
        each = max(i.file_size for i in archive.infolist() if i.filename.endswith(".py"))
    monkeypatch.setattr(torchscript, "MAX_EXPANDED", each + 1000)  # each member fits, both together do not
    with pytest.raises(ConversionError, match="its compressed members expand to .* bytes, more than a module's code"):
        torchscript.read_state_dict(path)


def test_200_single_byte_mutations_of_a_torchscript_pickle_read_or_are_one_conversion_error(tmp_path):
    # Seeded, so every run tries the same archives; each is read or refused in one sentence, none hangs.
    import io
    import random
    import zipfile

    from converters import torchscript
    from converters.state_dict import ConversionError

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Layers()), buffer)
    with zipfile.ZipFile(buffer) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    pickled = next(data for info, data in members if info.filename.endswith("/data.pkl"))
    rng, outcomes = random.Random(13), {"read": 0, "refused": 0}
    for i in range(200):
        data = bytearray(pickled)
        data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / f"m{i}.pt"
        with zipfile.ZipFile(path, "w") as out:
            for info, content in members:
                out.writestr(info, bytes(data) if info.filename.endswith("/data.pkl") else content)
        try:
            torchscript.read_state_dict(path)
            outcomes["read"] += 1
        except ConversionError as error:
            assert "\n" not in str(error) and str(error).endswith("."), error
            outcomes["refused"] += 1
        path.unlink()
    assert outcomes["refused"] > 100 and sum(outcomes.values()) == 200


def test_a_torch_file_whose_tensor_repeats_one_value_2_to_the_40_times_is_refused_by_its_shape(tmp_path):
    state = dict(tr.randomize(tr.FaceViT(CFG), seed=0).state_dict())
    state["pos_embed"] = torch.zeros(1).expand(1 << 20, 1 << 20)  # a stride-0 view: 4 bytes stored
    torch.save(state, tmp_path / "model.pt")
    assert (tmp_path / "model.pt").stat().st_size < 1 << 20
    hung, outcome = _finishes(
        lambda: pytest.raises(ConversionError, cvlface.convert, tmp_path / "model.pt", tmp_path / "ckpt", "testing")
    )
    assert not hung
    assert str(outcome.value) == (
        "the checkpoint does not match CVLface ViT-testing: pos_embed has shape (1048576, 1048576), "
        "expected (1, 16, 16)."
    )


def test_a_torch_zip_bomb_is_refused_before_torch_reads_it(tmp_path, monkeypatch):
    import zipfile

    from converters.state_dict import read_checkpoint

    src = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(4)}, src)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(bomb, "w") as out:
        for info in source.infolist():
            if info.filename.endswith("/data/0"):  # the storage, deflated, followed by 1 GiB of zeros
                deflated = zipfile.ZipInfo(info.filename)
                deflated.compress_type = zipfile.ZIP_DEFLATED
                with out.open(deflated, "w", force_zip64=True) as member:
                    member.write(source.read(info))
                    zero = bytes(1 << 24)
                    for _ in range(64):
                        member.write(zero)
            else:
                out.writestr(info, source.read(info))
    assert bomb.stat().st_size < 4 << 20  # a few MB on disk
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was reached"))
    with pytest.raises(ConversionError) as caught:
        read_checkpoint(bomb)
    with zipfile.ZipFile(bomb) as archive:
        declared = sum(info.file_size for info in archive.infolist())
    assert declared > 1 << 30
    assert str(caught.value).startswith(f"{bomb} declares {declared} bytes of contents in a file of ")
    assert str(caught.value).endswith(
        "torch.save compresses nothing, so the file is crafted or damaged, get a sound copy."
    )


def test_keys_from_a_file_are_shown_with_control_characters_escaped(tmp_path):
    state = dict(tr.randomize(tr.FaceViT(CFG), seed=0).state_dict())
    state["evil\x1b]0;owned\x07\x1b[2J"] = torch.zeros(1)
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ConversionError) as caught:
        cvlface.convert(tmp_path / "model.pt", tmp_path / "ckpt", "testing")
    assert str(caught.value).isprintable()
    assert "unexpected keys [evil\\x1b]0;owned\\x07\\x1b[2J]" in str(caught.value)


def test_a_crafted_weights_digest_is_not_passed_on(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    meta = _meta(ckpt)
    meta["weights_sha256"] = "\x1b[2J" + meta["weights_sha256"]
    _write_meta(ckpt, meta)
    assert checkpoint.weights_digest(ckpt) is None
    assert "is damaged" in _one_line_error(lambda: checkpoint.load(ckpt))
    assert checkpoint.weights_digest(saved) == _meta(saved)["weights_sha256"]


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_a_fifo_or_a_device_given_as_the_source_is_named_as_such(tmp_path, name):
    import os

    from converters.state_dict import read_checkpoint

    os.mkfifo(tmp_path / name)
    for path in (tmp_path / name, "/dev/zero"):
        with pytest.raises(ConversionError) as caught:
            read_checkpoint(path)
        assert str(caught.value) == (
            f"checkpoint {path} is a named pipe or a device, not a file; pass the .pt or .safetensors file itself."
        )
