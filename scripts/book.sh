#!/usr/bin/env bash
# Set everything up, execute every notebook afresh and build the book.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rm -rf _build
.venv/bin/jupyter-book build . --all -W -n --keep-going
echo
echo "The book is in $PWD/_build/html/index.html"
