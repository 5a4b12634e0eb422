"""The demo's agent task: multi-step arithmetic word problems and a calculator.

Everything here is deterministic given a seed. A problem is a short story
whose answer needs two or three calculator calls; the oracle writes the
ReAct trajectory an ideal agent would produce::

    Question: Ann has 14 pens. She buys 3 boxes of 6 pens. How many pens now?
    Thought: First the boxes.
    Action: calc[3*6]
    Observation: 18
    Thought: Add them to the 14.
    Action: calc[14+18]
    Observation: 32
    Action: finish[32]

The environment executes ``calc[...]`` with a small arithmetic parser (no
``eval``) and checks ``finish[...]`` against the answer.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

NAMES = ("Ann", "Bob", "Cy", "Dee", "Eli", "Fay", "Gus", "Ida", "Jo", "Kim", "Lu", "Max")
ITEMS = ("pens", "eggs", "cards", "coins", "books", "cups", "nuts", "beads")
ACTION = re.compile(r"Action:\s*([A-Za-z_]\w*)\[(.*)\]\s*$")


@dataclass(frozen=True)
class Problem:
    """One word problem: its question, its answer and the oracle's steps."""

    question: str
    answer: int
    # (thought, expression) per calculator call; the oracle's plan.
    steps: tuple[tuple[str, str], ...]
    # Per step, every phrasing the oracle could have chosen for its thought
    # (each is as correct as the one in ``steps``); () when unknown.
    thought_options: tuple[tuple[str, ...], ...] = ()


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return options[rng.randrange(len(options))]


def _buy_boxes(rng: random.Random, name: str, item: str) -> Problem:
    a, b, c = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 9)
    question = f"{name} has {a} {item}. {name} buys {b} boxes of {c} {item}. How many {item} now?"
    options = (
        ("First the boxes.", "Count the boxes first."),
        (f"Add them to the {a}.", f"Now add the {a}."),
    )
    steps = ((_pick(rng, options[0]), f"{b}*{c}"), (_pick(rng, options[1]), f"{a}+{b * c}"))
    return Problem(question, a + b * c, steps, options)


def _buy_then_give(rng: random.Random, name: str, item: str) -> Problem:
    a, b, c = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 9)
    d = rng.randint(1, a + b * c - 1)
    question = (
        f"{name} has {a} {item}, buys {b} bags of {c} and gives away {d}. How many {item} are left?"
    )
    options = (
        ("First the bags.", "Count the bags first."),
        (f"Add the {a}.", f"Now add the {a}."),
        (f"Take away {d}.", f"Subtract the {d}."),
    )
    steps = (
        (_pick(rng, options[0]), f"{b}*{c}"),
        (_pick(rng, options[1]), f"{a}+{b * c}"),
        (_pick(rng, options[2]), f"{a + b * c}-{d}"),
    )
    return Problem(question, a + b * c - d, steps, options)


def _share(rng: random.Random, name: str, item: str) -> Problem:
    k, each = rng.randint(2, 9), rng.randint(2, 12)
    a = rng.randint(1, k * each - 1)
    b = k * each - a
    question = (
        f"{name} has {a} {item} and finds {b} more, then shares them among {k} kids. "
        f"How many {item} does each kid get?"
    )
    options = (
        ("First the total.", "Find the total first."),
        (f"Split by {k}.", f"Divide among {k}."),
    )
    steps = ((_pick(rng, options[0]), f"{a}+{b}"), (_pick(rng, options[1]), f"{a + b}/{k}"))
    return Problem(question, each, steps, options)


def _rows(rng: random.Random, name: str, item: str) -> Problem:
    r, c, e = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 20)
    question = f"{name} puts {item} in {r} rows of {c}, and {e} extra. How many {item} in all?"
    options = (
        ("First the rows.", "Count the rows first."),
        (f"Add the {e} extra.", f"Now add {e}."),
    )
    steps = ((_pick(rng, options[0]), f"{r}*{c}"), (_pick(rng, options[1]), f"{r * c}+{e}"))
    return Problem(question, r * c + e, steps, options)


TEMPLATES = (_buy_boxes, _buy_then_give, _share, _rows)


def make_problems(count: int, seed: int) -> list[Problem]:
    """``count`` problems drawn from a seeded generator (all templates mixed)."""
    rng = random.Random(seed)
    return [
        TEMPLATES[rng.randrange(len(TEMPLATES))](rng, _pick(rng, NAMES), _pick(rng, ITEMS))
        for _ in range(count)
    ]


def split_problems(count_train: int, count_test: int, seed: int) -> tuple[list, list]:
    """Disjoint train / held-out problem sets (held-out questions never seen)."""
    train = make_problems(count_train, seed)
    seen = {p.question for p in train}
    test: list[Problem] = []
    offset = 1
    while len(test) < count_test:
        for p in make_problems(count_test, seed + 7919 * offset):
            if p.question not in seen and len(test) < count_test:
                seen.add(p.question)
                test.append(p)
        offset += 1
    return train, test


