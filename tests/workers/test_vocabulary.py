"""Experts whose vocabulary differs from the base's by added tokens: rows matched by token text, padded and
cropped as mergekit's `tokenizer_source: base` (and `union`) do, the tokenizer written to match; any other
shape difference is refused with one line naming model and tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.workers.architectures import VOCAB, perturbed, tiny_model
from workers.materialize import ResidentModel, write_merged
from workers.recipe import Recipe
from workers.sources import SourceError, Sources

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
PROMPT = torch.tensor([[1, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base of VOCAB tokens; `added2`/`added3` add `<extra_0>`, `<extra_1>` (and `<extra_2>`); `fewer` lacks
    the alphabet's last two characters."""
    root = tmp_path_factory.mktemp("vocab")
    base = tiny_model("llama", root / "base", seed=0)
    return {
        "base": base,
        "added2": perturbed(base, root / "added2", seed=1, vocab=VOCAB + 2),
        "added3": perturbed(base, root / "added3", seed=2, vocab=VOCAB + 3),
        "fewer": perturbed(base, root / "fewer", seed=3, vocab=VOCAB - 2),
        "same": perturbed(base, root / "same", seed=4),
    }


def raw(folder: Path, name: str) -> torch.Tensor:
    return load_file(folder / "model.safetensors")[name].float()


def ties(experts: list[str]) -> Recipe:
    spec = {"op": "ties", "params": {"weights": [0.6, 0.5], "density": 0.6}}
    return Recipe.parse(
        {"models": {"base": "base", "experts": experts}, "layers": [{"from": i, **spec} for i in (0, 1)], "rest": spec}
    )


def assert_in_place_equals_disk(sources: Sources, recipe: Recipe, out: Path) -> AutoModelForCausalLM:
    resident = ResidentModel(sources)
    resident.materialize(recipe)
    disk = AutoModelForCausalLM.from_pretrained(write_merged(recipe, sources, out), dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(resident.model(PROMPT).logits, disk(PROMPT).logits)
    assert len(resident.tokenizer) == len(AutoTokenizer.from_pretrained(out)) == disk.config.vocab_size
    return disk


def test_base_vocabulary_crops_added_rows_and_pads_missing_ones(folders: dict[str, Path], tmp_path: Path) -> None:
    experts = {n: folders[n] for n in ("added2", "fewer")}
    sources = Sources(folders["base"], experts)
    assert sources.vocabulary is not None and sources.vocabulary.rows == VOCAB
    for name in (EMBED, HEAD):
        assert sources.shape(name) == (VOCAB, 32)
        added = sources.load("added2", name)  # its own rows for the base's tokens, its added rows dropped
        assert torch.equal(added, raw(folders["added2"], name)[:VOCAB])
        fewer = sources.load("fewer", name)  # the rows it lacks are the base's
        assert torch.equal(fewer[: VOCAB - 2], raw(folders["fewer"], name))
        assert torch.equal(fewer[VOCAB - 2 :], raw(folders["base"], name)[VOCAB - 2 :])
        assert torch.equal(sources.load("base", name), raw(folders["base"], name))
    disk = assert_in_place_equals_disk(sources, ties(["added2", "fewer"]), tmp_path / "merged")
    assert disk.config.vocab_size == VOCAB
    assert json.loads((tmp_path / "merged" / "tokenizer.json").read_text()) == json.loads(
        (folders["base"] / "tokenizer.json").read_text()
    )


def test_union_vocabulary_adds_every_models_tokens(folders: dict[str, Path], tmp_path: Path) -> None:
    experts = {n: folders[n] for n in ("added2", "added3")}
    sources = Sources(folders["base"], experts, tokenizer_source="union")
    assert sources.vocabulary is not None and sources.vocabulary.rows == VOCAB + 3
    vocab = sources.vocabulary.tokenizer.get_vocab()
    assert [vocab[f"<extra_{i}>"] for i in range(3)] == [VOCAB, VOCAB + 1, VOCAB + 2]
    a2, a3 = raw(folders["added2"], HEAD), raw(folders["added3"], HEAD)
    base = sources.load("base", HEAD)
    # <extra_0>, <extra_1>: two experts have them, the base not: their mean; <extra_2>: only added3's.
    torch.testing.assert_close(base[VOCAB : VOCAB + 2], (a2[VOCAB:] + a3[VOCAB : VOCAB + 2]) / 2)
    assert torch.equal(base[VOCAB + 2], a3[VOCAB + 2])
    assert torch.equal(sources.load("added2", HEAD)[: VOCAB + 2], a2)
    assert torch.equal(sources.load("added2", HEAD)[VOCAB + 2], a3[VOCAB + 2])
    assert torch.equal(sources.load("added3", HEAD), a3)
    assert_in_place_equals_disk(sources, ties(["added2", "added3"]), tmp_path / "merged")
    written = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert written.convert_ids_to_tokens(VOCAB + 2) == "<extra_2>"
    assert written("ab<extra_2>").input_ids[-1] == VOCAB + 2


def test_same_vocabularies_need_no_alignment(folders: dict[str, Path]) -> None:
    assert Sources(folders["base"], {"same": folders["same"]}).vocabulary is None


def test_other_row_counts_are_refused_naming_model_and_tensor(folders: dict[str, Path], tmp_path: Path) -> None:
    """Rows that do not match the expert's own config vocabulary are not added tokens: refused."""
    bad = perturbed(folders["base"], tmp_path / "bad", seed=5, vocab=VOCAB + 2)
    config = json.loads((bad / "config.json").read_text())
    config["vocab_size"] = VOCAB
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=rf"^model 'bad': tensor 'lm_head.weight' has shape \[{VOCAB + 2}, 32\], "):
        Sources(folders["base"], {"bad": bad})
