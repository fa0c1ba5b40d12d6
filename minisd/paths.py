"""Where the package's data lives (the CLIP vocabulary and the course checkpoints), and how
every file the package writes gets there: atomically (`write_atomically`, `write_text`).

One copy, the repository's top-level `data/`. A checkout (or an editable install) reads it
there; a wheel carries the same files as `minisd/_data/` (the build maps `data/` onto it, see
setup.py). `MINISD_DATA=/some/folder` overrides both.
"""
import os
import tempfile
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


def write_atomically(path, write):
    """Write `path` so that it is never half-written: `write(tmp)` fills a temporary file in the
    same folder (same suffix, so formats that go by it still know it), which is then renamed over
    `path` in one step (os.replace). A crash, a kill or a full disk mid-write leaves the old file
    whole and no temporary file behind. Every file the package writes goes through here."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: give the final file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text):
    """`Path(path).write_text(text)`, atomically (the trainers' JSON logs, the evaluation tables)."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
