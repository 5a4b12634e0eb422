"""kdcore.integrations.transformers.KDTrainer on tiny random Qwen2 models (CPU, no downloads)."""

from __future__ import annotations

import functools
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Model, TrainingArguments

from hf_helpers import MESSAGES, make_model, make_tokenizer
from kdcore import Span
from kdcore.agent import collate, encode_chat
from kdcore.integrations.transformers import KDTrainer
from kdcore.offline import TopKDataset, capture

WEIGHTS = {Span.PROMPT: 0.0, Span.REASON: 1.0, Span.ACT: 2.0, Span.OBSERVATION: 0.0}
TOK = make_tokenizer()
V = len(TOK)


def items(n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Encoded trajectories whose spans differ in length from item to item."""
    words = ["2 + 3", "two and three", "5 + 2", "three and two"]
    thoughts = ["use calc", "use calc and add two and three", "add", "use calc ok"]
    answers = ["the sum is five .", "five", "ok the sum is five", "5"]
    out = []
    for i in range(n):
        messages = [dict(m) for m in MESSAGES]
        messages[0] = {"role": "user", "content": f"what is {words[i % 4]} ?"}
        messages[1]["reasoning_content"] = thoughts[i % 4]
        messages[3] = {"role": "assistant", "content": answers[i % 4]}
        out.append(encode_chat(messages, TOK).to_dict())
    return out


def arguments(tmp_path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=3,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def trainer(tmp_path, *, teacher=True, dataset=None, **options) -> KDTrainer:
    overrides = {
        k: options.pop(k) for k in list(options) if k in TrainingArguments.__dataclass_fields__
    }
    return KDTrainer(
        model=make_model(V, seed=1, initializer_range=0.2),
        teacher_model=make_model(V, hidden=48, seed=2, initializer_range=0.2) if teacher else None,
        args=arguments(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else items(),
        processing_class=TOK,
        **options,
    )


def reference_loss(student, teacher, batch, *, temperature, weights, normalize):
    """float64 span loss from the full logits (torch's own log_softmax)."""
    with torch.no_grad():
        zs = student(input_ids=batch["input_ids"]).logits[:, :-1].double() / temperature
        zt = teacher(input_ids=batch["input_ids"]).logits[:, :-1].double() / temperature
    kl = (zt.softmax(-1) * (zt.log_softmax(-1) - zs.log_softmax(-1))).sum(-1) * temperature**2
    valid = batch["labels"][:, 1:] != -100
    spans = batch["spans"][:, 1:]
    if weights is None:
        return kl[valid].mean().item()
    total, positive = 0.0, 0
    for k, w in weights.items():
        rows = valid & (spans == k)
        if w > 0 and rows.any():
            positive += int(rows.sum())
            total += w * (kl[rows].mean().item() if normalize == "span" else kl[rows].sum().item())
    return total if normalize == "span" else total / positive


@pytest.mark.parametrize(
    ("weights", "normalize"), [(None, "span"), (WEIGHTS, "span"), (WEIGHTS, "token")]
)
def test_loss_matches_float64_reference(tmp_path, weights, normalize):
    tr = trainer(tmp_path, temperature=2.0, span_weights=weights, normalize=normalize)
    batch = collate(items(), pad_id=TOK.pad_token_id)
    got = tr.compute_loss(tr.model, batch).item()
    want = reference_loss(
        tr.model, tr.teacher_model, batch, temperature=2.0, weights=weights, normalize=normalize
    )
    assert got == pytest.approx(want, rel=1e-4)


def test_trains_and_logs_span_losses(tmp_path):
    tr = trainer(tmp_path, span_weights=WEIGHTS, max_steps=3)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    logs = [entry for entry in tr.state.log_history if "loss" in entry]
    assert len(logs) == 3
    assert all(
        math.isfinite(e["loss"]) and "span_loss/reason" in e and "span_loss/act" in e for e in logs
    )
    # step loss = Σ w_k · mean over span k (one micro-batch, one process)
    first = logs[0]
    assert first["loss"] == pytest.approx(
        first["span_loss/reason"] + 2 * first["span_loss/act"], rel=1e-4
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters(), strict=True))
    assert all(not p.requires_grad for p in tr.teacher_model.parameters())


def test_gradient_accumulation_gives_the_whole_batch_loss(tmp_path):
    """Two micro-batches of 1 accumulate to the step of one batch of 2 (span means over the step)."""
    data = items(2)
    grads = []
    for batch_size, accumulation in ((2, 1), (1, 2)):
        tr = trainer(
            tmp_path / f"{batch_size}",
            dataset=data,
            span_weights=WEIGHTS,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=0.0,
            max_grad_norm=0.0,
        )
        seen = []
        tr.add_callback(_GradGrab(tr.model, seen))
        tr.train()
        grads.append(seen[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


class _GradGrab:
    """A callback keeping lm_head's gradient before the optimizer step."""

    def __init__(self, model, out):
        self.model, self.out = model, out

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.out.append(self.model.lm_head.weight.grad.detach().clone())


def test_resumes_from_its_checkpoint(tmp_path):
    common = dict(span_weights=WEIGHTS, max_steps=4, save_strategy="steps", save_steps=2)
    full = trainer(tmp_path / "full", **common)
    full.train()
    resumed = trainer(tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.state.global_step == 4


def test_stored_topk_teacher_replaces_the_model(tmp_path):
    teacher = make_model(V, hidden=48, seed=2, initializer_range=0.2)
    data = items()
    batches = [collate(data[i : i + 2], pad_id=TOK.pad_token_id) for i in (0, 2)]
    capture(teacher, batches, tmp_path / "topk", k=8, progress=False)
    dataset = TopKDataset(tmp_path / "topk", vocab_size=V, inputs=data)
    tr = trainer(tmp_path / "run", teacher=False, dataset=dataset, span_weights=WEIGHTS)
    tr.train()
    logs = [entry for entry in tr.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in logs)


def test_no_teacher_is_a_clear_error(tmp_path):
    tr = trainer(tmp_path, teacher=False)
    with pytest.raises(ValueError, match="teacher_model=.*TopKDataset"):
        tr.train()


def test_different_vocabularies_are_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size .*same tokenizer"):
        KDTrainer(
            model=make_model(V, seed=1),
            teacher_model=make_model(V + 3, seed=2),
            args=arguments(tmp_path),
            train_dataset=items(),
        )


def test_model_without_output_embeddings_is_refused(tmp_path):
    backbone = Qwen2Model(make_model(V).config)
    with pytest.raises(ValueError, match="no output embeddings.*AutoModelForCausalLM"):
        KDTrainer(
            model=make_model(V, seed=1),
            teacher_model=backbone,
            args=arguments(tmp_path),
            train_dataset=items(),
        )


def test_heads_on_different_devices_are_refused(tmp_path):
    tr = trainer(tmp_path)
    tr.teacher_model.lm_head.to("meta")
    with pytest.raises(ValueError, match="same device"):
        tr.compute_loss(tr.model, collate(items(2), pad_id=TOK.pad_token_id))


def test_default_collator_pads_with_the_tokenizer_pad_id(tmp_path):
    tr = trainer(tmp_path)
    assert isinstance(tr.data_collator, functools.partial)
    assert tr.data_collator.keywords["pad_id"] == TOK.pad_token_id
    loss = tr.compute_loss(tr.model, F_pad(items(2)))
    assert math.isfinite(loss.item())


def F_pad(data):
    return collate(data, pad_id=TOK.pad_token_id, pad_to_multiple_of=8)


_ = F  # torch.nn.functional kept for readers of reference_loss


def test_evaluate_reports_the_loss_and_span_losses(tmp_path):
    tr = trainer(tmp_path, span_weights=WEIGHTS, eval_dataset=items(2))
    metrics = tr.evaluate()
    batch = collate(items(2), pad_id=TOK.pad_token_id)
    want = reference_loss(
        tr.model, tr.teacher_model, batch, temperature=1.0, weights=WEIGHTS, normalize="span"
    )
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-4)
    assert "eval_span_loss/reason" in metrics and "eval_span_loss/act" in metrics


DTENSOR_HEAD = """
import os, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from kdcore.integrations._heads import output_head
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
model = torch.nn.Module()
plain = torch.randn(16, 8, dtype=torch.float64)
model.lm_head = torch.nn.Linear(8, 16, bias=False)
model.lm_head.weight = torch.nn.Parameter(distribute_tensor(plain.float(), mesh, [Shard(0)]))
model.get_output_embeddings = lambda: model.lm_head
model.config = type("C", (), {"final_logit_softcapping": 2.0})()
head = output_head(model, "student", torch.bfloat16)
assert type(head.weight) is torch.Tensor and head.weight.dtype == torch.bfloat16, type(head.weight)
torch.testing.assert_close(head.weight.float(), plain.float().bfloat16().float())
head.weight.float().sum().backward()
grad = model.lm_head.weight.grad.full_tensor()
torch.testing.assert_close(grad, torch.ones(16, 8))
assert head.logit_scale == 1.0 and head.softcap == 2.0
dist.destroy_process_group()
print("ok")
"""


def test_fsdp2_dtensor_head_is_gathered_once_with_its_gradient(tmp_path):
    """A Shard(0) DTensor head (FSDP2) comes back a plain tensor in the hidden
    states' dtype, and its gradient reaches the DTensor parameter."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "dtensor_head.py"
    script.write_text(DTENSOR_HEAD)
    env = {**os.environ, "PORT": str(port)}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_bf16_autocast_step_is_close_to_fp32(tmp_path):
    """Under bf16 autocast the hidden states are bf16 and the heads fp32: the
    fused loss takes both and stays near the fp32 loss."""
    fp32 = trainer(tmp_path / "fp32", span_weights=WEIGHTS, max_steps=1)
    fp32.train()
    bf16 = trainer(tmp_path / "bf16", span_weights=WEIGHTS, max_steps=1, bf16=True)
    bf16.train()
    a, b = fp32.state.log_history[0]["loss"], bf16.state.log_history[0]["loss"]
    assert b == pytest.approx(a, rel=0.05)
