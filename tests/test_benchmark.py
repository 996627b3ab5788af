"""The benchmark's PyTorch implementation scores what ours scores; its worker and target table."""

import numpy as np
import pytest
import torch

from experiments import benchmark
from experiments.torch_vitnt import TorchViTNT, state_from_flax
from vitnt_jax.model import init_variables
from vitnt_jax.scorer import Scorer
from vitnt_jax.stability import ScoreSettings


@pytest.mark.parametrize("blocks, attention", [((0, 1, 2), "last"), ((0, 1, 2), "all"), ((1, 2), "last")])
def test_torch_benchmark_implementation_equals_ours(testing_config, blocks, attention):
    cfg = testing_config
    variables = init_variables(cfg, seed=4)
    model = TorchViTNT(cfg).eval()
    model.load_state_dict(state_from_flax(variables, cfg))  # strict: every key named, none left over
    images = np.random.default_rng(2).integers(0, 256, (3, cfg.img_size, cfg.img_size, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    theirs = model(x, blocks, alpha=8.0, attention=attention).numpy()
    ours = Scorer(cfg, variables, ScoreSettings(blocks, attention=attention))(images)["quality"]
    np.testing.assert_allclose(theirs, ours, atol=1e-6, rtol=0)
    assert np.ptp(ours) > 0  # the images score differently: the comparison can tell them apart


def test_flops_formula_by_hand(testing_config):
    # testing: 16 patches of 8x8x3, D=16, MLP 32, no class token.
    patch = 2 * 16 * 192 * 16
    block = 2 * 16 * 16 * 48 + 4 * 16 * 16 * 16 + 2 * 16 * 16 * 16 + 4 * 16 * 16 * 32
    assert benchmark.flops_per_image(testing_config, 2) == patch + 2 * block


@pytest.mark.parametrize(
    "kind, batch", [("stream", 4), ("forward", 4), ("states", 4), ("torch", 4), ("stream", 12), ("forward", 12)]
)
def test_worker_reports_its_figures(kind, batch):
    # Batch 12 is no whole number of the CPU's 8-image micro-batches: both pad as the scorer does.
    got = benchmark.worker({"kind": kind, "model": "testing", "batch": batch, "runs": 1, "threads": 1})
    assert got["images_per_s"] > 0 and got["flops_per_s"] > 0 and got["blocks_run"] == 3
    if kind != "torch":
        assert 0 < got["xla_temp_mb"] < got["xla_footprint_mb"]


def test_targets_table():
    row = lambda impl, ips, **kw: {"model": "m", "batch": 32, "impl": impl, "images_per_s": ips, **kw}  # noqa: E731
    rows = [
        row("stream", 9.6, utilisation=0.7, peak_rss_mb=110.0, xla_temp_mb=130.0),
        row("forward", 10.0, utilisation=0.73, peak_rss_mb=100.0, xla_temp_mb=100.0),
        row("torch", 10.0),
    ]
    got = {c["target"]: (round(c["value"], 4), c["met"]) for c in benchmark.targets(rows, {"stream a": 5.0}, "m")}
    assert got == {
        "m batch 32: scorer >= 1.0x PyTorch": (0.96, False),
        "m batch 32: >= 60% of matmul peak": (0.7, True),
        "m batch 32: scorer overhead over forward <= 5%": (0.0417, True),
        "m batch 32: peak_rss_mb <= 1.2x forward": (1.1, True),
        "m batch 32: xla_temp_mb <= 1.2x forward": (1.3, False),
        "streaming memory flat in the number of selected blocks (spread)": (0.0, True),
    }
