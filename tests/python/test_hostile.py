"""Hostile inputs, grouped by class of input: each test is an input that once
gave a silent wrong number, silent corruption, a stall or an unclear error.

References are independent: torch's own formulas in float64, or the same
loss on an input that means the same thing (int64 labels for uint8 ones).
"""

from __future__ import annotations

import errno
import os
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import kdcore
from kdcore import reference
from kdcore.agent import TrajectoryError, encode_chat, render_chat
from kdcore.agent.tokenizer import token_offsets
from kdcore.train import CheckpointError, Distiller, atomic_save, load_checkpoint

V = 12


def logits(seed: int, rows: int = 4, vocab: int = V, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g, dtype=torch.float64).to(dtype)


def torch_kl(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · mean over rows of KL(softmax(t/T) ‖ softmax(s/T)), torch's own formula."""
    lq = torch.log_softmax(s / temperature, -1)
    lp = torch.log_softmax(t / temperature, -1)
    return torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="batchmean") * (
        temperature**2
    )


# --- 1. autograd modes: double backward, create_graph, torch.func, meta tensors -----------------


LOSSES = {
    "kl_loss": lambda s, t: kdcore.kl_loss(s, t, temperature=2.0),
    "jsd_loss": lambda s, t: kdcore.jsd_loss(s, t),
    "distillation_loss": lambda s, t: kdcore.distillation_loss(s, t, torch.arange(s.shape[0])),
    "sparse_kl_loss": lambda s, t: kdcore.sparse_kl_loss(
        s, t.topk(3, -1).indices, torch.log_softmax(t, -1).topk(3, -1).values
    ),
    "fused_linear": lambda s, t: kdcore.fused_linear_distillation_loss(
        s, torch.eye(V, s.shape[-1]), teacher_logits=t
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_double_backward_is_an_error_never_a_zero_hessian(name):
    s = logits(0).requires_grad_()
    t, v = logits(1), logits(2)
    loss = LOSSES[name](s, t.detach())
    # The (s*s)*0 term gives the gradient a graph: before, its Hessian was silently 0.
    with pytest.raises(RuntimeError, match=r"create_graph=True .*not supported"):
        (g,) = torch.autograd.grad(loss + (s * s).sum() * 0, s, create_graph=True)
        torch.autograd.grad((g * v).sum(), s)
    # create_graph alone names the op, not "element 0 of tensors does not require grad".
    with pytest.raises(RuntimeError, match=r"kdcore::"):
        torch.autograd.grad(LOSSES[name](s, t), s, create_graph=True)
    # First-order gradients are untouched.
    (g,) = torch.autograd.grad(LOSSES[name](s, t), s)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("log", [False, True])
def test_softmax_double_backward_matches_torch(log):
    x, v, w = logits(3), logits(4), logits(5)
    temperature = 1.7

    def hvp(fn, x):
        x = x.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(x) * v).sum(), x, create_graph=True)
        return torch.autograd.grad((g * w).sum(), x)[0]

    ours = hvp(
        lambda x: (kdcore.log_softmax if log else kdcore.softmax)(x, temperature), x
    ).double()
    ref_fn = torch.log_softmax if log else torch.softmax
    want = hvp(lambda x: ref_fn(x / temperature, -1), x.double())
    assert want.abs().max() > 1e-2  # a real second derivative
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


