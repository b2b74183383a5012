"""Sources: lazy opening, validation up front, one-line errors naming the model and the tensor or file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.workers.synthetic import make_models, tiny_config
from workers.sources import SourceError, Sources


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return make_models(tmp_path_factory.mktemp("zoo"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, edit) -> None:
    """Load a model's single safetensors file, apply `edit` to its tensor dict, and save it back."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_opens_and_describes(zoo: tuple[Path, dict[str, Path]]) -> None:
    base, experts = zoo
    src = Sources(base, experts)
    assert src.names == ["base", "expert0", "expert1"]
    assert src.experts == ["expert0", "expert1"]
    assert src.num_layers == 3
    assert src.config["num_hidden_layers"] == 3
    assert "lm_head.weight" in src.tensor_names()
    assert src.layer_of("model.layers.2.self_attn.q_proj.weight") == (2, "self_attn.q_proj.weight")
    assert src.layer_of("model.norm.weight") is None
    classes = {
        "model.layers.0.self_attn.q_proj.weight": "attn",
        "model.layers.0.mlp.down_proj.weight": "mlp",
        "model.layers.0.input_layernorm.weight": "norm",
        "model.norm.weight": "norm",
        "model.embed_tokens.weight": "embed",
        "lm_head.weight": "head",
    }
    assert {n: Sources.module_class(n) for n in classes} == classes


def test_load_is_float32_and_matches_file(zoo: tuple[Path, dict[str, Path]]) -> None:
    base, experts = zoo
    src = Sources(base, experts)
    name = "model.layers.1.mlp.up_proj.weight"
    expected = load_file(experts["expert1"] / "model.safetensors")[name]
    got = src.load("expert1", name)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected.float())
    assert not torch.equal(got, src.load("base", name))


def test_sharded_folder_reads_like_single_file(tmp_path: Path, zoo: tuple[Path, dict[str, Path]]) -> None:
    sharded_base, sharded_experts = make_models(tmp_path, max_shard_size="20KB")
    assert (sharded_base / "model.safetensors.index.json").exists()
    single = Sources(*zoo)
    sharded = Sources(sharded_base, sharded_experts)
    assert sharded.tensor_names() == single.tensor_names()
    for name in sharded.tensor_names():
        assert torch.equal(sharded.load("expert0", name), single.load("expert0", name))


def test_tied_head_is_left_out(tmp_path: Path) -> None:
    base, experts = make_models(tmp_path, config=tiny_config(tie=True))
    src = Sources(base, experts)
    assert src.tied_embeddings
    assert "lm_head.weight" not in src.tensor_names()
    assert "model.embed_tokens.weight" in src.tensor_names()


def test_missing_folder_and_config(tmp_path: Path, zoo: tuple[Path, dict[str, Path]]) -> None:
    base, experts = zoo
    with pytest.raises(SourceError, match=r"model 'ghost': folder .* does not exist"):
        Sources(base, {**experts, "ghost": tmp_path / "nowhere"})
    broken = _copy(experts["expert0"], tmp_path / "noconfig")
    (broken / "config.json").unlink()
    with pytest.raises(SourceError, match=r"model 'x': .*config.json does not exist"):
        Sources(base, {"x": broken})


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (
            lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(3, 3)),
            (
                r"^model 'bad': tensor 'model.layers.1.mlp.up_proj.weight' has shape \[3, 3\], "
                r"base has \[64, 32\]$"
            ),
        ),
        (
            lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].half()),
            r"^model 'bad': tensor 'model.norm.weight' is F16, base is F32$",
        ),
        (
            lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"),
            r"^model 'bad': tensor 'model.layers.0.self_attn.k_proj.weight' is missing$",
        ),
        (
            lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)),
            r"^model 'bad': tensor 'model.extra.weight' is not in the base$",
        ),
    ],
    ids=["shape", "dtype", "missing", "extra"],
)
def test_mismatch_names_model_and_tensor(
    tmp_path: Path, zoo: tuple[Path, dict[str, Path]], edit, pattern
) -> None:
    base, experts = zoo
    bad = _copy(experts["expert0"], tmp_path / "bad")
    _rewrite(bad, edit)
    with pytest.raises(SourceError, match=pattern):
        Sources(base, {"expert1": experts["expert1"], "bad": bad})


def test_config_mismatch(tmp_path: Path, zoo: tuple[Path, dict[str, Path]]) -> None:
    base, experts = zoo
    bad = _copy(experts["expert0"], tmp_path / "deeper")
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"^model 'deeper': config num_hidden_layers is 4, base has 3$"):
        Sources(base, {"deeper": bad})


def test_truncated_file_is_named(tmp_path: Path, zoo: tuple[Path, dict[str, Path]]) -> None:
    base, experts = zoo
    bad = _copy(experts["expert0"], tmp_path / "cut")
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(
        SourceError, match=r"^model 'cut': corrupt or truncated safetensors file .*cut/model\.safetensors"
    ):
        Sources(base, {"cut": bad})


def test_nan_source_fails_on_load(tmp_path: Path, zoo: tuple[Path, dict[str, Path]]) -> None:
    base, experts = zoo
    bad = _copy(experts["expert0"], tmp_path / "nan")

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.2.mlp.gate_proj.weight"][0, 0] = float("nan")

    _rewrite(bad, poison)
    src = Sources(base, {"nan": bad})  # opening reads no weights, so it succeeds
    with pytest.raises(
        SourceError, match=r"^model 'nan': tensor 'model.layers.2.mlp.gate_proj.weight' contains NaN"
    ):
        src.load("nan", "model.layers.2.mlp.gate_proj.weight")
