"""A tokenizer's fingerprint: stored with a capture so that a student with
another tokenizer is an error, not silently misaligned ids."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """``"sha256:<hex>"`` of the tokenizer's vocabulary (token string -> id, added
    tokens included), from its ``get_vocab()`` (Hugging Face ``transformers``
    tokenizers and ``tokenizers.Tokenizer`` alike). Two tokenizers with the same
    fingerprint map every token string to the same id."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        raise TypeError(
            "tokenizer_fingerprint needs a tokenizer with get_vocab(); got "
            f"{type(tokenizer).__name__}"
        )
    vocab = get_vocab()
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError("the tokenizer's get_vocab() returned no vocabulary")
    pairs = sorted((int(i), str(tok)) for tok, i in vocab.items())
    text = json.dumps(pairs, ensure_ascii=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()