def test_torch_func_grad_vmap_jacrev_run_the_reference():
    from torch.func import grad, jacrev, vmap

    s, t = logits(6), logits(7)
    s64 = s.double().requires_grad_()
    (want,) = torch.autograd.grad(torch_kl(s64, t.double()), s64)
    got = grad(lambda x: kdcore.kl_loss(x, t))(s)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    per_row = vmap(lambda x, y: kdcore.kl_loss(x, y))(s, t)
    want_rows = torch.stack(
        [torch_kl(s[i : i + 1].double(), t[i : i + 1].double()) for i in range(4)]
    )
    torch.testing.assert_close(per_row.double(), want_rows, rtol=1e-5, atol=1e-7)
    h, w = logits(8, 4, 5), logits(9, V, 5)
    h64 = h.double().requires_grad_()
    (want_h,) = torch.autograd.grad(torch_kl(h64 @ w.double().T, t.double()), h64)
    got_h = grad(lambda x: kdcore.fused_linear_distillation_loss(x, w, teacher_logits=t))(h)
    torch.testing.assert_close(got_h.double(), want_h, rtol=1e-5, atol=1e-7)
    jac = jacrev(lambda x: kdcore.softmax(x))(s[0])
    want_jac = torch.autograd.functional.jacobian(lambda x: torch.softmax(x, -1), s[0].double())
    torch.testing.assert_close(jac.double(), want_jac, rtol=1e-5, atol=1e-7)


def test_meta_tensors_give_shapes():
    s = torch.empty(2, 3, V, device="meta", requires_grad=True)
    t = torch.empty(2, 3, V, device="meta")
    labels = torch.empty(2, 3, dtype=torch.long, device="meta")
    spans = torch.empty(2, 3, dtype=torch.long, device="meta")
    ids = torch.empty(2, 3, 4, dtype=torch.long, device="meta")
    lps = torch.empty(2, 3, 4, device="meta")
    for out in (
        kdcore.kl_loss(s, t),
        kdcore.kl_loss(s, t, labels=labels, mask=torch.empty(2, 3, device="meta")),
        kdcore.distillation_loss(s, t, labels),
        kdcore.span_loss(s, t, spans),
        kdcore.sparse_kl_loss(s, ids, lps, labels=labels),
    ):
        assert out.shape == () and out.device.type == "meta" and out.dtype == torch.float32
    h = torch.empty(6, 5, device="meta", requires_grad=True)
    w = torch.empty(V, 5, device="meta", requires_grad=True)
    fused = kdcore.fused_linear_distillation_loss(h, w, teacher_logits=t.reshape(6, V))
    assert fused.shape == () and fused.device.type == "meta"
    fused.backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape
    assert kdcore.kl_loss(s, t, reduction="none").shape == (2, 3)
    assert kdcore.log_softmax(s, 2.0).shape == s.shape
    s64 = torch.empty(2, 3, V, device="meta", dtype=torch.float64)
    assert kdcore.kl_loss(s64, s64).dtype == torch.float64


