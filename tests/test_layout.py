"""The repository's folders never shadow installed packages of the same name.

The root is the `dejavu` package; kernels/, runtime/, ... have no __init__.py, so a process
started in the root (``python -m pytest``, ``python -c ...``) that imports a PyPI package named
like one of them (transformers imports ``kernels``) gets the installed package.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["kernels", "runtime", "scheduler", "workers", "tools", "bench"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_top_level_folders_are_not_regular_packages(folder):
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists(), (
        f"{folder}/__init__.py makes '{folder}' importable from the repository root, where it "
        "shadows any installed package of that name")


def test_transformers_imports_from_the_repository_root():
    code = ("import transformers; from transformers import OPTForCausalLM; "
            "import dejavu.kernels.sparse_mlp as m; print(m.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).resolve() == ROOT / "kernels" / "sparse_mlp.py"
