"""The demo's task, environment and agent loop, and `kdcore demo --quick` end to end."""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import pathlib
import re
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import png_info
from kdcore.demo.data import TOKENIZER
from kdcore.demo.model import ModelConfig, TinyLM
from kdcore.demo.rollout import run_agent
from kdcore.demo.task import CalcError, calculate, make_problems, oracle_trajectory, prompt

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def exact_value(expression: str) -> Fraction:
    """An independent evaluator: Python's parser, exact rational arithmetic."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return walk(node.left) / walk(node.right)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(ast.dump(node))

    return walk(ast.parse(expression, mode="eval"))


def expression(depth: int = 0):
    number = st.integers(0, 999).map(str)
    if depth >= 2:
        return number
    sub = expression(depth + 1)
    binary = st.tuples(sub, st.sampled_from("+-*/"), sub).map(lambda t: f"{t[0]}{t[1]}{t[2]}")
    return st.one_of(number, binary, sub.map(lambda e: f"({e})"))


@given(expression())
def test_calculator_matches_exact_arithmetic(expr):
    try:
        exact = exact_value(expr)
    except ZeroDivisionError:
        with pytest.raises(CalcError, match="division by zero"):
            calculate(expr)
        return
    got = calculate(expr)
    if exact.denominator == 1:
        assert got == str(exact.numerator)
    else:
        assert abs(float(got) - float(exact)) <= 5e-5 * max(1.0, abs(float(exact)))


@pytest.mark.parametrize("bad", ["", "2+", "(3", "3)", "2**3", "abc", "1/0", "4 5"])
def test_calculator_rejects_bad_expressions(bad):
    with pytest.raises(CalcError):
        calculate(bad)


def test_problems_are_deterministic_and_answers_follow_the_oracle_plan():
    a, b = make_problems(50, 11), make_problems(50, 11)
    assert a == b and make_problems(50, 12) != a
    for p in a:
        # The last calculator step yields the answer, checked by exact arithmetic.
        assert exact_value(p.steps[-1][1]) == p.answer
        numbers = [int(n) for n in re.findall(r"\d+", p.question)]
        first = [int(n) for n in re.findall(r"\d+", p.steps[0][1])]
        assert all(n in numbers for n in first), (p.question, p.steps)


class ScriptedAgent(torch.nn.Module):
    """Stands in for TinyLM: emits a fixed text per episode, whatever it is fed.

    It records what the environment fed it, so the test sees the observations.
    """

    def __init__(self, scripts: list[str]) -> None:
        super().__init__()
        self.cfg = ModelConfig(max_len=400)
        self.embed = torch.nn.Embedding(1, 1)
        self.scripts = [[TOKENIZER.bos_id, *TOKENIZER.encode(s), TOKENIZER.eos_id] for s in scripts]
        self.fed: list[list[int]] = [[] for _ in scripts]

    def new_cache(self, batch):
        return []

    def decode_step(self, tokens, cache, pos):
        logits = torch.full((len(self.scripts), TOKENIZER.vocab_size), -1e4)
        for b, script in enumerate(self.scripts):
            self.fed[b].append(int(tokens[b]))
            logits[b, script[pos + 1] if pos + 1 < len(script) else TOKENIZER.eos_id] = 0.0
        return logits


def test_rollout_executes_actions_and_feeds_observations_back():
    problems = make_problems(6, 3)
    scripts = [oracle_trajectory(p) for p in problems]
    # Episode 1 computes a wrong first step: the tool must answer what was asked.
    wrong = scripts[1].replace(f"calc[{problems[1].steps[0][1]}]", "calc[100+1]", 1)
    scripts[1] = wrong.split("Observation:")[0] + "Observation: 101\nAction: finish[101]\n"
    # Episode 2 never finishes and never acts: it stops at EOS.
    scripts[2] = prompt(problems[2]) + "Thought: no idea.\n"
    agent = ScriptedAgent(scripts)
    episodes = run_agent(agent, problems, tokenizer=TOKENIZER, max_actions=6)
    assert [e.success for e in episodes] == [True, False, False, True, True, True]
    assert episodes[1].answer == "101" and episodes[2].answer is None
    for b in (0, 3, 4, 5):
        assert episodes[b].text == scripts[b]  # observations came from the calculator
        assert episodes[b].actions == len(problems[b].steps) + 1
    assert "Observation: 101\n" in episodes[1].text


def test_rollout_stops_an_agent_that_never_finishes():
    problem = make_problems(1, 5)[0]
    loop = prompt(problem) + "Action: calc[1+1]\nObservation: 2\n" * 10
    episodes = run_agent(ScriptedAgent([loop]), [problem], tokenizer=TOKENIZER, max_actions=3)
    assert episodes[0].actions == 3 and not episodes[0].success
    assert episodes[0].text.count("Action:") == 3


def test_rollout_reports_malformed_actions_to_the_agent():
    problem = make_problems(1, 6)[0]
    text = prompt(problem) + "Action: calc 2+2\nObservation: error: expected tool[arguments]\n"
    text += "Action: search[x]\nObservation: error: unknown tool search\nAction: finish[0]\n"
    episodes = run_agent(ScriptedAgent([text]), [problem], tokenizer=TOKENIZER)
    assert episodes[0].text == text and len(episodes[0].errors) == 2


def test_kv_cache_decoding_matches_the_full_forward():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, max_len=64)
    model = TinyLM(cfg).eval()
    ids = torch.randint(0, TOKENIZER.vocab_size, (3, 20))
    full = model(ids)
    cache = model.new_cache(3)
    steps = torch.stack([model.decode_step(ids[:, i], cache, i) for i in range(20)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def _check_episode(episode: dict) -> None:
    """Re-executes every action of an episode with the independent evaluator.

    An observation cut off by the end of the context (the episode's last line,
    without its newline) is not checked."""
    lines = episode["text"].splitlines(keepends=True)
    finish = None
    for i, line in enumerate(lines):
        match = re.fullmatch(r"Action: calc\[(.*)\]", line.strip())
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if match and following.startswith("Observation:") and following.endswith("\n"):
            observed = following[len("Observation:") :].strip()
            try:
                value = exact_value(match.group(1))
            except (ValueError, SyntaxError, ZeroDivisionError):
                assert observed.startswith("error"), (line, observed)
                continue
            if value.denominator == 1:
                assert observed == str(value.numerator), (line, observed)
        done = re.fullmatch(r"Action: finish\[(.*)\]", line.strip())
        if done and finish is None:
            finish = done.group(1)
    assert episode["success"] == (finish is not None and finish.strip() == str(episode["answer"]))


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, KDCORE_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "kdcore", "demo", "--quick", "--out", str(out), "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    for name in ("teacher", "sft", "token_kd", "span_kd"):
        assert re.search(rf"^{name}\s", table, re.M), table
    summary = json.loads((out / "summary.json").read_text())
    seeds = summary["config"]["seeds"]
    assert seeds >= 2  # --quick runs the multi-seed path the default runs
    runs = {(r["model"], r.get("seed")): r for r in summary["rows"]}
    assert set(runs) == {("teacher", None)} | {
        (n, s) for n in ("sft", "token_kd", "span_kd") for s in range(seeds)
    }
    for row in runs.values():
        episodes = row["episodes"]
        assert len(episodes) == summary["config"]["held_out"]
        for episode in episodes:
            _check_episode(episode)
        rate = sum(e["success"] for e in episodes) / len(episodes)
        assert row["success_rate"] == pytest.approx(rate)
        assert 0.0 <= row["action_token_accuracy"] <= 1.0
        assert 0.0 <= row["reason_token_accuracy"] <= 1.0
        # One first-error kind per failed episode, none for a solved one.
        failed = [e for e in episodes if not e["success"]]
        assert sum(row["first_error"].values()) == len(failed)
        assert all((e["first_error"] is None) == e["success"] for e in episodes)
    # Per-span diagnostics: each student's KL from the teacher, averaged over seeds.
    for name in ("sft", "token_kd", "span_kd"):
        for span in ("reason", "action"):
            values = [runs[(name, s)]["spans"][span]["teacher_kl"] for s in range(seeds)]
            assert all(math.isfinite(v) and v >= 0 for v in values)
            agg_kl = {r["model"]: r for r in summary["aggregate"]}[name]["spans"][span]
            assert agg_kl["teacher_kl"] == pytest.approx(sum(values) / seeds)
    assert "teacher_kl" not in runs[("teacher", None)]["spans"]["action"]
    # Paired: the students of one seed start from the same weights and see the same
    # batches, so their initial loss scales come from the same batch and weights.
    for s in range(seeds):
        assert runs[("sft", s)]["initial_loss_scale"]["loss"] > 0
        assert runs[("span_kd", s)]["initial_loss_scale"]["grad_norm"] > 0
    # The aggregate: mean and sample sd of the per-seed success, computed here again.
    agg = {r["model"]: r for r in summary["aggregate"]}
    for name in ("sft", "token_kd", "span_kd"):
        rates = [runs[(name, s)]["success_rate"] for s in range(seeds)]
        mean = sum(rates) / seeds
        sd = (sum((x - mean) ** 2 for x in rates) / (seeds - 1)) ** 0.5
        assert agg[name]["success_by_seed"] == rates
        assert agg[name]["success_rate"] == pytest.approx(mean)
        assert agg[name]["success_sd"] == pytest.approx(sd)
        assert agg[name]["lr"] == summary["config"]["learning_rates"][name]
    gaps = {(g["a"], g["b"]): g for g in summary["paired_gaps"]}
    want = [
        runs[("span_kd", s)]["success_rate"] - runs[("token_kd", s)]["success_rate"]
        for s in range(seeds)
    ]
    assert gaps[("span_kd", "token_kd")]["gap_by_seed"] == pytest.approx(want)
    rows = {name: runs[(name, 0)] for name in ("sft", "token_kd", "span_kd")}
    rows["teacher"] = runs[("teacher", None)]
    # Same-size students, several times smaller than the teacher.
    sizes = {rows[n]["parameters"] for n in ("sft", "token_kd", "span_kd")}
    assert len(sizes) == 1 and rows["teacher"]["parameters"] >= 3 * sizes.pop()
    # The shipped teacher acts well; the curves were logged step by step.
    assert rows["teacher"]["success_rate"] >= 0.8
    for name in ("sft", "token_kd", "span_kd"):
        for s in range(seeds):
            steps = [step for step, _ in summary["curves_by_seed"][name][str(s)]]
            assert steps == list(range(1, summary["config"]["steps"] + 1))
            log = (out / "logs" / f"{name}_seed{s}.jsonl").read_text().splitlines()
            assert len(log) == summary["config"]["steps"]
    (width, height), text = png_info(out / "demo.png")
    assert width >= 800 and height >= 300
    assert text.get("Software", "").startswith("Matplotlib"), text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "argument --steps: must be >= 1; got 0"),
        (["--held-out", "-3"], "argument --held-out: must be >= 1; got -3"),
        (["--threads", "0"], "argument --threads: must be >= 1; got 0"),
        (["--tune", "--lr-grid", "0"], "argument --lr-grid: each rate must be in (0, 1]; got 0"),
        (["--tune", "--lr-grid", "1e-3,nan"], "each rate must be in (0, 1]; got nan"),
        (["--tune", "--lr-grid", "1e-3,x"], "argument --lr-grid: not a number: 'x'"),
        (["--lr-grid", "1e-3"], "--lr-grid: used only with --tune"),
        (["--train-teacher", "--lr-grid", "1e-3"], "--train-teacher does not take --lr-grid"),
    ],
)
def test_demo_rejects_bad_arguments(argv, message, capsys):
    from kdcore.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    from kdcore.demo.teacher import load_teacher

    with pytest.raises(FileNotFoundError):
        load_teacher(tmp_path / "nope.pt")


def test_seed_aggregate_is_mean_and_sample_sd():
    from kdcore.demo.pipeline import aggregate

    def row(model, seed, rate):
        return {
            "model": model,
            "seed": seed,
            "success_rate": rate,
            "objective": "x",
            "parameters": 10,
            "action_token_accuracy": 0.5,
            "mean_actions": 2.0,
            "train_seconds": None if model == "teacher" else 3.0,
        }

    rows = [row("teacher", None, 1.0)] + [row("sft", s, r) for s, r in ((0, 0.2), (1, 0.6))]
    teacher, sft = aggregate(rows)
    assert teacher["success_rate"] == 1.0 and teacher["train_seconds"] is None
    assert sft["success_rate"] == pytest.approx(0.4)
    assert sft["success_sd"] == pytest.approx(0.2828427, rel=1e-6)  # sqrt(0.08 / 1)
    assert sft["success_by_seed"] == [0.2, 0.6] and sft["seeds"] == [0, 1]


def test_shipped_teacher_matches_the_demo_tokenizer():
    from kdcore.demo.teacher import TEACHER_CONFIG, load_teacher
    from kdcore.demo.tokenizer import VOCAB_SIZE

    teacher, meta = load_teacher()
    assert teacher.cfg == TEACHER_CONFIG and teacher.cfg.vocab_size == VOCAB_SIZE
    assert "--train-teacher" in meta["command"]


def test_flush_denormals_flushes_inside_and_restores_after():
    from kdcore.demo.numerics import flush_denormals

    tiny = torch.tensor([1e-40], dtype=torch.float32)  # a float32 denormal
    assert float(tiny * 1.0) != 0.0
    with flush_denormals():
        assert float(tiny * 1.0) == 0.0
    assert float(tiny * 1.0) != 0.0


def test_readme_and_docs_tables_are_the_recorded_default_runs_output():
    """The README's and docs/demo.md's tables are what the default command printed:
    the run's summary is kept in docs/demo-run/, its config is today's default,
    and the tables are rebuilt from its aggregate rows by the demo's own report."""
    from dataclasses import asdict

    from kdcore.demo.pipeline import DemoConfig
    from kdcore.demo.report import format_seed_table

    root = pathlib.Path(__file__).resolve().parents[2]
    summary = json.loads((root / "docs" / "demo-run" / "summary.json").read_text())
    defaults = asdict(DemoConfig())
    recorded = dict(summary["config"])
    for key in ("out_dir", "teacher_path", "device"):
        recorded.pop(key), defaults.pop(key)
    recorded["student"] = ModelConfig(**recorded["student"])
    defaults["student"] = ModelConfig(**defaults["student"])
    assert recorded == defaults
    printed = format_seed_table(summary["aggregate"], summary["paired_gaps"])
    readme = (root / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", quick_start, flags=re.S | re.M)
    output = [text for language, text in blocks if not language]
    assert output[0].rstrip("\n") == printed.split("\n\nfirst wrong")[0]
    docs = (root / "docs" / "demo.md").read_text(encoding="utf-8")
    assert printed in docs
    for row in summary["aggregate"]:
        assert row["model"] == "teacher" or (
            row["success_rate"] >= 0.6 and row["success_sd"] <= 0.05 and len(row["seeds"]) >= 3
        )


def test_tune_quick_end_to_end(tmp_path):
    """`kdcore demo --tune` trains every student at every rate, scores them on
    validation problems disjoint from the held-out ones, and records the choice."""
    from kdcore.demo.data import held_out_problems, student_problems, validation_problems
    from kdcore.demo.pipeline import DemoConfig

    out = tmp_path / "tune"
    argv = ["demo", "--tune", "--quick", "--seeds", "1", "--lr-grid", "1e-3,4e-3"]
    proc = subprocess.run(
        [sys.executable, "-m", "kdcore", *argv, "--out", str(out), "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "tune.json").read_text())
    assert report["grid"] == [1e-3, 4e-3]
    runs = {(r["model"], r["lr"], r["seed"]) for r in report["runs"]}
    assert runs == {(n, lr, 0) for n in ("sft", "token_kd", "span_kd") for lr in (1e-3, 4e-3)}
    for name, lr in report["chosen"].items():
        cells = [r for r in report["runs"] if r["model"] == name]
        assert (
            lr
            == max(cells, key=lambda r: (r["validation_success"], r["action_token_accuracy"]))["lr"]
        )
    assert "chosen: " in proc.stdout
    cfg = DemoConfig.quick()
    problems = student_problems(cfg.student_problems)
    val = validation_problems(report["validation_problems"], exclude=problems, held_out=200)
    held = held_out_problems(cfg.held_out, exclude=problems)
    assert not {p.question for p in val} & {p.question for p in held}
    assert not {p.question for p in val} & {p.question for p in problems}
