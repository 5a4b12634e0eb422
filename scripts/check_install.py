"""Checks an installed kdcore the way a user gets it: declared dependencies only.

Run with the interpreter of a fresh virtualenv holding the wheel and nothing
else. Two checks, both needed:

1. Every module of the installed package imports. A module whose optional
   extra is missing may raise kdcore's MissingExtraError (an ImportError that
   names the ``pip install "kdcore[...]"``); any other ImportError fails.
2. Every third-party import in the package's source — at module level or
   inside a function, where step 1 cannot see it — names a distribution that
   pyproject.toml declares: module-level imports as core dependencies,
   function-level ones as core or extra dependencies.

Exits 1 and lists what is wrong. Standard library only (no pytest here).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pkgutil
import re
import sys
from pathlib import Path

#: Import names whose distribution is named otherwise.
DISTRIBUTION_OF = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}
#: Imported only by the GPU path, which torch's CUDA builds provide for: not declared.
PLATFORM_MODULES = {"triton": ("kdcore/kernels/", "kdcore/_triton.py")}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(dist: str = "kdcore") -> tuple[set[str], dict[str, set[str]]]:
    """(core requirement names, extra -> requirement names) of an installed distribution."""
    core: set[str] = set()
    extras: dict[str, set[str]] = {}
    for requirement in importlib.metadata.requires(dist) or []:
        name = _normalise(re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1))
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if extra:
            extras.setdefault(extra.group(1), set()).add(name)
        else:
            core.add(name)
    return core, extras


def _imports(tree: ast.AST):
    """(top-level module name, at module level?) for each absolute import."""
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], id(node) not in nested, node.lineno


def undeclared_imports(package_dir: Path, core: set[str], extras: dict[str, set[str]]):
    """Problems found in the sources under ``package_dir`` (a list of strings)."""
    optional = set().union(*extras.values()) if extras else set()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    own = package_dir.name
    problems = []
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for module, top_level, line in _imports(tree):
            if module in stdlib or module == own:
                continue
            if module in PLATFORM_MODULES:
                if not relative.startswith(PLATFORM_MODULES[module]):
                    problems.append(f"{relative}:{line}: {module} outside the GPU path")
                continue
            dist = _normalise(DISTRIBUTION_OF.get(module, module))
            if dist in core:
                continue
            if dist in optional and not top_level:
                continue
            where = "at module level" if top_level else "in a function"
            declared_as = "an extra only" if dist in optional else "nowhere"
            problems.append(
                f"{relative}:{line}: imports {module} {where}; {dist} is declared {declared_as}"
            )
    return problems


def import_every_module(package: str = "kdcore"):
    """Imports every module of ``package``: (names imported, problems)."""
    root = importlib.import_module(package)
    missing_extra = importlib.import_module(f"{package}._extras").MissingExtraError
    imported, problems = [], []
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.endswith(".__main__"):
            continue  # runs the command line
        try:
            importlib.import_module(info.name)
        except missing_extra as exc:
            print(f"  {info.name}: needs an extra ({exc})")
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            problems.append(f"import {info.name}: {type(exc).__name__}: {exc}")
        else:
            imported.append(info.name)
    return imported, problems


def main() -> int:
    import kdcore

    package_dir = Path(kdcore.__file__).resolve().parent
    print(f"checking {package_dir} with {sys.executable}")
    core, extras = declared()
    print(f"  core: {sorted(core)}; extras: { {k: sorted(v) for k, v in extras.items()} }")
    problems = undeclared_imports(package_dir, core, extras)
    imported, import_problems = import_every_module()
    problems += import_problems
    print(f"  imported {len(imported)} modules")
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
