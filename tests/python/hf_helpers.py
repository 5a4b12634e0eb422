"""Tiny Hugging Face models and a word-level tokenizer with a chat template,
built on the spot (no downloads) for the tests of kdcore.integrations and
of encode_chat with a chat template."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
WORDS = (
    "system user assistant tool you are helpful add two and three the sum is five "
    'use calc result ok what 2 3 5 + name arguments expr { } " : , . ?'
).split()

# Qwen-like: reasoning in <think>, tool calls as <tool_call> JSON, tool results
# as a user turn of <tool_response> blocks; tools listed in a system turn.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if m['reasoning_content'] %}<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}"
    "{% if m['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ c[\'function\'][\'name\'] }}", "arguments": '
    "{{ c['function']['arguments'] | tojson }}}\n</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}<|im_start|>user\n"
    "{% else %}{{ '\\n' }}{% endif %}<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{% if loop.last or loop.nextitem['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + TAGS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.add_tokens(TAGS)  # matched before the whitespace split
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok


def make_model(
    vocab_size: int, *, hidden: int = 32, layers: int = 1, seed: int = 0, **config
) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=None,
        **config,
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = 3
    model.generation_config.pad_token_id = 0
    return model.float()


MESSAGES = [
    {"role": "user", "content": "what is 2 + 3 ?"},
    {
        "role": "assistant",
        "reasoning_content": "use calc",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "calc", "arguments": {"expr": "2+3"}}}
        ],
    },
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "the sum is five ."},
]