def prompt(problem: Problem) -> str:
    """What the agent is given: the question line."""
    return f"Question: {problem.question}\n"


def oracle_trajectory(problem: Problem, thoughts: Sequence[str] | None = None) -> str:
    """The ideal ReAct trajectory (prompt included), observations from the tool.

    ``thoughts``: one thought per step instead of the oracle's own phrasing.
    """
    if thoughts is None:
        thoughts = [thought for thought, _ in problem.steps]
    if len(thoughts) != len(problem.steps):
        raise ValueError(f"need {len(problem.steps)} thoughts, one per step; got {len(thoughts)}")
    lines = [prompt(problem)]
    for thought, (_, expression) in zip(thoughts, problem.steps, strict=True):
        lines.append(f"Thought: {thought}\nAction: calc[{expression}]\n")
        lines.append(f"Observation: {calculate(expression)}\n")
    lines.append(f"Action: finish[{problem.answer}]\n")
    return "".join(lines)


def correct_trajectories(problem: Problem) -> list[str]:
    """Every trajectory that solves ``problem`` the oracle's way, one per choice of
    thought phrasings (just the oracle's own when the options are unknown)."""
    if not problem.thought_options:
        return [oracle_trajectory(problem)]
    return [
        oracle_trajectory(problem, list(c)) for c in itertools.product(*problem.thought_options)
    ]


# --- the calculator tool -----------------------------------------------------


class CalcError(ValueError):
    """An expression the calculator cannot evaluate."""


_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|(.))")


def calculate(expression: str) -> str:
    """Evaluates + - * / and parentheses over decimal numbers; no ``eval``.

    Returns an integer string when the result is whole, else up to 4 decimals.
    Raises :class:`CalcError` on anything else (the agent then observes the
    error, as a real tool would report it).
    """
    tokens = [(num, op) for num, op in _TOKEN.findall(expression) if num or op.strip()]
    if not tokens:
        raise CalcError("empty expression")
    pos = 0

    def peek() -> str | None:
        return tokens[pos][1] if pos < len(tokens) and not tokens[pos][0] else None

    def atom() -> float:
        nonlocal pos
        if pos >= len(tokens):
            raise CalcError("expression ends early")
        num, op = tokens[pos]
        pos += 1
        if num:
            return float(num)
        if op == "-":
            return -atom()
        if op == "(":
            value = expr()
            if peek() != ")":
                raise CalcError("missing )")
            pos += 1
            return value
        raise CalcError(f"unexpected {op!r}")

    def term() -> float:
        nonlocal pos
        value = atom()
        while peek() in ("*", "/"):
            op = tokens[pos][1]
            pos += 1
            rhs = atom()
            if op == "/" and rhs == 0:
                raise CalcError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def expr() -> float:
        nonlocal pos
        value = term()
        while peek() in ("+", "-"):
            op = tokens[pos][1]
            pos += 1
            value = value + term() if op == "+" else value - term()
        return value

    value = expr()
    if pos != len(tokens):
        raise CalcError(f"unexpected {tokens[pos][0] or tokens[pos][1]!r}")
    if abs(value) > 1e12:
        raise CalcError("number too large")
    if value == int(value):
        return str(int(value))
    return f"{value:.4f}".rstrip("0")


# --- the environment -----------------------------------------------------------


@dataclass
class Episode:
    """One agent run on one problem: the text so far and the outcome."""

    problem: Problem
    text: str = ""
    actions: int = 0
    done: bool = False
    answer: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.answer is not None and self.answer.strip() == str(self.problem.answer)


def react_to_line(episode: Episode, line: str, *, max_actions: int) -> str:
    """The environment's reply to one generated line ('' when it has none).

    ``calc[...]`` is executed and answered with an ``Observation:`` line;
    ``finish[...]`` ends the episode with that answer; an ``Action:`` line
    the tool cannot parse is answered with an error observation (counted as
    an action, so an agent that never finishes stops after ``max_actions``).
    """
    stripped = line.strip()
    if not stripped.startswith("Action:"):
        return ""
    episode.actions += 1
    match = ACTION.match(stripped)
    if match is None:
        reply = "Observation: error: expected tool[arguments]\n"
        episode.errors.append(stripped)
    elif match.group(1) == "finish":
        episode.done, episode.answer = True, match.group(2)
        return ""
    elif match.group(1) != "calc":
        reply = f"Observation: error: unknown tool {match.group(1)}\n"
        episode.errors.append(stripped)
    else:
        try:
            reply = f"Observation: {calculate(match.group(2))}\n"
        except CalcError as err:
            reply = f"Observation: error: {err}\n"
            episode.errors.append(stripped)
    if episode.actions >= max_actions:
        episode.done = True
    return reply