# --- 2. labels of every integer dtype -----------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.uint16, torch.uint32, torch.int16, torch.int32]
)
def test_unsigned_and_narrow_labels_are_exact(dtype):
    vocab = 200  # token 156 is a real token; -100 wrapped to uint8 is 156
    s, t = logits(8, 2, vocab), logits(9, 2, vocab)
    labels = torch.tensor([156, 7])
    want = kdcore.distillation_loss(s, t, labels, alpha=1.0)
    got = kdcore.distillation_loss(s, t, labels.to(dtype), alpha=1.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    ce = torch.nn.functional.cross_entropy(s.double(), labels)
    assert got.item() == pytest.approx(ce.item(), rel=1e-5)
    # The mask from labels, in kl_loss / sparse_kl_loss too.
    got_kl = kdcore.kl_loss(s, t, labels=labels.to(dtype))
    assert got_kl.item() == pytest.approx(torch_kl(s.double(), t.double()).item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["token", "sft"])
def test_objective_uses_uint8_labels_exactly(mode):
    from kdcore.train import Objective

    s, t = logits(30, 3, 200).reshape(1, 3, 200), logits(31, 3, 200).reshape(1, 3, 200)
    labels = torch.tensor([[0, 156, 7]])  # aligned with input_ids: rows 0, 1 score 156, 7
    objective = Objective(mode=mode, alpha=1.0)
    want, _ = objective(s, t, {"labels": labels})
    got, _ = objective(s, t, {"labels": labels.to(torch.uint8)})
    ce = torch.nn.functional.cross_entropy(s[0, :2].double(), torch.tensor([156, 7]))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert got.item() == pytest.approx(ce.item(), rel=1e-5)


def test_uint64_labels_are_refused():
    s = logits(10)
    with pytest.raises(TypeError, match="uint64"):
        kdcore.distillation_loss(s, s, torch.zeros(4, dtype=torch.uint64))


# --- 3. masks: float64 extremes, inf, negative weights under torch.compile ----------------------


@pytest.mark.parametrize("scale", [1e-300, 1e-50, 1e39, 1e300])
def test_float64_mask_weights_are_normalised_in_float64(scale):
    s, t = logits(11), logits(12)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    rows = torch.nn.functional.kl_div(
        torch.log_softmax(s.double(), -1),
        torch.log_softmax(t.double(), -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    want = (rows * w).sum() / w.sum()
    got = kdcore.kl_loss(s, t, mask=w * scale)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_mask_weights_beyond_float32_with_sum_are_refused():
    s = logits(13)
    with pytest.raises(ValueError, match="beyond torch.float32's range"):
        kdcore.kl_loss(s, s, mask=torch.full((4,), 1e39, dtype=torch.float64), reduction="sum")


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), -1.0])
def test_non_finite_or_negative_mask_is_an_error(bad):
    s = logits(14)
    mask = torch.tensor([1.0, bad, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights >= 0 and finite"):
        kdcore.kl_loss(s, s, mask=mask)


def test_negative_mask_under_compile_gives_nan_not_a_number():
    s, t = logits(15), logits(16)
    mask = torch.tensor([1.0, -1.0, 1.0, 1.0])
    fn = torch.compile(lambda s, t, m: kdcore.kl_loss(s, t, mask=m), fullgraph=True)
    assert torch.isnan(fn(s, t, mask))  # before: -0.14
    good = torch.tensor([1.0, 0.5, 1.0, 1.0])
    assert fn(s, t, good).item() == pytest.approx(kdcore.kl_loss(s, t, mask=good).item(), 1e-6)


# --- 4. temperature as a tensor -----------------------------------------------------------------


def test_temperature_tensor_that_requires_grad_is_refused():
    s = logits(17)
    temperature = torch.tensor(2.0, requires_grad=True)
    for fn in (kdcore.kl_loss, kdcore.jsd_loss):
        with pytest.raises(ValueError, match="requires grad"):
            fn(s, s, temperature=temperature)
    # A value that cannot be read (a meta tensor, one traced by torch.compile) is refused.
    with pytest.raises(TypeError, match="must be a Python float"):
        kdcore.kl_loss(s, s, temperature=torch.tensor(2.0, device="meta"))
    # A constant tensor is still a temperature, also under a torch.func transform.
    from torch.func import grad

    t = logits(18)
    two = torch.tensor(2.0)
    got = grad(lambda x: kdcore.kl_loss(x, t, temperature=two))(s)
    s64 = s.double().requires_grad_()
    (want,) = torch.autograd.grad(torch_kl(s64, t.double(), 2.0), s64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    got = kdcore.kl_loss(s, logits(18), temperature=torch.tensor(2.0))
    assert got.item() == pytest.approx(torch_kl(s.double(), logits(18).double(), 2.0).item(), 1e-5)


# --- 5. sparse teacher: rows the loss never reads ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # kernel and reference paths
def test_sparse_ids_in_masked_rows_are_not_read(dtype):
    s = logits(19, dtype=dtype)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    lps = torch.log(torch.full((4, 2), 0.3, dtype=dtype))
    keep = torch.tensor([True, True, False, True])
    want = kdcore.sparse_kl_loss(s, ids, lps, mask=keep)
    bad_ids, bad_lps = ids.clone(), lps.clone()
    bad_ids[2] = torch.tensor([99, -5])
    bad_lps[2] = torch.tensor([float("nan"), 3.0])
    got = kdcore.sparse_kl_loss(s, bad_ids, bad_lps, mask=keep)
    assert got.item() == want.item()
    with pytest.raises(ValueError, match="teacher_ids must be in"):
        kdcore.sparse_kl_loss(s, bad_ids, lps)  # an unmasked row is still checked


# --- 6. checkpoints: corruption, full disks, killed writes, changed settings --------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(V, 6), nn.Linear(6, V)

    def forward(self, ids):
        return self.out(self.emb(ids))


def distiller(tmp_path, **kwargs) -> Distiller:
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs.setdefault("loss", "token")
    return Distiller(model, Tiny(), opt, checkpoint_dir=tmp_path, **kwargs)


def batch(rows: int = 2) -> dict:
    ids = torch.arange(rows * 5).reshape(rows, 5) % V
    return {"input_ids": ids, "labels": ids.clone()}


def test_a_flipped_bit_is_detected_and_names_the_file(tmp_path):
    d = distiller(tmp_path)
    d.step(batch())
    path = d.save()
    data = bytearray(path.read_bytes())
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    for position in (len(data) // 3, len(data) // 2, len(data) - 60):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        bad = tmp_path / f"flipped{position}.pt"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=f"checkpoint {bad}"):
            distiller(tmp_path).load(bad)
    d2 = distiller(tmp_path)
    d2.load(path)  # the intact file loads
    for k, v in d2.student.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("empty", lambda data: b"", "is empty"),
        ("truncated", lambda data: data[: len(data) // 2], "cannot be read|damaged"),
        ("random", lambda data: os.urandom(len(data)), "cannot be read"),
    ],
)
def test_unreadable_checkpoints_name_the_file_and_cause(tmp_path, name, make, match):
    d = distiller(tmp_path)
    data = d.save().read_bytes()
    bad = tmp_path / f"{name}.pt"
    bad.write_bytes(make(data))
    with pytest.raises(CheckpointError, match=match) as info:
        d.load(bad)
    assert str(bad) in str(info.value)


def test_a_checkpoint_without_checksum_loads_with_a_warning(tmp_path):
    d = distiller(tmp_path)
    plain = tmp_path / "plain.pt"
    torch.save(d.state_dict(), plain)  # kdcore 0.1 wrote these
    with pytest.warns(UserWarning, match=rf"checkpoint {plain} carries no checksum"):
        d.load(plain)
    appended = tmp_path / "appended.pt"
    appended.write_bytes(d.save().read_bytes() + b"x")
    with pytest.warns(UserWarning, match="no checksum"):
        d.load(appended)


def test_a_checkpoint_with_wrong_keys_or_another_model_names_the_file(tmp_path):
    d = distiller(tmp_path)
    other = tmp_path / "other.pt"
    atomic_save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match=rf"checkpoint {other} is not a Distiller.*student"):
        d.load(other)
    state = d.state_dict()
    state["student"] = {"emb.weight": torch.zeros(3, 3)}
    atomic_save(state, other)
    with pytest.raises(CheckpointError, match=rf"checkpoint {other} does not fit"):
        d.load(other)


def test_a_full_disk_names_the_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    d = distiller(tmp_path)
    path = d.save()
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=rf"could not write checkpoint {path}.*disk full"):
        d.save()

    def enospc(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(OSError, match=rf"checkpoint {path}") as info:
        d.save()
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


def _stale_temp(tmp_path, name="last.pt", age_s=60.0):
    tmp = tmp_path / f".{name}.0123456789ab.tmp"
    tmp.write_bytes(b"\0" * 4096)  # what kill -9 mid-write leaves
    old = time.time() - age_s
    os.utime(tmp, (old, old))
    return tmp


@pytest.mark.parametrize("when", ["save", "load"])
def test_temp_files_of_killed_writes_are_removed(tmp_path, when):
    d = distiller(tmp_path)
    path = d.save()
    stale = _stale_temp(tmp_path)
    unrelated = _stale_temp(tmp_path, name="other.pt")
    d.save() if when == "save" else d.load(path)
    assert not stale.exists()
    assert unrelated.exists()  # another file's temporaries are not ours to remove


@pytest.mark.skipif(os.name != "posix", reason="file locks are POSIX")
def test_a_temp_file_being_written_is_kept(tmp_path):
    import fcntl

    d = distiller(tmp_path)
    live = _stale_temp(tmp_path)
    with open(live, "rb+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # a writer in another process would hold this
        d.save()
        assert live.exists()
    d.save()
    assert not live.exists()


def test_a_real_kill_during_a_write_leaves_a_temp_file_that_the_next_save_removes(tmp_path):
    import subprocess
    import sys

    # A child writes a big checkpoint and is killed mid-write (SIGKILL: no cleanup).
    code = (
        "import sys, torch; from kdcore.train import atomic_save\n"
        "print('go', flush=True)\n"
        "atomic_save({'x': torch.zeros(64 << 20, dtype=torch.uint8)}, sys.argv[1])\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(kdcore.__file__)))
    target = tmp_path / "last.pt"
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout.readline().strip() == b"go"
        deadline = time.time() + 60
        while time.time() < deadline and not any(n.endswith(".tmp") for n in os.listdir(tmp_path)):
            time.sleep(0.005)
        child.kill()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    if not leftovers:
        pytest.skip("the child finished its write before it was killed")
    for n in leftovers:  # a killed write left it; make it old enough to be judged stale
        os.utime(tmp_path / n, (time.time() - 60, time.time() - 60))
    distiller(tmp_path).save()
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_resuming_under_other_settings_warns_naming_them(tmp_path):
    d = distiller(tmp_path, alpha=0.2, temperature=2.0, grad_accum_steps=1)
    d.step(batch(2))
    path = d.save()
    other = distiller(tmp_path, alpha=0.5, temperature=3.0, grad_accum_steps=2)
    with pytest.warns(UserWarning, match=r"alpha 0\.2 -> 0\.5.*temperature 2\.0 -> 3\.0") as rec:
        other.load(path)
    assert "grad_accum_steps 1 -> 2" in str(rec[0].message)
    with pytest.warns(UserWarning, match="micro-batches of 3 sequences.*used 2"):
        other.step(batch(3))
    same = distiller(tmp_path, alpha=0.2, temperature=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load(path)
        same.step(batch(2))
    sft = distiller(tmp_path, alpha=0.2, temperature=2.0)
    sft.objective = type(sft.objective)(mode="sft", alpha=0.2, temperature=2.0)
    with pytest.warns(UserWarning, match="loss 'token' -> 'sft'"):
        sft.load(path)


def test_checkpoints_still_load_with_torch_load(tmp_path):
    d = distiller(tmp_path)
    path = d.save()
    state = torch.load(path, weights_only=True)  # the checksum trailer is ignored by torch
    assert state["state"]["step"] == load_checkpoint(path)["state"]["step"]


# --- 7. construction-time arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: kdcore.nn.KLLoss(temperature=-1), "temperature"),
        (lambda: kdcore.nn.KLLoss(reduction="avg"), "reduction"),
        (lambda: kdcore.nn.JSDLoss(beta=1.5), "beta"),
        (lambda: kdcore.nn.TVDLoss(temperature=0), "temperature"),
        (lambda: kdcore.nn.SpanLoss(span_weights={1: -1.0}), r"span_weights\[1\]"),
        (lambda: kdcore.nn.SpanLoss(divergence="xx"), "divergence"),
        (lambda: kdcore.nn.DistillationLoss(alpha=2.0), "alpha"),
        (lambda: kdcore.nn.DistillationLoss(normalize="row"), "normalize"),
        (lambda: kdcore.nn.SparseKLLoss(tail="drop"), "tail"),
        (lambda: kdcore.nn.SparseKLLoss(teacher_temperature=float("nan")), "temperature"),
    ],
)
def test_modules_check_arguments_at_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(divergence="xx"), "divergence"),
        (dict(span_weights={1: -1.0}), r"span_weights\[1\]"),
        (dict(beta=2.0), "beta"),
        (dict(normalize="row"), "normalize"),
        (dict(tail="drop"), "tail"),
        (dict(ignore_index=1.5), "ignore_index"),
    ],
)
def test_distiller_checks_arguments_at_construction(tmp_path, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        distiller(tmp_path, **kwargs)


@pytest.mark.parametrize("key", [np.int64(1), np.int32(1), np.uint8(1), torch.tensor(1)])
def test_integer_like_span_weight_keys_are_accepted(key):
    s, t = logits(20), logits(21)
    spans = torch.tensor([1, 1, 0, 1])
    want = kdcore.span_loss(s, t, spans, span_weights={0: 0.0, 1: 1.0})
    got = kdcore.span_loss(s, t, spans, span_weights={np.int64(0): 0.0, key: np.float32(1.0)})
    assert got.item() == want.item()
    for bad in (1.0, True, "1", torch.tensor(1.0)):
        with pytest.raises(ValueError, match="keys must be ints"):
            kdcore.span_loss(s, t, spans, span_weights={bad: 1.0})


# --- 8. agent text: tag floods, deep JSON, tokenizer offsets ------------------------------------


def test_chat_tag_blocks_scale_linearly():
    # 1 MB of tag blocks: before, str.find from every block for an absent tag took ~40 s.
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>a</think>" * 64_000},
    ]
    start = time.perf_counter()
    text, _ = render_chat(messages)
    assert time.perf_counter() - start < 5.0
    assert text.count("<think>") == 64_000


def test_chat_tag_blocks_encode_in_reasonable_time():
    content = "<think>a</think>" * 16_000 + '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
    start = time.perf_counter()
    encode_chat(messages)
    assert time.perf_counter() - start < 20.0


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("where", ["tool_calls", "inline"])
def test_deeply_nested_tool_call_json_is_a_trajectory_error(where):
    args = _nested(100_000)
    if where == "tool_calls":
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "f", "arguments": args}}],
        }
    else:
        message = {
            "role": "assistant",
            "content": f'<tool_call>{{"name": "f", "arguments": {args}}}</tool_call>',
        }
    with pytest.raises(TrajectoryError, match="nested too deeply"):
        render_chat([{"role": "user", "content": "hi"}, message])


