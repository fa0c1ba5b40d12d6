"""Sphinx extension: serve MathJax from the built book itself, not from a CDN.

A reader who opens the book without a network (offline, behind a firewall) would see raw
TeX if the pages loaded MathJax from cdn.jsdelivr.net. This extension points Sphinx's
`mathjax_path` at `_static/mathjax/tex-mml-chtml.js` and, when the HTML build finishes,
copies MathJax 3's `es5` folder (the combined components, the CHTML fonts and the
extensions that the TeX input loads on demand) from the installed, pinned
`django-static-mathjax` package into the build's `_static/mathjax/`. MathJax itself is
never committed: the copy is made at every build from the package.
"""
import shutil
from pathlib import Path

from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

TARGET = "mathjax"                    # under the build's _static/
ENTRY = "tex-mml-chtml.js"           # the combined component jupyter-book's default CDN URL names


def mathjax_es5():
    """The es5 folder of MathJax 3 shipped by django-static-mathjax (import name `mathjax`)."""
    try:
        import mathjax  # django-static-mathjax: MathJax 3 as static files
    except ImportError as e:
        raise ExtensionError("offline_mathjax: the package django-static-mathjax is not installed "
                             "(it is in minisd's `book` extra: pip install -e '.[book]')") from e
    root = Path(mathjax.__file__).parent / "static" / "mathjax"
    es5 = root / "es5"
    if not (es5 / ENTRY).is_file() or not (es5 / "output" / "chtml" / "fonts" / "woff-v2").is_dir():
        raise ExtensionError(f"offline_mathjax: {es5} does not hold MathJax 3's {ENTRY} and CHTML fonts")
    return root, es5


def _config_inited(app, config):
    mathjax_es5()  # fail early, before any page is read, if the package is missing
    if "://" in config.mathjax_path or config.mathjax_path.startswith("//"):
        # a CDN address (Sphinx's default): use the local copy instead
        config.mathjax_path = f"{TARGET}/{ENTRY}"  # relative: Sphinx serves it from _static/


def _build_finished(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    root, es5 = mathjax_es5()
    dest = Path(app.outdir) / "_static" / TARGET
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(es5, dest)
    shutil.copy2(root / "LICENSE", dest / "LICENSE")  # Apache 2.0: the licence travels with the copy
    logger.info(f"offline_mathjax: MathJax copied to {dest}")


def setup(app):
    app.connect("config-inited", _config_inited, priority=900)
    app.connect("build-finished", _build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
