"""Optional dependencies: imported where a feature needs them, never by ``import kdcore``.

A feature whose extra is not installed raises :class:`MissingExtraError`, an
``ImportError`` whose message names the ``pip install "kdcore[extra]"`` that
brings it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra name -> the distributions it installs (kept in step with pyproject.toml).
EXTRAS = {
    "plot": ("matplotlib",),
    "hf": ("transformers", "trl", "datasets"),
}


class MissingExtraError(ImportError):
    """A feature needs an optional dependency that is not installed."""


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Imports ``module`` or raises :class:`MissingExtraError` naming ``extra``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{feature} needs {top}, which is not installed (or failed to import: {exc}). "
            f'Install it with: pip install "kdcore[{extra}]"',
            name=top,
        ) from exc
