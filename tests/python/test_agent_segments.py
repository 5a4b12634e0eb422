"""kdcore.agent.segments: the span of a token that straddles a span boundary
(its first non-whitespace character's; its first character's when it is all
whitespace), through a Hugging Face fast tokenizer lookalike."""

from __future__ import annotations

import re

from agent_helpers import STRADDLE, A, O, P, R, check_alignment
from kdcore.agent import encode_react


class FakeFastTokenizer:
    """Hugging Face fast tokenizer lookalike: regex pieces, character offsets,
    an EOS id but no BOS id."""

    bos_token_id = None
    eos_token_id = 0

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)
        self.vocab: dict[str, int] = {"<eos>": 0}
        self.calls: list[tuple] = []

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        self.calls.append((text, return_offsets_mapping, add_special_tokens))
        ids, offsets = [], []
        for m in self.pattern.finditer(text):
            ids.append(self.vocab.setdefault(m.group(), len(self.vocab)))
            offsets.append(m.span())
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out


def test_straddling_tokens_take_the_span_of_their_first_non_whitespace_character():
    tok = FakeFastTokenizer(r"\s*\S+|\s+")  # newlines and indentation glue to the next word
    enc = encode_react(STRADDLE, tok)
    assert tok.calls == [(STRADDLE, True, False)]  # one call, on the whole rendered text
    texts = [STRADDLE[s:e] for s, e in enc.offsets[:-1]]
    assert list(zip(texts, enc.spans.tolist()[:-1], strict=True)) == [
        ("Q:", P),
        (" go", P),
        ("\nThought:", R),  # "\n" is PROMPT, "T" is REASON
        (" ok", R),
        ("\nAction:", A),
        (" f[x]", A),
        ("\nObservation:", O),
        (" y", O),
        ("\n  Thought:", R),
        (" fine", R),
        ("\nAction:", A),
        (" finish[x]", A),
        ("\n", A),  # all whitespace: the span of its first character
    ]
    assert enc.input_ids[-1] == 0 and enc.spans[-1] == A  # EOS added, no BOS (none exists)
    check_alignment(enc)


def test_whitespace_only_token_across_a_boundary_takes_its_first_character():
    tok = FakeFastTokenizer(r"\s+|\S+")  # "\n  " straddles OBSERVATION | REASON
    enc = encode_react(STRADDLE, tok, add_eos=False)
    got = {
        STRADDLE[s:e]: k
        for (s, e), k in zip(enc.offsets, enc.spans.tolist(), strict=True)
        if s == STRADDLE.index("\n  Thought")
    }
    assert got == {"\n  ": O}
    token_after = [
        k
        for (s, e), k in zip(enc.offsets, enc.spans.tolist(), strict=True)
        if STRADDLE[s:e] == "Thought:"
    ]
    assert token_after == [R, R]
