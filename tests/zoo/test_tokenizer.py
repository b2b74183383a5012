"""The character tokenizer: one token per character, specials set, loadable by AutoTokenizer."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from workers.zoo.tokenizer import char_tokenizer


def test_round_trip_through_save_pretrained(tmp_path: Path) -> None:
    char_tokenizer("abc =\n").save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("ab c\n=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len("ab c\n=")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab c\n="
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4


def test_unknown_characters_become_unk_and_padding_is_left() -> None:
    tokenizer = char_tokenizer("ab")
    assert tokenizer("aZ", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids("a"), tokenizer.unk_token_id]
    batch = tokenizer(["a", "abb"], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2 and batch["attention_mask"][0] == [0, 0, 1, 1]
