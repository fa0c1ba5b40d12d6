"""Sphinx extension: show a notebook's progress bars as a terminal would.

tqdm redraws its bar with carriage returns, and a notebook stores each redraw; Jupyter
shows only the last one, but the HTML book would print every redraw on its own line.
Before myst-nb parses a notebook, this merges each cell's consecutive stream outputs and
keeps, on every line, only the text after the last carriage return (what nbconvert's
`coalesce_streams` does). The .ipynb files themselves are not changed.
"""
import json
import re

_REDRAWN = re.compile(r"[^\n]*\r(?=[^\n])")  # text that a later \r on the same line overwrote


def tidy(cells):
    for cell in cells:
        merged = []
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and merged
                    and merged[-1].get("output_type") == "stream" and merged[-1]["name"] == out["name"]):
                merged[-1]["text"] = "".join(merged[-1]["text"]) + "".join(out["text"])
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                text = _REDRAWN.sub("", "".join(out["text"]).replace("\r\n", "\n"))
                out["text"] = text.rstrip("\r")
        if "outputs" in cell:
            cell["outputs"] = merged
    return cells


def _source_read(app, docname, source):
    if not app.env.doc2path(docname).endswith(".ipynb"):
        return
    nb = json.loads(source[0])
    tidy(nb.get("cells", []))
    source[0] = json.dumps(nb)


def setup(app):
    app.connect("source-read", _source_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
