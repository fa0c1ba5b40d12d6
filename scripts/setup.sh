#!/usr/bin/env bash
# Set up .venv with everything the course needs: torch first (CPU 2.13.0 unless a torch is
# already installed there, e.g. a CUDA build you chose), then minisd and its book and test
# extras, constrained to the tested versions in constraints.txt. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python >= 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip

# torch first: the CPU wheel 2.13.0, unless this venv already has a torch (keep it: a GPU
# owner installs a CUDA build here before running this script, see README.md).
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch 2.13.0 (CPU)"
  $PIP install -q "torch==2.13.0"
fi
TORCH_VERSION=$(.venv/bin/python -W ignore -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)

# Everything else, with torch pinned to the installed one so that nothing (a package that
# wants torchvision, say) can swap it for another build.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
sed "s/^torch==.*/torch==$TORCH_VERSION/" constraints.txt > "$CONSTRAINTS"
echo "setup: installing minisd and its book/test dependencies (torch $TORCH_VERSION kept)"
$PIP install -q -c "$CONSTRAINTS" -e ".[dev]"
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
if .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
  echo "setup: torchvision got installed; it swaps torch builds here, remove it" >&2; exit 1
fi
echo "setup: ready (.venv, torch $TORCH_VERSION, $(.venv/bin/python -c 'import minisd; print("minisd", minisd.__version__)'))"
