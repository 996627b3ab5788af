"""Named models: `--model NAME` resolves to a known source, downloaded and converted once.

    python -m vitnt_jax.models          # list the names, sources, licences and input contracts

The converted checkpoint is cached in $VITNT_JAX_CACHE (default ~/.cache/vitnt_jax), one folder
per name. Downloads use huggingface_hub with a bounded wait; offline, or for models that are not
on the Hugging Face Hub, you get one sentence saying what to download and how to convert it.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from vitnt_jax.cache import CACHE_ENV, cache_dir
from vitnt_jax.errors import UserError

__all__ = ["CACHE_ENV", "DEFAULT_MODEL", "MODELS", "ModelError", "NamedModel", "cache_dir", "mtcnn_weights", "resolve"]

log = logging.getLogger(__name__)
DEFAULT_MODEL = "cvlface_vit_base_webface4m"
CONNECT_TIMEOUT_S = 5.0


class ModelError(UserError):
    """A model that cannot be resolved; the message says what to download and where to put it."""


RANDOM_WEIGHTS = "random weights: measures nothing, for trying the pipeline offline"


@dataclass(frozen=True)
class NamedModel:
    name: str
    family: str  # converter module: converters.<family>; 'random': seeded random weights, built here
    description: str
    repo_id: str | None  # Hugging Face Hub repository, or None when it must be fetched by hand
    filename: str | None
    licence: str
    manual: str = ""  # where to get it when there is no hub repository
    convert_args: tuple[tuple[str, str], ...] = ()

    @property
    def input_contract(self) -> str:
        if self.family == "random":
            return f"any RGB image, resized to 32x32 ({RANDOM_WEIGHTS})"
        if self.family == "clip":
            return "224x224 RGB, CLIP mean/std (unaligned images are fine)"
        if self.family == "timm":
            return "224x224 RGB, mean/std 0.5"
        return "112x112 RGB face aligned to the 5-point ArcFace template, [-1, 1]"


MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in [
        NamedModel(
            "cvlface_vit_base_webface4m",
            "cvlface",
            "AdaFace ViT-B trained on WebFace4M (CVLface); the paper's main backbone",
            "minchul/cvlface_adaface_vit_base_webface4m",
            "pretrained_model/model.pt",
            "see the model card; trained on WebFace4M, whose terms allow non-commercial research only",
        ),
        NamedModel(
            "clip_vit_b16_openai",
            "clip",
            "OpenAI CLIP ViT-B/16 visual tower (the paper's foundation-model ablation)",
            "timm/vit_base_patch16_clip_224.openai",
            "open_clip_model.safetensors",
            "MIT (OpenAI CLIP)",
            convert_args=(("activation", "quick_gelu"),),
        ),
        NamedModel(
            "timm_vit_base_patch16_224",
            "timm",
            "timm ViT-B/16, ImageNet-21k pretrained, ImageNet-1k fine-tuned (augreg2)",
            "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
            "model.safetensors",
            "Apache-2.0",
        ),
        NamedModel(
            "insightface_vit_b_webface42m",
            "insightface",
            "insightface arcface_torch ViT-B trained on WebFace42M (PartialFC)",
            None,
            None,
            "see insightface's model zoo; WebFace42M terms allow non-commercial research only",
            manual="download model.pt of the WebFace42M ViT-B from insightface's arcface_torch model zoo",
        ),
        NamedModel(
            "transface_vit_b_glint360k",
            "insightface",
            "TransFace ViT-B trained on Glint360K",
            None,
            None,
            "see the TransFace repository",
            manual="download the ViT-B Glint360K model from github.com/DanJun6737/TransFace",
        ),
        NamedModel(
            "testing",
            "random",
            f"the tiny 'testing' preset (3 blocks, 32x32 input) with seeded {RANDOM_WEIGHTS}",
            None,
            None,
            "none: no trained weights",
        ),
    ]
}
RANDOM_SEED = 0  # the 'random' family's weights: jax.random.PRNGKey(RANDOM_SEED), the same on every machine


def hub_download(repo_id: str, filename: str, target: Path) -> Path:
    """Returns the local path of `filename` from the Hub repo, downloading it into `target`.

    Raises OSError (unreachable, HTTP, missing file) or ValueError (an invalid repository id).
    """
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as error:
        raise ModelError("downloading named models needs huggingface_hub: pip install huggingface_hub.") from error
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if not constants.HF_HUB_OFFLINE:
        try:  # fail within seconds when the hub is unreachable, instead of retrying for minutes
            socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            raise ConnectionError(f"{host} is unreachable ({error})") from error
    from huggingface_hub.utils import logging as hub_logging

    previous = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # no retry chatter: failures become one sentence here
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=target, etag_timeout=10))
    except EntryNotFoundError as error:  # the one hub error that is no OSError
        raise FileNotFoundError(f"{filename} is not in {repo_id}") from error
    finally:
        hub_logging.set_verbosity(previous)  # the process's own logging set-up is left as it was


def _cache() -> Path:
    """Returns cache_dir(), or ModelError when it names something other than a folder (nothing is created here)."""
    folder = cache_dir()
    if folder.exists() and not folder.is_dir():
        where = f"${CACHE_ENV} ({folder})" if os.environ.get(CACHE_ENV) else f"the model cache {folder}"
        raise ModelError(
            f"{where} is a file, not a folder; point ${CACHE_ENV} at a folder where converted models may be kept."
        )
    return folder


def resolve(spec: str | os.PathLike, download: Callable[[str, str, Path], Path] | None = None) -> Path:
    """Returns the checkpoint folder for `spec`: a converted folder as given, or a named model.

    A named model is converted once into cache_dir()/NAME; later calls reuse it. A name that is
    neither a folder nor a known model fails at once, before JAX is imported or anything downloaded.
    """
    path = Path(spec)
    if path.exists() or os.sep in str(spec) or str(spec).startswith("."):
        return path
    name = str(spec)
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1, cutoff=0.6)
        raise ModelError(
            "{model} "
            + f"{name!r} is neither a converted checkpoint folder nor a known model name; "
            + (f"did you mean {close[0]}? (" if close else "(")
            + f"known names: {', '.join(MODELS)}; python -m vitnt_jax.models lists them).",
            field="model",
        )
    from vitnt_jax import checkpoint

    model = MODELS[name]
    target = _cache() / name
    if model.family == "random":
        log.warning("model %r: %s", name, RANDOM_WEIGHTS)
    if checkpoint.is_checkpoint(target):
        return target
    if model.family == "random":
        return _random_model(target)
    how = f"`python -m converters.{model.family} FILE {target}`" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in model.convert_args
    )
    if model.repo_id is None:
        raise ModelError(f"{name} is not on the Hugging Face Hub: {model.manual}, then convert it with {how}.")
    log.info("%s: downloading %s from %s (once) ...", name, model.filename, model.repo_id)
    download = download or hub_download
    try:
        source = download(model.repo_id, model.filename, target.parent / "downloads")
    except ModelError:
        raise
    except (OSError, ValueError) as error:  # network, HTTP and hub errors are OSErrors; a bad repo id a ValueError
        raise ModelError(
            f"could not download {model.filename} of {model.repo_id} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); download it by hand from "
            f"https://huggingface.co/{model.repo_id} and convert it with {how}."
        ) from error
    from converters import clip, cvlface, insightface, timm  # explicit, so the import check sees them
    from converters.state_dict import ConversionError

    module = {"clip": clip, "cvlface": cvlface, "insightface": insightface, "timm": timm}[model.family]
    try:
        module.convert(source, target, **dict(model.convert_args))
    except ConversionError as error:
        if checkpoint.is_checkpoint(target):  # another process converted it at the same time
            return target
        raise ModelError(f"the downloaded {model.filename} of {name} did not convert: {error}") from error
    log.info("%s: converted into %s", name, target)
    return target


def _random_model(target: Path) -> Path:
    """Writes the 'testing' preset with seeded random weights into `target` and returns it (no download)."""
    from vitnt_jax import checkpoint
    from vitnt_jax.config import PRESETS
    from vitnt_jax.model import init_variables

    config = PRESETS["testing"]
    source = {"family": "random", "seed": RANDOM_SEED, "note": RANDOM_WEIGHTS}
    try:
        return checkpoint.save(target, config, init_variables(config, seed=RANDOM_SEED), source)
    except checkpoint.CheckpointError as error:
        if checkpoint.is_checkpoint(target):  # another process wrote it at the same time
            return target
        raise ModelError(f"cannot write the random-weight model into {target}: {error}") from error


def mtcnn_weights(path: str | os.PathLike | None = None) -> Path:
    """Returns the converted MTCNN weights file: `path` if given, else facenet-pytorch's, converted once into the cache.

    The cached conversion lives in cache_dir() (see CACHE_ENV); making it needs the facenet-pytorch
    package for its weight files and torch to read them. Raises ModelError when neither is at hand.
    """
    if path is not None:
        return Path(path)
    from vitnt_jax.mtcnn import WEIGHTS_NAME

    target = _cache() / WEIGHTS_NAME
    if target.is_file():
        return target
    from converters import mtcnn as converter
    from converters.state_dict import ConversionError

    source = converter.installed_facenet_weights()
    if source is None:
        raise ModelError(
            "alignment with MTCNN needs MTCNN weights: install facenet-pytorch's with `pip install --no-deps "
            f"facenet-pytorch==2.6.0` (and torch) to have them converted into ${CACHE_ENV} on first use, or give "
            "a weights file written by `python -m converters.mtcnn` as {mtcnn_weights}.",
            field="mtcnn_weights",
        )
    log.info("converting facenet-pytorch's MTCNN weights into %s (once) ...", target)
    try:
        return converter.convert(source, target, overwrite=True)
    except ConversionError as error:
        raise ModelError(f"facenet-pytorch's MTCNN weights in {source} did not convert: {error}") from error


def main(argv: list[str] | None = None) -> int:
    """Prints the named models: name, source, licence, input contract (`python -m vitnt_jax.models`)."""
    from vitnt_jax import cli

    cli.Parser(prog="python -m vitnt_jax.models", description=__doc__.splitlines()[0]).parse_args(argv)
    print(f"Named models (cache: {cache_dir()}; set ${CACHE_ENV} to move it). Default: {DEFAULT_MODEL}.\n")
    for m in MODELS.values():
        if m.family == "random":
            source, convert = f"built offline from seed {RANDOM_SEED}, nothing downloaded", f"none ({RANDOM_WEIGHTS})"
        else:
            source = f"hf://{m.repo_id}/{m.filename}" if m.repo_id else f"by hand: {m.manual}"
            convert = f"converters.{m.family}"
        print(
            f"{m.name}\n  {m.description}\n  source:  {source}\n  convert: {convert}\n"
            f"  licence: {m.licence}\n  input:   {m.input_contract}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
