"""Convert checkpoints made by the PUBLISHED PyTorch modules of each family, score them with our
CLI, and compare with the method's definition computed on those very modules.

    python -m experiments.zoo_parity --insightface PATH --transface PATH [--site PATH]
        [--count 4] [--out experiments/results/zoo_parity.json] [--overwrite]

--insightface / --transface: clones of deepinsight/insightface and DanJun6737/TransFace (their
`vit.py` is imported as is, nothing is copied). --site: a folder where the `timm` and `open_clip`
packages can be imported (e.g. their wheels unpacked); torchvision, which they import but their
ViT code does not use, does not install beside the CPU torch wheel, so this script registers an
empty stand-in for it. Random weights (perturbed away from init), random images.

For every model: the checkpoint written by the published module is converted by our converter,
scored by `python -m vitnt_jax.score` (mean, attention-last, attention-all, with
`--save-embeddings`), and compared with (a) DESIGN.md section 1 evaluated on the published
module's own block outputs (forward hooks), final norm and attention (its own qkv weights), and
(b) the published module's embedding. Prints and writes the largest absolute differences.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np


def _stand_in_torchvision() -> None:
    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)

            class Meta(type):
                def __getattr__(cls, attr):
                    if attr.startswith("__"):
                        raise AttributeError(attr)
                    return attr

            value = Meta(name, (), {"__init__": lambda self, *a, **k: None})
            setattr(self, name, value)
            return value

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = Stub(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def _load_file(path: Path, name: str):
    from experiments.reference_parity import _install_stand_ins

    _install_stand_ins()
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _perturb(model, seed, scale):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _attention(attn_module, y, heads, scale):
    """Softmax attention (B, H, T, T) from a module's own fused qkv projection."""
    b, t, d = y.shape
    qkv = attn_module(y).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    return ((q @ k.transpose(-2, -1)) * scale).softmax(-1)


def _definition(outputs, attentions, norm, prefix, blocks, alpha, aggregation, attention):
    import torch

    z = torch.stack([torch.nn.functional.normalize(norm(outputs[t])[:, prefix:], dim=-1) for t in blocks], 1)
    q = 2.0 / (1.0 + torch.exp(alpha * (z[:, 1:] - z[:, :-1]).norm(dim=-1).mean(1)))
    if aggregation == "mean":
        return q.mean(1)
    received = torch.stack([attentions[t][..., prefix:].mean(1).sum(1) for t in blocks])
    received = received[-1] if attention == "last" else received.mean(0)
    return (q * received / received.sum(1, keepdim=True)).sum(1)


