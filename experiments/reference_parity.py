"""Compare our scores with the authors' published PyTorch code (`calculate_ntfiq`).

    python -m experiments.reference_parity --reference PATH/TO/ViTNT-FIQA [--variant base]
        [--count 8] [--blocks 0-19] [--out results/reference_parity.json] [--overwrite]

PATH is a clone of github.com/gurayozgur/ViTNT-FIQA; we import its `backbones/vit/vit.py` as
is (nothing of it is copied here). That file imports timm and fvcore only for three init/helper
names and a FLOP counter; where those packages are missing (timm needs torchvision, which does
not install beside the CPU torch wheel) we register small stand-ins with the same behaviour in
eval mode: DropPath is the identity at inference, to_2tuple pairs a number, trunc_normal_ is
PyTorch's own.

Their model gets random weights (perturbed away from its init so scores spread), our converter
maps its state_dict strictly, and both score the same random uint8 images for mean,
attention-last and attention-all aggregation. Prints and writes the largest absolute differences.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np


def _install_stand_ins() -> None:
    import torch
    from torch import nn

    try:
        import timm.models.layers  # noqa: F401
    except Exception:

        class DropPath(nn.Module):
            def __init__(self, drop_prob=0.0):
                super().__init__()

            def forward(self, x):
                return x  # stochastic depth is the identity at inference

        layers = types.ModuleType("timm.models.layers")
        layers.DropPath = DropPath
        layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        layers.trunc_normal_ = nn.init.trunc_normal_
        timm = types.ModuleType("timm")
        models = types.ModuleType("timm.models")
        timm.models, models.layers = models, layers
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
    try:
        import fvcore.nn  # noqa: F401
    except Exception:
        fv = types.ModuleType("fvcore")
        fvnn = types.ModuleType("fvcore.nn")
        fvnn.flop_count = lambda *a, **k: (_ for _ in ()).throw(NotImplementedError("stand-in"))
        fv.nn = fvnn
        sys.modules.update({"fvcore": fv, "fvcore.nn": fvnn})
    del torch


def load_reference_module(repo: Path):
    path = repo / "backbones" / "vit" / "vit.py"
    if not path.is_file():
        raise ValueError(f"{path} not found; pass --reference the root of a ViTNT-FIQA clone.")
    _install_stand_ins()
    spec = importlib.util.spec_from_file_location("vitnt_reference_vit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison; returns the exit status (0 ok, 1 user error, 2 flag error)."""
    from experiments import harness
    from vitnt_jax import cli

    parser = harness.Parser(prog="python -m experiments.reference_parity", description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="root of a ViTNT-FIQA clone")
    parser.add_argument("--variant", choices=["base", "small"], default="base", help="CVLface ViT (default: base)")
    parser.add_argument("--count", type=int, default=8, help="number of random images (default: 8)")
    parser.add_argument("--blocks", default=None, help="default: the preset's published selection")
    parser.add_argument("--alpha", type=float, default=8.0, help="alpha (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and images (default: 0)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    return cli.run_command(lambda: _run(args), debug=args.debug, errors=(ValueError,))


def _run(args) -> int:
    if args.count < 1:
        raise ValueError("--count must be at least 1.")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; pass --overwrite to replace it, or choose another --out.")
    import jax
    import torch

    from converters import cvlface
    from vitnt_jax.scorer import Scorer
    from vitnt_jax.selection import parse_blocks
    from vitnt_jax.stability import ScoreSettings

    reference = load_reference_module(args.reference)
    torch.manual_seed(args.seed)
    # The published constructor arguments of the two CVLface ViTs (evaluation/QualityModel.py).
    shapes = {"small": dict(depth=12, mlp_ratio=5, num_heads=8), "base": dict(depth=24, mlp_ratio=3, num_heads=16)}
    model = reference.VisionTransformer(
        img_size=112,
        patch_size=8,
        num_classes=512,
        embed_dim=512,
        drop_path_rate=0.1,
        norm_layer="ln",
        mask_ratio=0.0,
        **shapes[args.variant],
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.05))
    config, variables, _ = cvlface.convert_state_dict(dict(model.state_dict()), args.variant)
    blocks = parse_blocks(args.blocks or config.default_blocks, config.depth)

    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (args.count, 112, 112, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)

    results = {
        "variant": args.variant,
        "blocks": list(blocks),
        "alpha": args.alpha,
        "images": args.count,
        "torch": torch.__version__,
        "jax": jax.__version__,
        "cases": {},
    }
    cases = {
        "mean": dict(use_attention_weights=False, last_block_attention_only=True),
        "attention_last": dict(use_attention_weights=True, last_block_attention_only=True),
        "attention_all": dict(use_attention_weights=True, last_block_attention_only=False),
    }
    for case, kwargs in cases.items():
        theirs = model.calculate_ntfiq(x, scaling=args.alpha, blocks_to_use=list(blocks), **kwargs).numpy()
        settings = ScoreSettings(
            blocks,
            alpha=args.alpha,
            aggregation="mean" if case == "mean" else "attention",
            attention="all" if case == "attention_all" else "last",
        )
        ours = np.asarray(Scorer(config, variables, settings, precision="highest")(images)["quality"])
        diff = float(np.abs(ours - theirs).max())
        results["cases"][case] = {"max_abs_diff": diff, "reference": theirs.tolist(), "ours": ours.tolist()}
        print(f"{case:15s} max |ours - reference| = {diff:.3e}   reference Q = {' '.join(f'{q:.5f}' for q in theirs)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
