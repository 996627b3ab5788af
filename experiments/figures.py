"""EDC figures laid out like the paper's: one panel per benchmark, one line per method, pAUC in the legend."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def edc_figures(curves: Sequence, out: Path, *, limit: float = 0.25) -> list[Path]:
    """Returns the written figure paths: one PNG and one PDF per (FR model, EDC protocol, FMR).

    curves: objects with benchmark, model, method, protocol, fmr, discard, fnmr and pauc (a dict by limit;
    the pAUC at `limit` goes in the legend, computed from the curve when it is not in the dict).
    """
    # A bare Figure draws on its own canvas: no pyplot state and no change of the user's backend.
    import matplotlib
    from matplotlib.figure import Figure

    from experiments import edc

    written: list[Path] = []
    groups: dict[tuple, list] = {}
    for c in curves:
        groups.setdefault((c.model, c.protocol, c.fmr), []).append(c)
    for (model, protocol, fmr), members in groups.items():
        benches = list(dict.fromkeys(c.benchmark for c in members))
        methods = list(dict.fromkeys(c.method for c in members))
        cols = min(4, len(benches))
        rows = math.ceil(len(benches) / cols)
        fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, bench in zip(axes.flat, benches, strict=False):
            for k, method in enumerate(methods):
                c = next((x for x in members if x.benchmark == bench and x.method == method), None)
                if c is None:
                    continue
                value = c.pauc.get(limit)
                if value is None:
                    value = float(edc.pauc(c.discard, c.fnmr, limit))
                style = {
                    "color": colours[k % len(colours)],
                    "linestyle": ("-", "--", ":", "-.")[(k // len(colours)) % 4],  # colours repeat after 10
                    "label": f"{method} ({value:.4f})",
                }
                if protocol == "fixed":  # one point per quality level: a step function
                    ax.step(c.discard, c.fnmr, where="post", **style)
                else:  # points at 0, 0.05, ...: drawn as lines, like the ERC figures of CR-FIQA and the paper
                    ax.plot(c.discard, c.fnmr, **style)
            ax.axvspan(0, limit, color="0.9", zorder=0)
            ax.set_xlim(0, 1 if protocol == "fixed" else 0.95)
            ax.set_ylim(bottom=0)
            ax.set_title(bench)
            ax.set_xlabel("Ratio of unconsidered images")
            ax.set_ylabel(f"FNMR at FMR={fmr:g}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, title=f"pAUC@{limit:g}", title_fontsize=7)
        for ax in list(axes.flat)[len(benches) :]:
            ax.set_visible(False)
        fig.suptitle(f"EDC, {model}, FMR={fmr:g} ({protocol} threshold)")
        fig.tight_layout()
        stem = f"edc_{_slug(model)}_{protocol}_fmr{fmr:g}"
        for suffix in (".png", ".pdf"):
            path = out / (stem + suffix)  # not with_suffix: "fmr0.001" has a dot of its own
            fig.savefig(path, dpi=150)
            written.append(path)
    return written