def _run(name, model, blocks_of, attn_of, norm, prefix, embed, preprocess, convert, size, images, work, results):
    """Hooks `model`, converts its checkpoint, runs our CLI and records the differences."""
    import torch

    from vitnt_jax import score
    from vitnt_jax.config import PRESETS  # noqa: F401  (imported for the side effect of presets)
    from vitnt_jax.selection import parse_blocks

    folder = work / name / "faces"
    folder.mkdir(parents=True)
    from PIL import Image

    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    ckpt = convert(work / name)
    from vitnt_jax import checkpoint

    config, _ = checkpoint.load(ckpt)
    blocks = parse_blocks(config.default_blocks, config.depth)
    outputs, attentions = [], []
    hooks = []
    for block in blocks_of(model):
        hooks.append(block.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o)))
    x = preprocess(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float())
    with torch.no_grad():
        theirs_embedding = embed(model, x).float().numpy()
        for h in hooks:
            h.remove()
        attentions = [attn_of(block, None) for block in blocks_of(model)]
    entry = {"blocks": f"{blocks[0]}-{blocks[-1]}", "images": len(images)}
    for case, agg, att in (
        ("mean", "mean", "last"),
        ("attention_last", "attention", "last"),
        ("attention_all", "attention", "all"),
    ):
        out = work / name / f"{case}.csv"
        emb = work / name / f"{case}.npy"
        argv = [
            "--images",
            str(folder),
            "--model",
            str(ckpt),
            "--out",
            str(out),
            "--aggregation",
            agg,
            "--attention",
            att,
            "--save-embeddings",
            str(emb),
            "--overwrite",
        ]
        assert score.main(argv) == 0, name
        ours = np.asarray([float(line.split(",")[1]) for line in out.read_text().splitlines()[1:]])
        with torch.no_grad():
            want = _definition(outputs, attentions, norm, prefix, blocks, 8.0, agg, att).numpy()
        entry[case] = float(np.abs(ours - want).max())
        entry["embedding"] = float(np.abs(np.load(emb) - theirs_embedding).max())
        entry["embedding_scale"] = float(np.abs(theirs_embedding).max())
    results[name] = entry
    print(f"{name:28s} " + "  ".join(f"{k} {v:.2e}" for k, v in entry.items() if isinstance(v, float)))


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison; returns the exit status (0 ok, 1 user error, 2 flag error)."""
    from experiments import harness
    from vitnt_jax import cli

    parser = harness.Parser(prog="python -m experiments.zoo_parity", description=__doc__.splitlines()[0])
    parser.add_argument("--insightface", type=Path, help="clone of deepinsight/insightface")
    parser.add_argument("--transface", type=Path, help="clone of DanJun6737/TransFace")
    parser.add_argument("--site", type=Path, help="folder from which timm and open_clip import")
    parser.add_argument("--count", type=int, default=4, help="number of random images (default: 4)")
    parser.add_argument("--variants", default="vit_t,vit_s,vit_b", help="insightface/TransFace sizes (default: all)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    return cli.run_command(lambda: _compare(args), debug=args.debug, errors=(ValueError,))


def _compare(args) -> int:
    if args.count < 1:
        raise ValueError("--count must be at least 1.")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; pass --overwrite to replace it, or choose another --out.")
    import torch

    from converters import clip, insightface
    from converters import timm as timm_converter

    torch.manual_seed(0)  # the published modules' own initialisation draws from the global generator
    rng = np.random.default_rng(0)
    results: dict = {"torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def faces(size):
            from PIL import Image

            small = rng.integers(0, 256, (args.count, 8, 8, 3), dtype=np.uint8)
            return [np.asarray(Image.fromarray(s).resize((size, size), Image.BILINEAR)) for s in small]

        to_face = lambda x: x.div(255).sub(0.5).div(0.5)  # noqa: E731
        sources = []
        if args.insightface:
            sources.append(("insightface", args.insightface / "recognition/arcface_torch/backbones/vit.py"))
        if args.transface:
            sources.append(("transface", args.transface / "backbones/vit.py"))
        widths = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}
        for family, path in sources:
            module = _load_file(path, f"published_{family}_vit")
            for variant in args.variants.split(","):
                width, depth = widths[variant]
                model = module.VisionTransformer(
                    img_size=112,
                    patch_size=9,
                    num_classes=512,
                    embed_dim=width,
                    depth=depth,
                    num_heads=8,
                    drop_path_rate=0.0,
                    norm_layer="ln",
                    mask_ratio=0.1,
                )
                model = _perturb(model, 1, 0.02)

                def convert(folder, model=model):
                    torch.save(model.state_dict(), folder / "model.pt")
                    return insightface.convert(folder / "model.pt", folder / "ckpt")

                def embed(m, x, family=family):
                    out = m(x)
                    return out[0] if isinstance(out, tuple) else out

                def attn_of(block, _, model=model):
                    return block._captured

                for block in model.blocks:
                    block.norm1.register_forward_hook(
                        lambda m, i, o, block=block: setattr(
                            block, "_captured", _attention(block.attn.qkv, o, 8, block.attn.scale)
                        )
                    )
                _run(
                    f"{family}_{variant}",
                    model,
                    lambda m: m.blocks,
                    attn_of,
                    model.norm,
                    0,
                    embed,
                    to_face,
                    convert,
                    112,
                    faces(112),
                    work,
                    results,
                )

        if args.site:
            sys.path.insert(0, str(args.site))
            # The small timm stand-in registered for the face ViT files must give way to real timm.
            for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
                if getattr(sys.modules[name], "__file__", None) is None:
                    del sys.modules[name]
            _stand_in_torchvision()
            import open_clip
            import timm

            model = _perturb(timm.create_model("vit_base_patch16_224", pretrained=False), 2, 0.02)
            for block in model.blocks:
                block.norm1.register_forward_hook(
                    lambda m, i, o, block=block: setattr(
                        block, "_captured", _attention(block.attn.qkv, o, block.attn.num_heads, block.attn.scale)
                    )
                )

            def convert_timm(folder, model=model):
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
                return timm_converter.convert(folder / "model.safetensors", folder / "ckpt")

            _run(
                "timm_vit_base_patch16_224",
                model,
                lambda m: m.blocks,
                lambda b, _: b._captured,
                model.norm,
                1,
                lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True),
                to_face,
                convert_timm,
                224,
                faces(224),
                work,
                results,
            )

            clip_model = _perturb(open_clip.create_model("ViT-B-16-quickgelu", pretrained=None), 3, 0.005)
            visual = clip_model.visual
            for block in visual.transformer.resblocks:

                def grab(m, i, o, block=block):
                    _, weights = block.attn(o, o, o, need_weights=True, average_attn_weights=False)
                    block._captured = weights

                block.ln_1.register_forward_hook(grab)

            def convert_clip(folder, clip_model=clip_model):
                torch.save(clip_model.state_dict(), folder / "open_clip_pytorch_model.bin")
                return clip.convert(folder / "open_clip_pytorch_model.bin", folder / "ckpt")

            mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
            std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
            _run(
                "open_clip_vit_b16_quickgelu",
                clip_model,
                lambda m: m.visual.transformer.resblocks,
                lambda b, _: b._captured,
                visual.ln_post,
                1,
                lambda m, x: m.encode_image(x),
                lambda x: (x / 255 - mean) / std,
                convert_clip,
                224,
                faces(224),
                work,
                results,
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
