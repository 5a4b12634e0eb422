"""Declared dependencies match the imports; a missing extra says how to install it."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

import kdcore
from kdcore._extras import EXTRAS, MissingExtraError, require

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "check_install.py"


def _check_install():
    spec = importlib.util.spec_from_file_location("check_install", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_import_of_the_installed_package_is_declared():
    check = _check_install()
    core, extras = check.declared()
    assert {"torch", "numpy", "tqdm"} <= core
    package = pathlib.Path(kdcore.__file__).resolve().parent
    assert check.undeclared_imports(package, core, extras) == []


def test_the_import_check_catches_undeclared_and_misplaced_imports(tmp_path):
    check = _check_install()
    package = tmp_path / "kdcore"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("import os\nimport torch\nfrom . import sub\n")
    (package / "sub" / "__init__.py").write_text("import yaml\n")
    (package / "lazy.py").write_text("def f():\n    import matplotlib.pyplot\n")
    (package / "eager.py").write_text("import matplotlib\n")
    (package / "gpu.py").write_text("import triton\n")
    problems = check.undeclared_imports(package, {"torch"}, {"plot": {"matplotlib"}})
    assert problems == [
        "kdcore/eager.py:1: imports matplotlib at module level; matplotlib is declared an extra only",
        "kdcore/gpu.py:1: triton outside the GPU path",
        "kdcore/sub/__init__.py:1: imports yaml at module level; pyyaml is declared nowhere",
    ]


def test_extras_module_matches_the_package_metadata():
    _, extras = _check_install().declared()
    assert {name: set(dists) for name, dists in EXTRAS.items()} == {
        name: dists for name, dists in extras.items() if name != "test"
    }


def test_every_module_of_the_installed_package_imports():
    imported, problems = _check_install().import_every_module()
    assert problems == []
    assert "kdcore.demo.plot" in imported and "kdcore.train.distiller" in imported


def test_a_missing_extra_names_the_pip_command():
    with pytest.raises(MissingExtraError, match=r'pip install "kdcore\[hf\]"') as exc:
        require("kdcore_no_such_module", extra="hf", feature="the TRL integration")
    assert isinstance(exc.value, ImportError)
    assert str(exc.value).startswith("the TRL integration needs kdcore_no_such_module")
    with pytest.raises(ValueError, match="unknown extra"):
        require("math", extra="nope", feature="x")
