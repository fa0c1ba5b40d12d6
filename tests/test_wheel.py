"""A wheel that works: built from a clean copy of the committed tree, installed (not editable)
into a fresh virtual environment, it generates an image from another directory with nothing
but its own files (code, BPE vocabulary, course checkpoints).

The new environment reuses the dependencies already installed for the running interpreter
(torch, numpy, ...) through a .pth file, so the test costs seconds, not a torch download;
the editable minisd of that environment is not visible there (a path added by a .pth file
does not run that folder's own .pth files), and the test checks where minisd was imported from.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _setuptools_version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return tuple(int(p) for p in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return (0,)


def test_wheel_installs_and_generates(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout (the wheel is built from the committed tree)")
    # a clean copy of what is committed: no untracked files, no build outputs
    src = tmp_path / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"], capture_output=True,
                             timeout=300, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MINISD_DATA")}
    # build with the installed setuptools when it is recent enough (no network), else in pip's isolation
    isolation = [] if _setuptools_version() >= (77,) else ["--use-pep517"]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *(isolation or ["--no-build-isolation"]), "-q",
          "-w", str(tmp_path / "dist"), str(src)], env=env, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("minisd-*.whl"))

    # a fresh venv whose site-packages also sees this interpreter's dependencies (not its minisd)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     env=env).stdout.strip())
    deps = sysconfig.get_paths()["purelib"]
    (site / "_minisd_test_deps.pth").write_text(deps + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         env=env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import minisd, minisd.paths as p; print(minisd.__file__); print(p.DATA_DIR)"],
                 env=env, cwd=elsewhere).stdout.split()
    assert Path(where[0]).is_relative_to(site) and Path(where[1]) == site / "minisd" / "_data", where
    out = elsewhere / "x.png"
    _run([str(python), "-m", "minisd", "generate", "a red circle in the top left", "--out", "x.png"],
         env=env, cwd=elsewhere)
    from PIL import Image
    image = Image.open(out)
    assert image.size == (32, 32) and image.mode == "RGB"
