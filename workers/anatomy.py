"""Sparsity anatomy of a task vector δ = θ_model − θ_base (ALGORITHMS.md §3, the 70B paper's §2.2/§3.4).

Per tensor: L0 sparsity (|δ| < 0.01·max|δ|), exact-zero and |δ| < 1e-8 fractions, Gini of |δ|, excess
kurtosis of δ, and the share of Σ|δ| held by the top 1% and 5% of entries. Then unweighted means per layer
and per module class (as the paper's tables), and numel-weighted global values (global L0 is not the mean of
per-tensor L0s). Tensors are read one at a time through memory-mapped safetensors, so a model of any size
fits in memory. A low measured L0 against the scaling-law prediction flags dense, SFT-like updates, where
RAM's unique-region assumption is weak.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workers.sources import Sources

METRICS = ("l0", "zero_fraction", "tiny_fraction", "gini", "kurtosis", "top1_mass", "top5_mass")
L0_EPS = 0.01
TINY = 1e-8
LAW_A, LAW_B = 0.085, 0.587
"""s(N) = 1 − a·N^(−b), N in billions (70B paper; fitted to simulated task vectors: a diagnostic only)."""
MODULE_ORDER = ("attn", "mlp", "norm", "embed", "head", "other")


def predicted_l0(billions: float) -> float | None:
    """The scaling law's L0 for a model of this size; None outside the sizes it was fitted on (1B–405B)."""
    return 1 - LAW_A * billions ** (-LAW_B) if 1.0 <= billions <= 405.0 else None


def tensor_metrics(delta: torch.Tensor) -> dict[str, float | None]:
    """The §3 metrics of one task-vector tensor (None where a metric is undefined)."""
    x = delta.detach().reshape(-1).to(torch.float64)
    n = x.numel()
    mag = x.abs()
    peak = float(mag.max()) if n else 0.0
    total = float(mag.sum())
    out: dict[str, float | None] = {
        "l0": float((mag < L0_EPS * peak).double().mean()) if peak > 0 else 1.0,
        "zero_fraction": float((x == 0).double().mean()),
        "tiny_fraction": float((mag < TINY).double().mean()),
    }
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    out["gini"] = (
        float(((2 * ranks - n - 1) * torch.sort(mag).values).sum() / (n * total)) if total > 0 else 0.0
    )
    centred = x - x.mean()
    m2 = float((centred**2).mean())
    out["kurtosis"] = float((centred**4).mean()) / m2**2 - 3.0 if m2 > 0 else None
    for key, share in (("top1_mass", 0.01), ("top5_mass", 0.05)):
        k = max(1, math.ceil(share * n))
        out[key] = float(torch.topk(mag, k).values.sum()) / total if total > 0 else None
    return out


def _mean(values: list[float | None], weights: list[int] | None = None) -> float | None:
    pairs = [
        (v, 1 if weights is None else w)
        for v, w in zip(values, weights or [1] * len(values))
        if v is not None
    ]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _summary(rows: list[dict[str, Any]], weighted: bool = False) -> dict[str, Any]:
    weights = [r["numel"] for r in rows] if weighted else None
    return {
        "tensors": len(rows),
        "numel": sum(r["numel"] for r in rows),
        **{m: _mean([r[m] for r in rows], weights) for m in METRICS},
    }


def anatomy(
    model_dir: Path, base_dir: Path, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """The sparsity report of `model_dir`'s task vector against `base_dir` (same architecture and shapes).

    Keys: `tensors` (one row per tensor: name, module, layer, numel and the metrics), `layers` (unweighted
    means per decoder layer), `modules` (unweighted means per module class), `global` (numel-weighted means,
    with the scaling law's predicted L0 for this parameter count). `progress(done, total)` counts tensors.
    """
    sources = Sources(Path(base_dir), {"model": Path(model_dir)})
    rows: list[dict[str, Any]] = []
    names = sources.tensor_names()
    for done, name in enumerate(names, 1):
        delta = sources.load("model", name) - sources.load("base", name)
        located = sources.layer_of(name)
        rows.append(
            {
                "name": name,
                "module": sources.module_class(name),
                "layer": located[0] if located else None,
                "numel": delta.numel(),
                **tensor_metrics(delta),
            }
        )
        del delta
        if progress is not None:
            progress(done, len(names))
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    modules = [m for m in MODULE_ORDER if any(r["module"] == m for r in rows)]
    total_numel = sum(r["numel"] for r in rows)
    billions = total_numel / 1e9
    return {
        "model": str(model_dir),
        "base": str(base_dir),
        "tensors": rows,
        "layers": [{"layer": i, **_summary([r for r in rows if r["layer"] == i])} for i in layers],
        "modules": {m: _summary([r for r in rows if r["module"] == m]) for m in modules},
        "global": {**_summary(rows, weighted=True), "predicted_l0": predicted_l0(billions)},
    }


def layer_module_grid(
    report: dict[str, Any], metric: str
) -> tuple[list[int], list[str], list[list[float | None]]]:
    """Unweighted mean of `metric` per (layer, module class) over the decoder layers' tensors."""
    rows = [r for r in report["tensors"] if r["layer"] is not None]
    layers = sorted({r["layer"] for r in rows})
    modules = [m for m in MODULE_ORDER if any(r["module"] == m for r in rows)]
    grid = [
        [_mean([r[metric] for r in rows if r["layer"] == i and r["module"] == m]) for m in modules]
        for i in layers
    ]
    return layers, modules, grid


def plot_anatomy(report: dict[str, Any], path: Path) -> Path:
    """Heatmaps (decoder layers × module class) of L0 sparsity and Gini, each cell annotated, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = (("l0", "L0 sparsity (|δ| < 1% of max)"), ("gini", "Gini of |δ|"))
    layers, modules, _ = layer_module_grid(report, "l0")
    height = max(3.0, 0.35 * len(layers) + 1.8)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, height), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        _, _, grid = layer_module_grid(report, metric)
        values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
        image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(len(modules)), modules)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        ax.set_xlabel("module")
        ax.set_ylabel("decoder layer")
        ax.set_title(title, fontsize=10)
        if len(layers) <= 40:
            for (i, j), v in np.ndenumerate(values):
                if not np.isnan(v):
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if v < 0.6 else "black",
                    )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    g = report["global"]
    fig.suptitle(
        f"{Path(report['model']).name} vs {Path(report['base']).name}: global L0 {g['l0']:.3f}, "
        f"Gini {g['gini']:.3f}, exact zeros {g['zero_fraction']:.3f}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
