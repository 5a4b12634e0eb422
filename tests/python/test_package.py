"""The installed package: cheap import, stubs, public API surface."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import kdcore


def test_import_does_not_pull_in_triton_or_transformers():
    code = (
        "import sys, kdcore; "
        "bad = [m for m in ('triton', 'transformers') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


def test_typing_files_ship_with_the_package():
    root = pathlib.Path(kdcore.__file__).parent
    assert (root / "py.typed").exists()
    assert (root / "_native.pyi").exists()


def test_native_extension_reports_a_simd_level():
    assert kdcore.simd_level() in {"avx512", "avx2+fma", "portable", "neon"}


def test_span_ids():
    assert [int(s) for s in kdcore.Span] == [0, 1, 2, 3]
    assert kdcore.Span.ACT.name == "ACT"
