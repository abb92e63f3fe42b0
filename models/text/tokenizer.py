"""Tokenization with the `tokenizers` library, from a bundle's ``tokenizer.json``.

The bundled all-MiniLM-L6-v2 tokenizer is BERT's: a normaliser that cleans control characters
and lower-cases, a whitespace/punctuation pre-tokenizer, WordPiece over a 30,522-entry
vocabulary, and a post-processor that adds ``[CLS]``/``[SEP]``. Its file also asks for fixed
padding and truncation to 128; sentence-transformers overrides both (it pads per batch and
truncates at the model's ``max_seq_length``, 256), and so do we: padding happens per batch in
:mod:`models.text.batching`, truncation here, and each result says whether it was truncated.

No I/O: the tokenizer is built from the JSON text the caller hands over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from models.text.errors import BundleFormatError, EmptyTextError

__all__ = ["TokenizedText", "TextTokenizer"]

#: Special tokens the pipeline relies on (the post-processor adds the first two).
CLS: Final = "[CLS]"
SEP: Final = "[SEP]"
PAD: Final = "[PAD]"


@dataclass(frozen=True, slots=True)
class TokenizedText:
    """One text's token ids (with ``[CLS]``/``[SEP]``) and whether it was cut at the cap."""

    ids: npt.NDArray[np.int64]
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


class TextTokenizer:
    """A `tokenizers` tokenizer set up as sentence-transformers uses it.

    Args:
        tokenizer_json: the contents of ``tokenizer.json``.
        max_seq_length: the token cap, special tokens included (256 for all-MiniLM-L6-v2).
        vocab_limit: ids must stay below this (the model's embedding table size).

    Raises:
        BundleFormatError: the JSON is not a tokenizer, or it lacks ``[CLS]``/``[SEP]``/``[PAD]``,
            or its vocabulary is larger than ``vocab_limit``.
    """

    def __init__(self, tokenizer_json: str, *, max_seq_length: int, vocab_limit: int) -> None:
        if max_seq_length < 2:
            raise ValueError("max_seq_length must leave room for [CLS] and [SEP]")
        try:
            tok = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise BundleFormatError(f"tokenizer.json is not a valid tokenizer: {exc}") from None
        tok.no_padding()
        tok.enable_truncation(max_length=max_seq_length)
        ids = {name: tok.token_to_id(name) for name in (CLS, SEP, PAD)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise BundleFormatError(f"tokenizer.json lacks the special tokens {missing}")
        if tok.get_vocab_size(with_added_tokens=True) > vocab_limit:
            raise BundleFormatError(
                f"tokenizer vocabulary ({tok.get_vocab_size()}) exceeds the model's {vocab_limit}"
            )
        self._tok = tok
        self._special = np.array(sorted(i for i in ids.values() if i is not None), np.int64)
        self.max_seq_length = max_seq_length
        self.pad_id: int = ids[PAD] or 0

    def encode(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Tokenize ``texts`` (already checked by :func:`models.text.limits.check_texts`).

        Raises:
            EmptyTextError: a text yields no token besides the special ones (only control or
                zero-width characters, for example).
        """
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=True)
        out: list[TokenizedText] = []
        for index, enc in enumerate(encodings):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if np.isin(ids, self._special).all():
                raise EmptyTextError(f"text {index} has no tokens", index=index)
            # With truncation on, whatever did not fit is returned as overflow encodings.
            out.append(TokenizedText(ids=ids, truncated=bool(enc.overflowing)))
        return out

    def tokens(self, text: str) -> list[str]:
        """The word pieces of one text (for tests and diagnostics)."""
        return list(self._tok.encode(text).tokens)
