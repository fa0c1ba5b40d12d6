"""Root conftest: lets `pytest` and `pytest --nbval book/` run from a fresh clone.

- the repo root goes on PYTHONPATH, so notebook kernels (which inherit the environment)
  import this checkout's minisd even before `pip install -e .`;
- nbval gets the project's sanitize file unless one is given;
- `gpu`-marked tests skip cleanly where CUDA is not available.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    if hasattr(config.option, "nbval_sanitize_with") and not (
            config.option.nbval_sanitize_with or config.option.sanitize_with):
        config.option.nbval_sanitize_with = str(ROOT / "book" / "sanitize.cfg")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
