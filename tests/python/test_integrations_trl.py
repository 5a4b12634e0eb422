"""kdcore.integrations.trl.DistillationTrainer against TRL's own trainer, on
tiny random Qwen2 models (CPU, no downloads)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import trl
from datasets import Dataset
from transformers import Qwen2Model

from hf_helpers import make_model, make_tokenizer
from kdcore import Span
from kdcore.agent import ChatFormat
from kdcore.agent.completion import completion_spans, tool_call_ranges
from kdcore.integrations.trl import DistillationTrainer

TOK = make_tokenizer()
V = len(TOK)
R, A, O = int(Span.REASON), int(Span.ACT), int(Span.OBSERVATION)  # noqa: E741
PROMPTS = Dataset.from_list(
    [
        {"prompt": [{"role": "user", "content": "what is 2 + 3 ?"}]},
        {"prompt": [{"role": "user", "content": "add two and three"}]},
    ]
    * 2
)


def config(tmp_path, **overrides) -> trl.DistillationConfig:
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        logging_steps=1,
        max_completion_length=10,
        report_to=[],
        save_strategy="no",
        seed=7,
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    options.update(overrides)
    return trl.DistillationConfig(**options)


def run(cls, tmp_path, *, transforms=None, **kwargs):
    args = {
        k: kwargs.pop(k) for k in list(kwargs) if k in trl.DistillationConfig.__dataclass_fields__
    }
    student = make_model(V, seed=1, initializer_range=0.3)
    teacher = make_model(V, hidden=48, seed=2, initializer_range=0.3)
    for model, options in zip((student, teacher), transforms or ({}, {}), strict=True):
        for name, value in options.items():  # read from the configs by both trainers
            setattr(model.config, name, value)
    trainer = cls(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **args),
        train_dataset=PROMPTS,
        processing_class=TOK,
        **kwargs,
    )
    trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


# Gemma's soft-cap on the student, Cohere's logit_scale and Granite's logits_scaling
# (a divisor) on the teacher: both trainers read them from the configs.
TRANSFORMS = (
    {"final_logit_softcapping": 3.0},
    {"logit_scale": 0.5, "final_logit_softcapping": 4.0},
)


@pytest.mark.parametrize(
    ("beta", "temperature", "transforms"),
    [
        (0.5, 1.0, None),
        (0.0, 2.0, None),
        (1.0, 1.0, None),
        (0.5, 1.5, TRANSFORMS),
        (0.0, 1.0, ({"logits_scaling": 2.0}, {})),
    ],
)
def test_first_step_loss_matches_trl(tmp_path, beta, temperature, transforms):
    options = dict(beta=beta, temperature=temperature, transforms=transforms)
    _, theirs = run(trl.DistillationTrainer, tmp_path / "trl", **options)
    _, ours = run(DistillationTrainer, tmp_path / "kd", **options)
    assert theirs[0]["loss"] > 1e-3  # a real divergence, not two uniform models
    assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], rel=1e-4)
    assert ours[0]["grad_norm"] == pytest.approx(theirs[0]["grad_norm"], rel=1e-3)


def test_span_weights_weight_reason_and_act(tmp_path):
    # "Tool calls" open at a "t" and close at an "e": letters of many words of
    # the tiny vocabulary, so the random model's completions surely hold both
    # ACT and REASON tokens.
    fmt = ChatFormat(tool_call_open="t", tool_call_close="e")
    weights = {Span.REASON: 1.0, Span.ACT: 3.0, Span.OBSERVATION: 0.0}
    _, theirs = run(trl.DistillationTrainer, tmp_path / "trl")
    trainer, ours = run(
        DistillationTrainer, tmp_path / "kd", span_weights=weights, chat_format=fmt, max_steps=2
    )
    first = ours[0]
    # one micro-batch on one process: loss = Σ w_k · (mean divergence of span k)
    want = first["span_loss/reason"] + 3.0 * first["span_loss/act"]
    assert first["loss"] == pytest.approx(want, rel=1e-4)
    assert not first["loss"] == pytest.approx(theirs[0]["loss"], rel=1e-2)
    assert all(math.isfinite(e["loss"]) for e in ours) and len(ours) == 2


@pytest.mark.parametrize("accumulation", [1, 2])
def test_equal_weights_averaged_over_tokens_are_trls_loss(tmp_path, accumulation):
    """REASON and ACT weighted 1, averaged over tokens: every completion token
    alike, as TRL — also over two accumulated micro-batches, whose token
    counts come from the whole generation batch."""
    weights = {Span.REASON: 1.0, Span.ACT: 1.0, Span.OBSERVATION: 0.0}
    fmt = ChatFormat(tool_call_open="t", tool_call_close="e")
    steps = dict(per_device_train_batch_size=1, gradient_accumulation_steps=accumulation)
    _, theirs = run(trl.DistillationTrainer, tmp_path / "trl", **steps)
    _, ours = run(
        DistillationTrainer,
        tmp_path / "kd",
        span_weights=weights,
        normalize="token",
        chat_format=fmt,
        **steps,
    )
    assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], rel=1e-4)
    assert ours[0]["grad_norm"] == pytest.approx(theirs[0]["grad_norm"], rel=1e-3)


def test_completion_spans_from_tool_mask_and_tags():
    pieces = [
        "I",
        " think",
        "<tool_call>",
        '{"a"',
        "}",
        "</tool_call>",
        "res",
        "ult",
        "ok",
        "<tool_call>",
        "x",
    ]
    mask = [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1]
    assert completion_spans(pieces, mask) == [R, R, A, A, A, A, O, O, R, A, A]
    assert completion_spans(["a", "b"]) == [R, R]
    assert tool_call_ranges("x</tool_call> <tool_call>y") == [
        (14, 26)
    ]  # stray close, unclosed open
    with pytest.raises(ValueError, match="tool_mask has 1 entries for 2 tokens"):
        completion_spans(["a", "b"], [1])


def test_span_weights_are_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="no completion span"):
        DistillationTrainer(
            model=make_model(V, seed=1),
            teacher_model=make_model(V, seed=2),
            args=config(tmp_path),
            train_dataset=PROMPTS,
            processing_class=TOK,
            span_weights={Span.PROMPT: 1.0, Span.REASON: 0.0, Span.ACT: 0.0},
        )
    with pytest.raises(ValueError, match="normalize"):
        DistillationTrainer(
            model=make_model(V, seed=1),
            teacher_model=make_model(V, seed=2),
            args=config(tmp_path),
            train_dataset=PROMPTS,
            processing_class=TOK,
            normalize="mean",
        )


def test_different_vocabularies_are_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        DistillationTrainer(
            model=make_model(V, seed=1),
            teacher_model=make_model(V + 5, seed=2),
            args=config(tmp_path),
            train_dataset=PROMPTS,
            processing_class=TOK,
        )


def test_teacher_without_output_embeddings_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no output embeddings.*AutoModelForCausalLM"):
        DistillationTrainer(
            model=make_model(V, seed=1),
            teacher_model=Qwen2Model(make_model(V).config),
            args=config(tmp_path),
            train_dataset=PROMPTS,
            processing_class=TOK,
        )


def test_heads_on_different_devices_are_refused(tmp_path):
    trainer = DistillationTrainer(
        model=make_model(V, seed=1),
        teacher_model=make_model(V, seed=2),
        args=config(tmp_path),
        train_dataset=PROMPTS,
        processing_class=TOK,
    )
    trainer.teacher_model.lm_head.to("meta")
    with pytest.raises(ValueError, match="same device"):
        trainer.train()


@pytest.mark.parametrize("module", ["trl", "transformers"])
def test_missing_extra_names_the_install(module):
    code = (
        "import sys\n"
        "sys.modules['trl'] = None; sys.modules['transformers'] = None\n"
        "import kdcore\n"
        "from kdcore._extras import MissingExtraError\n"
        "try:\n"
        f"    import kdcore.integrations.{module}\n"
        "except MissingExtraError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert 'pip install "kdcore[hf]"' in out.stdout, out.stdout + out.stderr


PROMPT = "<|im_start|> user what is 2 + 3 ? <|im_end|> <|im_start|> assistant"
# (word, tool mask, span): a completion with a tool call whose result TRL spliced in
COMPLETIONS = [
    [("<think>", 1, R), ("use", 1, R), ("calc", 1, R), ("</think>", 1, R)]
    + [(w, 1, A) for w in "<tool_call> { name : calc } </tool_call> <|im_end|>".split()[:-1]]
    + [(w, 0, O) for w in "<|im_end|> <|im_start|> user <tool_response> 5 </tool_response>".split()]
    + [(w, 0, O) for w in "<|im_end|> <|im_start|> assistant".split()]
    + [(w, 1, R) for w in "the sum is five <|im_end|>".split()],
    [(w, 1, R) for w in "five <|im_end|>".split()],
]


def fixed_generation(trainer):
    """The trainer's generation replaced by COMPLETIONS (prompt, completion ids, tool mask)."""
    prompt = TOK.convert_tokens_to_ids(PROMPT.split())
    ids = [TOK.convert_tokens_to_ids([w for w, _, _ in c]) for c in COMPLETIONS]
    masks = [[m for _, m, _ in c] for c in COMPLETIONS]
    trainer._generate = lambda prompts: ([prompt] * len(ids), ids, masks, None, [])
    batch = [{"prompt": [{"role": "user", "content": "what is 2 + 3 ?"}]}] * len(ids)
    return trainer._generate_and_score_completions(batch)


