"""Tokenization from the bundled tokenizer.json: WordPiece, lower-casing, the 256 cap, flags."""

from __future__ import annotations

import json

import pytest

from models.text.errors import BundleFormatError, EmptyTextError
from models.text.tokenizer import TextTokenizer
from tests.models.minilm_support import minilm_bundle


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(minilm_bundle().tokenizer_text(), max_seq_length=256, vocab_limit=30522)


def test_wordpiece_with_cls_and_sep(tok: TextTokenizer) -> None:
    assert tok.tokens("unaffable") == ["[CLS]", "una", "##ffa", "##ble", "[SEP]"]
    (enc,) = tok.encode(["hello world"])
    assert enc.ids.tolist() == [101, 7592, 2088, 102]  # BERT uncased vocabulary ids
    assert enc.ids.dtype.name == "int64"
    assert not enc.truncated


def test_lower_cases_and_splits_punctuation(tok: TextTokenizer) -> None:
    upper, lower = tok.encode(["HELLO, World!", "hello , world !"])
    assert upper.ids.tolist() == lower.ids.tolist()
    assert tok.tokens("Don't") == ["[CLS]", "don", "'", "t", "[SEP]"]


def test_accents_are_kept_and_unknown_characters_map_to_unk(tok: TextTokenizer) -> None:
    # strip_accents is null in the file and lowercase on: BERT uncased then strips accents.
    assert tok.tokens("Café")[1:-1] == ["cafe"]
    assert "[UNK]" in tok.tokens("\U0001f9ec")


def test_truncates_at_256_tokens_and_says_so(tok: TextTokenizer) -> None:
    long_text = " ".join(["word"] * 600)
    exact = " ".join(["word"] * 254)  # + [CLS] + [SEP] = 256: fits exactly
    over = " ".join(["word"] * 255)
    a, b, c, short = tok.encode([long_text, exact, over, "word"])
    assert len(a) == 256
    assert a.truncated
    assert a.ids[0] == 101
    assert a.ids[-1] == 102
    assert len(b) == 256
    assert not b.truncated
    assert len(c) == 256
    assert c.truncated
    assert len(short) == 3
    assert not short.truncated


def test_the_files_own_padding_and_128_truncation_are_overridden(tok: TextTokenizer) -> None:
    raw = json.loads(minilm_bundle().tokenizer_text())
    assert raw["truncation"]["max_length"] == 128
    assert raw["padding"] is not None
    (enc,) = tok.encode(["short"])
    assert len(enc) == 3  # no padding to 128
    (enc,) = tok.encode([" ".join(["word"] * 200)])
    assert len(enc) == 202  # not cut at 128


def test_a_text_without_tokens_is_an_empty_text(tok: TextTokenizer) -> None:
    with pytest.raises(EmptyTextError) as info:
        tok.encode(["fine", "\x00\x01\u200b"])
    assert info.value.index == 1


@pytest.mark.parametrize(
    ("text", "limit", "match"),
    [
        ("not json", 30522, "not a valid tokenizer"),
        ('{"version": "1.0"}', 30522, "not a valid tokenizer"),
        (None, 1000, "exceeds"),
    ],
)
def test_unusable_tokenizers_are_refused(text: str | None, limit: int, match: str) -> None:
    with pytest.raises(BundleFormatError, match=match):
        TextTokenizer(
            text or minilm_bundle().tokenizer_text(), max_seq_length=256, vocab_limit=limit
        )


def test_a_tokenizer_without_bert_special_tokens_is_refused() -> None:
    raw = json.loads(minilm_bundle().tokenizer_text())
    raw["model"]["vocab"] = {k: v for k, v in raw["model"]["vocab"].items() if k != "[SEP]"}
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "[SEP]"]
    raw["post_processor"] = None
    with pytest.raises(BundleFormatError, match="special tokens"):
        TextTokenizer(json.dumps(raw), max_seq_length=256, vocab_limit=30522)
