"""The README's "Use with TRL / transformers" examples run as written, on tiny
models built here (their configs shortened to a step or two)."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest
from datasets import Dataset

from hf_helpers import MESSAGES, make_model, make_tokenizer

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use with TRL / transformers", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def short(cls, **fixed):
    """``cls`` with a few settings forced, for a run of seconds on the CPU."""

    def make(*args, **kwargs):
        return cls(*args, **{**kwargs, **fixed})

    return make


def test_the_readme_has_both_examples():
    code = examples()
    assert len(code) == 2
    assert "kdcore.integrations.trl" in code[0] and "kdcore.integrations.transformers" in code[1]


@pytest.mark.parametrize("index", [0, 1])
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = dict(max_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    # What the examples' imports find (transformers' lazy module may have been
    # replaced in sys.modules since another file imported it).
    hf, trl_module = importlib.import_module("transformers"), importlib.import_module("trl")
    monkeypatch.setattr(
        trl_module,
        "DistillationConfig",
        short(
            trl_module.DistillationConfig,
            max_completion_length=6,
            bf16=False,
            per_device_train_batch_size=2,
            **common,
        ),
    )
    monkeypatch.setattr(hf, "TrainingArguments", short(hf.TrainingArguments, **common))
    tok = make_tokenizer()
    namespace = {
        "student": make_model(len(tok), seed=1),
        "teacher": make_model(len(tok), hidden=48, seed=2),
        "tokenizer": tok,
        "prompts": Dataset.from_list(
            [{"prompt": [{"role": "user", "content": "add two and three"}]}] * 2
        ),
        "trajectories": [MESSAGES, MESSAGES],
    }
    exec(compile(examples()[index], f"README example {index}", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 1
