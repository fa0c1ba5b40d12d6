"""Check that every notebook in book/ has its paired py:percent file and that they agree.

The .ipynb (with outputs) is what nbval and the book use; the .py is what reviewers read.
After editing one, `jupytext --sync book/NN_name.ipynb` brings the other up to date.
"""
import sys
from pathlib import Path

import jupytext

BOOK = Path(__file__).resolve().parent.parent / "book"


def main():
    problems = []
    notebooks = sorted(BOOK.glob("*.ipynb"))
    for nb_path in notebooks:
        py_path = nb_path.with_suffix(".py")
        if not py_path.exists():
            problems.append(f"{nb_path.name}: no paired {py_path.name} (jupytext --set-formats ipynb,py:percent)")
            continue
        nb = jupytext.read(nb_path)
        formats = nb.metadata.get("jupytext", {}).get("formats", "")
        if "py:percent" not in formats:
            problems.append(f"{nb_path.name}: not paired with py:percent (metadata formats={formats!r})")
        expected = jupytext.writes(nb, fmt="py:percent")
        if py_path.read_text() != expected:
            problems.append(f"{nb_path.name} and {py_path.name} differ: run jupytext --sync {nb_path.relative_to(BOOK.parent)}, "
                            "then re-execute the notebook if its code changed")
    for py_path in sorted(BOOK.glob("[0-9]*.py")):
        if not py_path.with_suffix(".ipynb").exists():
            problems.append(f"{py_path.name}: no executed {py_path.with_suffix('.ipynb').name} beside it")
    for p in problems:
        print("pairing:", p, file=sys.stderr)
    print(f"pairing: {len(notebooks)} notebooks checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
