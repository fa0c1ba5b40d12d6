"""Where the package's data lives: the CLIP vocabulary and the course checkpoints.

One copy, the repository's top-level `data/`. A checkout (or an editable install) reads it
there; a wheel carries the same files as `minisd/_data/` (the build maps `data/` onto it, see
setup.py). `MINISD_DATA=/some/folder` overrides both.
"""
import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def data_dir():
    """The folder of vocabulary and checkpoints: $MINISD_DATA, else the wheel's minisd/_data,
    else the checkout's data/ beside the package."""
    if os.environ.get("MINISD_DATA"):
        return Path(os.environ["MINISD_DATA"])
    installed = _HERE / "_data"
    return installed if installed.is_dir() else _HERE.parent / "data"


DATA_DIR = data_dir()