def test_deeply_nested_tool_call_dict_is_a_trajectory_error():
    args: dict = {}
    inner = args
    for _ in range(5000):
        inner["a"] = {}
        inner = inner["a"]
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"function": {"name": "f", "arguments": args}}],
    }
    with pytest.raises(TrajectoryError, match="nested too deeply"):
        render_chat([{"role": "user", "content": "hi"}, message])


class FakeTokenizer:
    """A fast-tokenizer look-alike returning the offsets it was given."""

    def __init__(self, offsets) -> None:
        self.offsets = offsets

    def __call__(self, text, return_offsets_mapping, add_special_tokens):
        return {"input_ids": list(range(len(self.offsets))), "offset_mapping": self.offsets}


def test_non_integer_offsets_are_refused_not_truncated():
    with pytest.raises(TypeError, match="offsets must be integer"):
        token_offsets(FakeTokenizer([(0, 1.7), (1.7, 3)]), "abc")
    with pytest.raises(TypeError, match="offsets must be integer"):
        token_offsets(FakeTokenizer(np.array([[0.0, 1.0], [1.0, 3.0]])), "abc")
    ids, offsets = token_offsets(FakeTokenizer(np.array([[0, 1], [1, 3]])), "abc")
    assert offsets == [(0, 1), (1, 3)] and ids == [0, 1]


def test_byte_offsets_are_named_as_such():
    text = "héllo wörld"  # 11 characters, 13 bytes
    byte_offsets = [(0, 6), (6, 7), (7, 13)]
    with pytest.raises(ValueError, match="look like UTF-8 byte offsets"):
        token_offsets(FakeTokenizer(byte_offsets), text)


def test_reference_matches_after_the_mode_changes():
    # The reference path still meets torch's formula (its mean no longer branches in Python).
    s, t = logits(22, dtype=torch.float64), logits(23, dtype=torch.float64)
    got = reference.kl_loss(s, t, mask=torch.zeros(4))
    assert got.item() == 0.0
    assert reference.kl_loss(s, t).item() == pytest.approx(torch_kl(s, t).item(), rel=1e-12)
