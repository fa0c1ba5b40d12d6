"""Draw the figures that Markdown pages of the book show (the notebooks draw their own).

    python scripts/make_figures.py          # writes book/images/*.png

tests/test_data.py checks that the committed files are what this script draws today.
"""
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minisd import data  # noqa: E402


def course_data(path):
    images, captions = data.sample(12, seed=2026)
    fig = data.show(images, captions, ncols=6, fontsize=10)
    fig.savefig(path, dpi=100, metadata={"Software": None})


FIGURES = {"course_data.png": course_data}


def main(out_dir=ROOT / "book" / "images"):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(out_dir / name)
        print(out_dir / name)


if __name__ == "__main__":
    main(*sys.argv[1:])
