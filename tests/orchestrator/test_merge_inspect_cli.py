"""`mergesearch merge` and `mergesearch inspect` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.commands.merge import parse_size
from tests.workers.synthetic import make_models, tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    base, experts = make_models(root, n_experts=2, config=tiny_config(layers=2, hidden=16))
    return {"base": base, **experts}


def test_merge_recipe_json_then_inspect(folders: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "recipe.json"
    config.write_text(
        json.dumps(
            {
                "models": {"base": "base", "experts": ["expert0", "expert1"]},
                "layers": [
                    {"from": 0, "op": "task_arithmetic", "params": {"weights": [1.0, 0.0]}},
                    {"from": 1, "op": "copy", "params": {"model": "base"}},
                ],
                "rest": {"op": "copy", "params": {"model": "base"}},
                "sources": {k: str(v) for k, v in folders.items()},
            }
        )
    )
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(config), "--out", str(out), "--shard-size", "20KB"])
    assert result.exit_code == 0, result.output
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    assert (out / "model.safetensors.index.json").exists()  # 20 KB shards: more than one file
    expert = load_file(folders["expert0"] / "model.safetensors")
    base = load_file(folders["base"] / "model.safetensors")
    torch.testing.assert_close(
        merged["model.layers.0.mlp.up_proj.weight"], expert["model.layers.0.mlp.up_proj.weight"]
    )
    torch.testing.assert_close(
        merged["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"]
    )

    plot = tmp_path / "anatomy.png"
    result = runner.invoke(
        app, ["inspect", str(out), "--base", str(folders["base"]), "--json", "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    layers = {row["layer"]: row for row in report["layers"]}
    assert layers[0]["l0"] < 0.5 and layers[1]["l0"] == 1.0  # layer 1 is the base: δ = 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    table = runner.invoke(app, ["inspect", str(out), "--base", str(folders["base"])])
    assert table.exit_code == 0 and "by module class" in table.stdout and "mlp" in table.stdout


def test_merge_mergekit_yaml(folders: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "ties.yaml"
    config.write_text(
        f"merge_method: ties\nbase_model: {folders['base']}\nmodels:\n"
        f"  - model: {folders['expert0']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    )
    result = runner.invoke(app, ["merge", str(config), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "ties x2" in result.stdout


def test_merge_passthrough_frankenmerge(folders: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "franken.yaml"
    config.write_text(
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {folders['expert0']}, layer_range: [0, 2]}}]\n"
        f"  - sources: [{{model: {folders['expert1']}, layer_range: [1, 2]}}]\n"
    )
    out = tmp_path / "m"
    result = runner.invoke(app, ["merge", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    merged = load_file(out / "model.safetensors")
    second = load_file(folders["expert1"] / "model.safetensors")
    name = "model.layers.{}.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name.format(2)], second[name.format(1)], atol=0, rtol=0)
    torch.testing.assert_close(merged["lm_head.weight"], second["lm_head.weight"], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["merge", "missing.json", "--out", "x"], "missing.json: no such file"),
        (["merge", "{config}", "--out", "x", "--shard-size", "lots"], "--shard-size 'lots'"),
        (["merge", "{config}", "--out", "{existing}"], "exists and is not an empty folder"),
        (["merge", "{config}", "--out", "x"], "sources has no folder for model 'expert1'"),
        (["inspect", "{existing}", "--base", "/nowhere"], "folder /nowhere does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "recipe.json"
    config.write_text(
        json.dumps(
            {
                "models": {"base": "base", "experts": ["expert0", "expert1"]},
                "layers": [{"from": 0, "op": "copy", "params": {"model": "base"}}],
                "rest": {"op": "copy", "params": {"model": "base"}},
                "sources": {"base": str(folders["base"]), "expert0": str(folders["expert0"])},
            }
        )
    )
    existing = tmp_path / "full"
    existing.mkdir()
    (existing / "f").write_text("x")
    argv = [a.format(config=config, existing=existing) for a in args]
    result = runner.invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="--shard-size '0MB'"):
        parse_size("0MB")
