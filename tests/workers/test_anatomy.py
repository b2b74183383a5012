"""Sparsity anatomy (ALGORITHMS.md §3): the worked example exactly, edge cases, aggregation, the plot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.workers.synthetic import make_models, tiny_config
from workers.anatomy import anatomy, plot_anatomy, predicted_l0, tensor_metrics


def test_worked_example() -> None:
    delta = torch.tensor([0, 0.001, -0.002, 0.5, -1.0, 0, 0, 0.003, 0, 0.2], dtype=torch.float64)
    m = tensor_metrics(delta)
    assert m["l0"] == pytest.approx(0.7)
    assert m["zero_fraction"] == pytest.approx(0.4)
    assert m["gini"] == pytest.approx(13.51 / 17.06, abs=1e-12)
    assert m["kurtosis"] == pytest.approx(2.895, abs=5e-4)
    assert m["top1_mass"] == m["top5_mass"] == pytest.approx(1.0 / 1.706)


def test_edge_cases() -> None:
    zero = tensor_metrics(torch.zeros(50))
    assert zero == {
        "l0": 1.0,
        "zero_fraction": 1.0,
        "tiny_fraction": 1.0,
        "gini": 0.0,
        "kurtosis": None,
        "top1_mass": None,
        "top5_mass": None,
    }
    one_hot = torch.zeros(100)
    one_hot[3] = -2.0
    m = tensor_metrics(one_hot)
    assert m["gini"] == pytest.approx(99 / 100)  # the maximum, (n − 1)/n
    assert m["top1_mass"] == pytest.approx(1.0) and m["l0"] == pytest.approx(0.99)


@pytest.fixture(scope="module")
def sparse_expert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An expert that equals the base everywhere except layer 1's MLP and the embeddings."""
    root = tmp_path_factory.mktemp("anatomy")
    base, experts = make_models(root, n_experts=1, config=tiny_config(layers=3, hidden=16))
    base_w = load_file(base / "model.safetensors")
    expert_w = load_file(experts["expert0"] / "model.safetensors")
    mixed = {k: (expert_w[k] if ("layers.1.mlp" in k or "embed" in k) else base_w[k]).clone() for k in base_w}
    save_file(mixed, experts["expert0"] / "model.safetensors", metadata={"format": "pt"})
    return experts["expert0"], base


def test_report_aggregates_per_layer_module_and_numel(sparse_expert: tuple[Path, Path]) -> None:
    model, base = sparse_expert
    report = anatomy(model, base)
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["model.layers.1.mlp.up_proj.weight"]["l0"] < 0.5
    assert rows["model.layers.0.mlp.up_proj.weight"]["l0"] == 1.0
    assert report["modules"]["mlp"]["tensors"] == 9 and report["modules"]["attn"]["tensors"] == 12
    mlp = [r["l0"] for r in report["tensors"] if r["module"] == "mlp"]
    assert report["modules"]["mlp"]["l0"] == pytest.approx(sum(mlp) / len(mlp))
    assert report["layers"][0]["l0"] == 1.0 and report["layers"][1]["l0"] < 1.0
    numel = sum(r["numel"] for r in report["tensors"])
    weighted = sum(r["l0"] * r["numel"] for r in report["tensors"]) / numel
    assert report["global"]["l0"] == pytest.approx(weighted) and report["global"]["numel"] == numel
    assert report["global"]["predicted_l0"] is None  # the law was fitted on 1B–405B models


def test_scaling_law_predictions() -> None:
    assert predicted_l0(70) == pytest.approx(0.993, abs=5e-4)
    assert predicted_l0(7) == pytest.approx(0.973, abs=5e-4)


def test_plot_writes_a_png(sparse_expert: tuple[Path, Path], tmp_path: Path) -> None:
    out = plot_anatomy(anatomy(*sparse_expert), tmp_path / "anatomy.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
