"""kdcore.agent.tokenizer: the ByteTokenizer's ids, offsets and decoding, a
tokenizers-library tokenizer with merged tokens, and tokenizers kdcore cannot use."""

from __future__ import annotations

import pytest
import torch

from agent_helpers import REACT, STRADDLE, A, O, P, R, check_alignment
from kdcore.agent import ByteTokenizer, encode_react

# ---------------------------------------------------------------- byte tokenizer


def test_byte_tokenizer_ids_offsets_and_decode():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    text = "aé€😀"  # 1, 2, 3 and 4 bytes
    assert tok.encode(text) == list(text.encode("utf-8"))
    out = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert out["input_ids"] == list(text.encode("utf-8"))
    assert out["offset_mapping"] == [(0, 1)] + [(1, 2)] * 2 + [(2, 3)] * 3 + [(3, 4)] * 4
    special = tok("ab", return_offsets_mapping=True, add_special_tokens=True)
    assert special["input_ids"] == [257, 97, 98, 258]
    assert special["offset_mapping"] == [(0, 0), (0, 1), (1, 2), (0, 0)]
    assert tok.decode([257, *tok.encode(text), 258, 256]) == text
    assert tok.decode(torch.tensor(tok.encode(text))) == text
    assert tok.decode([0xC3]) == "\ufffd"  # a lone lead byte
    with pytest.raises(ValueError, match="not a ByteTokenizer id"):
        tok.decode([259])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# ---------------------------------------------------------------- other tokenizers


def test_tokenizers_library_tokenizer_with_merged_tokens():
    from tokenizers import Regex, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split

    words = [
        "Q:",
        " go",
        "\nThought:",
        " ok",
        "\nAction:",
        " f[x]",
        "\nObservation:",
        " y",
        "\n  Thought:",
        " fine",
        " finish[x]",
        "\n",
    ]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Split(Regex(r"\s*\S+"), behavior="isolated")
    enc = encode_react(STRADDLE, tok)  # no BOS/EOS ids: none added, no error
    expected = [
        ("Q:", P),
        (" go", P),
        ("\nThought:", R),
        (" ok", R),
        ("\nAction:", A),
        (" f[x]", A),
        ("\nObservation:", O),
        (" y", O),
        ("\n  Thought:", R),
        (" fine", R),
        ("\nAction:", A),
        (" finish[x]", A),
        ("\n", A),
    ]
    assert enc.input_ids.tolist() == [vocab[w] for w, _ in expected]
    assert enc.spans.tolist() == [k for _, k in expected]
    check_alignment(enc)
    # non-ASCII: the library's offsets are character offsets too
    enc = encode_react("Thought: café\nAction: f[ü]\n", tok)
    assert enc.offsets == [(0, 8), (8, 13), (13, 21), (21, 26), (26, 27)]
    assert enc.spans.tolist() == [R, R, A, A, A]


def test_tokenizer_errors():
    class Slow:
        def __call__(self, text, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available")

    with pytest.raises(TypeError, match="fast tokenizer"):
        encode_react(REACT, Slow())
    with pytest.raises(TypeError, match="tokenizer must be"):
        encode_react(REACT, 42)

    class Broken:
        def __call__(self, text, **kwargs):
            return {"input_ids": [1], "offset_mapping": [(0, len(text) + 5)]}

    with pytest.raises(ValueError, match="outside the text"):
        encode_react(REACT, Broken())