def reference_divergences(trainer, inputs):
    """float64 generalized JSD (beta 0.5, T 1) per completion token from the full logits."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    p = inputs["prompt_ids"].shape[1]
    with torch.no_grad():
        zs = trainer.model(input_ids=ids, attention_mask=mask).logits[:, p - 1 : -1].double()
        zt = trainer.teacher_model(input_ids=ids, attention_mask=mask).logits[:, p - 1 : -1]
    ls, lt = zs.log_softmax(-1), zt.double().log_softmax(-1)
    lm = torch.logsumexp(torch.stack([ls + math.log(0.5), lt + math.log(0.5)]), 0)
    return 0.5 * (lt.exp() * (lt - lm)).sum(-1) + 0.5 * (ls.exp() * (ls - lm)).sum(-1)


@pytest.mark.parametrize("span_weights", [None, {Span.REASON: 1.0, Span.ACT: 2.0}])
def test_tool_results_are_observation_and_the_loss_is_the_float64_one(tmp_path, span_weights):
    trainer = DistillationTrainer(
        model=make_model(V, seed=1, initializer_range=0.3),
        teacher_model=make_model(V, hidden=48, seed=2, initializer_range=0.3),
        args=config(tmp_path, beta=0.5),
        train_dataset=PROMPTS,
        processing_class=TOK,
        span_weights=span_weights,
    )
    inputs = fixed_generation(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs).item()
    d = reference_divergences(trainer, inputs)
    spans = torch.zeros_like(d, dtype=torch.long) - 1  # -1: padding
    for b, c in enumerate(COMPLETIONS):
        spans[b, : len(c)] = torch.tensor([k for _, _, k in c])
    if span_weights is None:
        want = d[(spans == R) | (spans == A)].mean().item()  # TRL: tool results left out
    else:
        assert (
            inputs["kd_spans"][inputs["completion_mask"].bool()].tolist()
            == spans[spans >= 0].tolist()
        )
        want = d[spans == R].mean().item() + 2.0 * d[spans == A].mean().item()
    assert loss == pytest.approx(want, rel=1e-4)


def test_an_untested_trl_release_is_named_in_a_warning():
    from kdcore.integrations import trl as kd_trl

    assert kd_trl.untested_trl_warning("1.16.0") is None
    assert kd_trl.untested_trl_warning("1.16") is None
    for version in ("1.17.0", "1.160.0", "2.0.0", "unknown"):
        message = kd_trl.untested_trl_warning(version)
        assert message is not None and f"trl {version} is installed" in message
        assert 'install "trl==1.16.*"' in message
