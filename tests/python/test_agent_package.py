"""kdcore.agent as a package: importing it stays light."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, kdcore.agent\n"
        "heavy = {'transformers', 'tokenizers', 'triton'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
