"""The book's table of contents and its notebooks agree."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for entry in toc.get("chapters", []) or []:
        files.append(entry["file"])
    for part in toc.get("parts", []) or []:
        files += [entry["file"] for entry in part.get("chapters", [])]
    return files


def test_every_notebook_is_in_the_toc_and_every_toc_entry_exists():
    listed = _toc_files()
    for f in listed:
        assert (ROOT / f"{f}.ipynb").exists() or (ROOT / f"{f}.md").exists(), f"_toc.yml lists {f}, which does not exist"
    # book/NN_x_cells.ipynb: cells written apart, to be appended into chapter NN (not a page of their own)
    notebooks = {f"book/{p.stem}" for p in (ROOT / "book").glob("*.ipynb") if not p.stem.endswith("_cells")}
    missing = notebooks - set(listed)
    assert not missing, f"notebooks not in _toc.yml (the book would not show them): {sorted(missing)}"


def test_chapters_are_in_course_order():
    chapters = [f for f in _toc_files() if f.startswith("book/") and f[5:7].isdigit()]
    numbers = [int(f[5:7]) for f in chapters]
    assert numbers == sorted(numbers)


def test_progress_bar_redraws_collapse_in_the_book():
    import sys
    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    from tidy_streams import tidy
    cells = [{"cell_type": "code", "outputs": [
        {"output_type": "stream", "name": "stderr", "text": ["\rtrain:  0%| 0/2"]},
        {"output_type": "stream", "name": "stderr", "text": ["\rtrain: 50%| 1/2", "\rtrain: 100%| 2/2\n"]},
        {"output_type": "stream", "name": "stdout", "text": ["a\r\n", "b\n"]},
    ]}]
    out = tidy(cells)[0]["outputs"]
    assert [o["name"] for o in out] == ["stderr", "stdout"]
    assert out[0]["text"] == "train: 100%| 2/2\n"
    assert out[1]["text"] == "a\nb\n"
